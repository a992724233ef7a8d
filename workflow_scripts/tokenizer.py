"""Rule tokenizer: train the project tokenizer on the synthetic corpus."""
from poserft.text.tokenizer import build_project_tokenizer
from poserft.workflow import job

with job(snakemake) as (params, tracker):  # noqa: F821
    cfg = params["tokenizer"]
    build_project_tokenizer(cfg, list(snakemake.input), snakemake.output[0])  # noqa: F821
