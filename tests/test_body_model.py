"""Kinematic tree, skeleton forward kinematics, pose vectors, config and body.load."""

import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation
from smplx.lbs import batch_rigid_transform

import poserft.body as body
import poserft.body.rotations  # noqa: F401  (body.rotations)
from poserft.body import POSE_DIM, BodyConfig, SkeletonModel, forward_kinematics, \
    smpl_to_vec6d, vec6d_to_rotmats, vec6d_to_smpl
from poserft.body.kinematics import H36M17_TO_LSP14, JOINT_SETS, SMPL_JOINT_NAMES, \
    SMPL_PARENTS, select_joint_set, tree_levels
from poserft.configbase import ConfigError

J = {name: i for i, name in enumerate(SMPL_JOINT_NAMES)}


def _random_pose(batch, seed=0, scale=0.6):
    rng = np.random.default_rng(seed)
    return (torch.tensor(rng.normal(scale=scale, size=(batch, 3))),
            torch.tensor(rng.normal(scale=scale, size=(batch, 23, 3))))


def _numpy_fk(rotmats, rest, parents):
    """Independent reference: per-joint 4x4 homogeneous transforms, one sample at a time."""
    out = np.zeros((rotmats.shape[0], len(parents), 3))
    for b in range(rotmats.shape[0]):
        world = [None] * len(parents)
        for j, p in enumerate(parents):
            local = np.eye(4)
            local[:3, :3] = rotmats[b, j]
            local[:3, 3] = rest[j] - (rest[p] if p >= 0 else 0.0)
            world[j] = local if p < 0 else world[p] @ local
            out[b, j] = world[j][:3, 3]
    return out


def test_tree_and_names():
    assert len(SMPL_JOINT_NAMES) == 24 and len(SMPL_PARENTS) == 24
    assert SMPL_PARENTS[0] == -1
    assert SMPL_PARENTS[J["left_wrist"]] == J["left_elbow"]
    assert SMPL_PARENTS[J["left_elbow"]] == J["left_shoulder"]
    assert SMPL_PARENTS[J["head"]] == J["neck"]
    levels = tree_levels(SMPL_PARENTS)
    assert sorted(sum(levels, [])) == list(range(24))
    assert levels[0] == [0] and len(levels) == 9
    with pytest.raises(ValueError, match="topologically"):
        tree_levels([-1, 2, 0])


def test_joint_sets_documented_mappings():
    assert set(JOINT_SETS) == {"smpl24", "h36m17", "lsp14"}
    lsp = JOINT_SETS["lsp14"]
    assert lsp.num_joints == 14 and JOINT_SETS["h36m17"].num_joints == 17
    for name, idx in zip(lsp.names, lsp.from_smpl24):
        side_name = {"neck": "neck", "head_top": "head"}.get(name, name)
        assert SMPL_JOINT_NAMES[idx] == side_name
    assert set(lsp.approximate) >= {"neck", "head_top"}
    h36m = JOINT_SETS["h36m17"]
    assert [h36m.names[i] for i in H36M17_TO_LSP14][:12] == list(lsp.names[:12])
    joints = torch.randn(5, 24, 3)
    sel = select_joint_set(joints, "lsp14")
    assert torch.equal(sel[:, 0], joints[:, J["right_ankle"]])
    assert torch.equal(sel[:, 13], joints[:, J["head"]])
    with pytest.raises(ValueError, match="unknown joint set"):
        select_joint_set(joints, "coco")


def test_zero_pose_gives_rest_skeleton():
    model = body.load(None)
    go, bp = torch.zeros(3, 3), torch.zeros(3, 23, 3)
    joints = model(go, bp)
    assert joints.shape == (3, 24, 3)
    np.testing.assert_allclose(joints.numpy(), model.rest_joints.expand(3, 24, 3).numpy(),
                               atol=1e-7)
    np.testing.assert_allclose(model.rest_joints.numpy(), np.array(body.NEUTRAL_REST_JOINTS),
                               atol=1e-7)
    assert torch.equal(model.parents, torch.tensor(SMPL_PARENTS))


