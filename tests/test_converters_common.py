"""Frame helpers and SMPL-family mapping used by every converter (scipy as the reference)."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from poserft.body import load
from poserft.data.converters import CONVERTERS
from poserft.data.converters.common import (
    ZUP_TO_YUP, ConversionError, checked_array, remove_root_yaw, root_yaw, rotate_world,
    smpl_family_to_smpl, subsample_by_fps)
from poserft.data.converters.config import DATASET_NAMES


def _joints(body, go, bp, betas, transl):
    with torch.no_grad():
        return body(torch.as_tensor(go), torch.as_tensor(bp), betas=torch.as_tensor(betas),
                    transl=torch.as_tensor(transl)).double().numpy()


def test_registry_covers_every_configured_dataset():
    assert set(CONVERTERS) == set(DATASET_NAMES)


def test_zup_to_yup_maps_up_axis():
    np.testing.assert_allclose(ZUP_TO_YUP @ [0, 0, 1], [0, 1, 0])
    np.testing.assert_allclose(ZUP_TO_YUP, Rotation.from_euler("x", -90, degrees=True).as_matrix(),
                               atol=1e-12)


def test_rotate_world_rotates_the_joints_exactly():
    rng = np.random.default_rng(0)
    body = load(None)
    n = 6
    go = (rng.normal(size=(n, 3)) * 0.8).astype(np.float32)
    bp = (rng.normal(size=(n, 23, 3)) * 0.3).astype(np.float32)
    betas = np.zeros((n, 10), np.float32)
    transl = rng.normal(size=(n, 3)).astype(np.float32)
    A = Rotation.random(random_state=1).as_matrix()
    pelvis = body.rest_joints[0].double().numpy()
    go2, t2 = rotate_world(go, transl, A, pelvis)
    before = _joints(body, go, bp, betas, transl)
    after = _joints(body, go2, bp, betas, t2)
    np.testing.assert_allclose(after, before @ A.T, atol=2e-5)
    # the root rotation is A @ R (scipy composition as reference)
    ref = (Rotation.from_matrix(A) * Rotation.from_rotvec(go)).as_matrix()
    np.testing.assert_allclose(Rotation.from_rotvec(go2).as_matrix(), ref, atol=1e-5)


def test_remove_root_yaw_matches_posescript_normalisation():
    """PoseScript: Euler ZYX in the z-up frame, z angle set to 0. Ours: same, in y-up."""
    R_zup = Rotation.random(50, random_state=2)
    z, y, x = R_zup.as_euler("ZYX").T
    posescript = Rotation.from_euler("ZYX", np.stack([np.zeros_like(z), y, x], -1)).as_matrix()
    expected_yup = ZUP_TO_YUP @ posescript
    go_yup = Rotation.from_matrix(ZUP_TO_YUP @ R_zup.as_matrix()).as_rotvec()
    go, _, yaw = remove_root_yaw(go_yup)
    np.testing.assert_allclose(Rotation.from_rotvec(go).as_matrix(), expected_yup, atol=1e-5)
    np.testing.assert_allclose(np.cos(yaw - z), 1.0, atol=1e-6)  # removed angle = PoseScript's


def test_remove_root_yaw_is_heading_invariant_and_canonical():
    rng = np.random.default_rng(3)
    go = Rotation.random(20, random_state=3).as_rotvec()
    spin = Rotation.from_euler("y", rng.uniform(-np.pi, np.pi, (20, 1)))
    a, _, _ = remove_root_yaw(go)
    b, _, _ = remove_root_yaw((spin * Rotation.from_rotvec(go)).as_rotvec())
    np.testing.assert_allclose(Rotation.from_rotvec(a).as_matrix(),
                               Rotation.from_rotvec(b).as_matrix(), atol=1e-5)
    x_axis = Rotation.from_rotvec(a).as_matrix()[:, :, 0]
    np.testing.assert_allclose(x_axis[:, 2], 0, atol=1e-6)
    assert (x_axis[:, 0] > 0).all()
    np.testing.assert_allclose(root_yaw(a), 0, atol=1e-6)


def test_remove_root_yaw_with_transl_rotates_body_about_vertical():
    rng = np.random.default_rng(4)
    body = load(None)
    n = 5
    go = Rotation.random(n, random_state=4).as_rotvec().astype(np.float32)
    bp = (rng.normal(size=(n, 23, 3)) * 0.3).astype(np.float32)
    betas = np.zeros((n, 10), np.float32)
    transl = rng.normal(size=(n, 3)).astype(np.float32)
    pelvis = body.rest_joints[0].double().numpy()
    go2, t2, yaw = remove_root_yaw(go, transl, pelvis)
    before = _joints(body, go, bp, betas, transl)
    after = _joints(body, go2, bp, betas, t2)
    undo = Rotation.from_euler("y", -yaw[:, None]).as_matrix()
    np.testing.assert_allclose(after, np.einsum("nij,nkj->nki", undo, before), atol=2e-5)


@pytest.mark.parametrize("width", [72, 156, 165])
def test_smpl_family_mapping(width):
    rng = np.random.default_rng(width)
    poses = rng.normal(size=(4, width)).astype(np.float32)
    go, bp = smpl_family_to_smpl(poses)
    np.testing.assert_array_equal(go, poses[:, :3])
    np.testing.assert_array_equal(bp[:, :21], poses[:, 3:66].reshape(4, 21, 3))
    if width == 72:
        np.testing.assert_array_equal(bp[:, 21:], poses[:, 66:72].reshape(4, 2, 3))
    else:  # SMPL-H fingers / SMPL-X jaw are not SMPL hand joints
        assert not bp[:, 21:].any()


def test_subsample_by_fps():
    np.testing.assert_array_equal(subsample_by_fps(12, 60, 20), [0, 3, 6, 9])
    np.testing.assert_array_equal(subsample_by_fps(5, 30, 0), np.arange(5))
    np.testing.assert_array_equal(subsample_by_fps(5, 30, 60), np.arange(5))
    idx = subsample_by_fps(100, 120, 50)    # non-integer ratio: ~2.4 frames apart
    assert np.all(np.diff(idx) >= 2) and np.all(np.diff(idx) <= 3) and len(idx) == 42


def test_checked_array_names_file_and_field():
    with pytest.raises(ConversionError, match=r"f\.npz: 'poses': shape \(3, 5\) != expected \(\*, 72\)"):
        checked_array(np.zeros((3, 5)), "f.npz", "poses", (None, 72))
    with pytest.raises(ConversionError, match="NaN"):
        checked_array([1.0, np.nan], "f.npz", "x", (2,))


class _RecordingTracker:
    def __init__(self):
        self.params, self.metrics = {}, {}

    def log_params(self, d):
        self.params.update(d)

    def log_metrics(self, d, step=None):
        self.metrics.update(d)


def test_convert_logs_counts_and_keeps_previous_splits_when_a_later_write_fails(tmp_path, monkeypatch):
    import h5py

    from fixtures_realformat import write_amass_tree
    from poserft.body import BodyConfig
    from poserft.data.converters import convert
    from poserft.data.converters.config import DatasetsConfig

    raw = tmp_path / "raw"
    write_amass_tree(raw, {"CMU": 1, "HumanEva": 1}, n_frames=6)
    cfg = DatasetsConfig.from_dict({"amass": {"splits": {"train": ["CMU"], "val": ["HumanEva"]},
                                              "files": [], "target_fps": 0.0}}, where="datasets")
    out_dir = tmp_path / "out"
    out = {"train": out_dir / "train.h5", "val": out_dir / "val.h5"}
    tracker = _RecordingTracker()
    old_umask = os.umask(0o027)
    try:
        convert("amass", cfg, raw, out, BodyConfig.from_dict({"model": "skeleton"}, where="body"),
                tracker=tracker, progress=False)
    finally:
        os.umask(old_umask)
    assert tracker.params["dataset"] == "amass"
    assert tracker.metrics["train/n_poses"] == 6 and tracker.metrics["val/n_sequences"] == 1
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.values()} == {0o640}   # umask honoured
    good = {split: p.read_bytes() for split, p in out.items()}

    # New raw data, and the disk fills up while the second split (val) is being written.
    write_amass_tree(raw, {"CMU": 1, "HumanEva": 1}, n_frames=9, seed=5)
    real_create = h5py.Group.create_dataset

    def disk_full_in_val(self, name, *a, **kw):
        if ".val.h5." in self.file.filename:
            raise OSError("disk full")
        return real_create(self, name, *a, **kw)

    monkeypatch.setattr(h5py.Group, "create_dataset", disk_full_in_val)
    with pytest.raises(OSError, match="disk full"):
        convert("amass", cfg, raw, out, None, progress=False)
    # the previous good files are untouched (train.h5 was already written: not replaced)
    assert sorted(os.listdir(out_dir)) == ["train.h5", "val.h5"]
    assert {split: p.read_bytes() for split, p in out.items()} == good
    # with no previous files, nothing is left at all
    for p in out.values():
        p.unlink()
    with pytest.raises(OSError, match="disk full"):
        convert("amass", cfg, raw, out, None, progress=False)
    assert os.listdir(out_dir) == []


def test_convert_accepts_just_the_dataset_section(tmp_path):
    """Rules may pass ``config.datasets.<name>`` (a typed DatasetSource) instead of the whole
    section; a plain dict is not parsed here (the config is parsed once, by load_config)."""
    from fixtures_realformat import write_amass_tree
    from poserft.data.converters import convert
    from poserft.configbase import ConfigError
    from poserft.data.converters.config import AmassSource
    from poserft.data.h5io import SplitReader

    raw = tmp_path / "raw"
    write_amass_tree(raw, {"CMU": 1}, n_frames=6)
    section = {"splits": {"train": ["CMU"]}, "files": ["CMU"], "target_fps": 30.0}
    out = {"train": tmp_path / "train.h5"}
    convert("amass", AmassSource.from_dict(section, where="datasets.amass"), raw, out, None,
            progress=False)
    r = SplitReader(out["train"])
    assert r.num_poses == 3 and r.attrs["converter_params"]["target_fps"] == 30.0
    with pytest.raises(ConfigError, match="datasets.amass.target_fps"):
        convert("amass", AmassSource.from_dict({**section, "target_fps": -1.0},
                                               where="datasets.amass"), raw, out, None,
                progress=False)
    with pytest.raises(TypeError, match="from_dict"):
        convert("amass", section, raw, out, None, progress=False)


def test_load_npz_unreadable_files_name_file_field_and_fix(tmp_path):
    from poserft.data.converters.common import load_npz

    objects = tmp_path / "objects.npz"
    np.savez(objects, ok=np.zeros(2), poses=np.array([{"x": 1}], dtype=object))
    with pytest.raises(ConversionError, match=r"objects\.npz: 'poses': cannot be read without "
                                              r"unpickling .*re-download"):
        load_npz(objects)
    assert list(load_npz(objects, ["ok"])) == ["ok"]     # other keys stay readable
    single = tmp_path / "single.npz"
    with open(single, "wb") as fh:
        np.save(fh, np.zeros(3))
    with pytest.raises(ConversionError, match=r"single\.npz: '/': is a single \.npy array"):
        load_npz(single)
    crc = tmp_path / "crc.npz"
    np.savez_compressed(crc, poses=np.random.default_rng(0).random(5000))
    data = bytearray(crc.read_bytes())
    data[len(data) // 2] ^= 0xFF
    crc.write_bytes(bytes(data))
    with pytest.raises(ConversionError, match=r"crc\.npz: 'poses': truncated or corrupt"):
        load_npz(crc)
