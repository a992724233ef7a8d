"""``results/report/summary.md``: one page with the tables, figures, retrieval models and RFT
before/after rewards, which ``snakemake --report report.html`` links alongside the files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Sequence

from poserft.atomic import write_text
from poserft.eval.tables import flatten_metrics, parse_run_path

__all__ = ["write_summary"]


def _rel(target: str | os.PathLike, start: Path) -> str:
    return Path(os.path.relpath(Path(target).resolve(), start.resolve())).as_posix()


def _recall_lines(recall_files: Mapping[str, str | os.PathLike]) -> list[str]:
    lines = ["## Retrieval models", "",
             "Recall@K of the text-pose retrieval models on the test split (their own "
             "recall.json; the evaluator scores Table 2).", ""]
    for role, path in recall_files.items():
        data = json.loads(Path(path).read_text())
        flat = {k: v for k, v in flatten_metrics(data).items() if "mRecall" in k}
        shown = ", ".join(f"{k} {v:.1f}" for k, v in sorted(flat.items())) or "no mRecall entries"
        lines.append(f"* **{role}**: {shown}")
    return lines + [""]


def _rft_lines(rft_summaries: Sequence[str | os.PathLike]) -> list[str]:
    if not rft_summaries:
        return []
    lines = ["## RFT: held-out rewards before -> after", "",
             "Paired delta: mean over the same held-out prompts of (after - before) of the "
             "per-prompt mean reward, with its standard error and t = delta / SE.", "",
             "| Run | Mode | RL steps | Metric | Before | After | Delta | Paired delta ± SE (t) |",
             "|---|---|---:|---|---:|---:|---:|---:|"]
    for path in rft_summaries:
        variant, seed = parse_run_path(Path(path).parent.parent / "metrics.json")
        s = json.loads(Path(path).read_text())
        before, after = s.get("heldout_before") or {}, s.get("heldout_after") or {}
        paired = s.get("heldout_paired") or {}
        for key in sorted(set(before) & set(after)):
            if key.endswith(("n_candidates", "_se")):
                continue
            p = paired.get(key)
            pcell = f"{p['delta']:+.4g} ± {p['se']:.2g} ({p['t']:+.1f})" if p else ""
            lines.append(f"| {variant}/seed{seed} | {s.get('mode', '')} | {s.get('rl_steps', '')} | "
                         f"{key} | {before[key]:.4g} | {after[key]:.4g} | {after[key] - before[key]:+.4g} "
                         f"| {pcell} |")
    return lines + [""]


def write_summary(out_md: str | os.PathLike, tables_md: str | os.PathLike,
                  figures: Mapping[str, str | os.PathLike],
                  recall_files: Mapping[str, str | os.PathLike] | None = None,
                  rft_summaries: Sequence[str | os.PathLike] = (),
                  variants: Mapping[str, str] | None = None) -> Path:
    """Assemble the summary page (atomic write); figure links are relative to ``out_md``.

    figures: caption -> PNG path. recall_files: role -> recall.json. rft_summaries: the
    ``results/runs/{variant}/seed{seed}/rft/rft_summary.json`` files.
    """
    out = Path(out_md)
    here = out.parent
    here.mkdir(parents=True, exist_ok=True)
    parts = ["# Pose-RFT reproduction: summary", ""]
    if variants:
        parts += [f"{len(variants)} variants: " + ", ".join(f"`{v}`" for v in variants)
                  + " (descriptions in the table below).", ""]
    tables = Path(tables_md).read_text(encoding="utf-8")
    # demote the tables page's headings one level below this page's title
    parts += [("#" + line) if line.startswith("#") else line for line in tables.splitlines()]
    parts += [""]
    if recall_files:
        parts += _recall_lines(recall_files)
    parts += _rft_lines(list(rft_summaries))
    if figures:
        parts += ["## Figures", ""]
        for caption, path in figures.items():
            parts += [f"### {caption}", "", f"![{caption}]({_rel(path, here)})", ""]
    return write_text(out, "\n".join(parts) + "\n")
