# Evaluation of one variant: image->pose (MPJPE, PA-MPJPE) and text->pose (Recall@K with
# the evaluator retrieval model, MPJPE, PA-MPJPE), format rate and text reward on held-out
# VQA; and, once for all variants, the floor and ceiling every table shows beside them.

_EVAL = CFG["eval"]
# Real test splits scored beside the synthetic one: enabled datasets with a protocol.
EVAL_REAL_DATASETS = [ds for ds in REAL_DATASETS
                      if (ds in _EVAL.image_benchmarks or ds in _EVAL.text_benchmarks)
                      and "test" in dataset_splits(ds)]


rule evaluate:
    input:
        test="data/synthetic/test.h5",
        **{f"{ds}_test": f"data/{ds}/test.h5" for ds in EVAL_REAL_DATASETS},
        policy=lambda wc: f"{policy_dir(wc.variant, wc.seed)}/model.safetensors",
        evaluator=lambda wc: f"{retrieval_dir(evaluator_role())}/model.safetensors",
    output:
        metrics=f"{RUNS}/{{variant}}/seed{{seed}}/metrics.json",
    params:
        eval=CFG.params("eval"),
        text_embedder=CFG.params("text_embedder"),
        body=CFG.params("body"),
        policy_dir=lambda wc: policy_dir(wc.variant, wc.seed),
        evaluator_dir=lambda wc: retrieval_dir(evaluator_role()),
    log:
        "logs/evaluate/{variant}_seed{seed}.log",
    benchmark:
        "results/benchmarks/evaluate_{variant}_seed{seed}.tsv"
    resources:
        # One process; the policy and the evaluator run on eval.device (auto: the job's GPU
        # when one is visible, else the CPU). gpu=1 is what slurm/config.yaml asks for this
        # rule (set-resources: evaluate); a profile overrides it per key (the CPU test
        # profile: gpu 0). Not a rank count: evaluation never starts several processes.
        mem_mb=4000, runtime=60, gpu=1,
    script:
        "../workflow_scripts/evaluate.py"


rule evaluate_reference:
    """Floor and ceiling of every table (design.md, "Floors and ceilings"): the train
    split's mean pose, chance recall and the ground-truth poses through the evaluator, on
    the same synthetic test rows as rule evaluate. Once, not per variant or seed."""
    input:
        train="data/synthetic/train.h5",
        test="data/synthetic/test.h5",
        evaluator=f"{retrieval_dir(evaluator_role())}/model.safetensors",
    output:
        metrics=f"{RESULTS}/reference/metrics.json",
    params:
        eval=CFG.params("eval"),
        body=CFG.params("body"),
    log:
        "logs/evaluate/reference.log",
    benchmark:
        "results/benchmarks/evaluate_reference.tsv"
    resources:
        mem_mb=4000, runtime=30,
    script:
        "../workflow_scripts/evaluate_reference.py"
