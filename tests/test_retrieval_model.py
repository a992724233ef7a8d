"""Retrieval model pieces: InfoNCE loss, yaw-free pose features, encoders, checkpoints,
the semantic reward. All on untrained small models (training is in test_retrieval_train)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from poserft.body.posevec import smpl_to_vec6d
from poserft.configbase import ConfigError
from poserft.retrieval.checkpoint import (RetrievalCheckpointError, load_retrieval_model,
                                          save_retrieval_model)
from poserft.retrieval.config import RetrievalConfig
from poserft.retrieval.features import (FEATURE_DIM, remove_root_yaw, retrieval_pose_features,
                                        rotation_about_y, yaw_angle)
from poserft.retrieval.losses import symmetric_infonce
from poserft.retrieval.reward import SemanticReward
from poserft.retrieval.train import build_model
from poserft.text.tokenizer import train_tokenizer

SMALL = dict(d_model=32, n_layers=1, n_heads=2, ff_dim=64, pose_hidden_dim=64, latent_dim=16,
             max_text_len=16)
TEXTS = ["the left arm is raised", "the person squats with bent knees",
         "the torso leans forward", "the right elbow is bent and the left knee is straight"]


def _random_vec6d(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(n, 3, generator=g)
    body = 0.4 * torch.randn(n, 23, 3, generator=g)
    return smpl_to_vec6d(go, body)


# ----------------------------------------------------------------------------- loss

def test_symmetric_infonce_matches_hand_computation_3x3():
    angles_t = [0.0, 2.0, 4.0]
    angles_p = [0.3, 1.5, 4.4]
    text = np.array([[math.cos(a), math.sin(a)] for a in angles_t])
    pose = np.array([[math.cos(a), math.sin(a)] for a in angles_p])
    scale = 5.0
    logits = [[scale * float(text[i] @ pose[j]) for j in range(3)] for i in range(3)]
    # explicit cross-entropies: rows (text -> pose) and columns (pose -> text)
    rows = [-logits[i][i] + math.log(sum(math.exp(logits[i][j]) for j in range(3)))
            for i in range(3)]
    cols = [-logits[j][j] + math.log(sum(math.exp(logits[i][j]) for i in range(3)))
            for j in range(3)]
    expected = 0.5 * (sum(rows) / 3 + sum(cols) / 3)

    loss, metrics = symmetric_infonce(torch.tensor(text), torch.tensor(pose),
                                      torch.tensor(scale, dtype=torch.float64))
    assert float(loss) == pytest.approx(expected, rel=1e-12)
    assert metrics["loss_t2p"] == pytest.approx(sum(rows) / 3, rel=1e-12)
    assert metrics["loss_p2t"] == pytest.approx(sum(cols) / 3, rel=1e-12)
    # every text's best pose is its own here (angles close to the matching one)
    assert metrics["acc_t2p"] == 1.0 and metrics["acc_p2t"] == 1.0


def test_symmetric_infonce_gradient_flows_to_scale_and_rejects_bad_shapes():
    t = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1).requires_grad_()
    log_scale = torch.tensor(1.0, requires_grad=True)
    loss, _ = symmetric_infonce(t, t.detach(), log_scale.exp())
    loss.backward()
    assert t.grad is not None and log_scale.grad is not None
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        symmetric_infonce(torch.randn(3, 4), torch.randn(4, 4), 1.0)


# ----------------------------------------------------------------------------- features

def test_yaw_angle_and_removal_against_scipy():
    rng = np.random.default_rng(0)
    a = rng.uniform(-3.0, 3.0, 16)
    b = rng.uniform(-1.2, 1.2, 16)
    ry = Rotation.from_rotvec(np.stack([np.zeros(16), a, np.zeros(16)], 1))
    rx = Rotation.from_rotvec(np.stack([b, np.zeros(16), np.zeros(16)], 1))
    mats = torch.tensor((ry * rx).as_matrix())  # twist about y, then a swing about x
    np.testing.assert_allclose(yaw_angle(mats).numpy(), a, atol=1e-10)
    np.testing.assert_allclose(remove_root_yaw(mats).numpy(), rx.as_matrix(), atol=1e-10)
    np.testing.assert_allclose(rotation_about_y(torch.tensor(a)).numpy(), ry.as_matrix(),
                               atol=1e-12)


def test_features_are_invariant_to_world_yaw():
    vec = _random_vec6d(32, seed=1).double()
    feats = retrieval_pose_features(vec)
    assert feats.shape == (32, FEATURE_DIM)
    root = vec.reshape(32, 24, 6)[:, 0]
    from poserft.body.rotations import matrix_to_rot6d, rot6d_to_matrix
    for phi in (0.5, -2.0, math.pi):
        turned = rotation_about_y(torch.full((32,), phi, dtype=torch.float64)) @ rot6d_to_matrix(root)
        vec_turned = vec.clone().reshape(32, 24, 6)
        vec_turned[:, 0] = matrix_to_rot6d(turned)
        torch.testing.assert_close(retrieval_pose_features(vec_turned.reshape(32, 144)), feats,
                                   atol=1e-9, rtol=0)
    # the body joints 1..21 pass through untouched, joints 22, 23 are dropped
    torch.testing.assert_close(feats[:, 6:], vec[:, 6:132])


def test_features_reject_wrong_shape():
    with pytest.raises(ValueError, match=r"\(B, 144\)"):
        retrieval_pose_features(torch.zeros(2, 132))


# ----------------------------------------------------------------------------- model

@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> Path:
    return train_tokenizer(TEXTS * 20, 300, tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.fixture(scope="module")
def model(tokenizer_path):
    torch.manual_seed(0)
    cfg = RetrievalConfig.from_dict(SMALL, where="retrieval")
    return build_model(cfg, tokenizer_path).eval()


def test_encoders_give_unit_vectors_and_yaw_invariant_poses(model):
    ids, mask = model.tokenize(TEXTS)
    assert ids.shape[0] == 4 and ids.shape[1] <= 16 and ids.dtype == torch.long
    assert bool((ids[:, 0] == model.arch.bos_id).all())  # <s> first, so no text is empty
    t = model.encode_text(ids, mask)
    vec = _random_vec6d(5, seed=2)
    p = model.encode_pose(vec)
    assert t.shape == (4, 16) and p.shape == (5, 16)
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(p.norm(dim=-1), torch.ones(5))
    # turning the whole body about the vertical axis does not change its embedding
    go, body = torch.randn(5, 3), 0.3 * torch.randn(5, 23, 3)
    yaw = Rotation.from_rotvec([[0.0, 1.1, 0.0]] * 5) * Rotation.from_rotvec(go.numpy())
    turned = smpl_to_vec6d(torch.tensor(yaw.as_rotvec(), dtype=torch.float32), body)
    torch.testing.assert_close(model.encode_pose(turned), model.encode_pose(smpl_to_vec6d(go, body)),
                               atol=1e-5, rtol=0)


def test_padding_does_not_change_text_embedding(model):
    alone = model.embed_texts(["arm"])
    padded = model.embed_texts(["arm", TEXTS[3] * 3])  # long neighbour -> padding, truncation
    torch.testing.assert_close(padded[0], alone[0], atol=1e-5, rtol=0)
    assert model.embed_texts([""]).shape == (1, 16)  # empty caption still encodes


# ----------------------------------------------------------------------------- checkpoints

def test_checkpoint_roundtrip_identical_embeddings(model, tmp_path):
    save_retrieval_model(model, tmp_path / "m", {"role": "reward", "seed": 0})
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == \
        ["config.json", "model.safetensors", "tokenizer.json"]
    loaded = load_retrieval_model(tmp_path / "m")
    assert not loaded.training
    vec = _random_vec6d(6, seed=3)
    torch.testing.assert_close(loaded.embed_texts(TEXTS), model.embed_texts(TEXTS), atol=0, rtol=0)
    torch.testing.assert_close(loaded.embed_poses(vec), model.embed_poses(vec), atol=0, rtol=0)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["role"] == "reward" and cfg["tokenizer"]["vocab_size"] == 300


@pytest.fixture()
def saved(model, tmp_path) -> Path:
    return save_retrieval_model(model, tmp_path / "m", {"role": "evaluator", "seed": 1})


def test_load_errors_name_the_file(saved, model, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*train_retrieval"):
        load_retrieval_model(tmp_path / "nothing")

    (saved / "model.safetensors").rename(saved / "w.bak")
    with pytest.raises(FileNotFoundError, match="model.safetensors.*missing"):
        load_retrieval_model(saved)
    (saved / "w.bak").write_bytes(b"not a safetensors file at all")
    shutil.copy(saved / "w.bak", saved / "model.safetensors")
    with pytest.raises(RetrievalCheckpointError, match="model.safetensors: unreadable"):
        load_retrieval_model(saved)


def test_load_errors_wrong_keys_and_shapes(saved, model):
    from safetensors.torch import load_file, save_file
    state = load_file(str(saved / "model.safetensors"))
    renamed = {("renamed." + k if k.startswith("pose_encoder.net.0") else k): v
               for k, v in state.items()}
    save_file(renamed, str(saved / "model.safetensors"))
    with pytest.raises(RetrievalCheckpointError, match=r"missing keys \['pose_encoder.net.0"):
        load_retrieval_model(saved)

    save_file(state, str(saved / "model.safetensors"))
    cfg = json.loads((saved / "config.json").read_text())
    cfg["arch"]["latent_dim"] = 32
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RetrievalCheckpointError, match="shape mismatches.*pose_encoder"):
        load_retrieval_model(saved)


def test_load_errors_config(saved):
    (saved / "config.json").write_text("{broken")
    with pytest.raises(RetrievalCheckpointError, match="config.json: not valid JSON"):
        load_retrieval_model(saved)
    (saved / "config.json").write_text(json.dumps({"format": "poserft-retrieval",
                                                   "format_version": 1, "arch": {"d_model": 3},
                                                   "tokenizer": {}}))
    with pytest.raises(RetrievalCheckpointError, match="architecture keys missing"):
        load_retrieval_model(saved)
    (saved / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_retrieval_model(saved)


def test_load_error_missing_tokenizer(saved):
    (saved / "tokenizer.json").unlink()
    with pytest.raises(RetrievalCheckpointError, match="tokenizer.json"):
        load_retrieval_model(saved)


# ----------------------------------------------------------------------------- reward

def test_semantic_reward_equals_model_cosine(saved, model):
    reward = SemanticReward(saved, batch_size=2)
    texts = [TEXTS[0], TEXTS[1], TEXTS[0], TEXTS[2], TEXTS[0]]
    vec = _random_vec6d(5, seed=4)
    r = reward(texts, vec)
    expected = (model.embed_texts(texts) * model.embed_poses(vec)).sum(-1)
    assert r.shape == (5,)
    torch.testing.assert_close(r, expected, atol=1e-6, rtol=0)
    assert float(r.abs().max()) <= 1.0 + 1e-6
    assert all(not p.requires_grad for p in reward.model.parameters())


def test_semantic_reward_input_errors(saved):
    reward = SemanticReward(saved)
    with pytest.raises(ValueError, match="2 texts but 3 poses"):
        reward(TEXTS[:2], _random_vec6d(3, seed=0))
    with pytest.raises(ValueError, match=r"\(B, 144\)"):
        reward(TEXTS[:2], torch.zeros(2, 132))
    with pytest.raises(TypeError, match="list of strings"):
        reward("one text", _random_vec6d(1, seed=0))


# ----------------------------------------------------------------------------- pretrained switch

def test_pretrained_text_encoder_switch_roundtrip(tmp_path):
    """The real-run switch wraps a HF encoder; checked with the locally shipped MiniLM."""
    from poserft.text.embedder import embedded_model_dir
    cfg = RetrievalConfig.from_dict({**SMALL, "text_encoder": "pretrained", "freeze_pretrained": True,
                                     "pretrained_text_model": str(embedded_model_dir())},
                                    where="retrieval")
    model = build_model(cfg, None).eval()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert not any(n.startswith("text_encoder.backbone") for n in trainable)
    emb = model.embed_texts(TEXTS[:2])
    assert emb.shape == (2, 16)
    save_retrieval_model(model, tmp_path / "m", {"role": "reward"})
    assert (tmp_path / "m" / "text_encoder" / "config.json").is_file()
    loaded = load_retrieval_model(tmp_path / "m")
    torch.testing.assert_close(loaded.embed_texts(TEXTS[:2]), emb, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- config

@pytest.mark.parametrize("override, key", [
    ({"d_model": 30, "n_heads": 4}, "retrieval.d_model"),
    ({"text_encoder": "pretrained"}, "retrieval.pretrained_text_model"),
    ({"recall_ks": [5, 40]}, "retrieval.recall_ks"),
    ({"role_subsets": "all", "reward_seed": 3, "evaluator_seed": 3}, "retrieval.reward_seed"),
    ({"init_logit_scale": 200.0}, "retrieval.max_logit_scale"),
])
def test_config_invariants(override, key):
    with pytest.raises(ConfigError, match=key):
        RetrievalConfig.from_dict(override, where="retrieval")
    RetrievalConfig.from_dict({"role_subsets": "all", "reward_seed": 3, "evaluator_seed": 3,
                               "share_evaluator_with_reward": True}, where="retrieval")
