"""Rule evaluate_reference: floor and ceiling rows -> results/reference/metrics.json."""
from pathlib import Path

from poserft.eval.runner import evaluate_reference
from poserft.workflow import job

with job(snakemake) as (params, tracker):  # noqa: F821 (snakemake is injected)
    inp = snakemake.input  # noqa: F821
    metrics = evaluate_reference(params["eval"], inp.train, inp.test, str(Path(inp.evaluator).parent),
                                 snakemake.output.metrics, body_cfg=params["body"],  # noqa: F821
                                 tracker=tracker)
    print({k: v for k, v in metrics.items() if k != "meta"})
