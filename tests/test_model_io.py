"""Backbone/encoder loading, fusion math, and the policy save/load round trip."""

import json
import os

import pytest
import torch

from poserft.model.testing import tiny_model_config, tiny_policy

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _images(b, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, size, size, 3), generator=g, dtype=torch.uint8)


# ----------------------------------------------------------------------------- fusion

def test_resample_tokens_bilinear_against_numpy():
    import numpy as np

    from poserft.model.fusion import resample_tokens
    # identity on equal grids
    x = torch.randn(2, 6, 5)
    assert resample_tokens(x, (2, 3), (2, 3)) is x
    # a constant field stays constant; a 2x2 -> 4x4 upsampling of a ramp matches the
    # half-pixel-centre bilinear formula (edges clamped)
    const = torch.full((1, 4, 3), 2.5)
    torch.testing.assert_close(resample_tokens(const, (2, 2), (4, 4)), torch.full((1, 16, 3), 2.5))
    grid = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    tok = grid.reshape(1, 4, 1)
    up = resample_tokens(tok, (2, 2), (4, 4)).reshape(4, 4).numpy()
    # align_corners=False: output centre i maps to source (i + 0.5) / 2 - 0.5, clamped
    src = np.clip((np.arange(4) + 0.5) / 2 - 0.5, 0, 1)
    expected = src[:, None] * 2.0 + src[None, :] * 1.0
    np.testing.assert_allclose(up, expected, atol=1e-6)
    with pytest.raises(ValueError, match="do not form"):
        resample_tokens(torch.randn(1, 5, 2), (2, 3), (2, 2))


def test_fusion_separate_is_sum_of_projections_and_concat_init():
    from poserft.model.fusion import MLPProjector, VisionFusion, resample_tokens
    torch.manual_seed(0)
    clip, pose = torch.randn(2, 16, 8), torch.randn(2, 4, 6)
    sep = VisionFusion("separate", 8, 6, 10, (4, 4), (2, 2))
    for p in sep.proj_pose.parameters():  # leave the zero init so the test sees both terms
        p.data.normal_()
    expected = sep.proj_clip(clip) + sep.proj_pose(resample_tokens(pose, (2, 2), (4, 4)))
    torch.testing.assert_close(sep(clip, pose), expected)
    # W_b starts at zero: a fresh 'separate' fusion equals the CLIP projector alone
    fresh = VisionFusion("separate", 8, 6, 10, (4, 4), (2, 2))
    torch.testing.assert_close(fresh(clip, pose), fresh.proj_clip(clip))
    # concat initialised from a pretrained projector reproduces it (pose columns zero)
    pre = MLPProjector(8, 10)
    cat = VisionFusion("concat", 8, 6, 10, (4, 4), (2, 2), clip_projector=pre)
    torch.testing.assert_close(cat(clip, pose), pre(clip))
    assert cat.proj.linear_1.weight.shape == (10, 14)
    only = VisionFusion("clip_only", 8, None, 10, (4, 4), None)
    assert only(clip).shape == (2, 16, 10)
    with pytest.raises(ValueError, match="needs a pose encoder"):
        VisionFusion("separate", 8, None, 10, (4, 4), None)


# ----------------------------------------------------------------------------- vision

@pytest.mark.parametrize("arch, grid", [("vitpose", (2, 2)), ("conv", (8, 8))])
def test_pose_vit_checkpoint_roundtrip_and_errors(tmp_path, arch, grid):
    from poserft.model.config import PoseViTConfig
    from poserft.model.vision import PoseEncoderCheckpointError, build_pose_vit, save_pose_vit
    cfg = PoseViTConfig(arch=arch, image_size=16, patch_size=8, hidden_size=16, num_layers=1,
                        num_heads=2, conv_width=4)
    enc = build_pose_vit(cfg)
    assert enc.grid == grid
    x = torch.rand(2, 3, 16, 16)
    out = enc(x)
    assert out.shape == (2, grid[0] * grid[1], 16)
    save_pose_vit(enc, tmp_path / "enc")
    again = build_pose_vit(PoseViTConfig(checkpoint=str(tmp_path / "enc")))
    torch.testing.assert_close(again(x), out)
    with pytest.raises(PoseEncoderCheckpointError, match="no config.json"):
        build_pose_vit(PoseViTConfig(checkpoint=str(tmp_path / "missing")))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(PoseEncoderCheckpointError, match="model_type 'bert'"):
        build_pose_vit(PoseViTConfig(checkpoint=str(tmp_path / "bad")))


