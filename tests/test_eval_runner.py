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


def _leaves(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_leaves(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_metrics_do_not_depend_on_the_generate_batch_size(world, tmp_path):
    """eval.batch_size (prompts per generate call) changes only float rounding of the greedy
    metrics; the best-of-N draws share one generator per batch, so they are left out here.
    The policy is taught the answer format first, so that poses are generated (an untrained
    one emits no <POSE> and every pose would be the rest pose)."""
    from poserft.model.io import load_policy, save_policy
    from poserft.train.testing import teach_answer_format

    torch.manual_seed(0)
    save_policy(teach_answer_format(load_policy(world["policy"]), world["test"], 30),
                tmp_path / "taught")
    runs = {}
    for bs in (1, 8):
        cfg = _cfg(batch_size=bs, best_of_n=0, device="cpu", max_new_tokens=24)
        m = R.evaluate_variant(cfg, tmp_path / "taught", world["evaluator"],
                               {"test": world["test"]}, tmp_path / f"m{bs}.json",
                               text_embedder=HashEmbedder())
        assert m["meta"]["device"] == "cpu"
        runs[bs] = _leaves({k: v for k, v in m.items() if k != "meta"})
    assert set(runs[1]) == set(runs[8]) and len(runs[1]) > 20
    assert runs[1]["image2pose/synthetic/pose_valid_rate"] > 0.5
    assert runs[1]["text2pose/synthetic/pose_valid_rate"] > 0.5
    for key, v in runs[1].items():
        np.testing.assert_allclose(runs[8][key], v, rtol=1e-5, atol=1e-6, err_msg=key)


def test_eval_device_option(monkeypatch):
    from poserft.configbase import ConfigError

    assert EvalConfig().device == "auto"
    assert R.resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert R.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        R.resolve_device("cuda")
    for bad in ("gpu", "cuda:x", "tpu"):
        with pytest.raises(ConfigError, match="eval.device"):
            _cfg(device=bad)
    assert _cfg(device="cuda:1").device == "cuda:1"


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
    # the default regex is the default answer template (model.config owns both)
    from poserft.model.config import DEFAULT_FORMAT_REGEX, ModelConfig
    assert EvalConfig().format_regex == DEFAULT_FORMAT_REGEX
    assert R.format_matches([ModelConfig().pose_answer], DEFAULT_FORMAT_REGEX).tolist() == [True]
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


# ----------------------------------------------------------- text->pose errors, bounds --
def _np_rodrigues(aa: np.ndarray) -> np.ndarray:
    """(...,3) axis-angle -> (...,3,3) rotation matrices (numpy)."""
    aa = np.asarray(aa, dtype=np.float64)
    theta = np.linalg.norm(aa, axis=-1, keepdims=True)
    k = aa / np.where(theta < 1e-12, 1.0, theta)
    K = np.zeros(aa.shape[:-1] + (3, 3))
    K[..., 0, 1], K[..., 0, 2], K[..., 1, 2] = -k[..., 2], k[..., 1], -k[..., 0]
    K = K - np.swapaxes(K, -1, -2)
    t = theta[..., None]
    return np.eye(3) + np.sin(t) * K + (1 - np.cos(t)) * (K @ K)


def _np_ry(angle: np.ndarray) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    R = np.zeros(np.shape(angle) + (3, 3))
    R[..., 0, 0], R[..., 0, 2], R[..., 1, 1], R[..., 2, 0], R[..., 2, 2] = c, s, 1.0, -s, c
    return R


def _np_yaw_free(R: np.ndarray) -> np.ndarray:
    """Root rotations (n,3,3) with their twist about +y removed (numpy)."""
    yaw = np.arctan2(R[:, 0, 2] - R[:, 2, 0], R[:, 0, 0] + R[:, 2, 2])
    return _np_ry(-yaw) @ R


def _np_gram_schmidt(v6: np.ndarray) -> np.ndarray:
    """(...,6) first-column-then-second-column 6D -> (...,3,3)."""
    a1, a2 = v6[..., :3], v6[..., 3:]
    b1 = a1 / np.linalg.norm(a1, axis=-1, keepdims=True)
    b2 = a2 - (b1 * a2).sum(-1, keepdims=True) * b1
    b2 = b2 / np.linalg.norm(b2, axis=-1, keepdims=True)
    return np.stack([b1, b2, np.cross(b1, b2)], axis=-1)


def _np_vec(R24: np.ndarray) -> np.ndarray:
    """(n,24,3,3) -> (n,144) 6D (first column, then second column, per joint)."""
    return np.concatenate([R24[..., :, 0], R24[..., :, 1]], axis=-1).reshape(len(R24), 144)


def _np_pose_rotmats(orient: np.ndarray, body_pose: np.ndarray, yaw_free=False) -> np.ndarray:
    R = _np_rodrigues(np.concatenate([orient[:, None], body_pose], axis=1))
    if yaw_free:
        R[:, 0] = _np_yaw_free(R[:, 0])
    return R


def _np_errors(pred_R24: np.ndarray, gt_R24: np.ndarray) -> tuple[float, float]:
    """Pelvis-aligned MPJPE and Umeyama PA-MPJPE (mm) through the skeleton's FK."""
    pj, pp = _skeleton_joints(torch.as_tensor(_np_vec(pred_R24), dtype=torch.float32))
    gj, gp = _skeleton_joints(torch.as_tensor(_np_vec(gt_R24), dtype=torch.float32))
    pj, gj = pj - pp[:, None], gj - gp[:, None]
    return (np.linalg.norm(pj - gj, axis=-1).mean(-1) * 1000).mean(), _umeyama_pa(pj, gj).mean()


class ScriptedPolicy:
    """A test double of the policy: ``pose_for(prompt) -> (144,)`` decides every answer."""

    config = type("C", (), {"clip_image_size": IMG})()

    def __init__(self, pose_for):
        self.pose_for = pose_for

    def image2pose_prompt(self):
        return "<image> pose?"

    def text2pose_prompt(self, caption):
        return caption

    def generate(self, prompts, images=None, num_samples=1, **kw):
        vec = torch.stack([self.pose_for(p) for p in prompts]).float()
        vec = vec.repeat_interleave(num_samples, 0)
        n = vec.shape[0]
        return type("Roll", (), {"texts": ["The SMPL pose of this person is <POSE>."] * n,
                                 "pose_valid": torch.ones(n, dtype=torch.bool),
                                 "pose_mean": vec, "pose_sample": vec})()


def _text_split(path, yaw=0.0, n=12):
    """Poses with a large root yaw, two captions per pose in a shuffled order."""
    from poserft.data.h5io import write_split
    from poserft.model.testing import TEST_TEXTS

    rng = np.random.default_rng(5)
    body_pose = (rng.normal(size=(n, 23, 3)) * 0.3).astype(np.float32)
    R0 = _np_ry(rng.uniform(-3, 3, n) + yaw) @ _np_rodrigues(rng.normal(size=(n, 3)) * 0.4)
    from poserft.body.rotations import matrix_to_axis_angle
    orient = matrix_to_axis_angle(torch.as_tensor(R0)).numpy().astype(np.float32)
    pose_index = rng.permutation(np.repeat(np.arange(n), 2))
    arrays = {"poses/global_orient": orient, "poses/body_pose": body_pose,
              "poses/betas": np.zeros((n, 10), np.float32), "joints": np.zeros((n, 24, 3), np.float32),
              "captions/text": [f"{TEST_TEXTS[int(p) % 3]} number {i}" for i, p in enumerate(pose_index)],
              "captions/pose_index": pose_index}
    return write_split(path, arrays, {"source": "unit", "split": "test", "body_model": "skeleton",
                                      "converter_params": {}}), arrays


def test_text2pose_errors_match_numpy_reference(world, tmp_path):
    from poserft.body import load
    from poserft.data.h5io import SplitReader
    from poserft.model.io import load_policy
    from poserft.retrieval.checkpoint import load_retrieval_model

    cfg = _cfg()
    path, a = _text_split(tmp_path / "a" / "test.h5")
    policy = load_policy(world["policy"]).eval()
    ev = load_retrieval_model(world["evaluator"]).eval()
    with torch.inference_mode(), SplitReader(path) as reader:
        out, _ = R.evaluate_text2pose(policy, ev, load(None), reader, cfg)
    assert out["num_samples"] == 20

    # numpy: the caption's own pose (pose_index), both roots yaw-free
    cidx = R.subset_indices(24, 20, 0)
    rows = a["captions/pose_index"][cidx]
    gt = _np_pose_rotmats(a["poses/global_orient"][rows], a["poses/body_pose"][rows], yaw_free=True)
    caps = [a["captions/text"][i] for i in cidx]
    roll = policy.generate([policy.text2pose_prompt(c) for c in caps], max_new_tokens=6,
                           do_sample=False)
    rest = torch.tensor([1.0, 0, 0, 0, 1, 0]).repeat(24)
    vec = torch.where(roll.pose_valid[:, None], roll.pose_mean, rest).double().numpy()
    pred = _np_gram_schmidt(vec.reshape(-1, 24, 6))
    pred[:, 0] = _np_yaw_free(pred[:, 0])
    ref_mpjpe, ref_pa = _np_errors(pred, gt)
    np.testing.assert_allclose(out["mpjpe"], ref_mpjpe, rtol=1e-4)
    np.testing.assert_allclose(out["pa_mpjpe"], ref_pa, rtol=1e-4)
    # the wrong pairing (caption row instead of its pose_index) gives another number
    wrong = _np_pose_rotmats(a["poses/global_orient"][cidx % 12], a["poses/body_pose"][cidx % 12], True)
    assert abs(_np_errors(pred, wrong)[0] - ref_mpjpe) > 1.0

    # the generated pose's yaw is removed too: the caption's pose as it faces in the split
    # (root yaw up to +-3 rad) is a perfect answer
    from poserft.body import smpl_to_vec6d
    facing = smpl_to_vec6d(torch.as_tensor(a["poses/global_orient"]), torch.as_tensor(a["poses/body_pose"]))
    by_caption = {c: facing[int(i)] for c, i in zip(a["captions/text"], a["captions/pose_index"])}
    with torch.inference_mode(), SplitReader(path) as reader:
        exact, _ = R.evaluate_text2pose(ScriptedPolicy(by_caption.__getitem__), ev, load(None),
                                        reader, cfg)
    assert exact["mpjpe"] < 1e-2 and exact["pa_mpjpe"] < 1e-2

    # yaw-free: turning every body about the vertical changes nothing
    path_b, _ = _text_split(tmp_path / "b" / "test.h5", yaw=1.3)
    with torch.inference_mode(), SplitReader(path_b) as reader:
        out_b, _ = R.evaluate_text2pose(policy, ev, load(None), reader, cfg)
    np.testing.assert_allclose([out_b["mpjpe"], out_b["pa_mpjpe"]], [out["mpjpe"], out["pa_mpjpe"]],
                               rtol=1e-4)


def test_pose6d_without_root_yaw_is_yaw_invariant_and_idempotent():
    from poserft.body import smpl_to_vec6d
    from poserft.retrieval.features import pose6d_without_root_yaw

    rng = np.random.default_rng(2)
    R0 = _np_rodrigues(rng.normal(size=(5, 3)))
    bp = torch.as_tensor(rng.normal(size=(5, 23, 3)) * 0.3, dtype=torch.float32)
    from poserft.body.rotations import matrix_to_axis_angle
    v = smpl_to_vec6d(matrix_to_axis_angle(torch.as_tensor(R0)).float(), bp)
    turned = smpl_to_vec6d(matrix_to_axis_angle(torch.as_tensor(_np_ry(0.9) @ R0)).float(), bp)
    free = pose6d_without_root_yaw(v)
    torch.testing.assert_close(pose6d_without_root_yaw(turned), free, atol=1e-5, rtol=0)
    torch.testing.assert_close(pose6d_without_root_yaw(free), free, atol=1e-6, rtol=0)
    assert torch.equal(free[:, 6:], v[:, 6:])
    want = _np_yaw_free(R0)
    np.testing.assert_allclose(free[:, :6].numpy(), _np_vec(np.repeat(want[:, None], 24, 1))[:, :6],
                               atol=1e-5)


@pytest.fixture(scope="module")
def train_split(world):
    """A synthetic-like train split: camera-frame roots, captions on some poses twice."""
    from poserft.data.h5io import write_split

    rng = np.random.default_rng(7)
    n = 30
    rows = np.concatenate([np.arange(n), np.arange(10)])          # poses 0..9 captioned twice
    arrays = {"poses/global_orient": (rng.normal(size=(n, 3)) * 0.8).astype(np.float32),
              "poses/body_pose": (rng.normal(size=(n, 23, 3)) * 0.3 + 0.1).astype(np.float32),
              "poses/betas": np.zeros((n, 10), np.float32), "joints": np.zeros((n, 24, 3), np.float32),
              "image_pose/global_orient": (rng.normal(size=(n, 3)) * 0.5).astype(np.float32),
              "captions/text": [f"train caption {i}" for i in range(len(rows))],
              "captions/pose_index": rows}
    path = write_split(world["root"] / "synthetic" / "train.h5", arrays,
                       {"source": "unit", "split": "train", "body_model": "skeleton",
                        "converter_params": {}})
    return path, arrays


def test_floor_mean_poses_are_the_sft_targets_means(train_split):
    """One mean-pose computation: the eval floor is SFT's per-task mean (text targets with
    the root yaw removed), normalised to rotations."""
    from poserft.data.h5io import SplitReader
    from poserft.model.config import ModelConfig
    from poserft.train.data import SFTTaskData

    data = SFTTaskData(train_split[0], ModelConfig(), {"text2pose": 1.0},
                       text2pose_remove_yaw=True)
    with SplitReader(train_split[0]) as reader:
        means = R.train_mean_poses(reader)
    assert set(means) == {"image2pose", "text2pose"}
    for task, mean in means.items():
        assert torch.equal(mean, R.normalise_pose6d(data.mean_pose6d(task)))
        torch.testing.assert_close(data.mean_pose6d(task),
                                   data.task_targets(task).double().mean(0).float())


def test_reference_mean_pose_matches_numpy_and_the_variant_path(world, train_split, tmp_path):
    from poserft.body import load
    from poserft.data.h5io import SplitReader
    from poserft.retrieval.checkpoint import load_retrieval_model

    cfg = _cfg(best_of_n=0)
    out = tmp_path / "reference" / "metrics.json"
    tracker = RecordingTracker()
    m = R.evaluate_reference(cfg, train_split[0], world["test"], world["evaluator"], out,
                             tracker=tracker)
    assert json.loads(out.read_text()) == json.loads(json.dumps(m))
    assert tracker.artifacts == [str(out)] and "reference/text2pose/synthetic/oracle/mpjpe" in tracker.metrics
    t, a = train_split[1], world["arrays"]

    # --- numpy: image->pose mean pose (camera-frame roots, mean 6D, Gram-Schmidt)
    mean = _np_gram_schmidt(_np_vec(_np_pose_rotmats(t["image_pose/global_orient"],
                                                     t["poses/body_pose"])).mean(0).reshape(24, 6))
    idx = R.subset_indices(N_POSES, 10, 0)
    gt = _np_pose_rotmats(a["image_pose/global_orient"][idx], a["poses/body_pose"][idx])
    ref = _np_errors(np.repeat(mean[None], len(idx), 0), gt)
    img = m["image2pose"]["synthetic"]
    np.testing.assert_allclose([img["mean_pose"]["mpjpe"], img["mean_pose"]["pa_mpjpe"]], ref, rtol=1e-4)
    assert img["num_samples"] == 10 and img["oracle"]["mpjpe"] < 1e-3

    # --- numpy: text->pose mean pose (yaw-free canonical roots, per caption)
    rows = t["captions/pose_index"]
    tmean = _np_gram_schmidt(_np_vec(_np_pose_rotmats(t["poses/global_orient"][rows],
                                                      t["poses/body_pose"][rows], True)
                                     ).mean(0).reshape(24, 6))
    tmean[0] = _np_yaw_free(tmean[None, 0])[0]
    cidx = R.subset_indices(N_POSES, 20, 0)
    cgt = _np_pose_rotmats(a["poses/global_orient"][cidx], a["poses/body_pose"][cidx], True)
    ref = _np_errors(np.repeat(tmean[None], len(cidx), 0), cgt)
    txt = m["text2pose"]["synthetic"]
    np.testing.assert_allclose([txt["mean_pose"]["mpjpe"], txt["mean_pose"]["pa_mpjpe"]], ref, rtol=1e-4)

    # --- the same numbers from a "policy" answering the mean pose, through the variant path
    with SplitReader(train_split[0]) as reader:
        means = R.train_mean_poses(reader)
    body, ev = load(None), load_retrieval_model(world["evaluator"]).eval()
    with torch.inference_mode(), SplitReader(world["test"]) as reader:
        v_img, _ = R.evaluate_image2pose(ScriptedPolicy(lambda p: means["image2pose"]), body,
                                         reader, cfg, torch.Generator())
        v_txt, _ = R.evaluate_text2pose(ScriptedPolicy(lambda p: means["text2pose"]), ev, body,
                                        reader, cfg)
    assert {k: v_img[k] for k in ("mpjpe", "pa_mpjpe")} == img["mean_pose"]
    assert {k: v_txt[k] for k in txt["mean_pose"]} == txt["mean_pose"]
    # chance: the closed form for this many captions
    assert txt["chance"] == R.chance_recall(20, cfg.recall_ks, cfg.protocol2_candidates)
    assert txt["num_samples"] == 20


def test_oracle_recall_equals_gt_poses_through_the_variant_path(world, train_split, tmp_path):
    from poserft.body import load, smpl_to_vec6d
    from poserft.data.h5io import SplitReader
    from poserft.retrieval.checkpoint import load_retrieval_model
    from poserft.retrieval.features import pose6d_without_root_yaw

    cfg = _cfg(best_of_n=0, max_text_samples=0)
    m = R.evaluate_reference(cfg, train_split[0], world["test"], world["evaluator"],
                             tmp_path / "ref.json")
    a = world["arrays"]
    gt = pose6d_without_root_yaw(smpl_to_vec6d(torch.as_tensor(a["poses/global_orient"]),
                                               torch.as_tensor(a["poses/body_pose"])))
    by_caption = {c: gt[int(i)] for c, i in zip(a["captions/text"], a["captions/pose_index"])}
    with torch.inference_mode(), SplitReader(world["test"]) as reader:
        variant, _ = R.evaluate_text2pose(ScriptedPolicy(by_caption.__getitem__),
                                          load_retrieval_model(world["evaluator"]).eval(),
                                          load(None), reader, cfg)
    oracle = m["text2pose"]["synthetic"]["oracle"]
    for protocol in ("protocol1", "protocol2"):
        assert oracle[protocol] == variant[protocol]
    assert oracle["mpjpe"] < 1e-3 and oracle["pa_mpjpe"] < 1e-3 and variant["mpjpe"] < 1e-3
    assert m["text2pose"]["synthetic"]["num_samples"] == N_POSES
    # the oracle beats the mean pose, which (every pose the same, ties lose) finds nothing
    mean = m["text2pose"]["synthetic"]["mean_pose"]
    assert oracle["protocol1"]["mRecall"] > mean["protocol1"]["mRecall"]
    assert mean["mpjpe"] > 10 * max(oracle["mpjpe"], 1e-3)


def test_chance_recall_matches_monte_carlo():
    from poserft.eval.metrics import retrieval_recall

    M, ks, N, repeats = 40, (1, 5, 8), 8, 3
    chance = R.chance_recall(M, ks, N)
    assert chance["protocol1"]["t2p_R@5"] == pytest.approx(100 * 5 / 40)
    assert chance["protocol2"]["p2t_R@8"] == pytest.approx(100.0)       # K = N: always a hit
    assert chance["protocol2"]["t2p_R@1"] == pytest.approx(100 / 8)
    rng = np.random.default_rng(0)
    runs = {"protocol1": [], "protocol2": []}
    for trial in range(300):
        t, p = rng.normal(size=(M, 16)), rng.normal(size=(M, 16))
        runs["protocol1"].append(retrieval_recall(t, p, np.arange(M), ks=ks, protocol="full"))
        runs["protocol2"].append(retrieval_recall(t, p, np.arange(M), ks=ks, protocol="sampled",
                                                  n_candidates=N, repeats=repeats, seed=trial))
    for protocol, results in runs.items():
        for key, want in chance[protocol].items():
            vals = np.array([r[key] for r in results])
            se = vals.std(ddof=1) / np.sqrt(len(vals))
            assert abs(vals.mean() - want) <= 4 * se + 0.05, (protocol, key, vals.mean(), want)


def test_chance_recall_with_same_pose_groups_matches_monte_carlo():
    """Protocol 1 with caption groups (3 captions per pose, one of 2): each caption competes
    with the candidates outside its group only."""
    from poserft.eval.metrics import retrieval_recall

    rows = np.array([0, 0, 0, 1, 1, 2, 3, 3, 3, 4, 5, 5])
    M, ks = len(rows), (1, 3, 10)
    chance = R.chance_recall(M, ks, 4, pose_rows=rows)
    pools = np.array([10, 10, 10, 11, 11, 12, 10, 10, 10, 12, 11, 11], dtype=float)
    assert chance["protocol1"]["t2p_R@3"] == pytest.approx(100 * np.mean(3 / pools))
    assert chance["protocol1"]["p2t_R@10"] == pytest.approx(100 * np.mean(np.minimum(10, pools) / pools))
    rng = np.random.default_rng(1)
    results = [retrieval_recall(rng.normal(size=(M, 8)), rng.normal(size=(M, 8)), np.arange(M),
                                ks=ks, protocol="full", pose_groups=rows) for _ in range(2000)]
    for key, want in chance["protocol1"].items():
        vals = np.array([r[key] for r in results])
        se = vals.std(ddof=1) / np.sqrt(len(vals))
        assert abs(vals.mean() - want) <= 4 * se + 0.05, (key, vals.mean(), want)
    with pytest.raises(ValueError, match="pose_rows"):
        R.chance_recall(M, ks, 4, pose_rows=rows[:-1])


def test_reference_rows_reach_the_tables(world, train_split, tmp_path):
    """The keys evaluate_reference writes are the ones build_tables reads."""
    import pandas as pd

    from poserft.eval import tables as T

    cfg = _cfg(best_of_n=0, max_vqa_samples=2)
    run = tmp_path / "runs" / "dist" / "seed0" / "metrics.json"
    ref = tmp_path / "reference" / "metrics.json"
    m = R.evaluate_variant(cfg, world["policy"], world["evaluator"], {"test": world["test"]}, run,
                           text_embedder=HashEmbedder())
    r = R.evaluate_reference(cfg, train_split[0], world["test"], world["evaluator"], ref)
    assert {"mpjpe", "pa_mpjpe"} <= set(m["text2pose"]["synthetic"])
    outs = {k: tmp_path / "tables" / (k.rsplit("_", 1)[0] + "." + k.rsplit("_", 1)[1])
            for k in T.TABLE_FILES}
    T.build_tables([run], outs, {"dist": ""}, reference=ref)
    text = pd.read_csv(outs["text2pose_csv"])
    row = text[(text.Method == "oracle (GT poses)") & (text.Protocol == "P1 (full)")].iloc[0]
    np.testing.assert_allclose(row["mRecall"], r["text2pose"]["synthetic"]["oracle"]["protocol1"]["mRecall"],
                               rtol=1e-5)
    row = text[(text.Method == "dist") & (text.Protocol == "P2 (N=32, R=10)")].iloc[0]
    np.testing.assert_allclose(row["PA-MPJPE"], m["text2pose"]["synthetic"]["pa_mpjpe"], rtol=1e-5)
    img = pd.read_csv(outs["image2pose_csv"])
    assert list(img.Method) == ["mean pose (floor)", "dist", "oracle (GT poses)"]


def test_dry_run_schedules_evaluate_reference_once():
    """One evaluate_reference job for all variants and seeds, and the tables rule reads it."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "snakemake", "all", "-n", "--forceall", "--nolock",
                           "--cores", "1", "--configfile", "configs/seeds.yaml"],
                          cwd=root, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", out.split("Job stats:")[1].split("\n\n")[0], re.M))
    assert counts["evaluate_reference"] == "1"
    assert int(counts["evaluate"]) > 1                      # several variants x seeds
    tables = out.split("rule tables:")[1].split("\n\n")[0]
    assert "results/reference/metrics.json" in tables
