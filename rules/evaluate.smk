# Evaluation of one variant: image->pose (MPJPE, PA-MPJPE) and text->pose (Recall@K with
# the evaluator retrieval model), format rate and text reward on held-out VQA.

from poserft.eval.config import EvalConfig as _EvalConfig

_EVAL = _EvalConfig.from_dict(config["eval"], where="eval")
# Real test splits scored beside the synthetic one: enabled datasets with a protocol.
EVAL_REAL_DATASETS = [ds for ds in REAL_DATASETS
                      if (ds in _EVAL.image_benchmarks or ds in _EVAL.text_benchmarks)
                      and "test" in dataset_splits(config["datasets"], ds)]


rule evaluate:
    input:
        test="data/synthetic/test.h5",
        **{f"{ds}_test": f"data/{ds}/test.h5" for ds in EVAL_REAL_DATASETS},
        policy=lambda wc: f"{policy_dir(wc.variant, wc.seed)}/model.safetensors",
        evaluator=lambda wc: f"{retrieval_dir(evaluator_role())}/model.safetensors",
    output:
        metrics=f"{RUNS}/{{variant}}/seed{{seed}}/metrics.json",
    params:
        eval=config["eval"],
        text_embedder=config["text_embedder"],
        body=config["body"],
        policy_dir=lambda wc: policy_dir(wc.variant, wc.seed),
        evaluator_dir=lambda wc: retrieval_dir(evaluator_role()),
    log:
        "logs/evaluate/{variant}_seed{seed}.log",
    benchmark:
        "results/benchmarks/evaluate_{variant}_seed{seed}.tsv"
    resources:
        mem_mb=4000, runtime=60,
    script:
        "../workflow_scripts/evaluate.py"