def test_rest_skeleton_is_plausible_and_symmetric():
    rest = np.array(body.NEUTRAL_REST_JOINTS)
    mirrored = rest * np.array([-1, 1, 1])
    for left, idx in J.items():
        if left.startswith("left_"):
            np.testing.assert_allclose(rest[J["right_" + left[5:]]], mirrored[idx])
            assert rest[idx, 0] > 0                 # the body's left is +x when facing +z
    assert rest[J["head"], 1] > rest[J["neck"], 1] > rest[0, 1] > rest[J["left_knee"], 1]
    thigh = np.linalg.norm(rest[J["left_knee"]] - rest[J["left_hip"]])
    assert 0.3 < thigh < 0.45


def test_elbow_90_degrees_puts_wrist_where_geometry_says():
    model = SkeletonModel()
    rest = np.array(body.NEUTRAL_REST_JOINTS)
    bp = torch.zeros(1, 23, 3, dtype=torch.float64)
    # Left elbow -90 deg about +y: the forearm (along +x in the T-pose) turns to +z, i.e.
    # R_y(-90) maps (x, y, z) -> (-z, y, x).
    bp[0, J["left_elbow"] - 1] = torch.tensor([0.0, -math.pi / 2, 0.0])
    joints = model(torch.zeros(1, 3, dtype=torch.float64), bp)[0].numpy()
    fx, fy, fz = rest[J["left_wrist"]] - rest[J["left_elbow"]]
    expected_wrist = rest[J["left_elbow"]] + np.array([-fz, fy, fx])
    np.testing.assert_allclose(joints[J["left_wrist"]], expected_wrist, atol=1e-7)
    hx, hy, hz = rest[J["left_hand"]] - rest[J["left_wrist"]]
    np.testing.assert_allclose(joints[J["left_hand"]], expected_wrist + np.array([-hz, hy, hx]),
                               atol=1e-7)
    # Everything upstream of the elbow does not move.
    upstream = [j for j in range(24) if j not in (J["left_wrist"], J["left_hand"])]
    np.testing.assert_allclose(joints[upstream], rest[upstream], atol=1e-7)
    # Forearm length is preserved and the elbow angle is 90 degrees.
    upper = rest[J["left_elbow"]] - rest[J["left_shoulder"]]
    fore = joints[J["left_wrist"]] - joints[J["left_elbow"]]
    np.testing.assert_allclose(np.linalg.norm(fore), np.linalg.norm([fx, fy, fz]), rtol=1e-6)
    cos_rest = np.dot(upper, [fx, fy, fz]) / np.linalg.norm(upper) / np.linalg.norm(fore)
    cos_now = np.dot(upper, fore) / np.linalg.norm(upper) / np.linalg.norm(fore)
    # The rest arm is almost straight; after a 90-deg turn about y the angle changes by ~90.
    assert cos_rest > 0.99 and abs(cos_now) < 0.1


def test_global_orient_rotates_about_the_pelvis():
    model = SkeletonModel()
    rest = model.rest_joints.double()
    go = torch.tensor([[0.0, math.pi / 2, 0.0]], dtype=torch.float64)   # turn to face +x
    joints = model(go, torch.zeros(1, 23, 3, dtype=torch.float64))[0]
    rot = torch.tensor(Rotation.from_rotvec(go[0].numpy()).as_matrix())
    expected = (rest - rest[0]) @ rot.T + rest[0]
    np.testing.assert_allclose(joints.numpy(), expected.numpy(), atol=1e-12)
    transl = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    moved = model(go, torch.zeros(1, 23, 3, dtype=torch.float64), transl=transl)[0]
    np.testing.assert_allclose((moved - joints).numpy(), np.tile([1.0, 2.0, 3.0], (24, 1)),
                               atol=1e-12)


