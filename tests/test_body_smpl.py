"""The smplx path, tested for real with synthetic model files in SMPL's own format.

Each synthetic model has random template, blend shapes, pose correctives and skinning
weights, and a J_regressor built so that the regressed rest joints equal the skeleton
model's rest joints. smplx's own forward pass is the reference.
"""

import pickle
import sys
import types

import numpy as np
import pytest
import scipy.sparse
import smplx
import torch

import poserft.body as body
from poserft.body import BodyConfig, SkeletonModel
from poserft.body.kinematics import H36M17_TO_LSP14, SMPL_PARENTS
from poserft.body.smpl import SmplxBodyModel, load_model_data
from poserft.configbase import ConfigError

NUM_VERTS = 6890
# SMPL-H 52-joint tree: 22 body joints, then 15 joints per hand (5 fingers x 3, finger
# bases hang off the wrist).
SMPLH_PARENTS = list(SMPL_PARENTS[:22])
for wrist in (20, 21):
    for _finger in range(5):
        base = len(SMPLH_PARENTS)
        SMPLH_PARENTS += [wrist, base, base + 1]


def _regressor_for(targets, v_template, rng, per_joint=8):
    """A (J,V) regressor, each row a convex combination of a few vertices, with the last
    vertex of each row moved so that ``regressor @ v_template == targets``."""
    num_joints = targets.shape[0]
    reg = np.zeros((num_joints, NUM_VERTS))
    used = rng.choice(NUM_VERTS, size=(num_joints, per_joint), replace=False)
    for j in range(num_joints):
        w = rng.uniform(0.5, 1.5, size=per_joint)
        w /= w.sum()
        reg[j, used[j]] = w
        others = w[:-1] @ v_template[used[j, :-1]]
        v_template[used[j, -1]] = (targets[j] - others) / w[-1]
    return reg


def _synthetic_model(kind, rest24, seed=0):
    rng = np.random.default_rng(seed)
    num_joints = 24 if kind == "smpl" else 52
    parents = SMPL_PARENTS if kind == "smpl" else SMPLH_PARENTS
    targets = np.zeros((num_joints, 3))
    targets[:22] = rest24[:22]
    if kind == "smpl":
        targets[22:] = rest24[22:]
    else:   # finger joints: small steps out of the wrist
        for j in range(22, num_joints):
            targets[j] = targets[parents[j]] + rng.normal(scale=0.02, size=3)
    v_template = rng.normal(scale=0.3, size=(NUM_VERTS, 3))
    reg = _regressor_for(targets, v_template, rng)
    weights = rng.uniform(size=(NUM_VERTS, num_joints)) ** 4
    weights /= weights.sum(1, keepdims=True)
    kintree = np.stack([np.array([4294967295] + list(parents[1:]), dtype=np.int64),
                        np.arange(num_joints)])
    data = {
        "v_template": v_template,
        "shapedirs": rng.normal(scale=0.01, size=(NUM_VERTS, 3, 10)),
        "posedirs": rng.normal(scale=0.005, size=(NUM_VERTS, 3, (num_joints - 1) * 9)),
        "J_regressor": scipy.sparse.csc_matrix(reg),
        "weights": weights,
        "kintree_table": kintree,
        "f": rng.integers(0, NUM_VERTS, size=(13776, 3)).astype(np.uint32),
    }
    if kind == "smplh":
        for side in "lr":
            data[f"hands_components{side}"] = rng.normal(size=(45, 45))
            data[f"hands_mean{side}"] = rng.normal(scale=0.3, size=45)
    return data


def _dense(data):
    return {k: (v.toarray() if scipy.sparse.issparse(v) else v) for k, v in data.items()}


@pytest.fixture(scope="module")
def rest24():
    return np.array(body.NEUTRAL_REST_JOINTS, dtype=np.float64)


@pytest.fixture(scope="module")
def smpl_file(tmp_path_factory, rest24):
    folder = tmp_path_factory.mktemp("smpl")
    data = _synthetic_model("smpl", rest24)
    with open(folder / "SMPL_NEUTRAL.pkl", "wb") as handle:
        pickle.dump(data, handle, protocol=2)
    return folder / "SMPL_NEUTRAL.pkl"


@pytest.fixture(scope="module")
def smplh_folder(tmp_path_factory, rest24):
    folder = tmp_path_factory.mktemp("smplh")
    np.savez(folder / "SMPLH_MALE.npz", **_dense(_synthetic_model("smplh", rest24, 1)))
    return folder


