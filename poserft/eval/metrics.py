"""Evaluation metrics: MPJPE, PA-MPJPE (millimetres) and text<->pose Recall@K (percent).

The benchmarks' view of the metrics, which live where the layers below ``eval`` can import
them: joint errors in :mod:`poserft.body.metrics`, Recall@K in
:mod:`poserft.retrieval.metrics`. Code in ``body``..``rl`` imports those modules directly
(imports flow one way: tests/test_layering.py).
"""

from __future__ import annotations

from poserft.body.metrics import mpjpe, pa_mpjpe, similarity_procrustes
from poserft.retrieval.metrics import retrieval_recall, sample_retrieval_candidates

__all__ = ["mpjpe", "pa_mpjpe", "similarity_procrustes", "retrieval_recall",
           "sample_retrieval_candidates"]
