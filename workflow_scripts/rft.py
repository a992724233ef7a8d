"""Rule rft: HyGRPO (or GRPO) from the variant's SFT policy, reward model frozen.

The policy is exported into <run>/rft; resumable checkpoints live in <run>/rft_checkpoints.
"""
from pathlib import Path

from poserft.rl.trainer import run_rft
from poserft.text.config import TextEmbedderConfig
from poserft.text.embedder import build_text_embedder
from poserft.workflow import job

with job(snakemake) as (params, tracker):  # noqa: F821 (snakemake is injected)
    inp, out = snakemake.input, snakemake.output  # noqa: F821
    embedder = build_text_embedder(TextEmbedderConfig.from_dict(params["text_embedder"],
                                                                where="text_embedder"))
    summary = run_rft(None, params["rft"], Path(inp.sft).parent, Path(inp.reward_model).parent,
                      {s: inp[s] for s in ("train", "val")}, Path(out.model).parent,
                      tracker=tracker, text_embedder=embedder, body_cfg=params["body"],
                      checkpoint_dir=params["checkpoint_dir"])
    print(summary)
