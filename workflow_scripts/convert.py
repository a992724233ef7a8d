"""Rule convert_{dataset}: one real dataset -> data/{dataset}/{split}.h5."""
from poserft.data.converters import convert
from poserft.workflow import job

with job(snakemake) as (params, tracker):  # noqa: F821 (snakemake is injected)
    name = params["dataset"]
    cfg = params["datasets"]
    convert(name, cfg, cfg.root_of(name), dict(snakemake.output.items()),  # noqa: F821
            params["body"], tracker=tracker)
