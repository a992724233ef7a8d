"""3DPW converter on tiny sequence pickles in the official layout."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from fixtures_pw3d_bedlam import write_pw3d_sequence_60hz
from fixtures_realformat import write_pw3d_sequence
from poserft.body import load
from poserft.data.converters import convert
from poserft.data.converters.common import ConversionError
from poserft.data.converters.config import DatasetsConfig
from poserft.data.h5io import SplitReader, validate_split


def _write(raw, valid=None, betas_dim=10):
    seqs = {"courtyard_a_00": write_pw3d_sequence(raw / "sequenceFiles/train/courtyard_a_00.pkl",
                                                  "courtyard_a_00", n_frames=6, n_actors=2, seed=0,
                                                  valid=valid, betas_dim=betas_dim),
            "downtown_b_00": write_pw3d_sequence(raw / "sequenceFiles/test/downtown_b_00.pkl",
                                                 "downtown_b_00", n_frames=4, n_actors=1, seed=1)}
    (raw / "sequenceFiles/validation").mkdir(parents=True)
    return seqs


def test_pw3d_world_and_camera_frames(tmp_path):
    raw = tmp_path / "raw"
    valid = [np.array([1, 1, 0, 1, 1, 1]), np.array([0, 1, 1, 1, 0, 1])]
    src = _write(raw, valid=valid, betas_dim=300)
    out = {"train": tmp_path / "train.h5", "test": tmp_path / "test.h5"}
    convert("pw3d", DatasetsConfig.from_dict({"pw3d": {"frame_stride": 2}}, where="datasets"), raw, out,
            None, progress=False)
    assert validate_split(out["test"])["N"] == 2  # 4 frames, stride 2
    r = SplitReader(out["train"])
    seq = src["courtyard_a_00"]
    actors, frames = r.read("meta/actor"), r.read("meta/frame")
    # valid frames only, then every 2nd: actor 0 -> [0,1,3,4,5][::2], actor 1 -> [1,2,3,5][::2]
    assert list(zip(actors, frames)) == [(0, 0), (0, 3), (0, 5), (1, 1), (1, 3)]
    body = load(None)
    for row, (a, f) in enumerate(zip(actors, frames)):
        pose, cam = seq["poses"][a][f], seq["cam_poses"][f]
        np.testing.assert_allclose(r.read("poses/global_orient", row), pose[:3], atol=1e-6)
        np.testing.assert_allclose(r.read("poses/body_pose", row), pose[3:].reshape(23, 3), atol=1e-6)
        np.testing.assert_allclose(r.read("poses/betas", row), seq["betas"][a][:10], atol=1e-6)
        np.testing.assert_allclose(r.read("poses/transl", row), seq["trans"][a][f], atol=1e-6)
        np.testing.assert_allclose(r.read("camera/R", row), cam[:3, :3], atol=1e-6)
        np.testing.assert_allclose(r.read("camera/t", row), cam[:3, 3], atol=1e-6)
        np.testing.assert_allclose(r.read("camera/K", row), seq["cam_intrinsics"], atol=1e-3)
        # camera-frame root = R_cam @ R_root (scipy reference)
        ref = Rotation.from_matrix(cam[:3, :3]) * Rotation.from_rotvec(pose[:3])
        got = Rotation.from_rotvec(r.read("image_pose/global_orient", row))
        np.testing.assert_allclose(got.as_matrix(), ref.as_matrix(), atol=1e-5)
        # 2D keypoints: the official joint positions through K [R|t], point by point
        kp = r.read("keypoints2d", row)
        for j in (0, 7, 23):
            X = seq["jointPositions"][a][f].reshape(24, 3)[j]
            u, v, w = seq["cam_intrinsics"] @ (cam[:3, :3] @ X + cam[:3, 3])
            np.testing.assert_allclose(kp[j], [u / w, v / w], rtol=1e-4)
        assert r.read("image_paths", row).endswith(f"imageFiles/courtyard_a_00/image_{f:05d}.jpg")
    # world-frame joints from the body model with transl
    rows = np.arange(len(actors))
    with torch.no_grad():
        ref = body(torch.as_tensor(r.read("poses/global_orient")), torch.as_tensor(r.read("poses/body_pose")),
                   betas=torch.as_tensor(r.read("poses/betas")),
                   transl=torch.as_tensor(r.read("poses/transl"))).numpy()
    np.testing.assert_allclose(r.joints(rows), ref, atol=1e-6)


def test_pw3d_image_file_is_the_pose_row_not_img_frame_ids(tmp_path):
    # poses are at the image rate: row i <-> image_{i:05d}.jpg; img_frame_ids index the 60 Hz
    # poses (3DPW README; SPIN datasets/preprocess/pw3d.py; VIBE threedpw_utils.py).
    raw = tmp_path / "raw"
    seq = write_pw3d_sequence_60hz(raw / "sequenceFiles/train/outdoors_x_00.pkl", "outdoors_x_00",
                                   n_frames=5, n_actors=1, seed=4, offset=3)
    (raw / "sequenceFiles/test").mkdir(parents=True)
    (raw / "sequenceFiles/validation").mkdir(parents=True)
    assert not np.array_equal(seq["img_frame_ids"], np.arange(5))   # the conventions differ
    out = tmp_path / "train.h5"
    convert("pw3d", DatasetsConfig(), raw, {"train": out}, None, progress=False)
    r = SplitReader(out)
    frames = r.read("meta/frame")
    np.testing.assert_array_equal(frames, np.arange(5))
    for row, f in enumerate(frames):
        path = r.read("image_paths", row)
        assert path.endswith(f"imageFiles/outdoors_x_00/image_{f:05d}.jpg")
        assert not path.endswith(f"image_{int(seq['img_frame_ids'][f]):05d}.jpg")
        # that image's pose is the image-rate row f == the 60 Hz row img_frame_ids[f]
        pose60 = seq["poses_60Hz"][0][seq["img_frame_ids"][f]]
        np.testing.assert_allclose(r.read("poses/global_orient", row), pose60[:3], atol=1e-6)
        np.testing.assert_allclose(r.read("poses/transl", row),
                                   seq["trans_60Hz"][0][seq["img_frame_ids"][f]], atol=1e-6)
        np.testing.assert_allclose(r.read("camera/R", row), seq["cam_poses"][f][:3, :3], atol=1e-6)


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d.pop("cam_poses"), "cam_poses"),
    (lambda d: d.__setitem__("trans", d["trans"][:1]), "trans"),
    (lambda d: d["poses"].__setitem__(1, np.zeros((6, 69))), "poses[1]"),
    (lambda d: d.__setitem__("cam_intrinsics", np.eye(4)), "cam_intrinsics"),
])
def test_pw3d_malformed_sequence_fails_cleanly(tmp_path, mutate, field):
    raw = tmp_path / "raw"
    _write(raw)
    path = raw / "sequenceFiles/train/courtyard_a_00.pkl"
    with open(path, "rb") as fh:
        data = pickle.load(fh, encoding="latin1")
    mutate(data)
    with open(path, "wb") as fh:
        pickle.dump(data, fh, protocol=2)
    out_dir = tmp_path / "out"
    with pytest.raises(ConversionError) as err:
        convert("pw3d", DatasetsConfig(), raw,
                {"test": out_dir / "test.h5", "train": out_dir / "train.h5"}, None, progress=False)
    assert str(path) in str(err.value) and f"'{field}'" in str(err.value)
    assert not out_dir.exists()


def test_pw3d_unknown_split_is_refused(tmp_path):
    raw = tmp_path / "raw"
    _write(raw)
    with pytest.raises(ConversionError, match="split 'holdout' is not configured"):
        convert("pw3d", DatasetsConfig(), raw, {"holdout": tmp_path / "h.h5"}, None, progress=False)
