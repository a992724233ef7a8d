"""Rule download_{dataset}: checksummed download, or a check of manually placed files."""
from poserft.data.download import download_dataset
from poserft.workflow import job

with job(snakemake) as (params, tracker):  # noqa: F821 (snakemake is injected)
    download_dataset(params["dataset"], params["datasets"], snakemake.output.manifest,  # noqa: F821
                     tracker=tracker)
