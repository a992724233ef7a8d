"""HDF5 split files: round trip, validator errors, atomic writes, lazy/pickle-safe reader."""

import json
import os
import pickle

import h5py
import numpy as np
import pytest

from poserft.data.h5io import (SCHEMA_VERSION, DataValidationError, SplitReader,
                               validate_split, write_split)

ATTRS = {"source": "unit", "split": "train", "body_model": "skeleton",
         "converter_params": {"seed": 3, "note": "x"}}


def make_arrays(n=7, m=11, q=4, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "poses/global_orient": rng.normal(size=(n, 3)),
        "poses/body_pose": rng.normal(size=(n, 23, 3)),
        "poses/betas": rng.normal(size=(n, 10)),
        "poses/transl": rng.normal(size=(n, 3)),
        "joints": rng.normal(size=(n, 24, 3)),
        "captions/text": [f"caption {i} ünïcode" for i in range(m)],
        "captions/pose_index": rng.integers(0, n, size=m),
        "images": rng.integers(0, 256, size=(n, 16, 12, 3), dtype=np.uint8),
        "keypoints2d": rng.uniform(0, 16, size=(n, 24, 2)),
        "camera/K": np.tile(np.eye(3), (n, 1, 1)),
        "camera/R": np.tile(np.eye(3), (n, 1, 1)),
        "camera/t": rng.normal(size=(n, 3)),
        "image_pose/global_orient": rng.normal(size=(n, 3)),
        "vqa/question": [f"q{i}?" for i in range(q)],
        "vqa/answer": [f"a{i}." for i in range(q)],
        "vqa/pose_index": rng.integers(0, n, size=q),
        "meta/archetype": [f"arch{i % 3}" for i in range(n)],
    }


def test_round_trip_preserves_values_dtypes_and_attrs(tmp_path):
    arrays = make_arrays()
    path = write_split(tmp_path / "sub" / "train.h5", arrays, ATTRS)
    assert validate_split(path) == {"N": 7, "M": 11, "Q": 4}
    r = SplitReader(path)
    assert (r.num_poses, r.num_captions, r.num_vqa) == (7, 11, 4)
    poses = r.poses()
    np.testing.assert_allclose(poses["body_pose"], arrays["poses/body_pose"].astype(np.float32))
    np.testing.assert_allclose(poses["transl"], arrays["poses/transl"].astype(np.float32))
    assert poses["global_orient"].dtype == np.float32
    assert r.caption_pose_index().dtype == np.int64
    assert list(r.captions()) == arrays["captions/text"]
    assert r.captions(2) == "caption 2 ünïcode"
    np.testing.assert_array_equal(r.images(), arrays["images"])
    np.testing.assert_array_equal(r.vqa()["pose_index"], arrays["vqa/pose_index"])
    assert list(r.vqa()["answer"]) == arrays["vqa/answer"]
    np.testing.assert_allclose(r.camera(3)["t"], arrays["camera/t"][3].astype(np.float32))
    assert r.image_shape == (16, 12, 3)
    attrs = r.attrs
    assert attrs["schema_version"] == SCHEMA_VERSION
    assert attrs["converter_params"] == {"seed": 3, "note": "x"}
    assert (attrs["source"], attrs["split"], attrs["body_model"]) == ("unit", "train", "skeleton")
    # storage properties promised by the schema
    with h5py.File(path, "r") as f:
        assert f["joints"].chunks[1:] == (24, 3) and f["joints"].compression == "gzip"
        assert h5py.check_string_dtype(f["captions/text"].dtype).encoding == "utf-8"
        assert isinstance(f.attrs["converter_params"], str)


def test_reader_fancy_indexing_matches_numpy(tmp_path):
    arrays = make_arrays()
    r = SplitReader(write_split(tmp_path / "a.h5", arrays, ATTRS))
    ref = arrays["joints"].astype(np.float32)
    idx = np.array([5, 1, 5, 0])  # unsorted, repeated: h5py alone refuses this
    np.testing.assert_array_equal(r.joints(idx), ref[idx])
    np.testing.assert_array_equal(r.joints(-1), ref[-1])
    np.testing.assert_array_equal(r.joints(slice(2, 5)), ref[2:5])
    assert list(r.captions([3, 0])) == [arrays["captions/text"][3], arrays["captions/text"][0]]
    with pytest.raises(IndexError, match="out of range"):
        r.joints(7)
    with pytest.raises(KeyError, match="image_paths"):
        r.read("image_paths")


