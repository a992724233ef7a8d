# Text-pose retrieval: the reward model (semantic reward) and an independent evaluator.


rule train_retrieval:
    input:
        # the splits of retrieval.data's sources (data/<source>/<split>.h5 as <source>__<split>)
        **CFG.training_files("retrieval", splits=("train", "val", "test")),
        tokenizer=f"{RESULTS}/tokenizer/tokenizer.json",
    output:
        model=f"{RESULTS}/retrieval/{{role}}/model.safetensors",
        config=f"{RESULTS}/retrieval/{{role}}/config.json",
        recall=f"{RESULTS}/retrieval/{{role}}/recall.json",
    params:
        retrieval=CFG.params("retrieval"),
    log:
        "logs/retrieval/{role}.log",
    benchmark:
        "results/benchmarks/train_retrieval_{role}.tsv"
    resources:
        mem_mb=4000, runtime=60,
    script:
        "../workflow_scripts/train_retrieval.py"
