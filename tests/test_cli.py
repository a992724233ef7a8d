"""The `poserft` command end to end on a tiny saved policy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.spatial.transform import Rotation

from poserft.cli import main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from poserft.model.io import save_policy
    from poserft.model.testing import tiny_policy

    root = tmp_path_factory.mktemp("cli")
    policy, tok = tiny_policy(root)
    save_policy(policy, root / "policy")
    n_params = sum(v.numel() for v in policy.state_dict().values())
    return {"dir": root / "policy", "n_params": n_params, "vocab": len(tok), "root": root}


def _rot6d_matrix(six: np.ndarray) -> np.ndarray:
    """Gram-Schmidt of the two 6D columns (Zhou et al.), numpy, for the reference."""
    a, b = six[..., 0:3], six[..., 3:6]
    x = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b - (x * b).sum(-1, keepdims=True) * x
    y = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return np.stack([x, y, np.cross(x, y)], axis=-1)


def test_generate_text_writes_smpl_npz_and_render(checkpoint, tmp_path, capsys):
    out, png = tmp_path / "poses.npz", tmp_path / "poses.png"
    rc = main(["generate", "--text", "The person is squatting with the knees completely bent.",
               "--checkpoint", str(checkpoint["dir"]), "--out", str(out), "--render", str(png),
               "--max-new-tokens", "8"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert printed.startswith("[0] ") and f"wrote {out}" in printed
    z = np.load(out)
    assert z["global_orient"].shape == (1, 3) and z["body_pose"].shape == (1, 23, 3)
    assert z["betas"].shape == (1, 10) and z["joints"].shape == (1, 24, 3)
    assert z["texts"].shape == (1,) and z["texts"].dtype.kind == "U"
    # axis-angle parameters are the rotations of the predicted 6D vector (scipy reference)
    six = z["vec6d"].reshape(1, 24, 6)          # per joint: first column, second column
    want = _rot6d_matrix(six.astype(np.float64))
    got = Rotation.from_rotvec(np.concatenate([z["global_orient"][:, None], z["body_pose"]], 1)
                               .reshape(-1, 3)).as_matrix().reshape(1, 24, 3, 3)
    np.testing.assert_allclose(got, want, atol=2e-4)
    # joints: forward kinematics of those parameters (independent of the 6D path)
    from poserft.body import load
    import torch
    fk = load(None)(torch.as_tensor(z["global_orient"]), torch.as_tensor(z["body_pose"])).numpy()
    np.testing.assert_allclose(z["joints"], fk, atol=1e-4)
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 50


def test_generate_image_samples(checkpoint, tmp_path, capsys):
    img = tmp_path / "person.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(img)
    out = tmp_path / "s.npz"
    args = ["generate", "--image", str(img), "--checkpoint", str(checkpoint["dir"]),
            "--samples", "3", "--seed", "5", "--max-new-tokens", "6", "--out", str(out)]
    assert main(args) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("[")]
    assert len(lines) == 3
    z1 = dict(np.load(out))
    assert z1["joints"].shape == (3, 24, 3) and z1["pose_valid"].shape == (3,)
    assert main(args) == 0                                  # same seed, same samples
    np.testing.assert_array_equal(np.load(out)["vec6d"], z1["vec6d"])
    # greyscale and RGBA images are accepted (converted to RGB)
    for mode in ("L", "RGBA"):
        p = tmp_path / f"{mode}.png"
        Image.new(mode, (16, 16)).save(p)
        assert main(["generate", "--image", str(p), "--checkpoint", str(checkpoint["dir"]),
                     "--max-new-tokens", "4"]) == 0


def _commands_reading(checkpoint, out):
    """Every CLI command that reads a checkpoint: info, info --json, generate --out."""
    return (["info", str(checkpoint)], ["info", str(checkpoint), "--json"],
            ["generate", "--text", "The person is squatting.", "--checkpoint", str(checkpoint),
             "--out", str(out)])


def _error(capsys, argv) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 1
    assert len(err.splitlines()) == 1 and err.startswith("poserft: error: ")
    return err


def test_errors_are_one_line_and_write_nothing(checkpoint, tmp_path, capsys):
    out = tmp_path / "x.npz"
    ck = str(checkpoint["dir"])
    err = _error(capsys, ["generate", "--text", "hi", "--checkpoint", str(tmp_path / "nope"),
                          "--out", str(out)])
    assert str(tmp_path / "nope") in err and "does not exist" in err
    (tmp_path / "empty").mkdir()
    err = _error(capsys, ["generate", "--text", "hi", "--checkpoint", str(tmp_path / "empty")])
    assert "not a policy directory" in err and "model.safetensors" in err

    fake = tmp_path / "fake.png"
    fake.write_text("this is not an image")
    err = _error(capsys, ["generate", "--image", str(fake), "--checkpoint", ck, "--out", str(out)])
    assert str(fake) in err and "not a readable image" in err
    err = _error(capsys, ["generate", "--image", str(tmp_path / "missing.png"), "--checkpoint", ck])
    assert "does not exist" in err

    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16)).save(cmyk)
    err = _error(capsys, ["generate", "--image", str(cmyk), "--checkpoint", ck, "--out", str(out)])
    assert "mode 'CMYK' (4 channels)" in err and str(cmyk) in err
    la = tmp_path / "la.png"
    Image.new("LA", (16, 16)).save(la)
    assert "(2 channels)" in _error(capsys, ["generate", "--image", str(la), "--checkpoint", ck])
    deep = tmp_path / "deep.png"
    Image.fromarray(np.zeros((8, 8), np.uint16)).save(deep)
    assert "mode 'I;16'" in _error(capsys, ["generate", "--image", str(deep), "--checkpoint", ck])

    assert ".npz" in _error(capsys, ["generate", "--text", "hi", "--checkpoint", ck, "--out", "x.txt"])
    assert not out.exists()


def test_info(checkpoint, capsys):
    assert main(["info", str(checkpoint["dir"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == checkpoint["n_params"]
    assert info["vocab_size"] == checkpoint["vocab"]
    assert info["model"]["head"] == "gaussian"
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(info["files"])
    assert main(["info", str(checkpoint["dir"])]) == 0
    text = capsys.readouterr().out
    assert f"{checkpoint['n_params']:,}" in text and "vocab size" in text


def test_console_script(checkpoint, tmp_path):
    exe = Path(sys.executable).parent / "poserft"
    ok = subprocess.run([str(exe), "info", str(checkpoint["dir"])], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "parameters" in ok.stdout
    bad = subprocess.run([str(exe), "info", str(tmp_path / "absent")], capture_output=True, text=True)
    assert bad.returncode == 1 and "absent" in bad.stderr and "Traceback" not in bad.stderr
    usage = subprocess.run([str(exe), "generate", "--checkpoint", "x"], capture_output=True, text=True)
    assert usage.returncode == 2 and "--text" in usage.stderr


@pytest.mark.parametrize("keep", [0.5, 0.0001])
def test_truncated_weights_are_one_line_errors(checkpoint, tmp_path, capsys, keep):
    """generate and info on a cut-short model.safetensors: one line naming the file, what is
    wrong and the fix; exit 1, no traceback, nothing written."""
    import shutil
    ck = shutil.copytree(checkpoint["dir"], tmp_path / "policy")
    weights = ck / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:max(1, int(len(data) * keep))])
    out = tmp_path / "p.npz"
    for argv in _commands_reading(ck, out):
        err = _error(capsys, argv)
        assert f"{weights}: truncated or corrupt" in err, err
        assert "save_policy" in err and "rerun" in err and "Traceback" not in err
    assert not out.exists()


def test_empty_text_prompt_is_an_error(checkpoint, tmp_path, capsys):
    out = tmp_path / "p.npz"
    for text in ("", "   ", "\n\t"):
        err = _error(capsys, ["generate", "--text", text, "--checkpoint", str(checkpoint["dir"]),
                              "--out", str(out)])
        assert "--text is empty" in err and "--text \"" in err
    assert not out.exists()


@pytest.mark.parametrize("size, warned", [((1, 1), True), ((6, 30), True), ((30, 7), True),
                                          ((8, 8), False), ((20, 24), False)])
def test_tiny_image_warns_and_still_runs(checkpoint, tmp_path, capsys, size, warned):
    """Tiny policy: 16x16 vision input, so a side under 8 px (max(8, 16/4)) is warned about."""
    img = tmp_path / "tiny.png"
    Image.new("RGB", size, (120, 80, 40)).save(img)
    out = tmp_path / "p.npz"
    rc = main(["generate", "--image", str(img), "--checkpoint", str(checkpoint["dir"]),
               "--max-new-tokens", "4", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0 and out.exists() and captured.out.startswith("[0] ")
    warnings = [l for l in captured.err.splitlines() if l.startswith("poserft: warning:")]
    if warned:
        assert len(warnings) == 1, captured.err
        w, h = size
        assert f"image {img} is {w}x{h} px" in warnings[0]
        assert "16x16 px vision input" in warnings[0]
    else:
        assert warnings == [], captured.err


def test_small_image_threshold_scales_with_the_model_input():
    from poserft.cli import small_image_warning
    assert small_image_warning("a.png", (100, 100, 3), (336, 336)) is None       # >= 336/4
    msg = small_image_warning("a.png", (60, 200, 3), (336, 336))                # 60 < 84
    assert msg and "a.png is 200x60 px" in msg and "336x336 px vision input" in msg
    assert "at least 84x84 px" in msg
    assert small_image_warning("a.png", (7, 500, 3), (16, 16))                   # < 8 px


def test_device_option(checkpoint, tmp_path, capsys, monkeypatch):
    """--device: cpu gives the default (auto on a CPU machine) result; an unknown name or a
    GPU that is not there is a one-line error naming the fix."""
    import torch

    ck = str(checkpoint["dir"])
    base = ["generate", "--text", "The person is squatting.", "--checkpoint", ck,
            "--max-new-tokens", "6"]
    outs = {}
    for dev in ("auto", "cpu"):
        outs[dev] = tmp_path / f"{dev}.npz"
        assert main(base + ["--device", dev, "--out", str(outs[dev])]) == 0
    if not torch.cuda.is_available():
        a, b = np.load(outs["auto"]), np.load(outs["cpu"])
        assert all(np.array_equal(a[k], b[k]) for k in a.files)
    capsys.readouterr()
    assert "expected auto, cpu, cuda or cuda:N" in _error(capsys, base + ["--device", "gpu"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = _error(capsys, base + ["--device", "cuda", "--out", str(tmp_path / "x.npz")])
    assert "--device cuda" in err and "no CUDA device" in err and "auto or cpu" in err
    assert not (tmp_path / "x.npz").exists()


@pytest.mark.parametrize("failure", ["folder", "matplotlib"])
def test_failed_render_leaves_no_npz(checkpoint, tmp_path, capsys, monkeypatch, failure):
    """--out with a --render that fails (its folder cannot be created, or matplotlib raises):
    one line naming the png and the cause, exit 1, no npz and no temp file left, and an npz
    already at --out is left as it was."""
    out = tmp_path / "poses.npz"
    if failure == "folder":
        (tmp_path / "afile").write_text("a file where the png's folder should be")
        png = tmp_path / "afile" / "poses.png"
        cause = "FileExistsError"
    else:
        import poserft.eval.gallery as gallery

        def broken(*args, **kwargs):
            raise RuntimeError("renderer exploded")
        monkeypatch.setattr(gallery, "render_pose_grid", broken)
        png = tmp_path / "poses.png"
        cause = "RuntimeError: renderer exploded"
    argv = ["generate", "--text", "The person is squatting.", "--checkpoint",
            str(checkpoint["dir"]), "--max-new-tokens", "4", "--out", str(out),
            "--render", str(png)]
    before = set(tmp_path.iterdir())
    err = _error(capsys, argv)
    assert f"--render {png}" in err and cause in err, err
    assert not out.exists() and not png.exists()
    assert set(tmp_path.iterdir()) == before            # no temp files either
    out.write_bytes(b"an older result")
    _error(capsys, argv)
    assert out.read_bytes() == b"an older result"


@pytest.mark.parametrize("garbage", [b"{this is not json", b"\xff\xfe\x00\x80",
                                     b'{"version": "1.0", "model": {"type": "Nope"}}', b"[1, 2]"])
def test_corrupt_tokenizer_is_a_one_line_error(checkpoint, tmp_path, capsys, garbage):
    """generate and info on a policy whose tokenizer.json is garbage: one line naming the
    file and the fix, exit 1, nothing written; load_policy raises a typed error naming it."""
    import shutil

    ck = shutil.copytree(checkpoint["dir"], tmp_path / "policy")
    tok = ck / "tokenizer.json"
    tok.write_bytes(garbage)
    out = tmp_path / "p.npz"
    for argv in _commands_reading(ck, out):
        err = _error(capsys, argv)
        assert f"{tok}: cannot be read (" in err, err
        assert "save_policy" in err and "copy tokenizer.json" in err
    assert not out.exists()
    import re

    from poserft.model.io import PolicyFileError, PolicyTokenizerError, load_policy
    with pytest.raises(PolicyTokenizerError, match=re.escape(f"{tok}: cannot be read")) as info:
        load_policy(ck)
    assert isinstance(info.value, PolicyFileError)      # what callers already catch