def test_reader_is_lazy_and_pickles_without_handle(tmp_path):
    r = SplitReader(write_split(tmp_path / "a.h5", make_arrays(), ATTRS))
    assert r._file is None
    r.num_poses
    assert r._file is not None
    clone = pickle.loads(pickle.dumps(r))
    assert clone._file is None
    np.testing.assert_array_equal(clone.joints(0), r.joints(0))
    r.close()
    assert r._file is None


def _corrupt(path, fn):
    with h5py.File(path, "r+") as f:
        fn(f)


@pytest.mark.parametrize("corruption, dataset, problem", [
    (lambda f: f["joints"].__setitem__((2, 5, 1), np.nan), "joints", "NaN/inf (first at row 2)"),
    (lambda f: f["poses/betas"].__setitem__((6, 0), np.inf), "poses/betas", "NaN/inf"),
    (lambda f: f.__delitem__("poses/body_pose"), "poses/body_pose", "required dataset is missing"),
    (lambda f: f.__delitem__("camera/R"), "camera/R", "require all of"),
    (lambda f: f.attrs.__setitem__("schema_version", SCHEMA_VERSION + 1),
     "attrs.schema_version", "schema version"),
    (lambda f: f.attrs.__delitem__("body_model"), "attrs.body_model", "missing"),
    (lambda f: f["captions/pose_index"].__setitem__(4, 7), "captions/pose_index",
     "pose index 7 at row 4 is out of range [0, 7)"),
    (lambda f: f["vqa/pose_index"].__setitem__(0, -1), "vqa/pose_index", "out of range"),
    (lambda f: (f.__delitem__("keypoints2d"), f.create_dataset("keypoints2d",
                data=np.zeros((7, 17, 2), np.float32))), "keypoints2d", "shape (7, 17, 2)"),
    (lambda f: (f.__delitem__("images"), f.create_dataset("images",
                data=np.zeros((7, 4, 4, 3), np.float32))), "images", "kind 'uint8'"),
    (lambda f: (f.__delitem__("joints"), f.create_dataset("joints",
                data=np.zeros((6, 24, 3), np.float32))), "joints", "has 6 rows"),
])
def test_validator_rejects_corruption_naming_file_and_dataset(tmp_path, corruption, dataset,
                                                              problem):
    path = write_split(tmp_path / "bad.h5", make_arrays(), ATTRS)
    validate_split(path)  # valid before corruption
    _corrupt(path, corruption)
    with pytest.raises(DataValidationError) as info:
        validate_split(path)
    err = info.value
    assert err.file == str(path) and err.dataset == dataset
    assert problem in err.problem
    assert str(path) in str(err) and dataset in str(err)


def test_validator_rejects_missing_and_non_hdf5_files(tmp_path):
    with pytest.raises(DataValidationError, match="does not exist"):
        validate_split(tmp_path / "nope.h5")
    junk = tmp_path / "junk.h5"
    junk.write_text("not hdf5")
    with pytest.raises(DataValidationError, match="not a readable HDF5"):
        validate_split(junk)


def test_write_rejects_bad_arrays_before_creating_anything(tmp_path):
    arrays = make_arrays()
    arrays["poses/body_pose"] = arrays["poses/body_pose"][:, :21]  # SMPL-H count, not 23
    with pytest.raises(DataValidationError, match="poses/body_pose.*shape"):
        write_split(tmp_path / "x.h5", arrays, ATTRS)
    arrays = make_arrays()
    arrays["poses/betaz"] = arrays.pop("poses/betas")  # typo must not be silently stored
    with pytest.raises(DataValidationError, match="poses/betaz.*unknown"):
        write_split(tmp_path / "x.h5", arrays, ATTRS)
    with pytest.raises(DataValidationError, match="attrs.converter_params"):
        write_split(tmp_path / "x.h5", make_arrays(), {**ATTRS, "converter_params": "{bad"})
    with pytest.raises(DataValidationError, match="attrs.schema_version"):
        write_split(tmp_path / "x.h5", make_arrays(), {**ATTRS, "schema_version": 0})
    assert os.listdir(tmp_path) == []