def _poses(batch, seed, dtype=torch.float32):
    rng = np.random.default_rng(seed)
    return (torch.tensor(rng.normal(scale=0.5, size=(batch, 3)), dtype=dtype),
            torch.tensor(rng.normal(scale=0.5, size=(batch, 23, 3)), dtype=dtype),
            torch.tensor(rng.normal(size=(batch, 10)), dtype=dtype),
            torch.tensor(rng.normal(size=(batch, 3)), dtype=dtype))


def _reference_smpl(path, go, bp, betas, transl):
    layer = smplx.SMPL(model_path=str(path), num_betas=10)
    out = layer(global_orient=go, body_pose=bp.reshape(len(go), -1), betas=betas, transl=transl)
    return out.joints[:, :24].detach(), out.vertices.detach()


def test_smpl_matches_smplx_and_skeleton_fk(smpl_file, rest24):
    model = body.load(BodyConfig.from_dict({"model": "smpl", "model_path": str(smpl_file.parent)},
                                           where="body"))
    assert isinstance(model, SmplxBodyModel) and model.kind == "smpl"
    np.testing.assert_allclose(model.rest_joints.numpy(), rest24, atol=2e-5)
    go, bp, betas, transl = _poses(5, seed=0)
    ref_zero, _ = _reference_smpl(smpl_file, go, bp, torch.zeros_like(betas), None)
    skeleton = SkeletonModel()
    np.testing.assert_allclose(skeleton(go, bp).numpy(), ref_zero.numpy(), atol=5e-5)
    np.testing.assert_allclose(model(go, bp).numpy(), ref_zero.numpy(), atol=5e-5)
    # Shape and translation: the fast joint path (no skinning) equals smplx's forward.
    ref, _ = _reference_smpl(smpl_file, go, bp, betas, transl)
    got = model(go, bp, betas=betas, transl=transl)
    np.testing.assert_allclose(got.numpy(), ref.numpy(), atol=5e-5)
    assert (got - skeleton(go, bp, transl=transl)).abs().max() > 1e-3   # betas matter here
    # Fewer betas than the model: the rest are zero.
    ref3, _ = _reference_smpl(smpl_file, go, bp, torch.nn.functional.pad(betas[:, :3], (0, 7)),
                              None)
    np.testing.assert_allclose(model(go, bp, betas=betas[:, :3]).numpy(), ref3.numpy(), atol=5e-5)
    with pytest.raises(ValueError, match="uses 10"):
        model(go, bp, betas=torch.zeros(5, 16))


def test_h36m_regressor_on_vertices(smpl_file, tmp_path):
    rng = np.random.default_rng(3)
    regressor = rng.uniform(size=(17, NUM_VERTS)) * (rng.uniform(size=(17, NUM_VERTS)) > 0.995)
    regressor /= regressor.sum(1, keepdims=True)
    path = tmp_path / "J_regressor_h36m.npy"
    np.save(path, regressor)
    model = body.load(BodyConfig.from_dict({"model": "smpl", "model_path": str(smpl_file),
                                            "h36m_regressor_path": str(path)}, where="body"))
    go, bp, betas, transl = _poses(3, seed=4)
    _, verts = _reference_smpl(smpl_file, go, bp, betas, transl)
    expected = np.einsum("jv,bvc->bjc", regressor, verts.numpy())
    h36m = model.joint_set("h36m17", go, bp, betas=betas, transl=transl)
    np.testing.assert_allclose(h36m.numpy(), expected, atol=5e-5)
    lsp = model.joint_set("lsp14", go, bp, betas=betas, transl=transl)
    np.testing.assert_allclose(lsp.numpy(), expected[:, list(H36M17_TO_LSP14)], atol=5e-5)
    assert model.uses_regressor("lsp14") and not model.uses_regressor("smpl24")
    # The 24 SMPL joints are unchanged by the regressor.
    ref, _ = _reference_smpl(smpl_file, go, bp, betas, transl)
    np.testing.assert_allclose(model(go, bp, betas, transl).numpy(), ref.numpy(), atol=5e-5)

    np.save(tmp_path / "bad.npy", regressor[:, :100])
    with pytest.raises(ValueError, match=r"must have shape \(17, 6890\), got \(17, 100\)"):
        body.load(BodyConfig.from_dict({"model": "smpl", "model_path": str(smpl_file),
                                        "h36m_regressor_path": str(tmp_path / "bad.npy")},
                                       where="body"))
    # a missing file is a config error (test_body_model), also when it went away after the
    # config was read (body.load checks the section again); the model class says so itself
    gone = tmp_path / "gone.npy"
    np.save(gone, regressor)
    cfg = BodyConfig.from_dict({"model": "smpl", "model_path": str(smpl_file),
                                "h36m_regressor_path": str(gone)}, where="body")
    gone.unlink()
    with pytest.raises(ConfigError, match=r"body\.h36m_regressor_path: .*gone\.npy does not"):
        body.load(cfg)
    with pytest.raises(FileNotFoundError, match="H36M joint regressor not found"):
        SmplxBodyModel.from_config(cfg)


