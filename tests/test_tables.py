"""Tables from fixture metrics.json files: seed aggregation checked against numpy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from poserft.eval import tables as T
from poserft.eval.paper_results import PAPER_RESULTS, PaperResult


def _metrics(rng: np.random.Generator, datasets=("synthetic",), text=("synthetic",)) -> dict:
    """A metrics.json in the layout evaluate_variant writes, with random values."""
    recall = lambda: {**{f"{d}_R@{k}": float(rng.uniform(0, 100)) for d in ("t2p", "p2t")
                         for k in (5, 10, 20)}, "mRecall": float(rng.uniform(0, 100))}
    return {
        "image2pose": {ds: {"mpjpe": float(rng.uniform(50, 200)), "pa_mpjpe": float(rng.uniform(30, 90)),
                            "best_of_n": 4, "best_of_n_mpjpe": float(rng.uniform(40, 150)),
                            "best_of_n_pa_mpjpe": float(rng.uniform(20, 80)),
                            "pose_valid_rate": 1.0, "num_samples": 64} for ds in datasets},
        "text2pose": {ds: {"protocol1": recall(), "protocol2": recall(), "num_samples": 64}
                      for ds in text},
        "format_rate": float(rng.uniform(0, 1)),
        "text_reward": float(rng.uniform(-1, 1)),
        "meta": {"policy_dir": "x", "joint_set": "lsp14"},
    }


def _write_runs(root: Path, spec: dict[str, list[int]], seed=0, **kw) -> tuple[list[Path], dict]:
    rng = np.random.default_rng(seed)
    paths, data = [], {}
    for variant, seeds in spec.items():
        for s in seeds:
            p = root / "runs" / variant / f"seed{s}" / "metrics.json"
            p.parent.mkdir(parents=True)
            data[(variant, s)] = _metrics(rng, **kw)
            p.write_text(json.dumps(data[(variant, s)]))
            paths.append(p)
    return paths, data


def _outs(root: Path) -> dict[str, Path]:
    return {k: root / "tables" / (k.rsplit("_", 1)[0] + "." + k.rsplit("_", 1)[1])
            for k in T.TABLE_FILES}


VARIANTS = {"baseline": "no Dist.", "dist": "Dist.", "dist_rft": "the method", "grpo": "GRPO",
            "clip_only": "CLIP", "concat_fusion": "concat"}
# as the Snakefile builds it from config.yaml's `ablations:` lists
ABLATIONS = {"Distribution head and RFT (Table 3)": ["baseline", "dist", "dist_rft"],
             "Discrete-only GRPO vs HyGRPO": ["dist_rft", "grpo"],
             "CLIP only vs pose-aware encoder": ["dist", "clip_only"],
             "Concatenated vs separate projection": ["dist", "concat_fusion"]}


def test_parse_run_path():
    assert T.parse_run_path("results/runs/dist_rft/seed12/metrics.json") == ("dist_rft", 12)
    with pytest.raises(T.MetricsFileError, match="seed"):
        T.parse_run_path("results/runs/dist_rft/metrics.json")


def test_flatten_drops_metadata():
    flat = T.flatten_metrics({"a": {"b": 1, "c": "text", "d": True}, "e": 2.5})
    assert flat == {"a.b": 1.0, "e": 2.5}


def test_mean_std_over_seeds_match_numpy(tmp_path):
    spec = {"baseline": [0, 1, 2], "dist": [0, 1, 2], "dist_rft": [0, 1, 2], "grpo": [0]}
    paths, data = _write_runs(tmp_path, spec)
    tables = T.build_tables(paths, _outs(tmp_path), VARIANTS, ablations=ABLATIONS)

    img = pd.read_csv(_outs(tmp_path)["image2pose_csv"])
    for variant in ("baseline", "dist", "dist_rft"):
        vals = np.array([data[(variant, s)]["image2pose"]["synthetic"]["pa_mpjpe"] for s in range(3)])
        row = img[img["Method"] == variant].iloc[0]
        np.testing.assert_allclose(row["Synthetic PA-MPJPE"], vals.mean(), rtol=1e-5)
        np.testing.assert_allclose(row["Synthetic PA-MPJPE std"], vals.std(ddof=1), rtol=1e-5)
        assert row["Synthetic PA-MPJPE n"] == 3
    # one seed: mean = the value, no std
    grpo = img[img["Method"] == "grpo"].iloc[0]
    np.testing.assert_allclose(grpo["Synthetic MPJPE"],
                               data[("grpo", 0)]["image2pose"]["synthetic"]["mpjpe"], rtol=1e-5)
    assert np.isnan(grpo["Synthetic MPJPE std"])

    # markdown cell "mean ± std" with the numpy numbers
    vals = np.array([data[("dist", s)]["text2pose"]["synthetic"]["protocol2"]["mRecall"]
                     for s in range(3)])
    md = _outs(tmp_path)["text2pose_md"].read_text()
    assert f"{vals.mean():.1f} ± {vals.std(ddof=1):.1f}" in md
    # format rate shown in percent
    fr = np.array([data[("dist_rft", s)]["format_rate"] for s in range(3)]) * 100
    assert f"{fr.mean():.1f} ± {fr.std(ddof=1):.1f}" in _outs(tmp_path)["ablation_md"].read_text()
    # rows follow the config order, not alphabetical
    assert [r.index[0] for r in tables["image2pose"].rows] == ["baseline", "dist", "dist_rft", "grpo"]


def test_text_table_has_both_protocols_and_all_recalls(tmp_path):
    paths, data = _write_runs(tmp_path, {"dist": [0, 1]})
    T.build_tables(paths, _outs(tmp_path), VARIANTS, ablations=ABLATIONS)
    frame = pd.read_csv(_outs(tmp_path)["text2pose_csv"])
    assert list(frame["Protocol"]) == ["P1 (full)", "P2 (N=32, R=10)"]
    p1 = frame.iloc[0]
    want = np.mean([data[("dist", s)]["text2pose"]["synthetic"]["protocol1"]["p2t_R@10"]
                    for s in (0, 1)])
    np.testing.assert_allclose(p1["RP2T R@10"], want, rtol=1e-5)
    assert {f"RT2P R@{k}" for k in (5, 10, 20)} <= set(frame.columns)


def test_long_csv_has_every_metric(tmp_path):
    paths, data = _write_runs(tmp_path, {"dist": [0, 1], "baseline": [3]})
    T.build_tables(paths, _outs(tmp_path), VARIANTS, ablations=ABLATIONS)
    long = pd.read_csv(_outs(tmp_path)["main_csv"])
    row = long[(long.variant == "dist") & (long.metric == "text_reward")].iloc[0]
    vals = [data[("dist", s)]["text_reward"] for s in (0, 1)]
    np.testing.assert_allclose([row["mean"], row["std"]], [np.mean(vals), np.std(vals, ddof=1)],
                               rtol=1e-5)
    assert row["n_seeds"] == 2
    main = _outs(tmp_path)["main_md"].read_text()
    for title in ("Table 1", "Table 2", "Table 3"):
        assert title in main


def test_ablation_groups_skip_missing_variants(tmp_path):
    paths, _ = _write_runs(tmp_path, {"dist": [0], "clip_only": [0], "grpo": [0]})
    table = T.build_tables(paths, _outs(tmp_path), VARIANTS, ablations=ABLATIONS)["ablation"]
    groups = {r.index[0] for r in table.rows}
    assert groups == {"CLIP only vs pose-aware encoder"}
    assert any("Discrete-only GRPO vs HyGRPO: skipped" in n for n in table.notes)


def test_ablation_table_follows_the_config(tmp_path):
    """A user's own variant reaches Table 3 by listing an ablation title; none is hard-coded."""
    paths, data = _write_runs(tmp_path, {"dist": [0], "my_lora": [0], "grpo": [0]})
    groups = {"LoRA vs full fine-tuning": ["dist", "my_lora"]}
    table = T.build_tables(paths, _outs(tmp_path), {**VARIANTS, "my_lora": "LoRA"},
                           ablations=groups)["ablation"]
    assert [r.index for r in table.rows] == [("LoRA vs full fine-tuning", "dist"),
                                             ("LoRA vs full fine-tuning", "my_lora")]
    assert table.rows[1].cells["MPJPE"].mean == pytest.approx(
        data[("my_lora", 0)]["image2pose"]["synthetic"]["mpjpe"], rel=1e-6)
    assert T.build_tables(paths, _outs(tmp_path), VARIANTS)["ablation"].rows == []


