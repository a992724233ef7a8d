"""Rule rft: HyGRPO (or GRPO) from the variant's SFT policy, reward model frozen.

The policy is exported into <run>/rft; resumable checkpoints live in <run>/rft_checkpoints.
With several GPUs (resources gpu > 1) or resources nproc_per_node > 1, launch_local starts
one rank per process with torchrun; rank 0 logs into this job's MLflow run. The text
embedder goes as its config section: each rank builds it, and only when the text reward
is active.
"""
from pathlib import Path

from poserft.train.launch import job_nproc, launch_local
from poserft.workflow import job, source_split_paths

with job(snakemake) as (params, tracker):  # noqa: F821 (snakemake is injected)
    # imported here: torch loads after job() has set the thread limits and the log file
    from poserft.rl.trainer import run_rft

    inp, out = snakemake.input, snakemake.output  # noqa: F821
    kwargs = dict(rft_cfg=params["rft"], sft_dir=str(Path(inp.sft).parent),
                  reward_model_dir=str(Path(inp.reward_model).parent),
                  split_paths=source_split_paths(inp),
                  out_dir=str(Path(out.model).parent), text_embedder=params["text_embedder"],
                  body_cfg=params["body"], checkpoint_dir=params["checkpoint_dir"])
    summary = launch_local(run_rft, kwargs, job_nproc(snakemake), tracker=tracker)  # noqa: F821
    print(summary)