def test_smplh_uses_21_body_joints_and_flat_hands(smplh_folder):
    model = body.load(BodyConfig.from_dict(
        {"model": "smplh", "model_path": str(smplh_folder), "gender": "male"}, where="body"))
    assert model.kind == "smplh"
    go, bp, betas, transl = _poses(4, seed=5)
    layer = smplx.SMPLH(model_path=str(smplh_folder), gender="male", ext="npz", use_pca=False,
                        flat_hand_mean=True, num_betas=10)
    out = layer(global_orient=go, body_pose=bp[:, :21].reshape(4, -1), betas=betas,
                transl=transl, left_hand_pose=torch.zeros(4, 45),
                right_hand_pose=torch.zeros(4, 45))
    expected = torch.cat([out.joints[:, :22], out.joints[:, [25, 40]]], 1).detach()
    got = model(go, bp, betas=betas, transl=transl)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=5e-5)
    # SMPL hand-joint rotations (body_pose rows 21, 22) are ignored for SMPL-H.
    bp2 = bp.clone()
    bp2[:, 21:] = 1.0
    np.testing.assert_allclose(model(go, bp2, betas=betas, transl=transl).numpy(), got.numpy(),
                               atol=1e-6)
    # The skinning path (through smplx.lbs) gives the same joints.
    rotmats = body.smpl_to_rotmats(go, bp)
    joints_lbs, verts = model._pose(rotmats, betas, need_vertices=True)
    np.testing.assert_allclose((joints_lbs + transl[:, None]).numpy(), expected.numpy(), atol=5e-5)
    np.testing.assert_allclose((verts + transl[:, None]).numpy(), out.vertices.detach().numpy(),
                               atol=5e-5)


def test_chumpy_pickles_load_without_chumpy(tmp_path, rest24):
    """Official SMPL pickles hold chumpy objects; fake one and read it without chumpy."""
    fake = types.ModuleType("chumpy.ch")

    class Ch:   # pickles like chumpy.ch.Ch: its __dict__ with the array under 'x'
        def __init__(self, x):
            self.x = x
            self.dterms = ["x"]
    Ch.__module__, Ch.__qualname__ = "chumpy.ch", "Ch"
    fake.Ch = Ch
    sys.modules["chumpy"], sys.modules["chumpy.ch"] = types.ModuleType("chumpy"), fake
    try:
        data = _synthetic_model("smpl", rest24, seed=7)
        wrapped = dict(data, v_template=Ch(data["v_template"]), shapedirs=Ch(data["shapedirs"]))
        with open(tmp_path / "SMPL_NEUTRAL.pkl", "wb") as handle:
            pickle.dump(wrapped, handle, protocol=2)
    finally:
        del sys.modules["chumpy"], sys.modules["chumpy.ch"]
    loaded = load_model_data(tmp_path / "SMPL_NEUTRAL.pkl", "smpl")
    np.testing.assert_array_equal(loaded["v_template"], data["v_template"])
    np.testing.assert_array_equal(loaded["shapedirs"], data["shapedirs"])
    model = body.load(BodyConfig.from_dict({"model": "smpl", "model_path": str(tmp_path)},
                                           where="body"))
    np.testing.assert_allclose(model.rest_joints.numpy(), rest24, atol=2e-5)


def test_wrong_files_raise(tmp_path, rest24):
    data = _synthetic_model("smpl", rest24, seed=8)
    del data["weights"]
    with open(tmp_path / "SMPL_NEUTRAL.pkl", "wb") as handle:
        pickle.dump(data, handle)
    with pytest.raises(ValueError, match=r"missing keys \['weights'\]"):
        body.load(BodyConfig.from_dict({"model": "smpl", "model_path": str(tmp_path)},
                                       where="body"))
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="cannot read SMPL model file"):
        body.load(BodyConfig.from_dict({"model": "smpl", "model_path": str(tmp_path / "junk.pkl")},
                                       where="body"))
    np.savez(tmp_path / "SMPLH_NEUTRAL.npz", **_dense(_synthetic_model("smpl", rest24)))
    with pytest.raises(ValueError, match="missing keys"):
        body.load(BodyConfig.from_dict({"model": "smplh", "model_path": str(tmp_path)},
                                       where="body"))