def test_atomic_write_leaves_nothing_when_writing_raises(tmp_path, monkeypatch):
    target = tmp_path / "train.h5"
    original = h5py.Group.create_dataset
    calls = {"n": 0}

    def failing(self, name, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk full (simulated)")
        return original(self, name, *a, **kw)

    monkeypatch.setattr(h5py.Group, "create_dataset", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        write_split(target, make_arrays(), ATTRS)
    assert calls["n"] == 3
    assert os.listdir(tmp_path) == []  # neither the target nor a temp file


def test_atomic_write_keeps_previous_file_on_failure(tmp_path, monkeypatch):
    target = write_split(tmp_path / "train.h5", make_arrays(seed=1), ATTRS)
    before = SplitReader(target).joints()

    def boom(self, *a, **kw):
        raise RuntimeError("fail")

    monkeypatch.setattr(h5py.Group, "create_dataset", boom)
    with pytest.raises(RuntimeError):
        write_split(target, make_arrays(seed=2), ATTRS)
    np.testing.assert_array_equal(SplitReader(target).joints(), before)
    assert sorted(os.listdir(tmp_path)) == ["train.h5"]


def test_captions_optional_but_empty_caption_group_is_valid(tmp_path):
    arrays = make_arrays()
    for key in [k for k in arrays if k.startswith(("captions/", "vqa/"))]:
        del arrays[key]
    r = SplitReader(write_split(tmp_path / "img.h5", arrays, ATTRS))
    assert (r.num_captions, r.num_vqa) == (0, 0)
    arrays["captions/text"], arrays["captions/pose_index"] = [], np.zeros(0, np.int64)
    path = write_split(tmp_path / "empty.h5", arrays, ATTRS)
    assert validate_split(path)["M"] == 0
    assert json.loads(h5py.File(path, "r").attrs["converter_params"])["seed"] == 3


# ----------------------------------------------------------------------------- bad files on open (#17)

def test_truncated_split_names_the_path_and_the_fix(tmp_path):
    path = write_split(tmp_path / "data/amass/train.h5", make_arrays(n=300), ATTRS)
    path.write_bytes(path.read_bytes()[:4000])
    for open_reader in (lambda: SplitReader(path), lambda: SplitReader(path, validate=False).num_poses):
        with pytest.raises(DataValidationError) as info:
            open_reader()
        msg = str(info.value)
        assert msg.startswith(f"{path}: '/': not a readable HDF5 file, probably truncated or corrupt")
        assert "`snakemake --forcerun convert_amass`" in msg and "\n" not in msg


def test_reader_validates_on_open_and_can_skip_it(tmp_path):
    path = write_split(tmp_path / "data/synthetic/val.h5", make_arrays(), ATTRS)
    _corrupt(path, lambda f: f["joints"].__setitem__((5, 0, 2), np.nan))
    with pytest.raises(DataValidationError) as info:
        SplitReader(path)
    assert str(info.value) == (f"{path}: 'joints': contains NaN/inf (first at row 5); regenerate "
                               "it: `snakemake --forcerun synthesize` (or delete it and rerun)")
    r = SplitReader(path, validate=False)          # explicit opt-out: inspect / repair
    assert np.isnan(r.joints(5)[0, 2]) and r.lengths is None


def test_reader_validates_each_file_version_once(tmp_path, monkeypatch):
    from poserft.data import h5io

    calls = []
    real = h5io.validate_split
    monkeypatch.setattr(h5io, "validate_split", lambda p, **kw: calls.append(p) or real(p, **kw))
    path = write_split(tmp_path / "a.h5", make_arrays(), ATTRS)
    assert SplitReader(path).lengths == {"N": 7, "M": 11, "Q": 4}
    SplitReader(path)
    assert len(calls) == 1
    write_split(path, make_arrays(n=5, m=3, q=2), ATTRS)     # a new version is checked again
    assert SplitReader(path).lengths == {"N": 5, "M": 3, "Q": 2} and len(calls) == 2


def _bad_body_pose(f):
    data = f["poses/body_pose"][:, :21]
    del f["poses/body_pose"]
    f.create_dataset("poses/body_pose", data=data)          # SMPL-H count (N,21,3)


@pytest.mark.parametrize("make_dataset, corruption, dataset, problem", [
    ("caption", lambda f: f["joints"].__setitem__((5, 3, 1), np.nan), "joints",
     "contains NaN/inf (first at row 5)"),
    ("image", lambda f: f["keypoints2d"].__setitem__((3, 0, 0), np.inf), "keypoints2d",
     "contains NaN/inf (first at row 3)"),
    ("caption", lambda f: f["poses/body_pose"].__setitem__((4, 7, 0), np.nan), "poses/body_pose",
     "contains NaN/inf (first at row 4)"),
    ("vqa", _bad_body_pose, "poses/body_pose", "shape (7, 21, 3) != expected (N, 23, 3)"),
    ("image", _bad_body_pose, "poses/body_pose", "shape (7, 21, 3) != expected (N, 23, 3)"),
])
def test_datasets_reject_bad_splits_naming_file_dataset_and_row(tmp_path, make_dataset, corruption,
                                                               dataset, problem):
    from poserft.data.dataset import CaptionPoseDataset, ImagePoseDataset, VQADataset

    path = write_split(tmp_path / "data/synthetic/train.h5", make_arrays(), ATTRS)
    _corrupt(path, corruption)
    cls = {"caption": CaptionPoseDataset, "image": ImagePoseDataset, "vqa": VQADataset}[make_dataset]
    with pytest.raises(DataValidationError) as info:
        ds = cls(path)
        [ds[i] for i in range(len(ds))]
    err = info.value
    assert (err.file, err.dataset) == (str(path), dataset) and err.problem.startswith(problem)
    assert "snakemake --forcerun synthesize" in str(err) and "\n" not in str(err)


def test_write_splits_restores_previous_files_when_a_replace_fails(tmp_path, monkeypatch):
    from poserft.data import h5io

    paths = [tmp_path / "train.h5", tmp_path / "val.h5"]
    h5io.write_splits({p: (make_arrays(seed=1), ATTRS) for p in paths})
    before = [p.read_bytes() for p in paths]
    real_replace = os.replace

    def failing(src, dst):
        if str(dst) == str(paths[1]) and str(src).endswith(".tmp"):
            raise OSError("stale file handle")
        return real_replace(src, dst)

    monkeypatch.setattr(h5io.os, "replace", failing)
    with pytest.raises(OSError, match="stale"):
        h5io.write_splits({p: (make_arrays(seed=2), ATTRS) for p in paths})
    monkeypatch.undo()
    assert [p.read_bytes() for p in paths] == before            # train.h5 was put back
    assert sorted(os.listdir(tmp_path)) == ["train.h5", "val.h5"]
    # a bad split anywhere fails before anything is written
    bad = make_arrays(seed=3)
    bad["joints"][2, 0, 0] = np.nan
    with pytest.raises(DataValidationError, match=r"val\.h5: 'joints': contains NaN/inf \(first at row 2\)"):
        h5io.write_splits({paths[0]: (make_arrays(seed=3), ATTRS), paths[1]: (bad, ATTRS)})
    assert [p.read_bytes() for p in paths] == before


def test_written_splits_honour_the_umask(tmp_path):
    from poserft.data import h5io
    import stat

    old = os.umask(0o002)
    try:
        a = write_split(tmp_path / "a.h5", make_arrays(), ATTRS)
        b, = h5io.write_splits({tmp_path / "b.h5": (make_arrays(), ATTRS)})
    finally:
        os.umask(old)
    assert stat.S_IMODE(a.stat().st_mode) == stat.S_IMODE(b.stat().st_mode) == 0o664
