"""Figures for the report (PNG, matplotlib Agg): RFT reward curves and per-variant metric bars.

* :func:`plot_reward_curves`: one panel per reward metric, one line per (variant, seed),
  from the RFT trainer's metric history (:func:`load_reward_history`: the history the
  trainer writes next to its checkpoint, else the MLflow run of that RFT job).
* :func:`plot_metric_bars`: one panel per key metric, one bar per variant (mean over seeds)
  with the sample std as error bar and each seed as a dot.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from poserft.atomic import atomic_path

__all__ = ["BAR_METRICS", "load_reward_history", "mlflow_reward_history", "heldout_points",
           "collect_reward_histories", "reward_keys", "plot_reward_curves", "plot_metric_bars"]

# (panel title, metrics.json key, scale, lower is better)
BAR_METRICS: tuple[tuple[str, str, float, bool], ...] = (
    ("MPJPE (mm)", "image2pose.synthetic.mpjpe", 1.0, True),
    ("PA-MPJPE (mm)", "image2pose.synthetic.pa_mpjpe", 1.0, True),
    ("mRecall P1 (%)", "text2pose.synthetic.protocol1.mRecall", 1.0, False),
    ("mRecall P2 (%)", "text2pose.synthetic.protocol2.mRecall", 1.0, False),
    ("Format rate (%)", "format_rate", 100.0, False),
    ("Text reward (cos)", "text_reward", 1.0, False),
)
_HISTORY_FILES = ("history.csv", "metrics_history.csv", "history.jsonl")
_REWARD_KEY = re.compile(r"reward", re.IGNORECASE)


def _agg():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    plt = _agg()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    return Path(path)


# ------------------------------------------------------------------------- histories --
def _rows_to_long(rows: Iterable[Mapping[str, Any]], source: str) -> list[tuple[int, str, float]]:
    """Wide rows ``{"step": s, metric: value, ...}`` -> (step, metric, value) triples."""
    out = []
    for i, row in enumerate(rows):
        if "step" not in row:
            raise ValueError(f"{source}: history row {i} has no 'step' column")
        step = int(float(row["step"]))
        for key, value in row.items():
            if key == "step" or value in (None, ""):
                continue
            try:
                v = float(value)
            except (TypeError, ValueError):
                continue
            if math.isfinite(v):
                out.append((step, str(key), v))
    return out


def load_reward_history(rft_dir: str | os.PathLike) -> list[tuple[int, str, float]] | None:
    """(step, metric, value) triples from the trainer's files in ``rft_dir``, or None.

    Read, first found: ``history.csv`` / ``metrics_history.csv`` (a ``step`` column, one
    column per metric), ``history.jsonl`` (one JSON object per step), or a ``history`` list
    in ``rft_summary.json``.
    """
    d = Path(rft_dir)
    for name in _HISTORY_FILES:
        path = d / name
        if not path.is_file():
            continue
        if name.endswith(".csv"):
            with open(path, newline="") as fh:
                return _rows_to_long(csv.DictReader(fh), str(path))
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return _rows_to_long(rows, str(path))
    summary = d / "rft_summary.json"
    if summary.is_file():
        data = json.loads(summary.read_text())
        if isinstance(data, dict) and isinstance(data.get("history"), list):
            return _rows_to_long(data["history"], f"{summary}:history")
    return None


def mlflow_reward_history(tracking_uri: str, experiment: str, variant: str, seed: int,
                          rule: str = "rft") -> list[tuple[int, str, float]] | None:
    """Metric histories of the latest finished MLflow run of ``rule`` for (variant, seed)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=(f"tags.rule = '{rule}' and tags.`wildcard.variant` = '{variant}' "
                       f"and tags.`wildcard.seed` = '{seed}' and attributes.status = 'FINISHED'"),
        order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        return None
    run = runs[0]
    out = []
    for key in run.data.metrics:
        for m in client.get_metric_history(run.info.run_id, key):
            out.append((int(m.step), key, float(m.value)))
    return out


def heldout_points(summary: Mapping[str, Any]) -> list[tuple[int, str, float]]:
    """Held-out rewards of an ``rft_summary.json``: before (step 0) and after (the last
    optimizer step), as ``heldout/<task>/<reward>`` points (pose-valid rates, MPJPE, the
    head's std and counts are not rewards and are left out)."""
    before, after = summary.get("heldout_before") or {}, summary.get("heldout_after") or {}
    end = int(summary.get("optimizer_steps") or summary.get("rl_steps") or 1)
    out = []
    for key in sorted(set(before) & set(after)):
        if any(word in key for word in ("pose_valid", "mpjpe", "n_candidates", "pose_std")):
            continue
        out += [(0, f"heldout/{key}", float(before[key])), (end, f"heldout/{key}", float(after[key]))]
    return out