def test_fk_matches_numpy_reference_and_smplx_rigid_transform():
    go, bp = _random_pose(6, seed=1)
    model = SkeletonModel()
    rotmats = body.smpl_to_rotmats(go, bp)
    rest = model.rest_joints.double()
    joints = model.forward_rotmats(rotmats)
    ref = _numpy_fk(rotmats.numpy(), rest.numpy(), SMPL_PARENTS)
    np.testing.assert_allclose(joints.numpy(), ref, atol=1e-12)
    smplx_joints, _ = batch_rigid_transform(rotmats, rest.expand(6, 24, 3).contiguous(),
                                            torch.tensor(SMPL_PARENTS), dtype=torch.float64)
    np.testing.assert_allclose(joints.numpy(), smplx_joints.numpy(), atol=1e-12)
    np.testing.assert_allclose(model(go, bp).numpy(), joints.numpy())
    # Any leading shape.
    nested, rots = forward_kinematics(rotmats.reshape(2, 3, 24, 3, 3), rest)
    np.testing.assert_allclose(nested.reshape(6, 24, 3).numpy(), joints.numpy(), atol=1e-12)
    assert rots.shape == (2, 3, 24, 3, 3)


def test_fk_gradients_and_per_sample_rest_joints():
    # gradcheck on a small branching tree (same code path, few inputs: fast).
    parents = (-1, 0, 1, 1, 3, 0)
    rotmats = body.rotations.axis_angle_to_matrix(
        torch.randn(2, 6, 3, dtype=torch.float64)).requires_grad_(True)
    rest = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda r, j: forward_kinematics(r, j, parents),
                                    (rotmats, rest))
    ref = _numpy_fk(rotmats.detach().numpy()[:1], rest.detach().numpy()[0], parents)
    np.testing.assert_allclose(forward_kinematics(rotmats[:1], rest[:1], parents)[0].detach()
                               .numpy(), ref, atol=1e-12)
    go, bp = _random_pose(2, seed=2)
    six = smpl_to_vec6d(go, bp).requires_grad_(True)
    SkeletonModel().forward_rotmats(vec6d_to_rotmats(six)).square().sum().backward()
    assert torch.isfinite(six.grad).all() and six.grad.abs().sum() > 0


def test_forward_vec6d_is_fk_of_the_6d_rotations_for_any_batch_shape_and_dtype():
    go, bp = _random_pose(6, seed=4)
    six = smpl_to_vec6d(go, bp) + 0.05 * torch.randn(6, 144, dtype=torch.float64)  # off-manifold
    model = SkeletonModel()
    ref = model.forward_rotmats(vec6d_to_rotmats(six.float()))              # the old composition
    out = model.forward_vec6d(six.float())
    assert out.shape == (6, 24, 3) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    # float64 stays float64 (and matches the float64 composition exactly)
    torch.testing.assert_close(model.forward_vec6d(six),
                               model.forward_rotmats(vec6d_to_rotmats(six)), rtol=0, atol=0)
    # any leading shape, none included
    nested = model.forward_vec6d(six.float().reshape(2, 3, 144))
    assert nested.shape == (2, 3, 24, 3)
    torch.testing.assert_close(nested.reshape(6, 24, 3), ref)
    torch.testing.assert_close(model.forward_vec6d(six[0].float()), ref[0])
    # half precision in, float32 out, close to the float32 result
    for dtype in (torch.float16, torch.bfloat16):
        half = model.forward_vec6d(six.to(dtype))
        assert half.dtype == torch.float32
        assert float((half - ref).abs().max()) < 0.01                     # metres
        torch.testing.assert_close(half, model.forward_rotmats(
            vec6d_to_rotmats(six.to(dtype).float())), rtol=0, atol=0)
    # differentiable, as the SFT joint loss needs
    x = six.float().requires_grad_(True)
    model.forward_vec6d(x).square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="144"):
        model.forward_vec6d(torch.zeros(3, 72))
    with pytest.raises(TypeError, match="torch.Tensor"):
        model.forward_vec6d(six.numpy())


def test_pose_vector_layout_and_round_trip():
    go, bp = _random_pose(4, seed=3, scale=0.8)
    vec = smpl_to_vec6d(go, bp)
    assert POSE_DIM == 144 and vec.shape == (4, 144)
    mats = Rotation.from_rotvec(bp[:, 4].numpy()).as_matrix()      # joint 5 = body_pose[4]
    np.testing.assert_allclose(vec[:, 30:33].numpy(), mats[:, :, 0], atol=1e-12)
    np.testing.assert_allclose(vec[:, 33:36].numpy(), mats[:, :, 1], atol=1e-12)
    go2, bp2 = vec6d_to_smpl(vec)
    np.testing.assert_allclose(go2.numpy(), go.numpy(), atol=1e-10)
    np.testing.assert_allclose(bp2.numpy(), bp.numpy(), atol=1e-10)
    rot = vec6d_to_rotmats(torch.randn(7, 144, dtype=torch.float64))
    np.testing.assert_allclose(torch.linalg.det(rot).numpy(), 1.0, atol=1e-10)
    with pytest.raises(ValueError, match="144"):
        vec6d_to_rotmats(torch.zeros(3, 72))


