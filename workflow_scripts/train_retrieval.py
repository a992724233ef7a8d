"""Rule train_retrieval: the reward or evaluator text-pose retrieval model."""
from pathlib import Path

from poserft.retrieval.train import train_retrieval
from poserft.workflow import job

with job(snakemake) as (params, tracker):  # noqa: F821 (snakemake is injected)
    inp = snakemake.input  # noqa: F821
    summary = train_retrieval(params["retrieval"], snakemake.wildcards.role,  # noqa: F821
                              {s: inp[s] for s in ("train", "val", "test")}, inp.tokenizer,
                              Path(snakemake.output.model).parent, tracker=tracker)  # noqa: F821
    print(summary)
