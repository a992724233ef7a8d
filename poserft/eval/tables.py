"""Result tables in the layout of the paper's Tables 1-3, from per-run ``metrics.json`` files.

Input: ``results/runs/{variant}/seed{seed}/metrics.json`` (written by
:func:`poserft.eval.runner.evaluate_variant`); the variant and seed come from the path.
Rows are variants (in config order); with several seeds a cell shows
``mean ± std`` over seeds (sample standard deviation, ``ddof=1``), with one seed the value.

* Table 1, image->pose: MPJPE / PA-MPJPE (mm, LSP-14, pelvis-aligned) per dataset, plus
  the best-of-N columns.
* Table 2, text->pose: RT2P / RP2T Recall@5/10/20 and mRecall (%), protocol 1 (full) and
  protocol 2 (N=32 candidates, R=10 repeats), per dataset.
* Table 2 also has MPJPE / PA-MPJPE (mm) of the generated poses against the captions'
  ground-truth poses (yaw-free); they do not depend on the protocol and repeat on its rows.
* Table 3, ablations: groups of variants (each variant's ``ablations`` in the config) on
  the key metrics.

Bounds (design.md, "Floors and ceilings"): given ``results/reference/metrics.json``
(:func:`poserft.eval.runner.evaluate_reference`), every table also gets the rows
"chance" (recall columns only) and "mean pose (floor)" above the variants and
"oracle (GT poses)" below them (:data:`BOUND_LABELS`). They are computed once, on the
same test rows, and are neither seeds nor models nor published numbers: italic in
Markdown, ``kind = bound`` (and ``n = 0``) in the CSV files.

Each table is written as Markdown (``.md``, cells formatted) and CSV (``.csv``, numeric:
``<column>`` mean, ``<column> std``, ``<column> n``, then ``reference`` (citation) and
``kind``: variant, bound or paper). ``main.md`` holds all three plus the published numbers
(:mod:`poserft.eval.paper_results`) where the dataset matches.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from poserft.atomic import write_text
from poserft.eval.paper_results import PaperResult, paper_rows

__all__ = ["Stat", "Column", "Row", "Table", "Ablation", "ablations_from", "DATASET_LABELS",
           "MetricsFileError", "parse_run_path", "flatten_metrics", "load_runs",
           "aggregate_seeds", "aggregate_runs", "image2pose_table", "text2pose_table",
           "ablation_table", "render_markdown", "table_frame", "build_tables", "TABLE_FILES",
           "BOUND_LABELS", "load_reference", "reference_stats"]

DATASET_LABELS = {"synthetic": "Synthetic", "pw3d": "3DPW", "h36m": "H36M",
                  "mpi_inf_3dhp": "MPI-INF-3DHP", "posescript": "PoseScript"}
_PROTOCOL_LABELS = {"protocol1": "P1 (full)", "protocol2": "P2 (N=32, R=10)"}
_MISSING = "–"

# Bounds of results/reference/metrics.json (key below "<task>.<dataset>.") -> row label.
BOUND_LABELS = {"chance": "chance", "mean_pose": "mean pose (floor)",
                "oracle": "oracle (GT poses)"}
_FLOORS = ("chance", "mean_pose")          # rows above the variants
_CEILINGS = ("oracle",)                    # rows below them
_BOUNDS_NOTE = ("Rows in italics are bounds, not models (results/reference/metrics.json, "
                "computed once on the same test rows, no seeds): *mean pose (floor)* predicts "
                "the train split's mean pose for every input; *chance* is the exact chance "
                "recall of the protocol (K/M against all M test captions/poses, K/N against N "
                "sampled candidates); *oracle (GT poses)* scores the ground-truth poses through "
                "the same evaluator and joint errors. A variant's number means something only "
                "between its floor and ceiling.")

# Output files of build_tables (keys of its ``out_paths``).
TABLE_FILES = ("main_md", "main_csv", "image2pose_md", "image2pose_csv", "text2pose_md",
               "text2pose_csv", "ablation_md", "ablation_csv")


class MetricsFileError(ValueError):
    """A metrics.json is missing, unreadable, or not where the run layout says."""


# ------------------------------------------------------------------------------ inputs --
_RUN_PATH = re.compile(r"(?:^|/)(?P<variant>[^/]+)/seed(?P<seed>\d+)/metrics\.json$")


def parse_run_path(path: str | os.PathLike) -> tuple[str, int]:
    """``.../{variant}/seed{seed}/metrics.json`` -> (variant, seed)."""
    m = _RUN_PATH.search(Path(path).as_posix())
    if not m:
        raise MetricsFileError(f"{path}: not a run metrics path; expected "
                               "results/runs/{variant}/seed{seed}/metrics.json")
    return m["variant"], int(m["seed"])


def flatten_metrics(obj: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested metrics -> ``{"image2pose.synthetic.mpjpe": 81.2, ...}`` (numbers only;
    strings, lists and booleans are metadata and dropped)."""
    out: dict[str, float] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_metrics(value, f"{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


@dataclass
class Run:
    variant: str
    seed: int
    path: Path
    metrics: dict[str, float]


def load_runs(paths: Iterable[str | os.PathLike]) -> list[Run]:
    """Read every metrics.json; one error names the bad file and what is wrong."""
    runs, seen = [], {}
    for path in paths:
        path = Path(path)
        variant, seed = parse_run_path(path)
        if (variant, seed) in seen:
            raise MetricsFileError(f"{path}: run {variant}/seed{seed} given twice "
                                   f"(also {seen[(variant, seed)]})")
        data = _read_metrics_json(path, "evaluate")
        seen[(variant, seed)] = path
        runs.append(Run(variant, seed, path, flatten_metrics(data)))
    return runs


def _read_metrics_json(path: Path, rule: str) -> dict:
    """A metrics JSON object; one error names the file, the problem and the rule to rerun."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MetricsFileError(f"{path}: metrics file does not exist (run `snakemake "
                               f"{path}` first, rule {rule})") from None
    except json.JSONDecodeError as exc:
        raise MetricsFileError(f"{path}: not valid JSON ({exc}); delete it and rerun the "
                               f"{rule} rule") from None
    if not isinstance(data, dict):
        raise MetricsFileError(f"{path}: expected a JSON object of metrics")
    return data


def load_reference(path: str | os.PathLike) -> dict[str, float]:
    """Flat metrics of ``results/reference/metrics.json``; one error names the file."""
    data = _read_metrics_json(Path(path), "evaluate_reference")
    return flatten_metrics({k: v for k, v in data.items() if k != "meta"})


_BOUND_KEY = re.compile(rf"^(?P<task>image2pose|text2pose)\.(?P<ds>[^.]+)\."
                        rf"(?P<bound>{'|'.join(BOUND_LABELS)})\.(?P<rest>.+)$")


def reference_stats(flat: Mapping[str, float]) -> dict[str, dict[str, Stat]]:
    """Reference metrics -> bound name -> metric key in the variants' layout -> Stat:
    ``text2pose.synthetic.oracle.protocol1.mRecall`` becomes
    ``{"oracle": {"text2pose.synthetic.protocol1.mRecall": Stat}}`` (n = 0: not seeds)."""
    out: dict[str, dict[str, Stat]] = {}
    for key, value in flat.items():
        m = _BOUND_KEY.match(key)
        if m and math.isfinite(value):
            out.setdefault(m["bound"], {})[f"{m['task']}.{m['ds']}.{m['rest']}"] = \
                Stat(float(value), None, 0, (float(value),))
    return out


# ---------------------------------------------------------------------------- numerics --
@dataclass(frozen=True)
class Stat:
    """Mean and sample std (``ddof=1``; None with one value) over seeds."""

    mean: float
    std: float | None
    n: int
    values: tuple[float, ...] = ()


def aggregate_seeds(values: Sequence[float]) -> Stat | None:
    """Finite values -> :class:`Stat`; None if there is none (a NaN seed is left out and
    shows in ``n``)."""
    arr = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return None
    std = float(np.std(arr, ddof=1)) if arr.size > 1 else None
    return Stat(float(np.mean(arr)), std, int(arr.size), tuple(float(v) for v in arr))


def aggregate_runs(runs: Sequence[Run]) -> dict[str, dict[str, Stat]]:
    """variant -> metric key -> :class:`Stat` over that variant's seeds."""
    by_variant: dict[str, list[Run]] = {}
    for run in runs:
        by_variant.setdefault(run.variant, []).append(run)
    out: dict[str, dict[str, Stat]] = {}
    for variant, vruns in by_variant.items():
        keys = sorted({k for r in vruns for k in r.metrics})
        stats = {k: aggregate_seeds([r.metrics.get(k, math.nan) for r in vruns]) for k in keys}
        out[variant] = {k: s for k, s in stats.items() if s is not None}
    return out


# ------------------------------------------------------------------------------ tables --
@dataclass(frozen=True)
class Column:
    """One numeric column: ``key`` is the metric key below the row's prefix."""

    label: str
    key: str
    decimals: int = 1
    scale: float = 1.0   # e.g. 100 to show a rate in percent


@dataclass
class Row:
    index: tuple[str, ...]                  # values of the table's index columns
    cells: dict[str, Stat]                  # Column.label -> statistic
    reference: str = ""                     # citation for a published row
    kind: str = ""                          # "variant", "bound", "paper" ("": from reference)

    @property
    def row_kind(self) -> str:
        return self.kind or ("paper" if self.reference else "variant")


@dataclass
class Table:
    name: str
    title: str
    index_names: tuple[str, ...]
    columns: list[Column]
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _datasets(agg: Mapping[str, Mapping[str, Stat]], task: str, leaf: str) -> list[str]:
    """Datasets with metric ``{task}.{ds}.{leaf}`` in any run, synthetic first."""
    pattern = re.compile(rf"^{task}\.([^.]+)\.{re.escape(leaf)}$")
    found = {m[1] for stats in agg.values() for k in stats if (m := pattern.match(k))}
    order = list(DATASET_LABELS)
    return sorted(found, key=lambda d: (order.index(d) if d in order else len(order), d))


def _label(ds: str) -> str:
    return DATASET_LABELS.get(ds, ds)


def _ordered_variants(agg: Mapping[str, Any], variants: Sequence[str] | None) -> list[str]:
    """Config order first, then any other variant that has metrics (alphabetical)."""
    known = [v for v in (variants or []) if v in agg]
    return known + sorted(set(agg) - set(known))


def _cells(stats: Mapping[str, Stat], prefix: str, columns: Sequence[Column]) -> dict[str, Stat]:
    return {c.label: stats[prefix + c.key] for c in columns if prefix + c.key in stats}


def _paper_stat(value: float) -> Stat:
    return Stat(float(value), None, 0, (float(value),))


def _best_of_n_label(agg: Mapping[str, Mapping[str, Stat]], ds: str) -> str:
    ns = {int(s[f"image2pose.{ds}.best_of_n"].mean) for s in agg.values()
          if f"image2pose.{ds}.best_of_n" in s}
    return f"best-of-{ns.pop()}" if len(ns) == 1 else "best-of-N"


def _bound_rows(bounds: Mapping[str, Mapping[str, Stat]] | None, names: Sequence[str],
                index: Callable[[str], tuple[str, ...]], prefix: str | Sequence[tuple[str, Sequence[Column]]],
                columns: Sequence[Column] = ()) -> list[Row]:
    """Rows of the bounds ``names`` that have at least one cell. ``prefix``: one key prefix
    for ``columns``, or (prefix, columns) pairs."""
    parts = [(prefix, columns)] if isinstance(prefix, str) else list(prefix)
    rows = []
    for name in names:
        stats = (bounds or {}).get(name)
        if not stats:
            continue
        cells: dict[str, Stat] = {}
        for pre, cols in parts:
            cells.update(_cells(stats, pre, cols))
        if cells:
            rows.append(Row(index(BOUND_LABELS[name]), cells, kind="bound"))
    return rows


def image2pose_table(agg: Mapping[str, Mapping[str, Stat]], variants: Sequence[str] | None = None,
                     paper: Sequence[PaperResult] | None = None,
                     bounds: Mapping[str, Mapping[str, Stat]] | None = None) -> Table:
    """Table 1: rows = bounds below, variants, bounds above, published rows; columns =
    MPJPE / PA-MPJPE per dataset."""
    datasets = _datasets({**agg, **{f"bound:{k}": v for k, v in (bounds or {}).items()}},
                         "image2pose", "mpjpe")
    columns: list[Column] = []
    for ds in datasets:
        bon = _best_of_n_label(agg, ds)
        columns += [Column(f"{_label(ds)} MPJPE", f"{ds}.mpjpe"),
                    Column(f"{_label(ds)} PA-MPJPE", f"{ds}.pa_mpjpe")]
        if any(f"image2pose.{ds}.best_of_n_mpjpe" in s for s in agg.values()):
            columns += [Column(f"{_label(ds)} MPJPE ({bon})", f"{ds}.best_of_n_mpjpe"),
                        Column(f"{_label(ds)} PA-MPJPE ({bon})", f"{ds}.best_of_n_pa_mpjpe")]
    table = Table("image2pose", "Table 1. Image-to-pose: MPJPE / PA-MPJPE (mm, lower is better; "
                  "LSP-14 joints, pelvis-aligned)", ("Method",), columns)
    index = lambda label: (label,)
    table.rows += _bound_rows(bounds, _FLOORS, index, "image2pose.", columns)
    for v in _ordered_variants(agg, variants):
        table.rows.append(Row((v,), _cells(agg[v], "image2pose.", columns), kind="variant"))
    table.rows += _bound_rows(bounds, _CEILINGS, index, "image2pose.", columns)
    for result in paper_rows("image2pose", datasets, paper):
        cells = {c.label: _paper_stat(result.metrics[c.key.split(".", 1)[1]]) for c in columns
                 if c.key.split(".", 1)[0] == result.dataset and c.key.split(".", 1)[1] in result.metrics}
        table.rows.append(Row((f"{result.method} (paper)",), cells, reference=result.source,
                              kind="paper"))
    if any(r.kind == "bound" for r in table.rows):
        table.notes.append(_BOUNDS_NOTE + " Image rows: the oracle predicts the ground-truth "
                           "pose with the predictions' shape (eval.pred_betas).")
    return table


_RECALL_COLUMNS = [Column(f"{d} R@{k}", f"{p}_R@{k}") for d, p in (("RT2P", "t2p"), ("RP2T", "p2t"))
                   for k in (5, 10, 20)] + [Column("mRecall", "mRecall")]
# per dataset, not per protocol: the same generated poses (repeated on each protocol's row)
_TEXT_ERROR_COLUMNS = [Column("MPJPE", "mpjpe"), Column("PA-MPJPE", "pa_mpjpe")]


def text2pose_table(agg: Mapping[str, Mapping[str, Stat]], variants: Sequence[str] | None = None,
                    paper: Sequence[PaperResult] | None = None,
                    bounds: Mapping[str, Mapping[str, Stat]] | None = None) -> Table:
    """Table 2: rows = (dataset, protocol, method), columns = Recall@K (%), mRecall and,
    when the runs have them, MPJPE / PA-MPJPE (mm) of the generated poses."""
    everything = {**agg, **{f"bound:{k}": v for k, v in (bounds or {}).items()}}
    p1 = _datasets(everything, "text2pose", "protocol1.mRecall")
    datasets = p1 + [d for d in _datasets(everything, "text2pose", "protocol2.mRecall")
                     if d not in p1]
    errors = [c for c in _TEXT_ERROR_COLUMNS
              if any(re.match(rf"^text2pose\.[^.]+\.{c.key}$", k) for st in everything.values()
                     for k in st)]
    table = Table("text2pose", "Table 2. Text-to-pose: Recall@K (%, higher is better) with the "
                  "evaluator retrieval model" + ("; MPJPE / PA-MPJPE (mm, lower is better) of "
                                                 "the generated pose against the caption's "
                                                 "pose, root yaw removed" if errors else ""),
                  ("Dataset", "Protocol", "Method"), list(_RECALL_COLUMNS) + errors)
    published = paper_rows("text2pose", datasets, paper)
    for ds in datasets:
        for protocol, plabel in _PROTOCOL_LABELS.items():
            parts = [(f"text2pose.{ds}.{protocol}.", _RECALL_COLUMNS), (f"text2pose.{ds}.", errors)]
            index = lambda label: (_label(ds), plabel, label)
            table.rows += _bound_rows(bounds, _FLOORS, index, parts)
            for v in _ordered_variants(agg, variants):
                cells = {}
                for pre, cols in parts:
                    cells.update(_cells(agg[v], pre, cols))
                if cells:
                    table.rows.append(Row((_label(ds), plabel, v), cells, kind="variant"))
            table.rows += _bound_rows(bounds, _CEILINGS, index, parts)
            for result in published:
                if result.dataset != ds:
                    continue
                cells = {c.label: _paper_stat(result.metrics[f"{protocol}.{c.key}"])
                         for c in _RECALL_COLUMNS if f"{protocol}.{c.key}" in result.metrics}
                cells.update({c.label: _paper_stat(result.metrics[c.key]) for c in errors
                              if c.key in result.metrics})
                if cells:
                    table.rows.append(Row((_label(ds), plabel, f"{result.method} (paper)"), cells,
                                          reference=result.source, kind="paper"))
    if errors:
        table.notes.append("MPJPE / PA-MPJPE do not depend on the protocol (the same generated "
                           "poses): they repeat on both protocols' rows.")
    if any(r.kind == "bound" for r in table.rows):
        table.notes.append(_BOUNDS_NOTE + " The mean pose gives every caption the same pose: "
                           "its recall is at most chance (ties count against the query).")
    return table


@dataclass(frozen=True)
class Ablation:
    """One block of Table 3: the variants (names of config.yaml ``variants:``) that list
    ``title`` in their ``ablations``."""
    title: str
    variants: tuple[str, ...]


def ablations_from(groups: Mapping[str, Sequence[str]] | None) -> tuple[Ablation, ...]:
    """``{title: [variant, ...]}`` (the Snakefile builds it from each variant's
    ``ablations``, config order) -> Table 3's blocks."""
    return tuple(Ablation(title, tuple(vs)) for title, vs in (groups or {}).items())


_ABLATION_COLUMNS = [
    Column("MPJPE", "image2pose.synthetic.mpjpe"),
    Column("PA-MPJPE", "image2pose.synthetic.pa_mpjpe"),
    Column("mRecall P1", "text2pose.synthetic.protocol1.mRecall"),
    Column("mRecall P2", "text2pose.synthetic.protocol2.mRecall"),
    Column("Format %", "format_rate", decimals=1, scale=100.0),
    Column("Text reward", "text_reward", decimals=3),
]


_FLOOR_GROUP, _CEILING_GROUP = "Floor (reference, not a model)", "Ceiling (reference, not a model)"


def ablation_table(agg: Mapping[str, Mapping[str, Stat]],
                   ablations: Sequence[Ablation],
                   bounds: Mapping[str, Mapping[str, Stat]] | None = None) -> Table:
    """Table 3: one block of rows per ablation whose variants (at least two) have metrics,
    between a floor block (chance, mean pose) and a ceiling block (oracle) when ``bounds``."""
    table = Table("ablation", "Table 3. Ablations on the synthetic test split (MPJPE/PA-MPJPE "
                  "mm, lower is better; mRecall %, format rate %, text reward cosine, higher "
                  "is better)", ("Ablation", "Method"), list(_ABLATION_COLUMNS))
    table.rows += _bound_rows(bounds, _FLOORS, lambda label: (_FLOOR_GROUP, label), "",
                              table.columns)
    for ab in ablations:
        present = [v for v in ab.variants if v in agg]
        missing = [v for v in ab.variants if v not in agg]
        if len(present) < 2:
            table.notes.append(f"{ab.title}: skipped, needs variants {list(ab.variants)} "
                               f"(missing: {missing})")
            continue
        if missing:
            table.notes.append(f"{ab.title}: variants without metrics: {missing}")
        for v in present:
            table.rows.append(Row((ab.title, v), _cells(agg[v], "", table.columns), kind="variant"))
    table.rows += _bound_rows(bounds, _CEILINGS, lambda label: (_CEILING_GROUP, label), "",
                              table.columns)
    if any(r.kind == "bound" for r in table.rows):
        table.notes.append(_BOUNDS_NOTE)
    return table


# --------------------------------------------------------------------------- rendering --
def format_stat(stat: Stat | None, column: Column) -> str:
    if stat is None:
        return _MISSING
    d, s = column.decimals, column.scale
    text = f"{stat.mean * s:.{d}f}"
    if stat.std is not None:
        text += f" ± {stat.std * s:.{d}f}"
    return text


def render_markdown(table: Table, descriptions: Mapping[str, str] | None = None) -> str:
    """GitHub Markdown: title, header, one line per row, notes."""
    header = list(table.index_names) + [c.label for c in table.columns]
    align = ["---"] * len(table.index_names) + ["---:"] * len(table.columns)
    lines = [f"### {table.title}", "", "| " + " | ".join(header) + " |",
             "|" + "|".join(align) + "|"]
    for row in table.rows:
        cells = [format_stat(row.cells.get(c.label), c) for c in table.columns]
        index = list(row.index)
        if row.row_kind == "bound":         # italic: a bound, not a model
            index[-1] = f"*{index[-1]}*"
            cells = [f"*{c}*" if c != _MISSING else c for c in cells]
        lines.append("| " + " | ".join(index + cells) + " |")
    refs = sorted({r.reference for r in table.rows if r.reference})
    if refs:
        lines += ["", "Published rows (paper): " + "; ".join(refs) + "."]
    n = sorted({s.n for r in table.rows if r.row_kind == "variant" for s in r.cells.values()})
    if n:
        lines += ["", f"Seeds per cell: {', '.join(map(str, n))} (mean ± sample std over seeds "
                  "when more than one)."]
    if table.notes:
        lines += [""] + [f"* {note}" for note in table.notes]
    return "\n".join(lines) + "\n"


def table_frame(table: Table):
    """Numeric :class:`pandas.DataFrame`: index columns, then per column mean, std, n."""
    import pandas as pd

    records = []
    for row in table.rows:
        rec: dict[str, Any] = dict(zip(table.index_names, row.index))
        for c in table.columns:
            stat = row.cells.get(c.label)
            rec[c.label] = None if stat is None else stat.mean * c.scale
            rec[f"{c.label} std"] = None if stat is None or stat.std is None else stat.std * c.scale
            rec[f"{c.label} n"] = 0 if stat is None else stat.n
        rec["reference"] = row.reference
        rec["kind"] = row.row_kind
        records.append(rec)
    columns = list(table.index_names) + [x for c in table.columns
                                         for x in (c.label, f"{c.label} std", f"{c.label} n")]
    return pd.DataFrame.from_records(records, columns=columns + ["reference", "kind"])


def _long_frame(agg: Mapping[str, Mapping[str, Stat]], variants: Sequence[str] | None,
                bounds: Mapping[str, Mapping[str, Stat]] | None = None):
    """One row per (variant, metric); then the bounds (variant = the bound's row label,
    kind = bound, n_seeds = 0)."""
    import pandas as pd

    def record(name, key, s, kind):
        return {"variant": name, "metric": key, "mean": s.mean, "std": s.std, "n_seeds": s.n,
                "values": " ".join(f"{x:.6g}" for x in s.values), "kind": kind}

    records = [record(v, k, s, "variant")
               for v in _ordered_variants(agg, variants) for k, s in sorted(agg[v].items())]
    records += [record(BOUND_LABELS[b], k, s, "bound") for b in (*_FLOORS, *_CEILINGS)
                for k, s in sorted((bounds or {}).get(b, {}).items())]
    return pd.DataFrame.from_records(records, columns=["variant", "metric", "mean", "std",
                                                       "n_seeds", "values", "kind"])


def _csv_text(frame) -> str:
    return frame.to_csv(index=False, float_format="%.6g", lineterminator="\n")


def build_tables(metrics_paths: Iterable[str | os.PathLike], out_paths: Mapping[str, str | os.PathLike],
                 variants: Mapping[str, str] | None = None, include_paper_numbers: bool = True,
                 paper: Sequence[PaperResult] | None = None,
                 reference: str | os.PathLike | None = None,
                 ablations: Mapping[str, Sequence[str]] | None = None) -> dict[str, Table]:
    """Read the runs, write every file of :data:`TABLE_FILES` (atomically), return the tables.

    Args:
        metrics_paths: ``results/runs/{variant}/seed{seed}/metrics.json`` files.
        out_paths: ``{"main_md": ..., "main_csv": ..., "image2pose_md": ..., ...}``.
        variants: variant name -> description (config order; descriptions listed in main.md).
        paper: published rows (default :data:`poserft.eval.paper_results.PAPER_RESULTS`).
        reference: ``results/reference/metrics.json`` (rule evaluate_reference): adds the
            floor and ceiling rows (:data:`BOUND_LABELS`) to every table; None: no bounds.
        ablations: ablation title -> its variants (from each variant's ``ablations`` in
            the config); Table 3 has one block per title.
    """
    missing = [k for k in TABLE_FILES if k not in out_paths]
    if missing:
        raise ValueError(f"build_tables: out_paths lacks {missing} (needs all of {list(TABLE_FILES)})")
    runs = load_runs(metrics_paths)
    if not runs:
        raise MetricsFileError("build_tables: no metrics.json given; run the evaluate rule first")
    agg = aggregate_runs(runs)
    bounds = reference_stats(load_reference(reference)) if reference is not None else None
    order = list(variants or {})
    published = paper if include_paper_numbers else []   # None: the recorded PAPER_RESULTS
    tables = {"image2pose": image2pose_table(agg, order, published, bounds),
              "text2pose": text2pose_table(agg, order, published, bounds),
              "ablation": ablation_table(agg, ablations_from(ablations), bounds=bounds)}
    for name, table in tables.items():
        write_text(out_paths[f"{name}_md"], render_markdown(table))
        write_text(out_paths[f"{name}_csv"], _csv_text(table_frame(table)))
    seeds = sorted({r.seed for r in runs})
    parts = ["# Results", "",
             f"{len(runs)} runs: {len(agg)} variants x seeds {seeds}. Cells: mean ± sample std "
             "over seeds (ddof=1) when a variant has more than one seed.", ""]
    if bounds:
        parts += ["Every table brackets the variants between bounds (italic rows, from "
                  f"{Path(reference).as_posix()}): *chance* and *mean pose (floor)* above "
                  "them, *oracle (GT poses)* below them.", ""]
    if variants:
        parts += ["| Variant | Description |", "|---|---|"]
        parts += [f"| {v} | {d} |" for v, d in variants.items()] + [""]
    parts += [render_markdown(t) for t in tables.values()]
    write_text(out_paths["main_md"], "\n".join(parts))
    write_text(out_paths["main_csv"], _csv_text(_long_frame(agg, order, bounds)))
    return tables
