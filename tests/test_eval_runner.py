"""evaluate_variant on a tiny saved policy, a tiny evaluator and a small split file.

References are computed independently here: numpy MPJPE on the skeleton's joints, a numpy
Umeyama PA-MPJPE, numpy Recall@K ranks, numpy cosines.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from poserft.eval import runner as R
from poserft.eval.config import EvalConfig

N_POSES, N_VQA, IMG = 40, 12, 16


class HashEmbedder:
    """Deterministic bag-of-character-trigrams embedder (a test double for the MiniLM)."""

    def encode(self, texts):
        out = np.zeros((len(texts), 64))
        for i, t in enumerate(texts):
            for j in range(max(1, len(t) - 2)):
                h = int(hashlib.md5(t[j:j + 3].encode()).hexdigest(), 16)
                out[i, h % 64] += 1.0
        out += 1e-3
        return out / np.linalg.norm(out, axis=1, keepdims=True)


class RecordingTracker:
    def __init__(self):
        self.metrics, self.artifacts = {}, []

    def log_metrics(self, metrics, step=None):
        self.metrics.update(metrics)

    def log_artifact(self, path, artifact_path=None):
        self.artifacts.append(str(path))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from poserft.data.h5io import write_split
    from poserft.model.io import save_policy
    from poserft.model.testing import TEST_TEXTS, tiny_policy
    from poserft.retrieval.checkpoint import save_retrieval_model
    from poserft.retrieval.config import RetrievalConfig
    from poserft.retrieval.model import RetrievalArch, RetrievalModel

    root = tmp_path_factory.mktemp("evalworld")
    torch.manual_seed(0)
    policy, tok = tiny_policy(root)
    save_policy(policy, root / "policy")
    rcfg = RetrievalConfig.from_dict(dict(d_model=16, n_layers=1, n_heads=2, ff_dim=32,
                                          pose_hidden_dim=32, latent_dim=8), where="retrieval")
    arch = RetrievalArch.from_config(rcfg, len(tok), tok.pad_token_id, tok.bos_token_id)
    save_retrieval_model(RetrievalModel(arch, tok).eval(), root / "evaluator", {"role": "evaluator"})

    rng = np.random.default_rng(0)
    body_pose = (rng.normal(size=(N_POSES, 23, 3)) * 0.3).astype(np.float32)
    orient = (rng.normal(size=(N_POSES, 3)) * 0.5).astype(np.float32)
    from poserft.body import load
    joints = load(None)(torch.as_tensor(orient), torch.as_tensor(body_pose)).numpy()
    arrays = {
        "poses/global_orient": orient, "poses/body_pose": body_pose,
        "poses/betas": np.zeros((N_POSES, 10), np.float32), "joints": joints,
        "images": rng.integers(0, 256, size=(N_POSES, IMG, IMG, 3), dtype=np.uint8),
        "image_pose/global_orient": (rng.normal(size=(N_POSES, 3)) * 0.5).astype(np.float32),
        "captions/text": [f"{TEST_TEXTS[i % 3]} variant {i}" for i in range(N_POSES)],
        "captions/pose_index": np.arange(N_POSES),
        "vqa/question": [TEST_TEXTS[3 + i % 2].rsplit("?", 1)[0] + "?" for i in range(N_VQA)],
        "vqa/answer": ["yes" if i % 2 else "no" for i in range(N_VQA)],
        "vqa/pose_index": np.arange(N_VQA) * 3,
    }
    test = write_split(root / "synthetic" / "test.h5", arrays,
                       {"source": "unit", "split": "test", "body_model": "skeleton",
                        "converter_params": {}})
    return {"root": root, "policy": root / "policy", "evaluator": root / "evaluator",
            "test": test, "arrays": arrays}


def _cfg(**kw):
    d = dict(max_image_samples=10, max_text_samples=20, max_vqa_samples=8, best_of_n=3,
             max_new_tokens=6, batch_size=64, recall_ks=[1, 2, 5], protocol2_candidates=8,
             protocol2_repeats=3, format_regex=r"(?s).*<POSE>.*")
    d.update(kw)
    return EvalConfig.from_dict(d, where="eval")


def _umeyama_pa(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Per-sample similarity Procrustes error (mm), numpy, proper rotations only."""
    out = []
    for x, y in zip(pred, gt):
        mx, my = x.mean(0), y.mean(0)
        xc, yc = x - mx, y - my
        u, s, vt = np.linalg.svd(xc.T @ yc)
        d = np.sign(np.linalg.det(u @ vt))
        D = np.diag([1.0, 1.0, d])
        rot = u @ D @ vt
        scale = (s * np.diag(D)).sum() / (xc ** 2).sum()
        aligned = scale * xc @ rot + my
        out.append(np.linalg.norm(aligned - y, axis=1).mean() * 1000)
    return np.array(out)


