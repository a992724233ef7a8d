"""Rule train_retrieval: the reward or evaluator text-pose retrieval model."""
from pathlib import Path

from poserft.retrieval.train import train_retrieval
from poserft.workflow import job, source_split_paths

with job(snakemake) as (params, tracker):  # noqa: F821 (snakemake is injected)
    inp = snakemake.input  # noqa: F821
    summary = train_retrieval(params["retrieval"], snakemake.wildcards.role,  # noqa: F821
                              source_split_paths(inp), inp.tokenizer,
                              Path(snakemake.output.model).parent, tracker=tracker)  # noqa: F821
    print(summary)