def test_real_dataset_columns_and_paper_rows(tmp_path):
    paths, _ = _write_runs(tmp_path, {"dist_rft": [0]}, datasets=("synthetic", "pw3d"))
    fake = [PaperResult("Method X", "image2pose", "pw3d", {"mpjpe": 123.4, "pa_mpjpe": 56.7},
                        source="Some paper, Table 1"),
            PaperResult("Method Y", "image2pose", "h36m", {"mpjpe": 1.0}, source="elsewhere")]
    tables = T.build_tables(paths, _outs(tmp_path), VARIANTS, paper=fake)
    md = _outs(tmp_path)["image2pose_md"].read_text()
    assert "3DPW MPJPE" in md and "3DPW PA-MPJPE (best-of-4)" in md
    paper_row = [r for r in tables["image2pose"].rows if r.reference]
    assert len(paper_row) == 1 and paper_row[0].index == ("Method X (paper)",)   # no H36M run
    assert paper_row[0].cells["3DPW MPJPE"].mean == 123.4
    assert "Synthetic MPJPE" not in paper_row[0].cells
    assert "Some paper, Table 1" in md
    # switched off by the report config
    tables = T.build_tables(paths, _outs(tmp_path), VARIANTS, include_paper_numbers=False, paper=fake)
    assert not any(r.reference for r in tables["image2pose"].rows)


