"""Issue #14 end to end on CPU: the paper's model section (LoRA, bf16, gradient
checkpointing) on a tiny LLaVA checkpoint written in float16, as llava-hf/llava-1.5-7b-hf
ships, through SFT with bf16 autocast -> export -> HyGRPO with its reference -> evaluation
-> `poserft generate`; and the same with LoRA off. Before the dtype discipline the first
generate failed with "mat1 and mat2 must have the same dtype"."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from poserft.model.testing import make_test_split, make_test_tokenizer, tiny_model_config

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A float16 tiny LLaVA checkpoint, toy splits and a tiny evaluator retrieval model."""
    from transformers import LlavaForConditionalGeneration

    from poserft.model.backbone import tiny_llava_config
    from poserft.retrieval.checkpoint import save_retrieval_model
    from poserft.retrieval.config import RetrievalConfig
    from poserft.retrieval.model import RetrievalArch, RetrievalModel

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("fp16world")
    tok = make_test_tokenizer(d / "tokenizer")
    llava = LlavaForConditionalGeneration(tiny_llava_config(
        tiny_model_config(), len(tok), tok.convert_tokens_to_ids("<image>"), tok.pad_token_id,
        tok.bos_token_id, tok.eos_token_id))
    llava.half().save_pretrained(d / "llava_fp16")
    tok.save_pretrained(d / "llava_fp16")
    rcfg = RetrievalConfig.from_dict(dict(d_model=16, n_layers=1, n_heads=2, ff_dim=32,
                                          pose_hidden_dim=32, latent_dim=8), where="retrieval")
    arch = RetrievalArch.from_config(rcfg, len(tok), tok.pad_token_id, tok.bos_token_id)
    save_retrieval_model(RetrievalModel(arch, tok).eval(), d / "evaluator", {"role": "evaluator"})
    splits = {s: str(make_test_split(d / f"{s}.h5", 24, seed=i, split=s))
              for i, s in enumerate(("train", "val", "test"))}
    return {"dir": d, "ckpt": d / "llava_fp16", "evaluator": d / "evaluator", "splits": splits}


def _paper_model_section(ckpt: Path, lora: bool):
    """configs/paper.yaml's model section, with the stand-in checkpoint and a small pose
    encoder built from config (the ViTPose weights are not here)."""
    from poserft.model.config import ModelConfig

    paper = yaml.safe_load((ROOT / "configs" / "paper.yaml").read_text())["model"]
    assert paper["lora"]["enabled"] and paper["dtype"] == "bfloat16"
    tiny = tiny_model_config()
    paper.update(checkpoint=str(ckpt), head_hidden_size=32,
                 pose_vit={**tiny.pose_vit.to_dict(), "checkpoint": None},
                 clip_image_size=tiny.clip_image_size, clip_patch_size=tiny.clip_patch_size)
    if not lora:
        paper["lora"] = {**paper["lora"], "enabled": False}
    return ModelConfig.from_dict(paper, where="model")


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_fp16_checkpoint_through_sft_rft_eval_and_cli(world, tmp_path, lora, capsys):
    from poserft.cli import main as cli_main
    from poserft.eval.config import EvalConfig
    from poserft.eval.runner import evaluate_variant
    from poserft.model.io import load_policy
    from poserft.rl.config import RFTConfig
    from poserft.rl.trainer import run_rft
    from poserft.train.config import SFTConfig
    from poserft.train.sft import run_sft

    model_cfg = _paper_model_section(world["ckpt"], lora)
    # enough steps at a high rate that candidates emit <POSE>, so RFT's pose branch runs
    sft_cfg = SFTConfig.from_dict({"steps": 40, "batch_size": 8, "eval_samples": 4,
                                   "task_weights": {"text2pose": 1.0, "image2pose": 1.0},
                                   "optim": {"lr": 1e-2, "warmup_steps": 0},
                                   "engine": {"precision": "bf16", "device": "cpu",
                                              "checkpoint_every": 0}}, where="sft")
    sft = run_sft(model_cfg, sft_cfg, {"train": world["splits"]["train"],
                                       "val": world["splits"]["val"]}, None, tmp_path / "sft")
    policy = load_policy(tmp_path / "sft")
    dtypes = {p.dtype for p in policy.parameters() if p.is_floating_point()}
    assert dtypes == {torch.bfloat16}, dtypes            # one dtype, the configured one
    assert sft["steps"] == 40
    print({k: v for k, v in sft.items() if "format_rate" in k or "valid" in k})

    rft_cfg = RFTConfig.from_dict({
        "steps": 1, "batch_size": 2, "group_size": 2, "micro_batch_size": 4, "mu": 2,
        "max_new_tokens": 12, "eval_prompts": 2, "eval_samples": 2,
        "task_weights": {"image2pose": 1.0, "text2pose": 0.0},
        "reward_weights": {"format": 1.0, "joint": 1.0},
        "engine": {"precision": "bf16", "device": "cpu", "checkpoint_every": 0}}, where="rft")
    summary = run_rft(rft_cfg, tmp_path / "sft", None,
                      {"train": world["splits"]["train"], "val": world["splits"]["val"]},
                      tmp_path / "rft")
    assert summary["optimizer_steps"] == 2
    assert "image2pose/joint" in summary["heldout_after"], summary["heldout_after"]

    metrics = evaluate_variant(
        EvalConfig.from_dict({"max_image_samples": 4, "max_text_samples": 12, "protocol2_candidates": 8, "recall_ks": [2, 4],
                              "max_vqa_samples": 2, "best_of_n": 1}, where="eval"),
        tmp_path / "rft", world["evaluator"], {"test": world["splits"]["test"]},
        tmp_path / "metrics.json")
    assert json.loads((tmp_path / "metrics.json").read_text())["image2pose"]["synthetic"]["mpjpe"] \
        == pytest.approx(metrics["image2pose"]["synthetic"]["mpjpe"])

    rc = cli_main(["generate", "--checkpoint", str(tmp_path / "rft"), "--device", "cpu",
                   "--text", "The person is squatting with the knees completely bent.",
                   "--out", str(tmp_path / "pose.npz")])
    assert rc in (0, None), capsys.readouterr().err
    assert (tmp_path / "pose.npz").is_file()
