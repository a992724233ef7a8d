"""Published numbers printed beside ours in the tables, where the dataset matches.

Each entry is one method's row on one benchmark, with the metric keys of our
``metrics.json`` (relative to ``image2pose.<dataset>.`` / ``text2pose.<dataset>.``), so the
tables can put it in the same columns. Only values that were checked against the paper
belong here, each with its citation (paper, table). A value we are not sure of is left out:
a wrong reference number is worse than none.

Current state: EMPTY on purpose. The Pose-RFT paper (Li et al., "Pose-RFT: Enhancing MLLMs
for 3D Pose Generation via Hybrid Action Reinforcement Fine-Tuning", arXiv:2508.07804,
Tables 1-3: 3DPW / Human3.6M MPJPE and PA-MPJPE, PoseScript RT2P/RP2T Recall@5/10/20 and
mRecall) could not be consulted while this was written (no network access to the paper's
tables), so no value is recorded. To add one, append a :class:`PaperResult`, e.g.::

    PaperResult(method="Pose-RFT", table="image2pose", dataset="pw3d",
                metrics={"mpjpe": ..., "pa_mpjpe": ...},
                source="arXiv:2508.07804, Table 1")

Rows only appear for datasets that our evaluation also scored (the synthetic world never
matches a published benchmark).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["PaperResult", "PAPER_RESULTS", "paper_rows"]


@dataclass(frozen=True)
class PaperResult:
    """One published row: ``metrics`` keys as in our metrics.json below the dataset level
    (image2pose: ``mpjpe``, ``pa_mpjpe``; text2pose: ``protocol1.t2p_R@5`` ... ``protocol2.mRecall``)."""

    method: str
    table: str            # "image2pose" | "text2pose"
    dataset: str          # our dataset name (pw3d, h36m, posescript, ...)
    metrics: dict[str, float] = field(default_factory=dict)
    source: str = ""      # citation: paper + table

    def __post_init__(self):
        if self.table not in ("image2pose", "text2pose"):
            raise ValueError(f"PaperResult {self.method!r}: table must be image2pose or "
                             f"text2pose, got {self.table!r}")
        if not self.source:
            raise ValueError(f"PaperResult {self.method!r} ({self.dataset}): a citation "
                             "(source) is required")


PAPER_RESULTS: tuple[PaperResult, ...] = ()


def paper_rows(table: str, datasets: list[str],
               results: tuple[PaperResult, ...] | list[PaperResult] | None = None
               ) -> list[PaperResult]:
    """Published rows of ``table`` whose dataset is among ``datasets`` (ours), in order."""
    results = PAPER_RESULTS if results is None else results
    return [r for r in results if r.table == table and r.dataset in datasets]