def test_recorded_paper_results_are_cited():
    for r in PAPER_RESULTS:   # every recorded published value carries its source
        assert r.source


def test_bad_metrics_file_named(tmp_path):
    p = tmp_path / "runs" / "dist" / "seed0" / "metrics.json"
    p.parent.mkdir(parents=True)
    p.write_text("{not json")
    outs = _outs(tmp_path)
    with pytest.raises(T.MetricsFileError, match=str(p)):
        T.build_tables([p], outs, VARIANTS)
    assert not any(Path(o).exists() for o in outs.values())   # nothing half-written
    with pytest.raises(T.MetricsFileError, match="does not exist"):
        T.build_tables([tmp_path / "runs/x/seed0/metrics.json"], outs, VARIANTS)


def test_aggregate_seeds_ignores_nan():
    s = T.aggregate_seeds([1.0, float("nan"), 3.0])
    assert (s.mean, s.n) == (2.0, 2)
    np.testing.assert_allclose(s.std, np.std([1.0, 3.0], ddof=1))
    assert T.aggregate_seeds([float("nan")]) is None


def _reference(path: Path) -> dict:
    """results/reference/metrics.json in the layout evaluate_reference writes."""
    recall = lambda base: {**{f"{d}_R@{k}": base + k for d, b in (("t2p", 0), ("p2t", 1))
                              for k in (5, 10, 20)}, "mRecall": base + 7.5}
    data = {"image2pose": {"synthetic": {"mean_pose": {"mpjpe": 310.5, "pa_mpjpe": 140.25},
                                         "oracle": {"mpjpe": 0.0, "pa_mpjpe": 0.0},
                                         "num_samples": 200}},
            "text2pose": {"synthetic": {
                "mean_pose": {"mpjpe": 180.5, "pa_mpjpe": 90.75, "protocol1": recall(0.0),
                              "protocol2": recall(10.0)},
                "oracle": {"mpjpe": 0.0, "pa_mpjpe": 0.0, "protocol1": recall(50.0),
                           "protocol2": recall(70.0)},
                "chance": {"protocol1": recall(0.5), "protocol2": recall(15.0)},
                "num_samples": 600}},
            "meta": {"joint_set": "lsp14"}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return data


def test_bound_rows_in_every_table(tmp_path):
    paths, data = _write_runs(tmp_path, {"baseline": [0], "dist": [0, 1], "dist_rft": [0]},
                              datasets=("synthetic", "pw3d"))
    for (v, s), d in data.items():        # text->pose errors of the runs
        d["text2pose"]["synthetic"].update(mpjpe=100.0 + s, pa_mpjpe=50.0 + s)
        (tmp_path / "runs" / v / f"seed{s}" / "metrics.json").write_text(json.dumps(d))
    ref = _reference(tmp_path / "reference" / "metrics.json")
    outs = _outs(tmp_path)
    tables = T.build_tables(paths, outs, VARIANTS, ablations=ABLATIONS, reference=tmp_path / "reference" / "metrics.json")
    floor, chance, oracle = "mean pose (floor)", "chance", "oracle (GT poses)"

    # Table 1: floor above, ceiling below the variants; synthetic columns only; no chance row
    img = pd.read_csv(outs["image2pose_csv"])
    assert list(img.Method)[:5] == [floor, "baseline", "dist", "dist_rft", oracle]
    row = img[img.Method == floor].iloc[0]
    assert (row["Synthetic MPJPE"], row["Synthetic PA-MPJPE"]) == (310.5, 140.25)
    assert np.isnan(row["3DPW MPJPE"]) and np.isnan(row["Synthetic MPJPE (best-of-4)"])
    assert row["kind"] == "bound" and row["Synthetic MPJPE n"] == 0
    assert img[img.Method == oracle].iloc[0]["Synthetic MPJPE"] == 0.0
    assert set(img[img.Method.isin(VARIANTS)]["kind"]) == {"variant"}
    numeric = [c for c in img.columns if c not in ("Method", "reference", "kind")]
    assert all(pd.api.types.is_numeric_dtype(img[c]) for c in numeric)

    # Table 2: per protocol chance + floor, variants, oracle; errors in their own columns
    text = pd.read_csv(outs["text2pose_csv"])
    p1 = text[text.Protocol == "P1 (full)"]
    assert list(p1.Method) == [chance, floor, "baseline", "dist", "dist_rft", oracle]
    for bound, name in ((chance, "chance"), (floor, "mean_pose"), (oracle, "oracle")):
        for protocol, plabel in (("protocol1", "P1 (full)"), ("protocol2", "P2 (N=32, R=10)")):
            row = text[(text.Method == bound) & (text.Protocol == plabel)].iloc[0]
            want = ref["text2pose"]["synthetic"][name][protocol]
            assert row["RP2T R@10"] == want["p2t_R@10"] and row["mRecall"] == want["mRecall"]
            if name == "chance":       # recall columns only
                assert np.isnan(row["MPJPE"]) and np.isnan(row["PA-MPJPE"])
            else:
                assert row["MPJPE"] == ref["text2pose"]["synthetic"][name]["mpjpe"]
    dist = text[(text.Method == "dist") & (text.Protocol == "P2 (N=32, R=10)")].iloc[0]
    np.testing.assert_allclose([dist["MPJPE"], dist["MPJPE std"]], [100.5, np.std([100, 101], ddof=1)],
                               rtol=1e-5)
    numeric = [c for c in text.columns if c not in ("Dataset", "Protocol", "Method", "reference", "kind")]
    assert all(pd.api.types.is_numeric_dtype(text[c]) for c in numeric)

    # Table 3: a floor block first, a ceiling block last
    ab = tables["ablation"]
    assert ab.rows[0].index == ("Floor (reference, not a model)", chance)
    assert ab.rows[1].index == ("Floor (reference, not a model)", floor)
    assert ab.rows[-1].index == ("Ceiling (reference, not a model)", oracle)
    assert ab.rows[1].cells["MPJPE"].mean == 310.5
    assert ab.rows[1].cells["mRecall P2"].mean == ref["text2pose"]["synthetic"]["mean_pose"]["protocol2"]["mRecall"]
    assert set(ab.rows[0].cells) == {"mRecall P1", "mRecall P2"}
    assert ab.rows[-1].cells["mRecall P1"].mean == 57.5

    # Markdown: bounds in italics, explained, not counted as seeds
    md = outs["text2pose_md"].read_text()
    assert "| Synthetic | P1 (full) | *oracle (GT poses)* | *55.0* |" in md
    assert "Rows in italics are bounds" in md and "Seeds per cell: 1, 2 " in md
    main = pd.read_csv(outs["main_csv"])
    row = main[(main.variant == floor) & (main.metric == "text2pose.synthetic.protocol1.mRecall")].iloc[0]
    assert (row["mean"], row["kind"], row["n_seeds"]) == (7.5, "bound", 0)
    assert set(main[main.variant == "dist"]["kind"]) == {"variant"}


def test_missing_reference_named(tmp_path):
    paths, _ = _write_runs(tmp_path, {"dist": [0]})
    with pytest.raises(T.MetricsFileError, match="evaluate_reference"):
        T.build_tables(paths, _outs(tmp_path), VARIANTS, reference=tmp_path / "nope.json")
