"""Rule sft: supervised pretraining of one variant's pose MLLM.

run_sft(out_dir=<run>/sft) resumes from <run>/sft/checkpoints (not a declared output, so
Snakemake keeps it when a killed job is rerun) and exports the policy to <run>/sft/final.
"""
from pathlib import Path

from poserft.train.sft import run_sft
from poserft.workflow import job

with job(snakemake) as (params, tracker):  # noqa: F821 (snakemake is injected)
    inp = snakemake.input  # noqa: F821
    if inp.pose_encoder:  # pose_encoder.enabled: start the pose ViT from the pretrained one
        params["model"].setdefault("pose_vit", {})["checkpoint"] = str(Path(inp.pose_encoder[0]).parent)
    summary = run_sft(params["model"], params["sft"], {s: inp[s] for s in ("train", "val")},
                      inp.tokenizer, Path(snakemake.output.model).parent.parent,  # noqa: F821
                      tracker=tracker)
    print(summary)
