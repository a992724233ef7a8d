"""Rule evaluate: one variant's policy -> results/runs/{variant}/seed{seed}/metrics.json."""
from poserft.eval.runner import evaluate_variant
from poserft.workflow import job

with job(snakemake) as (params, tracker):  # noqa: F821 (snakemake is injected)
    inputs = dict(snakemake.input.items())  # noqa: F821
    # the synthetic test split ("test") and real test splits ("<dataset>_test")
    splits = {k: v for k, v in inputs.items() if k == "test" or k.endswith("_test")}
    metrics = evaluate_variant(params["eval"], params["policy_dir"], params["evaluator_dir"],
                               splits, snakemake.output.metrics,  # noqa: F821
                               body_cfg=params["body"], text_embedder_cfg=params["text_embedder"],
                               tracker=tracker)
    print({k: v for k, v in metrics.items() if k != "meta"})
