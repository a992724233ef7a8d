"""Rule gallery: poses generated for report.gallery_prompts by SFT / RFT checkpoints (PNG)."""
from poserft.eval.gallery import build_gallery, gallery_checkpoints
from poserft.workflow import job

with job(snakemake) as (params, tracker):  # noqa: F821 (snakemake is injected)
    entries = []
    for src in params["sources"]:
        entries += gallery_checkpoints(src["variant"], src["sft_dir"], src["rft_dir"],
                                       src["rft_checkpoint_dir"], sft_variant=src["sft_variant"])
    build_gallery(entries, params["gallery_prompts"], snakemake.output.gallery,  # noqa: F821
                  body_cfg=params["body"])
    tracker.log_artifact(snakemake.output.gallery, "plots")  # noqa: F821
