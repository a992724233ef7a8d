"""Rule pretrain_pose_encoder: the pose-aware ViT on synthetic 2D keypoints (optional)."""
from pathlib import Path

from poserft.model.pretrain import pretrain_pose_encoder
from poserft.workflow import job

with job(snakemake) as (params, tracker):  # noqa: F821 (snakemake is injected)
    inp = snakemake.input  # noqa: F821
    summary = pretrain_pose_encoder(params["pose_encoder"], {s: inp[s] for s in ("train", "val")},
                                    Path(snakemake.output[0]).parent, tracker=tracker)  # noqa: F821
    print(summary)
