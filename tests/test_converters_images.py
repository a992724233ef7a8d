"""Image datasets: Human3.6M / MPI-INF-3DHP (SPIN npz), COCO/MPII + EFT, BEDLAM-Script."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from fixtures_pw3d_bedlam import write_bedlam_labels
from fixtures_realformat import write_eft_json, write_spin_npz
from poserft.body import load
from poserft.data.converters import convert
from poserft.data.converters.common import ConversionError
from poserft.data.converters.config import DatasetsConfig
from poserft.data.h5io import SplitReader, validate_split


def _model_joints(r: SplitReader, transl: bool = False) -> np.ndarray:
    p = r.poses()
    with torch.no_grad():
        return load(None)(torch.as_tensor(p["global_orient"]), torch.as_tensor(p["body_pose"]),
                          betas=torch.as_tensor(p["betas"]),
                          transl=torch.as_tensor(p["transl"]) if transl else None).numpy()


# ----------------------------------------------------------------------------- SPIN npz

@pytest.mark.parametrize("name", ["h36m", "mpi_inf_3dhp"])
def test_spin_npz_filters_strides_and_keeps_spin_joints(tmp_path, name):
    raw = tmp_path / "raw"
    has_smpl = np.array([1, 0, 1, 1, 1, 0, 1, 1, 1, 1])
    src = write_spin_npz(raw / "train.npz", n=10, has_smpl=has_smpl)
    cfg = DatasetsConfig.from_dict(
        {name: {"files": ["train.npz"], "splits": {"train": ["train.npz"]}, "frame_stride": 2,
                "image_root": "/data/h36m"}}, where="datasets")
    out = {"train": tmp_path / "train.h5"}
    convert(name, cfg, raw, out, None, progress=False)
    r = SplitReader(out["train"])
    rows = np.flatnonzero(has_smpl)[::2]                 # rows with SMPL, every 2nd: 0, 3, 6, 8
    np.testing.assert_array_equal(rows, [0, 3, 6, 8])
    assert validate_split(out["train"])["N"] == 4
    np.testing.assert_allclose(r.read("poses/global_orient"), src["pose"][rows, :3], atol=1e-6)
    np.testing.assert_allclose(r.read("poses/body_pose"), src["pose"][rows, 3:].reshape(-1, 23, 3), atol=1e-6)
    np.testing.assert_allclose(r.read("image_pose/global_orient"), src["pose"][rows, :3], atol=1e-6)
    np.testing.assert_allclose(r.read("poses/betas"), src["shape"][rows], atol=1e-6)
    np.testing.assert_allclose(r.read("meta/gt_joints3d_spin24"), src["S"][rows], atol=1e-6)
    np.testing.assert_allclose(r.read("meta/keypoints2d_spin24"), src["part"][rows], atol=1e-4)
    np.testing.assert_allclose(r.read("meta/bbox_center"), src["center"][rows], atol=1e-4)
    assert list(r.read("image_paths")) == [f"/data/h36m/{n}" for n in src["imgname"][rows]]
    np.testing.assert_allclose(r.joints(), _model_joints(r), atol=1e-6)
    assert not r.has("keypoints2d")  # SPIN's 24-joint order is not SMPL's


@pytest.mark.parametrize("overrides, field", [
    ({"pose": None, "S": None}, "pose"),           # neither fits nor 3D joints to score by
    ({"shape": np.zeros((8, 11))}, "shape"),
    ({"S": np.zeros((8, 17, 4))}, "S"),
    ({"imgname": None}, "imgname"),
])
def test_spin_npz_malformed_fails_cleanly(tmp_path, overrides, field):
    raw = tmp_path / "raw"
    write_spin_npz(raw / "h36m_train.npz", n=8, **overrides)
    write_spin_npz(raw / "h36m_valid_protocol2.npz", n=4)
    out_dir = tmp_path / "out"
    with pytest.raises(ConversionError) as err:
        convert("h36m", DatasetsConfig(), raw,
                {"test": out_dir / "test.h5", "train": out_dir / "train.h5"}, None, progress=False)
    assert "h36m_train.npz" in str(err.value) and f"'{field}'" in str(err.value)
    assert not out_dir.exists()


def _h36m_protocol2(tmp_path, n=6):
    """raw/ with SPIN's h36m_train.npz (fits) and h36m_valid_protocol2.npz as SPIN ships it:
    imgname, center, scale, S only. S holds the skeleton model's LSP-14 joints (rows 0-13)
    and H36M pelvis (row 14) of known poses, in a camera frame 5 m away."""
    from poserft.body import smpl_to_vec6d
    from poserft.eval.runner import pose_joints

    raw = tmp_path / "raw"
    write_spin_npz(raw / "h36m_train.npz", n=8)
    rng = np.random.default_rng(1)
    go = rng.normal(size=(n, 3)) * 0.3
    bp = rng.normal(size=(n, 23, 3)) * 0.3
    vec = smpl_to_vec6d(torch.as_tensor(go, dtype=torch.float32), torch.as_tensor(bp, dtype=torch.float32))
    with torch.no_grad():
        lsp, pelvis = pose_joints(load(None), vec, "lsp14")
    S = np.concatenate([rng.normal(size=(n, 24, 3)), np.ones((n, 24, 1))], -1)
    S[:, :14, :3] = lsp.numpy() + [0.0, 0.0, 5.0]
    S[:, 14, :3] = pelvis.numpy() + [0.0, 0.0, 5.0]
    src = write_spin_npz(raw / "h36m_valid_protocol2.npz", n=n, prefix="images/S9_Walking.60457274",
                         pose=None, shape=None, part=None, S=S)
    assert sorted(src) == ["S", "center", "imgname", "scale"]
    return raw, src, vec


def test_h36m_protocol2_without_fits_converts_to_images_and_joints(tmp_path):
    raw, src, _ = _h36m_protocol2(tmp_path, n=6)
    cfg = DatasetsConfig.from_dict({"h36m": {"image_root": "/data/h36m"}}, where="datasets")
    out = {"test": tmp_path / "test.h5"}
    convert("h36m", cfg, raw, out, None, progress=False)
    assert validate_split(out["test"])["N"] == 6        # all rows: no frame_stride (5)
    r = SplitReader(out["test"])
    assert list(r.read("image_paths")) == [f"/data/h36m/{n}" for n in src["imgname"]]
    np.testing.assert_allclose(r.read("meta/gt_joints3d_spin24"), src["S"], atol=1e-6)
    np.testing.assert_array_equal(r.read("meta/has_smpl"), np.zeros(6))
    np.testing.assert_allclose(r.read("meta/bbox_center"), src["center"], atol=1e-4)
    # rest-pose placeholders; /joints stays the model's joints of /poses
    assert not r.read("poses/body_pose").any() and not r.read("poses/global_orient").any()
    np.testing.assert_allclose(r.joints(), _model_joints(r), atol=1e-6)
    assert r.attrs["converter_params"]["frame"] == "camera"


def test_h36m_protocol2_image2pose_scores_against_stored_joints(tmp_path):
    from poserft.eval.config import EvalConfig
    from poserft.eval.runner import image2pose_pose_metrics, image2pose_targets

    raw, src, vec = _h36m_protocol2(tmp_path, n=6)
    out = {"test": tmp_path / "test.h5"}
    convert("h36m", DatasetsConfig(), raw, out, None, progress=False)
    body = load(None)
    cfg = EvalConfig.from_dict({"batch_size": 4}, where="eval")
    with SplitReader(out["test"]) as r, torch.no_grad():
        target = image2pose_targets(body, r, cfg)
        np.testing.assert_allclose(target.joints.numpy(), src["S"][:, :14, :3], atol=1e-5)
        np.testing.assert_allclose(target.pelvis.numpy(), src["S"][:, 14, :3], atol=1e-5)
        assert target.pred_betas is None
        exact = image2pose_pose_metrics(body, vec, target, cfg)      # the poses S came from
        rest = image2pose_pose_metrics(body, target.vec6d, target, cfg)
    assert exact["mpjpe"] < 1e-3 and exact["pa_mpjpe"] < 1e-3        # mm
    assert rest["mpjpe"] > 10.0
    with SplitReader(out["test"]) as r, pytest.raises(ValueError, match="lsp14"):
        image2pose_targets(body, r, EvalConfig.from_dict({"joint_set": "smpl24"}, where="eval"))


# ----------------------------------------------------------------------------- EFT

@pytest.mark.parametrize("name, file", [("coco_eft", "COCO2014-All-ver01.json"),
                                        ("mpii_eft", "MPII_ver01.json")])
def test_eft_rotmats_to_axis_angle(tmp_path, name, file):
    raw = tmp_path / "raw"
    src = write_eft_json(raw / file, n=5, coco=name == "coco_eft")
    out = {"train": tmp_path / "train.h5"}
    convert(name, DatasetsConfig.from_dict({name: {"image_root": "/img"}}, where="datasets"), raw, out,
            None, progress=False)
    r = SplitReader(out["train"])
    rot = np.array([d["parm_pose"] for d in src["data"]])
    ref = Rotation.from_matrix(rot.reshape(-1, 3, 3)).as_rotvec().reshape(5, 24, 3)
    got = np.concatenate([r.read("poses/global_orient")[:, None], r.read("poses/body_pose")], 1)
    # compare as rotations (axis-angle is unique for angles < pi; matrices are unambiguous)
    np.testing.assert_allclose(Rotation.from_rotvec(got.reshape(-1, 3)).as_matrix(),
                               rot.reshape(-1, 3, 3), atol=1e-5)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    np.testing.assert_allclose(r.read("poses/betas"), [d["parm_shape"] for d in src["data"]], atol=1e-6)
    np.testing.assert_allclose(r.read("meta/weak_cam"), [d["parm_cam"] for d in src["data"]], atol=1e-6)
    subdir = "train2014" if name == "coco_eft" else "images"
    assert r.read("image_paths", 2) == f"/img/{subdir}/{src['data'][2]['imageName']}"
    annot = r.read("meta/annot_id")
    assert list(annot) == ([1000 + i for i in range(5)] if name == "coco_eft" else [-1] * 5)
    np.testing.assert_allclose(r.joints(), _model_joints(r), atol=1e-6)


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d["data"][3].pop("parm_shape"), "parm_shape"),
    (lambda d: d["data"][1].__setitem__("parm_pose", np.zeros((24, 3, 3)).tolist()), "data[1].parm_pose[0]"),
    (lambda d: d["data"][2].__setitem__("parm_pose", np.eye(3)[None].repeat(23, 0).tolist()),
     "data[2].parm_pose"),
    (lambda d: d.pop("data"), "data"),
])
def test_eft_malformed_fails_cleanly(tmp_path, mutate, field):
    raw = tmp_path / "raw"
    path = raw / "MPII_ver01.json"
    data = write_eft_json(path, n=5)
    mutate(data)
    path.write_text(json.dumps(data))
    out_dir = tmp_path / "out"
    with pytest.raises(ConversionError) as err:
        convert("mpii_eft", DatasetsConfig(), raw, {"train": out_dir / "train.h5"}, None, progress=False)
    assert str(path) in str(err.value) and field in str(err.value)
    assert not out_dir.exists()


# ----------------------------------------------------------------------------- BEDLAM-Script

def test_bedlam_script_captions_camera_and_keypoints(tmp_path):
    raw = tmp_path / "raw"
    captions = {"sceneA.npz:1": "Arms crossed.", "sceneB.npz:0": ["Kneeling.", "On one knee."]}
    src = write_bedlam_labels(raw, "training", {"sceneA": 3, "sceneB": 2}, captions)
    out = {"train": tmp_path / "train.h5"}
    convert("bedlam_script", DatasetsConfig(), raw, out, None, progress=False)
    assert validate_split(out["train"]) == {"N": 5, "M": 3}
    r = SplitReader(out["train"])
    assert list(r.read("meta/label_key")) == ["sceneA.npz:0", "sceneA.npz:1", "sceneA.npz:2",
                                              "sceneB.npz:0", "sceneB.npz:1"]
    assert list(r.captions()) == ["Arms crossed.", "Kneeling.", "On one knee."]
    np.testing.assert_array_equal(r.caption_pose_index(), [1, 3, 3])
    poses = np.concatenate([src["sceneA.npz"]["pose_cam"], src["sceneB.npz"]["pose_cam"]])
    np.testing.assert_allclose(r.read("poses/global_orient"), poses[:, :3], atol=1e-6)
    np.testing.assert_allclose(r.read("poses/body_pose")[:, :21], poses[:, 3:66].reshape(-1, 21, 3), atol=1e-6)
    assert not r.read("poses/body_pose")[:, 21:].any()
    shape = np.concatenate([src["sceneA.npz"]["shape"], src["sceneB.npz"]["shape"]])
    np.testing.assert_allclose(r.read("poses/betas"), shape[:, :10], atol=1e-6)
    ext = np.concatenate([src["sceneA.npz"]["cam_ext"], src["sceneB.npz"]["cam_ext"]])
    trans_cam = np.concatenate([src["sceneA.npz"]["trans_cam"], src["sceneB.npz"]["trans_cam"]])
    np.testing.assert_allclose(r.read("poses/transl"), trans_cam + ext[:, :3, 3], atol=1e-5)
    joints = r.joints()
    np.testing.assert_allclose(joints, _model_joints(r, transl=True), atol=1e-6)
    K = r.read("camera/K")
    uvw = np.einsum("nij,nkj->nki", K, joints)
    np.testing.assert_allclose(r.keypoints2d(), uvw[..., :2] / uvw[..., 2:], rtol=1e-4)
    np.testing.assert_array_equal(r.read("camera/R"), np.tile(np.eye(3), (5, 1, 1)))
    assert r.read("image_paths", 4).endswith("images/" + src["sceneB.npz"]["imgname"][1])


def test_bedlam_script_adds_camera_offset_to_trans_cam(tmp_path):
    # BEDLAM labels: camera-frame translation = trans_cam + cam_ext[:3, 3]
    # (pixelite1201/BEDLAM train/dataset/dataset.py; data_processing/df_full_body.py).
    raw = tmp_path / "raw"
    src = write_bedlam_labels(raw, "training", {"sceneA": 2}, {"sceneA.npz:0": "Standing."}, seed=3)
    path = raw / "labels/training/sceneA.npz"
    data = dict(np.load(path))
    data["trans_cam"] = np.array([[0.1, -0.2, 0.3], [0.0, 0.0, 0.0]])
    data["cam_ext"][:, :3, 3] = np.array([[1.0, 2.0, 5.0], [-0.5, 0.25, 7.0]])
    np.savez(path, **data)
    convert("bedlam_script", DatasetsConfig(), raw, {"train": tmp_path / "t.h5"}, None, progress=False)
    r = SplitReader(tmp_path / "t.h5")
    expected = np.array([[1.1, 1.8, 5.3], [-0.5, 0.25, 7.0]])   # by hand
    np.testing.assert_allclose(r.read("poses/transl"), expected, atol=1e-6)
    # camera-frame joints = body joints at the origin + the full translation
    np.testing.assert_allclose(r.joints(), _model_joints(r) + expected[:, None], atol=1e-5)
    # the camera-frame root joint is not at trans_cam alone (the old, wrong convention)
    assert np.abs(r.joints()[:, 0] - (_model_joints(r)[:, 0] + data["trans_cam"])).max() > 1.0
    np.testing.assert_array_equal(r.read("camera/t"), np.zeros((2, 3)))
    uvw = np.einsum("nij,nkj->nki", r.read("camera/K"), r.joints())
    np.testing.assert_allclose(r.keypoints2d(), uvw[..., :2] / uvw[..., 2:], rtol=1e-4)
    assert src["sceneA.npz"]["imgname"][0] in r.read("image_paths", 0)


def test_bedlam_script_missing_cam_ext_is_an_error(tmp_path):
    raw = tmp_path / "raw"
    write_bedlam_labels(raw, "training", {"sceneA": 2}, {}, with_cam_ext=False)
    with pytest.raises(ConversionError, match=r"sceneA\.npz.*'cam_ext'"):
        convert("bedlam_script", DatasetsConfig(), raw, {"train": tmp_path / "t.h5"}, None,
                progress=False)
    assert not (tmp_path / "t.h5").exists()


def test_bedlam_script_caption_for_unknown_row_is_an_error(tmp_path):
    raw = tmp_path / "raw"
    write_bedlam_labels(raw, "training", {"sceneA": 2}, {"sceneA.npz:7": "?"})
    with pytest.raises(ConversionError, match="'sceneA.npz:7'.*no label row"):
        convert("bedlam_script", DatasetsConfig(), raw, {"train": tmp_path / "t.h5"}, None,
                progress=False)
    assert not (tmp_path / "t.h5").exists()


def test_bedlam_script_wrong_pose_width(tmp_path):
    raw = tmp_path / "raw"
    write_bedlam_labels(raw, "training", {"sceneA": 2}, {})
    path = raw / "labels/training/sceneA.npz"
    data = dict(np.load(path))
    data["pose_cam"] = data["pose_cam"][:, :72]
    np.savez(path, **data)
    with pytest.raises(ConversionError, match=r"sceneA\.npz: 'pose_cam': shape \(2, 72\)"):
        convert("bedlam_script", DatasetsConfig(), raw, {"train": tmp_path / "t.h5"}, None,
                progress=False)
    assert not (tmp_path / "t.h5").exists()