def test_bad_inputs_raise_clear_errors():
    model = body.load(BodyConfig.from_dict({}, where="body"))
    go, bp = _random_pose(2)
    with pytest.raises(ValueError, match="body_pose must have shape"):
        model(go, bp[:, :21])
    with pytest.raises(ValueError, match="batch sizes differ"):
        model(go[:1], bp)
    with pytest.raises(ValueError, match="empty batch"):
        model(go[:0], bp[:0])
    bad = bp.clone()
    bad[1, 3, 0] = float("nan")
    with pytest.raises(ValueError, match=r"body_pose contains NaN or inf \(first bad rows: \[1\]"):
        model(go, bad)
    with pytest.raises(ValueError, match=r"transl must have shape \(2, 3\)"):
        model(go, bp, transl=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="rotmats must have shape"):
        model.forward_rotmats(torch.zeros(2, 22, 3, 3))
    with pytest.raises(ValueError, match="unknown joint set"):
        model.joint_set("coco", go, bp)
    # (B,69) body pose is accepted; betas are shape-checked and ignored by the skeleton.
    np.testing.assert_allclose(model(go, bp.reshape(2, 69), betas=torch.randn(2, 10)).numpy(),
                               model(go, bp).numpy())
    lsp = model.joint_set("lsp14", go, bp)
    np.testing.assert_allclose(lsp.numpy(), model(go, bp)[:, list(JOINT_SETS["lsp14"].from_smpl24)]
                               .numpy())


def test_config_section_and_load():
    cfg = BodyConfig()
    assert (cfg.model, cfg.model_path, cfg.gender, cfg.num_betas, cfg.h36m_regressor_path) == \
        ("skeleton", None, "neutral", 10, None)
    assert isinstance(body.load(cfg), SkeletonModel)
    assert isinstance(body.load(BodyConfig.from_dict({"model": "skeleton"}, where="body")),
                      SkeletonModel)
    with pytest.raises(ConfigError, match="body.model_path: required"):
        body.load(BodyConfig.from_dict({"model": "smpl"}, where="body"))
    with pytest.raises(ConfigError, match="body.h36m_regressor_path"):
        BodyConfig.from_dict({"h36m_regressor_path": "x.npy"}, where="body")
    with pytest.raises(ConfigError, match="body.modle: unknown key"):
        body.load(BodyConfig.from_dict({"modle": "smpl"}, where="body"))
    with pytest.raises(ConfigError, match="not one of"):
        body.load(BodyConfig.from_dict({"model": "smplx"}, where="body"))
    with pytest.raises(TypeError, match="BodyConfig"):
        body.load("skeleton")
    with pytest.raises(TypeError, match=r"BodyConfig\.from_dict"):   # a plain dict is not parsed
        body.load({"model": "skeleton"})


