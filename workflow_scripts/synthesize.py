"""Rule synthesize: the embedded synthetic world -> data/synthetic/{split}.h5."""
from poserft.data.config import SynthConfig
from poserft.data.synthetic import synthesize
from poserft.workflow import job

with job(snakemake) as (params, tracker):  # noqa: F821 (snakemake is injected)
    cfg = SynthConfig.from_dict(params["synth"], where="synth")
    stats = synthesize(cfg, dict(snakemake.output.items()), tracker=tracker,  # noqa: F821
                       body=params["body"])
    print(stats)