def _skeleton_joints(vec6d: torch.Tensor):
    """LSP-14 joints and SMPL pelvis through the skeleton's FK (numpy)."""
    from poserft.body import JOINT_SETS, load, vec6d_to_rotmats

    j24 = load(None).forward_rotmats(vec6d_to_rotmats(vec6d.float())).numpy()
    return j24[:, list(JOINT_SETS["lsp14"].from_smpl24)], j24[:, 0]


def test_evaluate_variant_matches_independent_reference(world, tmp_path):
    from poserft.model.io import load_policy
    from poserft.retrieval.checkpoint import load_retrieval_model

    cfg = _cfg()
    out = tmp_path / "runs" / "v" / "seed0" / "metrics.json"
    tracker = RecordingTracker()
    m = R.evaluate_variant(cfg, world["policy"], world["evaluator"],
                           {"test": world["test"], "train": "ignored.h5"}, out,
                           tracker=tracker, text_embedder=HashEmbedder())
    assert json.loads(out.read_text()) == json.loads(json.dumps(m))

    # --- image->pose reference
    a = world["arrays"]
    idx = R.subset_indices(N_POSES, 10, 0)
    policy = load_policy(world["policy"])
    roll = policy.generate([policy.image2pose_prompt()] * len(idx), images=a["images"][idx],
                           max_new_tokens=6, do_sample=False)
    rest = torch.tensor([1.0, 0, 0, 0, 1, 0]).repeat(24)
    pred_vec = torch.where(roll.pose_valid[:, None], roll.pose_mean, rest)
    from poserft.body import smpl_to_vec6d
    gt_vec = smpl_to_vec6d(torch.as_tensor(a["image_pose/global_orient"][idx]),   # camera frame
                           torch.as_tensor(a["poses/body_pose"][idx]))
    pj, pp = _skeleton_joints(pred_vec)
    gj, gp = _skeleton_joints(gt_vec)
    pj, gj = pj - pp[:, None], gj - gp[:, None]
    ref_mpjpe = (np.linalg.norm(pj - gj, axis=-1).mean(-1) * 1000).mean()
    img = m["image2pose"]["synthetic"]
    np.testing.assert_allclose(img["mpjpe"], ref_mpjpe, rtol=1e-4)
    np.testing.assert_allclose(img["pa_mpjpe"], _umeyama_pa(pj, gj).mean(), rtol=1e-4)
    assert img["num_samples"] == 10 and img["best_of_n"] == 3
    assert np.isfinite(img["best_of_n_mpjpe"]) and img["best_of_n_pa_mpjpe"] <= img["best_of_n_mpjpe"]
    np.testing.assert_allclose(img["pose_valid_rate"], roll.pose_valid.float().mean().item())
    # the format regex here accepts any answer with <POSE>: the rate is the valid rate
    np.testing.assert_allclose(m["format"]["image2pose"], img["pose_valid_rate"])

    # --- text->pose reference: numpy ranks with the evaluator's embeddings
    cidx = R.subset_indices(N_POSES, 20, 0)
    caps = [a["captions/text"][i] for i in cidx]
    roll = policy.generate([policy.text2pose_prompt(c) for c in caps], max_new_tokens=6,
                           do_sample=False)
    vec = torch.where(roll.pose_valid[:, None], roll.pose_mean, rest)
    ev = load_retrieval_model(world["evaluator"])
    t = ev.embed_texts(caps).numpy().astype(np.float64)
    p = ev.embed_poses(vec).numpy().astype(np.float64)
    s = (t / np.linalg.norm(t, axis=1, keepdims=True)) @ (p / np.linalg.norm(p, axis=1, keepdims=True)).T
    diag = np.diag(s)
    t2p_rank = (s >= diag[:, None]).sum(1) - 1
    p2t_rank = (s.T >= diag[:, None]).sum(1) - 1
    p1 = m["text2pose"]["synthetic"]["protocol1"]
    for k in (1, 2, 5):
        np.testing.assert_allclose(p1[f"t2p_R@{k}"], 100 * (t2p_rank < k).mean(), atol=1e-9)
        np.testing.assert_allclose(p1[f"p2t_R@{k}"], 100 * (p2t_rank < k).mean(), atol=1e-9)
    p2 = m["text2pose"]["synthetic"]["protocol2"]
    assert set(p2) == set(p1) and all(0 <= v <= 100 for v in p2.values())
    np.testing.assert_allclose(p2["mRecall"], np.mean([v for k, v in p2.items() if k != "mRecall"]))

    # --- VQA text reward reference
    emb = HashEmbedder()
    vidx = R.subset_indices(N_VQA, 8, 0)
    qs = [a["vqa/question"][i] for i in vidx]
    roll = policy.generate([policy.vqa_prompt(q) for q in qs],
                           images=a["images"][a["vqa/pose_index"][vidx]], max_new_tokens=6,
                           do_sample=False)
    ref = (emb.encode(roll.texts) * emb.encode([a["vqa/answer"][i] for i in vidx])).sum(1).mean()
    np.testing.assert_allclose(m["text_reward"], ref, rtol=1e-6)

    # --- tracker: MLflow-valid names, the json logged
    from mlflow.utils.validation import _validate_metric_name
    for name in tracker.metrics:
        _validate_metric_name(name)
    assert tracker.metrics["eval/image2pose/synthetic/mpjpe"] == img["mpjpe"]
    assert "eval/text2pose/synthetic/protocol1/t2p_R_5" in tracker.metrics
    assert tracker.artifacts == [str(out)]