def test_missing_model_file_names_expected_path(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        body.load(BodyConfig.from_dict({"model": "smpl", "model_path": str(tmp_path)},
                                       where="body"))
    msg = str(info.value)
    assert f"SMPL model file not found: {tmp_path}/SMPL_NEUTRAL.pkl" in msg
    assert "https://smpl.is.tue.mpg.de" in msg and "body.model_path" in msg
    with pytest.raises(FileNotFoundError, match="SMPLH_FEMALE.pkl .*mano.is.tue.mpg.de"):
        body.load(BodyConfig.from_dict(
            {"model": "smplh", "model_path": str(tmp_path), "gender": "female"}, where="body"))


def test_fk_chunking_is_invisible(monkeypatch):
    import poserft.body.kinematics as kinematics
    go, bp = _random_pose(10, seed=4)
    rotmats = body.smpl_to_rotmats(go, bp)
    rest = torch.tensor(body.NEUTRAL_REST_JOINTS, dtype=torch.float64) \
        + 0.02 * torch.randn(10, 24, 3, dtype=torch.float64)
    whole, whole_rot = forward_kinematics(rotmats, rest)
    monkeypatch.setattr(kinematics, "_FK_CHUNK", 3)      # 4 chunks, the last one short
    chunked, chunked_rot = forward_kinematics(rotmats, rest)
    np.testing.assert_array_equal(chunked.numpy(), whole.numpy())
    np.testing.assert_array_equal(chunked_rot.numpy(), whole_rot.numpy())
    ref = np.stack([_numpy_fk(rotmats[i:i + 1].numpy(), rest[i].numpy(), SMPL_PARENTS)[0]
                    for i in range(10)])
    np.testing.assert_allclose(chunked.numpy(), ref, atol=1e-12)
    # Global rotations: product of local rotations along the chain (left wrist).
    chain = [0, 3, 6, 9, 13, 16, 18, 20]
    expected = np.eye(3)
    for j in chain:
        expected = expected @ rotmats[0, j].numpy()
    np.testing.assert_allclose(chunked_rot[0, 20].numpy(), expected, atol=1e-12)


@pytest.mark.parametrize("model, site", [("smpl", "https://smpl.is.tue.mpg.de"),
                                         ("smplh", "https://mano.is.tue.mpg.de")])
def test_nonexistent_model_path_is_a_config_error(tmp_path, model, site):
    """A mesh model whose files are not there fails when the config is read (the Snakefile
    parse), not when a job first loads the body model."""
    missing = tmp_path / "nonexistent"
    with pytest.raises(ConfigError) as info:
        BodyConfig.from_dict({"model": model, "model_path": str(missing)}, where="body")
    msg = str(info.value)
    assert msg.startswith(f"body.model_path: {missing} does not exist")
    assert site in msg and "body.model: skeleton" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match="relative to the working directory"):
        BodyConfig.from_dict({"model": model, "model_path": "no/such/dir"}, where="body")
    # an existing folder passes the config check (the file lookup stays in body.load)
    assert BodyConfig.from_dict({"model": model, "model_path": str(tmp_path)},
                                where="body").model_path == str(tmp_path)
    assert BodyConfig.from_dict({"model": "skeleton", "model_path": str(missing)},
                                where="body").model == "skeleton"


def test_nonexistent_h36m_regressor_path_is_a_config_error(tmp_path):
    """Like body.model_path: a regressor file that is not there fails when the config is
    read, not when evaluation first loads the body model; unset stays fine."""
    mesh = {"model": "smpl", "model_path": str(tmp_path)}
    missing = tmp_path / "J_regressor_h36m.npy"
    with pytest.raises(ConfigError) as info:
        BodyConfig.from_dict({**mesh, "h36m_regressor_path": str(missing)}, where="body")
    msg = str(info.value)
    assert msg.startswith(f"body.h36m_regressor_path: {missing} does not exist")
    assert "J_regressor_h36m.npy (17 x 6890)" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match="relative to the working directory"):
        BodyConfig.from_dict({**mesh, "h36m_regressor_path": "no/such.npy"}, where="body")
    with pytest.raises(ConfigError, match=r"body\.h36m_regressor_path: .* is a folder"):
        BodyConfig.from_dict({**mesh, "h36m_regressor_path": str(tmp_path)}, where="body")
    missing.write_bytes(b"")        # exists: its contents are checked by body.load
    assert BodyConfig.from_dict({**mesh, "h36m_regressor_path": str(missing)},
                                where="body").h36m_regressor_path == str(missing)
    for unset in (None, ""):
        assert BodyConfig.from_dict({**mesh, "h36m_regressor_path": unset},
                                    where="body").h36m_regressor_path == unset


def test_workflow_config_rejects_nonexistent_model_path():
    """What the Snakefile calls at parse time, on the shipped config plus the bad body."""
    from pathlib import Path

    import yaml

    from poserft.config import load_config
    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "config.yaml").read_text())
    cfg["body"] = {"model": "smpl", "model_path": "/nonexistent"}
    with pytest.raises(ConfigError, match=r"body\.model_path: /nonexistent does not exist.*"
                                          r"smpl\.is\.tue\.mpg\.de"):
        load_config(cfg)
