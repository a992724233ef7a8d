"""Contrastive training of the reward and evaluator retrieval models on a tiny captioned world.

The world: poses built from 7 binary attributes (elbows/knees bent, arms raised, torso
leaning) plus joint noise and a random yaw; captions state every attribute in random order
with synonyms. A model that reads the captions and the poses can retrieve; chance cannot.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from poserft.data.h5io import write_split
from poserft.retrieval.checkpoint import load_retrieval_model
from poserft.retrieval.config import RetrievalConfig
from poserft.retrieval.train import load_retrieval_split, role_pose_subset, train_retrieval
from poserft.text.tokenizer import load_tokenizer, read_split_texts, train_tokenizer

# (body_pose row = SMPL joint - 1, rotation vector when the attribute holds, words)
ATTRIBUTES = [
    (17, [0, 1.6, 0], "left elbow", ("bent", "flexed"), ("straight", "extended")),
    (18, [0, -1.6, 0], "right elbow", ("bent", "flexed"), ("straight", "extended")),
    (3, [1.7, 0, 0], "left knee", ("bent", "flexed"), ("straight", "extended")),
    (4, [1.7, 0, 0], "right knee", ("bent", "flexed"), ("straight", "extended")),
    (15, [0, 0, -1.3], "left arm", ("raised", "lifted up"), ("down", "lowered")),
    (16, [0, 0, 1.3], "right arm", ("raised", "lifted up"), ("down", "lowered")),
    (2, [0.8, 0, 0], "torso", ("leaning forward", "bent forward"), ("upright", "straight up")),
]
TRAIN_CFG = RetrievalConfig.from_dict(
    dict(epochs=25, lr=1e-3, batch_size=32, d_model=64, n_layers=1, ff_dim=128,
         pose_hidden_dim=128, latent_dim=64, torch_threads=1), where="retrieval")


def _world(n: int, seed: int, captions_per_pose: int = 3) -> dict:
    rng = np.random.default_rng(seed)
    on = rng.random((n, len(ATTRIBUTES))) < 0.5
    body = np.deg2rad(5.0) * rng.standard_normal((n, 23, 3))
    for a, (row, vec, *_) in enumerate(ATTRIBUTES):
        body[on[:, a], row] += np.asarray(vec)
    yaw = Rotation.from_rotvec(np.outer(rng.uniform(-np.pi, np.pi, n), [0.0, 1.0, 0.0]))
    tilt = Rotation.from_rotvec(np.deg2rad(5.0) * rng.standard_normal((n, 3)))
    texts, index = [], []
    for i in range(n):
        for _ in range(captions_per_pose):
            parts = []
            for a in rng.permutation(len(ATTRIBUTES)):
                _, _, name, yes, no = ATTRIBUTES[a]
                parts.append(f"the {name} is {(yes if on[i, a] else no)[rng.integers(2)]}")
            opener = "the person stands with " if rng.random() < 0.5 else ""
            texts.append(opener + ", ".join(parts) + ".")
            index.append(i)
    return {"poses/global_orient": (yaw * tilt).as_rotvec().astype(np.float32),
            "poses/body_pose": body.astype(np.float32),
            "poses/betas": np.zeros((n, 10), np.float32),
            "joints": np.zeros((n, 24, 3), np.float32),
            "captions/text": texts, "captions/pose_index": np.asarray(index, np.int64)}


def _write(folder, split: str, arrays: dict) -> str:
    attrs = {"source": "test-world", "split": split, "body_model": "skeleton",
             "converter_params": {}}
    return str(write_split(folder / f"{split}.h5", arrays, attrs))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("world")
    paths = {split: _write(folder, split, _world(n, seed))
             for seed, (split, n) in enumerate((("train", 400), ("val", 100), ("test", 100)))}
    tok = train_tokenizer(read_split_texts(list(paths.values())), 400, folder / "tokenizer.json")
    return paths, tok, folder


class RecordingTracker:
    def __init__(self):
        self.metrics: list[tuple[int | None, dict]] = []
        self.params: list[dict] = []

    def log_params(self, params): self.params.append(dict(params))
    def log_metrics(self, metrics, step=None): self.metrics.append((step, dict(metrics)))
    def log_artifact(self, path, artifact_path=None): ...
    def set_tags(self, tags): ...


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    paths, tok, _ = world
    out = tmp_path_factory.mktemp("retrieval")
    results, trackers, seconds = {}, {}, {}
    for role in ("reward", "evaluator"):
        trackers[role] = RecordingTracker()
        start = time.perf_counter()
        results[role] = train_retrieval(TRAIN_CFG, role, paths, tok, out / role,
                                        tracker=trackers[role])
        seconds[role] = time.perf_counter() - start
    return results, trackers, seconds, out


def test_evaluator_retrieves_far_above_chance(trained):
    results, _, seconds, out = trained
    for role, s in results.items():
        full, chance = s["test"]["full"]["mRecall"], s["chance"]["full"]["mRecall"]
        print(f"{role}: test mRecall full {full:.1f} (chance {chance:.1f}), sampled "
              f"{s['test']['sampled']['mRecall']:.1f} (chance {s['chance']['sampled']['mRecall']:.1f}),"
              f" pair accuracy {s['test_pair_accuracy']:.3f}, {seconds[role]:.1f}s")
        assert chance < 15.0
        assert full > 3 * chance, (role, full, chance)
        assert s["test"]["sampled"]["mRecall"] > s["chance"]["sampled"]["mRecall"] + 30
        assert s["test_pair_accuracy"] > 0.9, (role, s["test_pair_accuracy"])


def test_outputs_and_recall_json(trained, world):
    results, _, _, out = trained
    for role in ("reward", "evaluator"):
        d = out / role
        assert {"model.safetensors", "config.json", "tokenizer.json", "recall.json"} <= \
            {p.name for p in d.iterdir()}
        assert not [p for p in d.iterdir() if p.name.startswith(".")]  # no temp leftovers
        recall = json.loads((d / "recall.json").read_text())
        assert set(recall) == {"full", "sampled"}
        for protocol in ("full", "sampled"):
            assert set(recall[protocol]) == {"t2p_R@5", "t2p_R@10", "t2p_R@20", "p2t_R@5",
                                             "p2t_R@10", "p2t_R@20", "mRecall"}
            assert recall[protocol] == pytest.approx(results[role]["test"][protocol])
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["role"] == role and cfg["seed"] == results[role]["seed"]
        assert cfg["best_epoch"] == results[role]["best_epoch"]
        assert cfg["tokenizer"]["vocab_size"] == len(load_tokenizer(world[1]))


def test_best_epoch_is_the_best_validation_epoch(trained):
    results, trackers, _, _ = trained
    for role, tracker in trackers.items():
        per_epoch = [(step, m["val/full/mRecall"]) for step, m in tracker.metrics
                     if "val/full/mRecall" in m]
        assert [s for s, _ in per_epoch] == list(range(TRAIN_CFG.epochs))
        best_step, best_value = max(per_epoch, key=lambda sv: (sv[1], -sv[0]))
        assert results[role]["best_epoch"] == best_step
        assert results[role]["val_mRecall"] == pytest.approx(best_value)
        first = [m for _, m in tracker.metrics][0]
        assert "val/sampled/t2p_R_at_5" in first and "train/loss" in first
        # training lowered the contrastive loss
        losses = [m["train/loss"] for _, m in tracker.metrics if "train/loss" in m]
        assert losses[-1] < losses[0] - 0.5


def test_roles_differ_and_reload_identically(trained, world):
    _, _, _, out = trained
    paths, _, _ = world
    test = load_retrieval_split(paths["test"])
    reward = load_retrieval_model(out / "reward")
    evaluator = load_retrieval_model(out / "evaluator")
    poses = test.pose_vec6d[:50]
    pr, pe = reward.embed_poses(poses), evaluator.embed_poses(poses)
    assert (pr - pe).abs().max() > 0.1  # different seeds and training poses
    # in-memory twin: reload twice, and re-embed with a model rebuilt from the same files
    again = load_retrieval_model(out / "reward")
    torch.testing.assert_close(again.embed_poses(poses), pr, atol=0, rtol=0)
    torch.testing.assert_close(again.embed_texts(test.captions[:20]),
                               reward.embed_texts(test.captions[:20]), atol=0, rtol=0)


def test_saved_model_equals_in_memory_model(world, tmp_path, monkeypatch):
    """Capture the in-memory model that train_retrieval saves and compare it with the
    model loaded back from disk on the whole test split."""
    import poserft.retrieval.train as train_mod
    paths, tok, _ = world
    captured = {}
    original = train_mod.save_retrieval_model

    def capture(model, out_dir, meta):
        captured["model"] = model
        return original(model, out_dir, meta)

    monkeypatch.setattr(train_mod, "save_retrieval_model", capture)
    threads = torch.get_num_threads()
    cfg = RetrievalConfig.from_dict({"epochs": 2}, where="retrieval", base=TRAIN_CFG)
    train_retrieval(cfg, "reward", paths, tok, tmp_path / "m")
    assert torch.get_num_threads() == threads  # torch_threads is restored afterwards
    test = load_retrieval_split(paths["test"])
    in_memory, loaded = captured["model"].eval(), load_retrieval_model(tmp_path / "m")
    torch.testing.assert_close(loaded.embed_poses(test.pose_vec6d),
                               in_memory.embed_poses(test.pose_vec6d), atol=0, rtol=0)
    torch.testing.assert_close(loaded.embed_texts(test.captions),
                               in_memory.embed_texts(test.captions), atol=0, rtol=0)


def test_role_subsets():
    pool = np.repeat(np.arange(10), 3)
    cfg = RetrievalConfig()
    reward, evaluator = role_pose_subset(pool, cfg, "reward"), role_pose_subset(pool, cfg, "evaluator")
    assert len(reward) == 5 and len(evaluator) == 5
    assert set(reward) | set(evaluator) == set(range(10)) and not set(reward) & set(evaluator)
    frac = RetrievalConfig.from_dict({"role_subsets": "random_fraction", "subset_fraction": 0.8})
    a, b = role_pose_subset(pool, frac, "reward"), role_pose_subset(pool, frac, "evaluator")
    assert len(a) == len(b) == 8 and not np.array_equal(a, b)
    shared = RetrievalConfig.from_dict({"share_evaluator_with_reward": True})
    np.testing.assert_array_equal(role_pose_subset(pool, shared, "reward"), np.arange(10))


def test_bad_inputs_leave_no_output(world, tmp_path):
    paths, tok, folder = world
    arrays = _world(10, seed=9)
    del arrays["captions/text"], arrays["captions/pose_index"]
    no_captions = _write(folder, "nocap", arrays)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="nocap.h5: no captions"):
        train_retrieval(TRAIN_CFG, "reward", {**paths, "val": no_captions}, tok, out)
    with pytest.raises(ValueError, match="role 'judge'"):
        train_retrieval(TRAIN_CFG, "judge", paths, tok, out)
    with pytest.raises(ValueError, match=r"no source has a 'test' split"):
        train_retrieval(TRAIN_CFG, "reward", {"train": paths["train"], "val": paths["val"]},
                        tok, out)
    assert not out.exists()