def test_pred_betas_and_joint_set_options(world, tmp_path):
    cfg = _cfg(best_of_n=0, joint_set="smpl24", max_text_samples=0, max_vqa_samples=2)
    m = R.evaluate_variant(cfg, world["policy"], world["evaluator"], {"test": world["test"]},
                           tmp_path / "m.json", text_embedder=HashEmbedder())
    assert "best_of_n_mpjpe" not in m["image2pose"]["synthetic"]
    assert m["text2pose"]["synthetic"]["num_samples"] == N_POSES      # 0 = all captions
    assert m["vqa"]["num_samples"] == 2
    assert m["meta"]["joint_set"] == "smpl24"


def test_errors_leave_no_output(world, tmp_path):
    out = tmp_path / "metrics.json"
    with pytest.raises(FileNotFoundError, match="missing.h5"):
        R.evaluate_variant(_cfg(), world["policy"], world["evaluator"],
                           {"test": tmp_path / "missing.h5"}, out)
    with pytest.raises(ValueError, match="h36m_bogus_test"):
        R.evaluate_variant(_cfg(), world["policy"], world["evaluator"],
                           {"test": world["test"], "h36m_bogus_test": world["test"]}, out)
    with pytest.raises(Exception, match="nowhere"):
        R.evaluate_variant(_cfg(), world["policy"], tmp_path / "nowhere", {"test": world["test"]},
                           out, text_embedder=HashEmbedder())
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_subset_indices_seeded_sorted_unique():
    a = R.subset_indices(100, 10, 3)
    assert np.array_equal(a, R.subset_indices(100, 10, 3))
    assert len(set(a.tolist())) == 10 and np.all(np.diff(a) > 0)
    assert not np.array_equal(a, R.subset_indices(100, 10, 4))
    assert np.array_equal(R.subset_indices(5, 0, 0), np.arange(5))
    assert np.array_equal(R.subset_indices(5, 9, 0), np.arange(5))


def test_best_of_n_and_format_and_cosine():
    e = np.array([3.0, 1.0, 2.0, 5.0, 4.0, 6.0])
    np.testing.assert_array_equal(R.best_of_n_errors(e, 3), [1.0, 4.0])
    with pytest.raises(ValueError):
        R.best_of_n_errors(e, 4)
    ok = R.format_matches([" The SMPL pose of this person is <POSE>. ", "The pose is <POSE>.",
                           "The SMPL  pose of this person is<POSE> ."],
                          EvalConfig().format_regex)
    assert ok.tolist() == [True, False, True]
    a, b = np.array([[3.0, 4.0], [1.0, 0.0]]), np.array([[3.0, 4.0], [0.0, 2.0]])
    np.testing.assert_allclose(R.embedding_cosine(a, b), [1.0, 0.0])


