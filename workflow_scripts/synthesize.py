"""Rule synthesize: the embedded synthetic world -> data/synthetic/{split}.h5."""
from poserft.data.synthetic import synthesize
from poserft.workflow import job

with job(snakemake) as (params, tracker):  # noqa: F821 (snakemake is injected)
    cfg = params["synth"]
    stats = synthesize(cfg, dict(snakemake.output.items()), tracker=tracker,  # noqa: F821
                       body=params["body"])
    print(stats)
