# Data: the synthetic embedded world, real datasets (download -> convert), the tokenizer.


rule synthesize:
    """Sample poses, caption them, render images and VQA pairs (the embedded world)."""
    output:
        **synthetic_splits(),
    params:
        synth=CFG.params("synth"),
        body=CFG.params("body"),
    log:
        "logs/synthesize.log",
    benchmark:
        "results/benchmarks/synthesize.tsv"
    resources:
        mem_mb=4000, runtime=30,
    script:
        "../workflow_scripts/synthesize.py"


# One download/convert rule pair per enabled dataset: their split files differ.
for _ds in REAL_DATASETS:

    rule:
        name:
            f"download_{_ds}"
        output:
            manifest=f"data/{_ds}/download_manifest.json",
        params:
            datasets=dataset_params(_ds),
            dataset=_ds,
        log:
            f"logs/download/{_ds}.log",
        script:
            "../workflow_scripts/download.py"

    rule:
        name:
            f"convert_{_ds}"
        input:
            **convert_inputs(_ds),
        output:
            **{s: f"data/{_ds}/{s}.h5" for s in dataset_splits(_ds)},
        params:
            datasets=convert_params(_ds),
            dataset=_ds,
            body=CFG.params("body"),
        log:
            f"logs/convert/{_ds}.log",
        benchmark:
            f"results/benchmarks/convert_{_ds}.tsv"
        script:
            "../workflow_scripts/convert.py"


rule tokenizer:
    """The tokenizer: with tokenizer.pretrained, the backbone's own (extended with
    <image>/<POSE>; reads no data); else a BPE trained on the texts of the training sources'
    train splits (the embedded world: the synthetic corpus; cached)."""
    input:
        **tokenizer_corpus(),
    output:
        f"{RESULTS}/tokenizer/tokenizer.json",
    params:
        tokenizer=CFG.params("tokenizer"),
    log:
        "logs/tokenizer.log",
    script:
        "../workflow_scripts/tokenizer.py"
