"""AMASS and PoseScript(+AMASS) converters on tiny fixtures in the real layouts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from fixtures_realformat import write_amass_sequence, write_amass_tree, write_posescript_release
from poserft.body import load
from poserft.data.converters import convert
from poserft.data.converters.common import ZUP_TO_YUP, ConversionError
from poserft.data.converters.config import DatasetsConfig
from poserft.data.h5io import SplitReader, validate_split

SPLITS = {"train": ["CMU"], "val": ["HumanEva"]}


def _amass_cfg(**kw):
    return DatasetsConfig.from_dict(
        {"amass": {"splits": SPLITS, "files": ["CMU", "HumanEva"], "target_fps": 20.0, **kw}},
        where="datasets")


def _raw_joints(body, poses, trans, betas):
    """Joints of the raw z-up AMASS rows (SMPL-H body joints, hands zero), via the body model."""
    n = len(poses)
    bp = np.zeros((n, 23, 3), np.float32)
    bp[:, :21] = poses[:, 3:66].reshape(n, 21, 3)
    with torch.no_grad():
        return body(torch.as_tensor(poses[:, :3]), torch.as_tensor(bp),
                    betas=torch.as_tensor(np.repeat(betas[None, :10], n, 0)),
                    transl=torch.as_tensor(trans)).double().numpy()


def test_amass_converts_to_y_up_smpl(tmp_path):
    raw = tmp_path / "raw"
    written = write_amass_tree(raw, {"CMU": 2, "HumanEva": 1}, n_frames=12, fps=60.0)
    out = {"train": tmp_path / "out/train.h5", "val": tmp_path / "out/val.h5"}
    convert("amass", _amass_cfg(), raw, out, None, progress=False)
    body = load(None)
    for split, path in out.items():
        assert validate_split(path)["N"] == {"train": 8, "val": 4}[split]  # 4 frames per sequence
        r = SplitReader(path)
        assert r.attrs["source"] == "amass" and r.attrs["split"] == split
        params = r.attrs["converter_params"]
        assert params["target_fps"] == 20.0 and params["splits"] == SPLITS
        seqs = r.read("meta/sequence")
        frames = r.read("meta/frame")
        assert sorted(set(seqs)) == sorted(k for k in written if k.split("/")[0] in SPLITS[split])
        for seq in set(seqs):
            rows = np.flatnonzero(seqs == seq)
            np.testing.assert_array_equal(frames[rows], [0, 3, 6, 9])  # 60 -> 20 fps
            src = written[seq]
            poses, trans = src["poses"][frames[rows]], src["trans"][frames[rows]]
            # body joints copied, SMPL hand joints zero
            bp = r.read("poses/body_pose", rows)
            np.testing.assert_allclose(bp[:, :21], poses[:, 3:66].reshape(-1, 21, 3), atol=1e-6)
            assert not bp[:, 21:].any()
            np.testing.assert_allclose(r.read("poses/betas", rows), np.repeat(src["betas"][None, :10], 4, 0))
            # root orientation = Rx(-90) @ AMASS root (scipy reference)
            ref = Rotation.from_matrix(ZUP_TO_YUP) * Rotation.from_rotvec(poses[:, :3])
            got = Rotation.from_rotvec(r.read("poses/global_orient", rows))
            np.testing.assert_allclose(got.as_matrix(), ref.as_matrix(), atol=1e-5)
            # stored joints are the rotated AMASS joints
            expected = _raw_joints(body, poses, trans, src["betas"]) @ ZUP_TO_YUP.T
            np.testing.assert_allclose(r.joints(rows), expected, atol=5e-5)


def test_amass_remove_root_yaw_and_max_samples(tmp_path):
    raw = tmp_path / "raw"
    write_amass_tree(raw, {"CMU": 2, "HumanEva": 1})
    out = {"train": tmp_path / "train.h5"}
    convert("amass", _amass_cfg(remove_root_yaw=True, max_samples=5, target_fps=0.0), raw, out, None,
            progress=False)
    r = SplitReader(out["train"])
    assert r.read("poses/global_orient").shape == (5, 3)
    x_axis = Rotation.from_rotvec(r.read("poses/global_orient")).as_matrix()[:, :, 0]
    np.testing.assert_allclose(x_axis[:, 2], 0, atol=1e-5)


def test_amass_accepts_smplx_g_sequences(tmp_path):
    raw = tmp_path / "raw"
    src = write_amass_sequence(raw / "CMU/s1/a_stageii.npz", n_frames=4, fps=30.0, width=165)
    out = {"train": tmp_path / "train.h5"}
    cfg = DatasetsConfig.from_dict(
        {"amass": {"splits": {"train": ["CMU"]}, "files": ["CMU"], "target_fps": 0.0}}, where="datasets")
    convert("amass", cfg, raw, out, None, progress=False)
    bp = SplitReader(out["train"]).read("poses/body_pose")
    np.testing.assert_allclose(bp[:, :21], src["poses"][:, 3:66].reshape(-1, 21, 3), atol=1e-6)


@pytest.mark.parametrize("bad, field", [
    ({"poses": np.zeros((5, 100), np.float32)}, "poses"),
    ({"trans": None}, "trans"),
    ({"trans": np.zeros((4, 3))}, "trans"),
    ({"mocap_framerate": None}, "mocap_framerate"),
])
def test_amass_malformed_sequence_fails_cleanly(tmp_path, bad, field):
    raw = tmp_path / "raw"
    write_amass_tree(raw, {"CMU": 1, "HumanEva": 1}, n_frames=5)
    bad_file = raw / "CMU/subject1/seq0_poses.npz"
    data = dict(np.load(bad_file))
    for k, v in bad.items():
        if v is None:
            data.pop(k)
        else:
            data[k] = v
    np.savez(bad_file, **data)
    out_dir = tmp_path / "out"
    out = {"val": out_dir / "val.h5", "train": out_dir / "train.h5"}
    with pytest.raises(ConversionError) as err:
        convert("amass", _amass_cfg(), raw, out, None, progress=False)
    assert str(bad_file) in str(err.value) and f"'{field}'" in str(err.value)
    assert not out_dir.exists() or list(out_dir.iterdir()) == []


def test_amass_missing_subdataset_names_the_folder(tmp_path):
    raw = tmp_path / "raw"
    write_amass_tree(raw, {"CMU": 1})
    (raw / "HumanEva").mkdir()
    with pytest.raises(ConversionError, match="no sequence .npz files"):
        convert("amass", _amass_cfg(), raw, {"val": tmp_path / "v.h5"}, None, progress=False)
    with pytest.raises(ConversionError, match="HumanEva"):
        convert("amass", _amass_cfg(), tmp_path / "empty", {"val": tmp_path / "v.h5"}, None,
                progress=False)


def test_amass_accepts_either_release_folder_names(tmp_path):
    # The SMPL+H G names (BioMotionLab_NTroje, MPI_HDM05) and the current release's names
    # (BMLrub, HDM05) are the same sub-datasets (amass.AMASS_RELEASE_NAMES).
    for tree, listed in ((("BMLrub", "HDM05"), ("BioMotionLab_NTroje", "MPI_HDM05")),
                         (("BioMotionLab_NTroje", "MPI_HDM05"), ("BMLrub", "HDM05"))):
        raw = tmp_path / tree[0] / "raw"
        written = write_amass_tree(raw, {tree[0]: 2, tree[1]: 1}, n_frames=12, fps=60.0)
        cfg = DatasetsConfig.from_dict(
            {"amass": {"splits": {"train": [listed[0]], "val": [listed[1]]}, "target_fps": 20.0}},
            where="datasets")
        out = {"train": raw.parent / "train.h5", "val": raw.parent / "val.h5"}
        convert("amass", cfg, raw, out, None, progress=False)
        assert validate_split(out["train"])["N"] == 8 and validate_split(out["val"])["N"] == 4
        r = SplitReader(out["train"])
        assert sorted(set(r.read("meta/sequence"))) == sorted(k for k in written if k.startswith(tree[0] + "/"))
        assert r.attrs["converter_params"]["subdataset_folders"] == [tree[0]]
        assert r.attrs["converter_params"]["missing_subdatasets"] == []


def test_amass_default_splits_convert_the_present_subdatasets(tmp_path, caplog):
    # A real unpack of the current release with only some sub-datasets: the default
    # (SMPL+H G named) split lists convert what is there and warn about the rest.
    raw = tmp_path / "raw"
    written = write_amass_tree(raw, {"BMLrub": 1, "CMU": 1, "HDM05": 1, "SSM": 1}, n_frames=6)
    out = {s: tmp_path / f"{s}.h5" for s in ("train", "val", "test")}
    with caplog.at_level("WARNING", logger="poserft.data.converters.amass"):
        convert("amass", DatasetsConfig(), raw, out, None, progress=False)
    for split, subs in {"train": {"BMLrub", "CMU"}, "val": {"HDM05"}, "test": {"SSM"}}.items():
        r = SplitReader(out[split])
        validate_split(out[split])
        assert {s.split("/")[0] for s in r.read("meta/sequence")} == subs
        params = r.attrs["converter_params"]
        assert sorted(params["subdataset_folders"]) == sorted(subs)
    missing = SplitReader(out["val"]).attrs["converter_params"]["missing_subdatasets"]
    assert missing == ["HumanEva", "SFU", "MPI_mosh"]
    text = caplog.text
    assert "'val'" in text and "HumanEva" in text and "MPI_mosh or MoSh" in text
    assert "'test'" in text and "Transitions_mocap or Transitions" in text
    assert len(written) == 4


def test_amass_split_with_no_subdataset_present_names_root_and_folders(tmp_path):
    raw = tmp_path / "raw"
    write_amass_tree(raw, {"CMU": 1})                     # train present, val absent
    with pytest.raises(ConversionError) as err:
        convert("amass", DatasetsConfig(), raw, {"train": tmp_path / "t.h5", "val": tmp_path / "v.h5"},
                None, progress=False)
    msg = str(err.value)
    assert str(raw) in msg and "'val'" in msg
    for name in ("HumanEva", "MPI_HDM05 or HDM05", "SFU", "MPI_mosh or MoSh"):
        assert name in msg
    assert not (tmp_path / "t.h5").exists()


# ----------------------------------------------------------------------------- PoseScript

def _posescript_fixture(tmp_path):
    amass_root = tmp_path / "amass"
    written = write_amass_tree(amass_root, {"CMU": 2}, n_frames=10)
    human = {0: "The person stands with arms up.", 2: ["Knees bent.", "Squatting low."]}
    auto = {0: ["auto a", "auto b"], 1: ["auto c"], 3: ["auto d"]}
    id_map = write_posescript_release(tmp_path / "ps", written, {"train": [0, 1, 2, 4], "val": [3], "test": []},
                                      human, auto)
    cfg = DatasetsConfig.from_dict({"posescript": {"amass_root": str(amass_root)}}, where="datasets")
    return cfg, written, id_map, human, auto


def test_posescript_joins_captions_to_amass_frames(tmp_path):
    cfg, written, id_map, human, auto = _posescript_fixture(tmp_path)
    out = {"train": tmp_path / "out/train.h5", "val": tmp_path / "out/val.h5"}
    convert("posescript", cfg, tmp_path / "ps", out, None, progress=False)
    r = SplitReader(out["train"])
    ids = r.read("meta/posescript_id")
    np.testing.assert_array_equal(ids, [0, 1, 2])            # id 4 has no caption: dropped
    texts, index = r.captions(), r.caption_pose_index()
    by_pose = {int(ids[i]): sorted(texts[index == i]) for i in range(len(ids))}
    assert by_pose == {0: sorted(["The person stands with arms up.", "auto a", "auto b"]),
                       1: ["auto c"], 2: sorted(["Knees bent.", "Squatting low."])}
    body = load(None)
    for row, pid in enumerate(ids):
        _, seq, frame = id_map[int(pid)]
        src = written[seq]
        # pose = that AMASS frame: body joints equal, root = yaw-free Rx(-90) @ AMASS root
        np.testing.assert_allclose(r.read("poses/body_pose", row)[:21],
                                   src["poses"][frame, 3:66].reshape(21, 3), atol=1e-6)
        R = Rotation.from_rotvec(r.read("poses/global_orient", row)).as_matrix()
        assert abs(R[2, 0]) < 1e-5 and R[0, 0] > 0               # heading removed
        ref = ZUP_TO_YUP @ Rotation.from_rotvec(src["poses"][frame, :3]).as_matrix()
        yaw = np.arctan2(-ref[2, 0], ref[0, 0])
        np.testing.assert_allclose(R, Rotation.from_euler("y", -yaw).as_matrix() @ ref, atol=1e-5)
        # joints: the raw frame's joints, rotated to y-up and about the vertical by -yaw
        raw = _raw_joints(body, src["poses"][frame:frame + 1], src["trans"][frame:frame + 1], src["betas"])[0]
        expected = raw @ ZUP_TO_YUP.T @ Rotation.from_euler("y", -yaw).as_matrix().T
        np.testing.assert_allclose(r.joints(row), expected, atol=5e-5)
    rv = SplitReader(out["val"])
    assert list(rv.captions()) == ["auto d"] and rv.attrs["split"] == "val"


def test_posescript_missing_amass_sequence_names_it(tmp_path):
    cfg, written, id_map, *_ = _posescript_fixture(tmp_path)
    victim = tmp_path / "amass" / id_map[1][1]
    victim.unlink()
    out_dir = tmp_path / "out"
    with pytest.raises(ConversionError, match="amass_root") as err:
        convert("posescript", cfg, tmp_path / "ps", {"train": out_dir / "train.h5"}, None,
                progress=False)
    assert str(victim) in str(err.value)
    assert not out_dir.exists()


def test_posescript_malformed_id_map_entry(tmp_path):
    cfg, *_ = _posescript_fixture(tmp_path)
    path = tmp_path / "ps/ids_2_dataset_sequence_and_frame_index_100k.json"
    id_map = json.loads(path.read_text())
    id_map["2"] = ["AMASS", "CMU/subject1/seq0_poses.npz"]  # frame missing
    path.write_text(json.dumps(id_map))
    with pytest.raises(ConversionError, match=r"ids_2_dataset.*'2': expected \[dataset"):
        convert("posescript", cfg, tmp_path / "ps", {"train": tmp_path / "t.h5"}, None, progress=False)
    assert not (tmp_path / "t.h5").exists()


def test_posescript_missing_release_file(tmp_path):
    cfg, *_ = _posescript_fixture(tmp_path)
    (tmp_path / "ps/val_ids_100k.json").unlink()
    with pytest.raises(ConversionError, match="val_ids_100k.json.*download"):
        convert("posescript", cfg, tmp_path / "ps", {"val": tmp_path / "v.h5"}, None, progress=False)


# ----------------------------------------------------------------------------- bad input (#17)

def _emptied(path):
    """Rewrite an AMASS sequence with 0 frames (as an interrupted export leaves it)."""
    data = dict(np.load(path))
    data["poses"], data["trans"] = data["poses"][:0], data["trans"][:0]
    np.savez(path, **data)


@pytest.mark.parametrize("damage, problem", [
    (lambda b: b[: len(b) // 2], "truncated or corrupt .npz"),
    (lambda b: b"", "truncated or corrupt .npz"),
    (lambda b: b"<html>502 Bad Gateway</html>", "not an .npz archive"),
])
def test_amass_truncated_npz_names_the_file_and_the_fix(tmp_path, damage, problem):
    raw = tmp_path / "raw"
    write_amass_tree(raw, {"CMU": 2, "HumanEva": 1}, n_frames=6)
    bad = raw / "CMU/subject1/seq1_poses.npz"
    bad.write_bytes(damage(bad.read_bytes()))
    out_dir = tmp_path / "out"
    with pytest.raises(ConversionError) as err:
        convert("amass", _amass_cfg(), raw, {"train": out_dir / "train.h5"}, None, progress=False)
    msg = str(err.value)
    assert msg.startswith(f"{bad}: '/': {problem}") and "download" in msg and "\n" not in msg
    assert not out_dir.exists()


def test_amass_empty_sequences_are_skipped_with_a_warning(tmp_path, caplog):
    raw = tmp_path / "raw"
    write_amass_tree(raw, {"CMU": 2, "HumanEva": 1}, n_frames=12)
    empty = raw / "CMU/subject1/seq0_poses.npz"
    _emptied(empty)
    out = {"train": tmp_path / "out/train.h5"}
    metrics = {}

    class Tracker:
        def log_params(self, d):
            pass

        def log_metrics(self, d, step=None):
            metrics.update(d)

    with caplog.at_level("WARNING", logger="poserft.data.converters.amass"):
        convert("amass", _amass_cfg(), raw, out, None, tracker=Tracker(), progress=False)
    r = SplitReader(out["train"])
    assert set(r.read("meta/sequence")) == {"CMU/subject1/seq1_poses.npz"} and r.num_poses == 4
    assert metrics["train/n_empty_sequences"] == 1
    warned = [rec.getMessage() for rec in caplog.records if rec.levelname == "WARNING"]
    assert len(warned) == 1 and str(empty) in warned[0] and "0 frames" in warned[0]


def test_amass_split_of_only_empty_sequences_names_them(tmp_path):
    raw = tmp_path / "raw"
    write_amass_tree(raw, {"CMU": 1, "HumanEva": 2}, n_frames=6)
    for k in (0, 1):
        _emptied(raw / f"HumanEva/subject1/seq{k}_poses.npz")
    out_dir = tmp_path / "out"
    with pytest.raises(ConversionError) as err:
        convert("amass", _amass_cfg(), raw, {"train": out_dir / "train.h5", "val": out_dir / "val.h5"},
                None, progress=False)
    msg = str(err.value)
    assert msg.startswith(f"{raw / 'HumanEva/subject1/seq0_poses.npz'}: 'poses': 0 frames")
    assert "HumanEva/subject1/seq1_poses.npz" in msg and "datasets.amass.splits.val" in msg
    assert not out_dir.exists()


def test_posescript_empty_captions_are_reported(tmp_path, caplog):
    amass_root = tmp_path / "amass"
    written = write_amass_tree(amass_root, {"CMU": 1}, n_frames=10)
    human = {0: "Arms up.", 1: "   ", 2: ["Knees bent.", ""]}
    auto = {0: ["auto a"], 3: [""], 4: ["auto e"]}
    write_posescript_release(tmp_path / "ps", written, {"train": [0, 1, 2, 3, 4], "val": [],
                                                        "test": []}, human, auto)
    out = {"train": tmp_path / "train.h5"}
    with caplog.at_level("WARNING", logger="poserft.data.converters.posescript"):
        convert("posescript", DatasetsConfig.from_dict(
                    {"posescript": {"amass_root": str(amass_root)}}, where="datasets"),
                tmp_path / "ps", out, None, progress=False)
    np.testing.assert_array_equal(SplitReader(out["train"]).read("meta/posescript_id"), [0, 2, 4])
    warned = sorted(rec.getMessage() for rec in caplog.records if rec.levelname == "WARNING")
    assert len(warned) == 2
    auto_msg, human_msg = warned          # sorted by file name: ..._auto_... < ..._human_...
    assert auto_msg.startswith(str(tmp_path / "ps/posescript_auto_100k.json"))
    assert "1 empty caption(s)" in auto_msg and "pose ids 3" in auto_msg
    assert human_msg.startswith(str(tmp_path / "ps/posescript_human_6293.json"))
    assert "2 empty caption(s)" in human_msg and "pose ids 1, 2" in human_msg


def test_posescript_finds_sequences_under_the_current_release_folder_names(tmp_path):
    """PoseScript's id map names the older release's folders (BioMotionLab_NTroje/...); an
    AMASS root unpacked from the current release has BMLrub/... and must convert the same."""
    amass_root = tmp_path / "amass"
    written = write_amass_tree(amass_root, {"BMLrub": 2}, n_frames=10)
    old_names = {k.replace("BMLrub", "BioMotionLab_NTroje", 1): v for k, v in written.items()}
    id_map = write_posescript_release(tmp_path / "ps", old_names,
                                      {"train": [0, 1, 2], "val": [], "test": []},
                                      {0: "Arms up.", 1: "Knees bent.", 2: "Sitting."}, {})
    assert all(entry[1].startswith("BioMotionLab_NTroje/") for entry in id_map.values())
    cfg = DatasetsConfig.from_dict({"posescript": {"amass_root": str(amass_root)}},
                                   where="datasets")
    out = {"train": tmp_path / "out" / "train.h5"}
    convert("posescript", cfg, tmp_path / "ps", out, None, progress=False)
    r = SplitReader(out["train"])
    for row, pid in enumerate(r.read("meta/posescript_id")):
        _, seq, frame = id_map[int(pid)]
        src = old_names[seq]
        np.testing.assert_allclose(r.read("poses/body_pose", row)[:21],
                                   src["poses"][frame, 3:66].reshape(21, 3), atol=1e-6)
