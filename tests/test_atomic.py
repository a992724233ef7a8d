"""Atomic writers: outputs honour the umask (readable by the group on a shared file system),
and JSON results refuse NaN/inf naming the file and the key."""

from __future__ import annotations

import json
import math
import os
import stat

import numpy as np
import pytest

from poserft.atomic import atomic_path, write_json, write_text

# umask -> (file mode, dir mode)
MODES = {0o022: (0o644, 0o755), 0o002: (0o664, 0o775)}


@pytest.fixture(params=sorted(MODES), ids=lambda m: f"umask{m:03o}")
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_current_umask_reads_without_changing(umask):
    from poserft.atomic import current_umask
    assert current_umask() == umask
    assert current_umask() == umask


def test_atomic_writers_honour_the_umask(tmp_path, umask):
    file_mode, dir_mode = MODES[umask]
    from poserft.atomic import apply_umask, make_temp_dir
    assert _mode(write_text(tmp_path / "a" / "t.md", "x\n")) == file_mode
    assert _mode(tmp_path / "a") == dir_mode                          # created parent
    assert _mode(write_json(tmp_path / "metrics.json", {"a": 1.0})) == file_mode
    with atomic_path(tmp_path / "arr.npz") as tmp:
        np.savez(tmp, x=np.zeros(2))
    assert _mode(tmp_path / "arr.npz") == file_mode
    d = make_temp_dir(tmp_path / "new" / "parent", prefix=".x-")
    assert _mode(d) == dir_mode and d.parent.name == "parent"
    (tmp_path / "private").write_text("")
    os.chmod(tmp_path / "private", 0o600)
    assert _mode(apply_umask(tmp_path / "private")) == file_mode
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_write_schema_honours_the_umask(tmp_path, umask):
    from poserft.config import main
    out = tmp_path / "schemas" / "config.schema.yaml"
    assert main(["--write-schema", str(out)]) == 0
    assert _mode(out) == MODES[umask][0] and out.read_text().startswith("# GENERATED")
    assert [p.name for p in out.parent.iterdir()] == [out.name]


@pytest.mark.parametrize("obj, key, kind", [
    ({"image2pose": {"mpjpe": math.nan, "pa_mpjpe": 1.0}}, "image2pose.mpjpe", "NaN"),
    ({"b": 1.0, "a": {"curve": [0.5, math.inf]}}, "a.curve[1]", "inf"),
    ({"z": -math.inf, "y": [{"x": math.nan}]}, "y[0].x", "NaN"),     # first in written order
    ([1.0, -math.inf], "[1]", "-inf"),
])
def test_write_json_names_file_and_key_of_non_finite_values(tmp_path, obj, key, kind):
    path = tmp_path / "runs" / "x" / "metrics.json"
    with pytest.raises(ValueError) as info:
        write_json(path, obj)
    msg = str(info.value)
    assert msg.startswith(f"{path}: {key} is {kind}; ") and "\n" not in msg
    assert not path.exists() and not path.parent.exists()      # refused before any write
    # a previous complete file stays untouched
    write_json(path, {"ok": 1})
    with pytest.raises(ValueError, match="metrics.json"):
        write_json(path, obj)
    assert json.loads(path.read_text()) == {"ok": 1}
    # summaries may opt in
    write_json(path, obj, allow_nan=True)


def _assert_tree_modes(root, umask):
    file_mode, dir_mode = MODES[umask]
    assert _mode(root) == dir_mode, root
    found = list(root.rglob("*"))
    assert found
    for p in found:
        assert _mode(p) == (dir_mode if p.is_dir() else file_mode), p
    assert [p for p in found if p.name.startswith(".")] == []          # no temp left


def test_pose_encoder_folder_honours_the_umask(tmp_path, umask):
    from poserft.model.config import PoseEncoderConfig
    from poserft.model.pretrain import pretrain_pose_encoder
    from poserft.model.testing import make_test_split
    train = make_test_split(tmp_path / "train.h5", 8)
    vit = dict(image_size=16, hidden_size=8, num_layers=2, conv_width=4)
    cfg = PoseEncoderConfig.from_dict({"vit": vit, "steps": 1, "batch_size": 4, "heatmap_stride": 2,
                                       "val_samples": 0}, where="pose_encoder")
    pretrain_pose_encoder(cfg, {"train": train}, tmp_path / "runs" / "enc")
    _assert_tree_modes(tmp_path / "runs" / "enc", umask)


def test_retrieval_checkpoint_honours_the_umask(tmp_path, umask):
    from poserft.retrieval.checkpoint import save_retrieval_model
    from poserft.retrieval.config import RetrievalConfig
    from poserft.retrieval.train import build_model
    from poserft.text.tokenizer import train_tokenizer

    tok = train_tokenizer(["the left arm is raised", "the person squats"] * 20, 300,
                          tmp_path / "tok" / "tokenizer.json")
    cfg = RetrievalConfig.from_dict(dict(d_model=16, n_layers=1, n_heads=2, ff_dim=32,
                                         pose_hidden_dim=32, latent_dim=8, max_text_len=8),
                                    where="retrieval")
    save_retrieval_model(build_model(cfg, tok), tmp_path / "retrieval" / "reward", {"role": "reward"})
    _assert_tree_modes(tmp_path / "retrieval" / "reward", umask)
