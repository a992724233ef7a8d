"""Evaluation: metrics (MPJPE, PA-MPJPE, Recall@K), benchmark runners, tables, plots."""
