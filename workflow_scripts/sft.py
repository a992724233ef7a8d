"""Rule sft: supervised pretraining of one variant's pose MLLM.

run_sft(out_dir=<run>/sft) resumes from <run>/sft/checkpoints (not a declared output, so
Snakemake keeps it when a killed job is rerun) and exports the policy to <run>/sft/final.
With several GPUs (resources gpu > 1) or resources nproc_per_node > 1, launch_local starts
one rank per process with torchrun; rank 0 logs into this job's MLflow run.
"""
from pathlib import Path

from poserft.train.launch import job_nproc, launch_local
from poserft.workflow import job, source_split_paths

with job(snakemake) as (params, tracker):  # noqa: F821 (snakemake is injected)
    # imported here: torch loads after job() has set the thread limits and the log file
    from poserft.train.sft import run_sft

    inp = snakemake.input  # noqa: F821
    if inp.pose_encoder:  # pose_encoder.enabled: start the pose ViT from the pretrained one
        params["model"].pose_vit.checkpoint = str(Path(inp.pose_encoder[0]).parent)
    kwargs = dict(model_cfg=params["model"], sft_cfg=params["sft"],
                  split_paths=source_split_paths(inp),
                  tokenizer_path=str(inp.tokenizer),
                  out_dir=str(Path(snakemake.output.model).parent.parent))  # noqa: F821
    summary = launch_local(run_sft, kwargs, job_nproc(snakemake), tracker=tracker)  # noqa: F821
    print(summary)
