"""Plots, reward histories (files and MLflow), the pose gallery and the summary page."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from poserft.eval import plots as P
from poserft.eval.gallery import (GalleryEntry, build_gallery, gallery_checkpoints,
                                  generate_gallery_poses, render_skeletons)
from poserft.eval.summary import write_summary


def _png_size(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


# ------------------------------------------------------------------------- histories --
def test_history_from_csv_and_summary(tmp_path):
    d = tmp_path / "rft"
    d.mkdir()
    (d / "history.csv").write_text("step,rft/reward/mean,loss\n1,0.5,2\n2,0.75,\n")
    hist = P.load_reward_history(d)
    assert sorted(hist) == [(1, "loss", 2.0), (1, "rft/reward/mean", 0.5), (2, "rft/reward/mean", 0.75)]
    assert P.reward_keys(hist) == ["rft/reward/mean"]
    (d / "history.csv").unlink()
    assert P.load_reward_history(d) is None
    (d / "rft_summary.json").write_text(json.dumps({"history": [{"step": 3, "r": 1.5}]}))
    assert P.load_reward_history(d) == [(3, "r", 1.5)]
    (d / "history.csv").write_text("rft/reward,loss\n1,2\n")
    with pytest.raises(ValueError, match="no 'step' column"):
        P.load_reward_history(d)


def test_heldout_points_from_rft_summary():
    s = {"optimizer_steps": 24, "heldout_before": {"image2pose/joint": 5.0, "image2pose/pose_valid_rate": 1.0,
                                                   "text2pose/semantic": 0.1, "image2pose/mpjpe_mm_mean_pose": 9.0,
                                                   "text2pose/pose_std": 0.2},
         "heldout_after": {"image2pose/joint": 7.0, "image2pose/pose_valid_rate": 1.0,
                           "text2pose/semantic": 0.3, "image2pose/mpjpe_mm_mean_pose": 8.0,
                           "text2pose/pose_std": 0.1}}
    pts = P.heldout_points(s)
    assert pts == [(0, "heldout/image2pose/joint", 5.0), (24, "heldout/image2pose/joint", 7.0),
                   (0, "heldout/text2pose/semantic", 0.1), (24, "heldout/text2pose/semantic", 0.3)]


def test_mlflow_history_found_by_rule_variant_seed_tags(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("e", artifact_location=(tmp_path / "art").as_uri())

    def run(variant, seed, rule, values, status="FINISHED"):
        r = client.create_run(exp, tags={"rule": rule, "wildcard.variant": variant,
                                         "wildcard.seed": str(seed)})
        for step, v in enumerate(values):
            client.log_metric(r.info.run_id, "rft/reward/mean", v, step=step)
        client.set_terminated(r.info.run_id, status=status)

    run("dist_rft", 0, "rft", [0.1, 0.2, 0.4])
    run("dist_rft", 1, "rft", [9.0])
    run("grpo", 0, "rft", [5.0])
    run("dist_rft", 0, "sft", [7.0])
    hist = P.mlflow_reward_history(uri, "e", "dist_rft", 0)
    assert sorted(hist) == [(0, "rft/reward/mean", 0.1), (1, "rft/reward/mean", 0.2),
                            (2, "rft/reward/mean", 0.4)]
    assert P.mlflow_reward_history(uri, "e", "baseline", 0) is None
    assert P.mlflow_reward_history(uri, "missing-experiment", "dist_rft", 0) is None

    # collect: MLflow history + the held-out points of the summary
    rft = tmp_path / "results" / "runs" / "dist_rft" / "seed0" / "rft"
    rft.mkdir(parents=True)
    (rft / "rft_summary.json").write_text(json.dumps(
        {"optimizer_steps": 3, "heldout_before": {"a/joint": 1.0}, "heldout_after": {"a/joint": 2.0}}))
    got = P.collect_reward_histories([rft / "rft_summary.json"],
                                     (uri, "e"))
    assert sorted(got) == [("dist_rft", 0)]
    assert (3, "heldout/a/joint", 2.0) in got[("dist_rft", 0)] and len(got[("dist_rft", 0)]) == 5
    off = P.collect_reward_histories([rft / "rft_summary.json"], None)
    assert len(off[("dist_rft", 0)]) == 2


# ---------------------------------------------------------------------------- figures --
def test_reward_curves_and_bars(tmp_path, monkeypatch):
    hist = {("dist_rft", 0): [(s, "rft/reward/mean", 0.1 * s) for s in range(5)]
            + [(0, "heldout/a/joint", 1.0), (4, "heldout/a/joint", 2.0)],
            ("grpo", 0): [(s, "rft/reward/mean", 0.05 * s) for s in range(5)],
            ("grpo", 1): []}
    out = P.plot_reward_curves(hist, tmp_path / "curves.png")
    w, h = _png_size(out)
    assert w > h > 100                       # two panels side by side
    assert P.plot_reward_curves({}, tmp_path / "empty.png").is_file()

    # bars: what is drawn is the numpy mean and sample std over seeds
    rng = np.random.default_rng(0)
    runs = {v: {s: {"image2pose.synthetic.mpjpe": float(rng.uniform(50, 100)), "format_rate": 0.5}
                for s in range(3)} for v in ("baseline", "dist")}
    runs["grpo"] = {0: {"image2pose.synthetic.mpjpe": 70.0}}
    drawn = {}
    import matplotlib.axes
    original = matplotlib.axes.Axes.bar

    def spy(self, x, height, *a, yerr=None, **kw):
        drawn[self.get_title()] = (list(height), list(yerr))
        return original(self, x, height, *a, yerr=yerr, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "bar", spy)
    P.plot_metric_bars(runs, tmp_path / "bars.png", variants=["dist", "baseline", "grpo"])
    heights, errs = drawn["MPJPE (mm) ↓"]
    for i, v in enumerate(["dist", "baseline"]):
        vals = [runs[v][s]["image2pose.synthetic.mpjpe"] for s in range(3)]
        np.testing.assert_allclose([heights[i], errs[i]], [np.mean(vals), np.std(vals, ddof=1)])
    assert heights[2] == 70.0 and errs[2] == 0.0
    np.testing.assert_allclose(drawn["Format rate (%) ↑"][0][:2], [50.0, 50.0])
    assert "Text reward (cos) ↑" not in drawn           # metric absent everywhere: no panel
    assert _png_size(tmp_path / "bars.png")[0] > 200


# ---------------------------------------------------------------------------- gallery --
@pytest.fixture(scope="module")
def gallery_world(tmp_path_factory):
    from poserft.model.io import save_policy
    from poserft.model.testing import tiny_policy

    root = tmp_path_factory.mktemp("gallery")
    torch.manual_seed(0)
    policy, _ = tiny_policy(root)
    save_policy(policy, root / "sft")
    with torch.no_grad():                            # an "RFT" policy: visibly other head weights
        for p in policy.pose_head.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    save_policy(policy, root / "rft")
    (root / "rft" / "rft_summary.json").write_text(json.dumps({"optimizer_steps": 24, "rl_steps": 12}))
    ck = root / "rft_checkpoints" / "checkpoints"
    for step, complete in ((12, True), (13, False), (24, True)):
        d = ck / f"step_{step:08d}"
        d.mkdir(parents=True)
        torch.save({"model": policy.state_dict(), "step": step}, d / "state.pt")
        if complete:
            (d / "COMPLETE").write_text(str(step))
    return root


def test_gallery_checkpoints_and_weights(gallery_world, tmp_path):
    root = gallery_world
    entries = gallery_checkpoints("dist_rft", root / "sft", root / "rft", root / "rft_checkpoints",
                                  sft_variant="dist")
    # labels count RL steps (mu = 24 / 12 = 2 optimizer steps each), as rft.steps does
    assert [e.label for e in entries] == ["dist: SFT", "dist_rft: RFT step 6",
                                          "dist_rft: RFT final (step 12)"]
    assert entries[1].state_file == root / "rft_checkpoints/checkpoints/step_00000012/state.pt"
    assert [e.label for e in gallery_checkpoints("dist", root / "sft", None)] == ["dist: SFT"]
    # a summary without rl_steps (older runs): optimizer steps, named as such
    old = tmp_path / "old_rft"
    shutil.copytree(root / "rft", old)
    (old / "rft_summary.json").write_text(json.dumps({"optimizer_steps": 24}))
    assert [e.label for e in gallery_checkpoints("dist_rft", root / "sft", old,
                                                 root / "rft_checkpoints")][1:] == [
        "dist_rft: RFT optimizer step 12", "dist_rft: RFT final (optimizer step 24)"]

    prompts = ["The person is squatting.", "Arms raised."]
    joints, invalid = generate_gallery_poses(entries, prompts, max_new_tokens=6)
    assert len(joints) == 3 and all(len(r) == 2 and r[0].shape == (24, 3) for r in joints)
    # the step-12 checkpoint carries the RFT weights: same poses as the final policy, not SFT
    np.testing.assert_allclose(np.stack(joints[1]), np.stack(joints[2]), atol=1e-5)
    assert not np.allclose(np.stack(joints[0]), np.stack(joints[2]), atol=1e-3)
    # reference: greedy head mean of the RFT policy through the skeleton FK
    from poserft.body import load, vec6d_to_rotmats
    from poserft.model.io import load_policy
    pol = load_policy(root / "rft")
    roll = pol.generate([pol.text2pose_prompt(p) for p in prompts], max_new_tokens=6, do_sample=False)
    ref = load(None).forward_rotmats(vec6d_to_rotmats(roll.pose_mean)).numpy()
    np.testing.assert_allclose(np.stack(joints[2]), ref, atol=1e-5)
    assert invalid[2] == [not v for v in roll.pose_valid.tolist()]

    out = build_gallery(entries + entries[:1], prompts, tmp_path / "g.png", max_new_tokens=6)
    w, h = _png_size(out)
    assert h > w / 2 * 1.2        # 3 rows (the duplicate SFT row is drawn once) x 2 columns
    with pytest.raises(ValueError, match="gallery_prompts"):
        build_gallery(entries, [], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_render_skeletons_front_view_is_left_right_correct():
    from poserft.body import load

    rest = load(None)(torch.zeros(1, 3), torch.zeros(1, 23, 3)).numpy()
    img = render_skeletons(rest, size=64)[0].astype(float)
    # the SMPL body faces +z, so the camera in front sees its left hand on the image's right:
    # the left arm's warm (red) colours dominate the right half of the image
    redness = img[..., 0] - img[..., 2]
    assert redness[:, 40:].max() > 100 and redness[:, :24].max() < redness[:, 40:].max()


# ---------------------------------------------------------------------------- summary --
def test_summary_page(tmp_path):
    tables = tmp_path / "results" / "tables" / "main.md"
    tables.parent.mkdir(parents=True)
    tables.write_text("# Results\n\n### Table 1. x\n| a |\n")
    png = tmp_path / "results" / "plots" / "bars.png"
    png.parent.mkdir(parents=True)
    png.write_bytes(b"png")
    recall = tmp_path / "recall.json"
    recall.write_text(json.dumps({"full": {"mRecall": 12.34, "t2p_R@5": 1.0}, "sampled": {"mRecall": 56.78}}))
    rft = tmp_path / "results" / "runs" / "dist_rft" / "seed2" / "rft" / "rft_summary.json"
    rft.parent.mkdir(parents=True)
    rft.write_text(json.dumps({"mode": "hygrpo", "rl_steps": 12, "heldout_before": {"a/joint": 1.0},
                               "heldout_after": {"a/joint": 1.5, "a/semantic": 0.2},
                               "heldout_paired": {"a/joint": {"delta": 0.5, "se": 0.125, "t": 4.0,
                                                              "n_prompts": 8}}}))
    out = write_summary(tmp_path / "results" / "report" / "summary.md", tables,
                        {"Metrics per variant": png}, {"evaluator": recall}, [rft],
                        variants={"dist_rft": "the method"})
    text = out.read_text()
    assert "## Results" in text and "#### Table 1. x" in text        # headings demoted
    assert "![Metrics per variant](../plots/bars.png)" in text
    assert "full.mRecall 12.3" in text and "sampled.mRecall 56.8" in text
    assert "| dist_rft/seed2 | hygrpo | 12 | a/joint | 1 | 1.5 | +0.5 | +0.5 ± 0.12 (+4.0) |" in text
    assert "a/semantic" not in text                  # only keys measured before and after


def test_reward_panels_keep_training_curves_beside_heldout(tmp_path, monkeypatch):
    """Many held-out keys must not crowd out the training reward curves (and standard
    errors / timings are not rewards)."""
    hist = [(s, f"rft/reward/{n}", float(s)) for s in range(3) for n in ("a", "b", "c", "d", "e", "f")]
    hist += [(0, "rft/time/reward_s", 1.0)]
    for t in ("joint", "joint_mean_pose", "semantic", "semantic_mean_pose"):
        hist += [(0, f"heldout/x/{t}", 0.0), (2, f"heldout/x/{t}", 1.0),
                 (0, f"heldout/x/{t}_se", 0.1), (2, f"heldout/x/{t}_se", 0.1)]
    keys = P.reward_keys(hist)
    assert "rft/time/reward_s" not in keys and not any(k.endswith("_se") for k in keys)
    drawn = []
    real_plot = P._agg

    def spy_agg():
        plt = real_plot()
        orig = plt.subplots

        def subplots(*a, **kw):
            fig, axes = orig(*a, **kw)
            for ax in axes.flat:
                ax.set_title = lambda title, _f=ax.set_title, **k: (drawn.append(title), _f(title, **k))[1]
            return fig, axes
        monkeypatch.setattr(plt, "subplots", subplots)
        return plt
    monkeypatch.setattr(P, "_agg", spy_agg)
    P.plot_reward_curves({("dist_rft", 0): hist}, tmp_path / "curves.png", max_panels=8)
    assert len(drawn) == 8
    assert sum(k.startswith("rft/reward/") for k in drawn) == 4
    assert sum(k.startswith("heldout/") for k in drawn) == 4