def test_fill_invalid_poses_uses_rest_pose():
    from poserft.body import vec6d_to_rotmats

    vec = torch.randn(3, 144)
    out = R.fill_invalid_poses(vec, torch.tensor([True, False, True]))
    assert torch.equal(out[0], vec[0]) and torch.equal(out[2], vec[2])
    torch.testing.assert_close(vec6d_to_rotmats(out[1:2])[0], torch.eye(3).expand(24, 3, 3))


def test_config_invariants():
    from poserft.configbase import ConfigError

    with pytest.raises(ConfigError, match="eval.max_text_samples"):
        EvalConfig.from_dict({"max_text_samples": 10}, where="eval")
    with pytest.raises(ConfigError, match="eval.recall_ks"):
        EvalConfig.from_dict({"recall_ks": [5, 64]}, where="eval")
    with pytest.raises(ConfigError, match="eval.format_regex"):
        EvalConfig.from_dict({"format_regex": "("}, where="eval")
    with pytest.raises(ConfigError, match="eval.image_benchmarks"):
        EvalConfig.from_dict({"image_benchmarks": ["coco"]}, where="eval")


def _frames_split(root, n=6, with_box=False):
    """A real-dataset-like split: full-frame PNGs (/image_paths) with the person in a red box."""
    from PIL import Image

    from poserft.data.h5io import write_split

    rng = np.random.default_rng(1)
    paths, kps = [], []
    for i in range(n):
        frame = np.zeros((60, 80, 3), np.uint8)
        frame[10:40, 30:60] = (255, 0, 0)                       # the "person"
        p = root / "frames" / f"f{i}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(frame).save(p)
        paths.append(f"frames/f{i}.png")                      # relative to the split's folder
        kp = np.stack([rng.uniform(33, 57, 24), rng.uniform(13, 37, 24)], 1)
        kp[0], kp[1] = (33, 13), (57, 37)                       # extent: 24 x 24 px
        kps.append(kp)
    arrays = {"poses/global_orient": np.zeros((n, 3), np.float32),
              "poses/body_pose": (rng.normal(size=(n, 23, 3)) * 0.2).astype(np.float32),
              "poses/betas": np.zeros((n, 10), np.float32),
              "joints": np.zeros((n, 24, 3), np.float32),
              "image_paths": paths, "keypoints2d": np.array(kps, np.float32)}
    if with_box:
        arrays["meta/bbox_center"] = np.tile([45.0, 25.0], (n, 1))
        arrays["meta/bbox_scale"] = np.full(n, 30 / 200)
    return write_split(root / "test.h5", arrays, {"source": "unit", "split": "test",
                                                 "body_model": "skeleton", "converter_params": {}})


@pytest.mark.parametrize("with_box", [False, True])
def test_full_frames_are_cropped_to_the_person(tmp_path, with_box):
    from poserft.data.h5io import SplitReader

    path = _frames_split(tmp_path, with_box=with_box)
    with SplitReader(path) as reader:
        boxes = R.person_boxes(reader, np.arange(3))
        want = [30.0, 10.0, 60.0, 40.0] if with_box else [30.6, 10.6, 59.4, 39.4]   # 1.2 x 24 px
        np.testing.assert_allclose(boxes[0], want, atol=1e-5)
        imgs = R._read_images(reader, np.arange(3), 16)
    assert imgs.shape == (3, 16, 16, 3)
    red = (imgs[..., 0] > 200) & (imgs[..., 1] < 50)
    assert red[2:-2, 2:-2].all()              # the crop is the person, not the black frame


def test_real_image_benchmark_split(world, tmp_path):
    path = _frames_split(tmp_path / "pw3d")
    m = R.evaluate_variant(_cfg(best_of_n=0, max_text_samples=0), world["policy"], world["evaluator"],
                           {"test": world["test"], "pw3d_test": path}, tmp_path / "m.json",
                           text_embedder=HashEmbedder())
    assert set(m["image2pose"]) == {"synthetic", "pw3d"} and set(m["text2pose"]) == {"synthetic"}
    assert m["image2pose"]["pw3d"]["num_samples"] == 6