def test_to_unit_images_accepts_uint8_and_float():
    import numpy as np

    from poserft.model.vision import to_unit_images
    u8 = np.full((2, 4, 5, 3), 255, np.uint8)
    out = to_unit_images(u8)
    assert out.shape == (2, 3, 4, 5) and torch.allclose(out, torch.ones_like(out))
    f = torch.rand(1, 3, 4, 4)
    assert torch.equal(to_unit_images(f), f)
    with pytest.raises(ValueError, match="4-D"):
        to_unit_images(torch.zeros(3, 4, 4))


# ----------------------------------------------------------------------------- backbone

def test_unreachable_checkpoint_gives_clear_error(monkeypatch):
    from poserft.model.backbone import CheckpointUnavailableError, load_pretrained_backbone
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointUnavailableError) as info:
        load_pretrained_backbone("llava-hf/llava-1.5-7b-hf")
    msg = str(info.value)
    assert "llava-hf/llava-1.5-7b-hf" in msg
    assert "local HF cache" in msg and "unreachable" in msg and "model.checkpoint" in msg
    assert "local path" in msg


def test_local_checkpoint_loads_and_extends_tokenizer(tmp_path):
    """A LLaVA checkpoint directory (here: a tiny one whose tokenizer lacks <POSE>) loads,
    gets <POSE> added and its embeddings resized."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlavaForConditionalGeneration, PreTrainedTokenizerFast

    from poserft.model.backbone import tiny_llava_config
    from poserft.model.policy import build_policy

    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<s>", "</s>", "<image>"]
                                        + [chr(c) for c in range(32, 127)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                  bos_token="<s>", eos_token="</s>",
                                  additional_special_tokens=["<image>"])
    cfg = tiny_model_config()
    llava = LlavaForConditionalGeneration(tiny_llava_config(cfg, len(tok), 4, 0, 2, 3))
    ckpt = tmp_path / "llava"
    llava.save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    policy = build_policy(tiny_model_config(checkpoint=str(ckpt)))
    assert policy.tokenizer.convert_tokens_to_ids("<POSE>") == len(tok)  # appended
    assert policy.backbone.get_input_embeddings().num_embeddings == len(tok) + 1
    # the pretrained projector became W_a unchanged
    torch.testing.assert_close(policy.fusion.proj_clip.linear_1.weight,
                               llava.model.multi_modal_projector.linear_1.weight)
    r = policy.generate([policy.image2pose_prompt()], _images(1), num_samples=2, max_new_tokens=3)
    assert len(r) == 2


# ----------------------------------------------------------------------------- save / load

def test_save_load_roundtrip_is_exact(tmp_path):
    from poserft.model.io import load_policy, save_policy
    policy, _ = tiny_policy(tmp_path, covariance="lowrank", cov_rank=2)
    policy.eval()
    out = save_policy(policy, tmp_path / "run" / "final")
    assert sorted(p.name for p in out.iterdir()) >= ["config.json", "model.safetensors", "tokenizer.json"]
    meta = json.loads((out / "config.json").read_text())
    assert meta["model"]["covariance"] == "lowrank"
    loaded = load_policy(tmp_path / "run")  # run dir -> run/final
    for (k, a), (k2, b) in zip(policy.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    prompts = [policy.image2pose_prompt(), policy.text2pose_prompt("The person is squatting.")]
    torch.manual_seed(3)
    r1 = policy.generate(prompts, _images(2), num_samples=2, max_new_tokens=5)
    torch.manual_seed(3)
    r2 = loaded.generate(prompts, _images(2), num_samples=2, max_new_tokens=5)
    assert r1.texts == r2.texts
    torch.testing.assert_close(r1.token_logprobs, r2.token_logprobs)
    torch.testing.assert_close(r1.pose_sample, r2.pose_sample)


def test_save_is_atomic_and_load_errors(tmp_path, monkeypatch):
    from poserft.model import io
    policy, _ = tiny_policy(tmp_path)
    dest = tmp_path / "policy"
    io.save_policy(policy, dest)
    before = (dest / "model.safetensors").read_bytes()

    def boom(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(policy.tokenizer, "save_pretrained", boom)
    with torch.no_grad():
        policy.pose_head.mean_out.bias.add_(1.0)
    with pytest.raises(RuntimeError, match="disk full"):
        io.save_policy(policy, dest)
    assert (dest / "model.safetensors").read_bytes() == before      # old policy intact
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".policy")] == []  # no temp left
    with pytest.raises(io.PolicyFileError, match="no policy here"):
        io.load_policy(tmp_path / "nothing")
    os.remove(dest / "tokenizer.json")
    with pytest.raises(io.PolicyFileError, match="tokenizer.json: missing"):
        io.load_policy(dest)


def test_model_config_invariants():
    from poserft.configbase import ConfigError
    from poserft.model.config import ModelConfig
    with pytest.raises(ConfigError, match="model.pose_answer"):
        ModelConfig.from_dict({"pose_answer": "no token"}, where="model")
    with pytest.raises(ConfigError, match="model.log_std_min"):
        ModelConfig.from_dict({"log_std_min": 1.0, "log_std_max": 0.0}, where="model")
    with pytest.raises(ConfigError, match="model.fusion"):
        ModelConfig.from_dict({"fusion": "sum"}, where="model")
    with pytest.raises(ConfigError, match="model.pose_vit.patch_size"):
        ModelConfig.from_dict({"pose_vit": {"patch_size": 4}}, where="model")


def test_conv_encoder_checkpoint_errors_name_the_file(tmp_path):
    """A conv encoder folder without weights, or with weights of another size, is refused
    with the file and the fix named."""
    from safetensors.torch import save_file

    from poserft.model.config import PoseViTConfig
    from poserft.model.vision import PoseEncoderCheckpointError, build_pose_vit, save_pose_vit
    enc = build_pose_vit(PoseViTConfig(arch="conv", image_size=16, hidden_size=8, num_layers=2,
                                       conv_width=4))
    save_pose_vit(enc, tmp_path / "enc")
    (tmp_path / "enc" / "model.safetensors").unlink()
    with pytest.raises(PoseEncoderCheckpointError, match=r"model\.safetensors: missing.*pretrain_pose_encoder"):
        build_pose_vit(PoseViTConfig(checkpoint=str(tmp_path / "enc")))
    save_file({"token_proj.weight": torch.zeros(3, 3)}, str(tmp_path / "enc" / "model.safetensors"))
    with pytest.raises(PoseEncoderCheckpointError, match="do not match the ConvPoseEncoder"):
        build_pose_vit(PoseViTConfig(checkpoint=str(tmp_path / "enc")))


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755),
                                                        (0o002, 0o664, 0o775)],
                         ids=["umask022", "umask002"])
def test_saved_policy_honours_the_umask(tmp_path, umask, file_mode, dir_mode):
    """Policy folders are readable by the group on a shared file system (mkdtemp makes 0700
    folders, safetensors 0600 files)."""
    import stat

    from poserft.model.io import save_policy
    policy, _ = tiny_policy(tmp_path)
    old = os.umask(umask)
    try:
        out = save_policy(policy, tmp_path / "results" / "runs" / "sft" / "final")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == dir_mode
    for p in out.rglob("*"):
        assert stat.S_IMODE(p.stat().st_mode) == (dir_mode if p.is_dir() else file_mode), p


@pytest.mark.parametrize("keep", [0.5, 0.0001])
def test_truncated_weights_give_a_named_error(tmp_path, keep):
    """A model.safetensors cut short (copy interrupted, disk full) is refused naming the file,
    what is wrong and the fix, not with a raw SafetensorError."""
    from poserft.model import io
    policy, _ = tiny_policy(tmp_path)
    dest = io.save_policy(policy, tmp_path / "policy")
    weights = dest / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:max(1, int(len(data) * keep))])
    with pytest.raises(io.PolicyCheckpointError) as info:
        io.load_policy(dest)
    msg = str(info.value)
    assert msg.startswith(f"{weights}: truncated or corrupt") and "save_policy" in msg
    assert "rerun" in msg and "\n" not in msg
    assert isinstance(info.value, (io.PolicyFileError, ValueError))
    with pytest.raises(io.PolicyCheckpointError, match="truncated or corrupt"):
        io.read_weights_header(weights)


def test_vitpose_reads_the_central_4_3_window_of_a_square_crop():
    """A square person crop reaches a 256x192-style ViTPose as its central h:w = 4:3 window,
    resized (not the whole square squashed): checked against slicing + resizing by hand."""
    import torch.nn.functional as F

    from poserft.model.vision import IMAGENET_MEAN, IMAGENET_STD, crop_to_aspect, resize_normalize
    unit = torch.rand(2, 3, 64, 64)
    window = crop_to_aspect(unit, (32, 24))
    assert window.shape[-2:] == (64, 48)
    torch.testing.assert_close(window, unit[..., 8:56])
    assert crop_to_aspect(unit, (16, 16)) is unit                       # square: unchanged
    assert crop_to_aspect(unit[..., :48], (64, 64)).shape[-2:] == (48, 48)  # too tall: rows cut
    got = resize_normalize(window, (32, 24), IMAGENET_MEAN, IMAGENET_STD)
    ref = F.interpolate(unit[..., 8:56], size=(32, 24), mode="bilinear", align_corners=False,
                        antialias=True)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(got, (ref - mean) / std)