def collect_reward_histories(rft_summaries: Sequence[str | os.PathLike],
                             mlflow: tuple[str, str] | None = None
                             ) -> dict[tuple[str, int], list[tuple[int, str, float]]]:
    """(variant, seed) -> reward history of each RFT run given by its rft_summary.json.

    Training rewards come from a history file next to the policy (:func:`load_reward_history`)
    or else the run's MLflow metrics (``mlflow``: (tracking URI, experiment); None when
    tracking is off); the held-out before/after rewards of the summary are added in both cases.
    """
    from poserft.eval.tables import parse_run_path

    out = {}
    for path in rft_summaries:
        path = Path(path)
        variant, seed = parse_run_path(path.parent.parent / "metrics.json")
        summary = json.loads(path.read_text())
        hist = load_reward_history(path.parent)
        if hist is None and mlflow is not None:
            hist = mlflow_reward_history(mlflow[0], mlflow[1], variant, seed)
        out[(variant, seed)] = list(hist or []) + heldout_points(summary)
    return out


def reward_keys(history: Iterable[tuple[int, str, float]]) -> list[str]:
    """Metric names that are rewards (contain 'reward', or held-out rewards), sorted with the
    held-out ones last."""
    keys = {k for _, k, _ in history
            if (_REWARD_KEY.search(k) or k.startswith("heldout/"))
            and not k.endswith("_se") and "time/" not in k}   # standard errors, timings
    return sorted(keys, key=lambda k: (k.startswith("heldout/"), k))


def plot_reward_curves(histories: Mapping[tuple[str, int], Sequence[tuple[int, str, float]]],
                       out_png: str | os.PathLike, keys: Sequence[str] | None = None,
                       max_panels: int = 8) -> Path:
    """One panel per reward metric, one line per (variant, seed) run.

    histories: (variant, seed) -> (step, metric, value) triples. keys: metrics to draw
    (default: every key containing 'reward', at most ``max_panels``). Runs without
    history are listed in the figure instead of silently dropped.
    """
    plt = _agg()
    present = {run: h for run, h in histories.items() if h}
    keys = list(keys) if keys is not None else reward_keys(t for h in present.values() for t in h)
    if len(keys) > max_panels:   # at most half the panels held-out, the rest training curves
        held = [k for k in keys if k.startswith("heldout/")]
        train = [k for k in keys if not k.startswith("heldout/")]
        n_held = min(len(held), max(max_panels // 2, max_panels - len(train)))
        keys = train[:max_panels - n_held] + held[:n_held]
    cols = min(4, max(1, len(keys)))
    rows = max(1, math.ceil(len(keys) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 3.2 * rows), squeeze=False)
    colours = plt.get_cmap("tab10")
    variants = sorted({v for v, _ in histories})
    for ax, key in zip(axes.flat, keys):
        for (variant, seed), hist in sorted(present.items()):
            pts = sorted((s, v) for s, k, v in hist if k == key)
            if pts:
                steps, vals = zip(*pts)
                ax.plot(steps, vals, color=colours(variants.index(variant) % 10),
                        alpha=0.9 if seed == min(s for v, s in present if v == variant) else 0.5,
                        label=f"{variant} s{seed}", marker="." if len(pts) < 30 else None)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if keys:
        handles, labels = axes.flat[0].get_legend_handles_labels()
        if handles:
            axes.flat[0].legend(fontsize=7)
    else:
        axes.flat[0].text(0.5, 0.5, "no reward history found", ha="center", va="center")
        axes.flat[0].axis("off")
    missing = sorted(f"{v}/seed{s}" for (v, s) in histories if (v, s) not in present)
    title = "RFT reward curves"
    if missing:
        title += f"  (no history: {', '.join(missing)})"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, out_png)


# ---------------------------------------------------------------------------- bars --
def plot_metric_bars(runs: Mapping[str, Mapping[int, Mapping[str, float]]],
                     out_png: str | os.PathLike, variants: Sequence[str] | None = None,
                     metrics: Sequence[tuple[str, str, float, bool]] = BAR_METRICS) -> Path:
    """Bars of the mean over seeds, error bars = sample std (ddof=1), dots = seeds.

    runs: variant -> seed -> flat metrics (``poserft.eval.tables.flatten_metrics``).
    """
    plt = _agg()
    order = [v for v in (variants or []) if v in runs] + sorted(set(runs) - set(variants or []))
    metrics = [m for m in metrics if any(m[1] in s for v in runs.values() for s in v.values())]
    cols = min(3, max(1, len(metrics)))
    rows = max(1, math.ceil(len(metrics) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    x = np.arange(len(order))
    for ax, (title, key, scale, lower) in zip(axes.flat, metrics):
        ax.set_title(title + (" ↓" if lower else " ↑"), fontsize=9)
        means, stds = [], []
        for i, v in enumerate(order):
            vals = np.array([s[key] * scale for s in runs[v].values() if key in s and
                             math.isfinite(s[key])], dtype=np.float64)
            means.append(vals.mean() if vals.size else np.nan)
            stds.append(vals.std(ddof=1) if vals.size > 1 else 0.0)
            ax.scatter(np.full(vals.size, i), vals, color="black", s=8, zorder=3)
        ax.bar(x, means, yerr=stds, capsize=3, color="tab:blue", alpha=0.7)
        ax.set_xticks(x, order, rotation=30, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    n_seeds = sorted({len(s) for s in runs.values()})
    fig.suptitle(f"Metrics per variant (mean ± std over {'/'.join(map(str, n_seeds))} seeds)",
                 fontsize=10)
    fig.tight_layout()
    return _save(fig, out_png)
