# HyGRPO (or GRPO for the ablation) from the SFT checkpoint, with the frozen reward model.


rule rft:
    input:
        # the prompt sources of the variant's rft.data (<source>__<split>: train, and val for
        # the held-out measurement)
        unpack(lambda wc: CFG.training_files("rft", wc.variant)),
        sft=lambda wc: f"{sft_dir(wc.variant, wc.seed)}/model.safetensors",
        reward_model=f"{RESULTS}/retrieval/reward/model.safetensors",
    output:
        model=f"{RUNS}/{{variant}}/seed{{seed}}/rft/model.safetensors",
        config=f"{RUNS}/{{variant}}/seed{{seed}}/rft/config.json",
        tokenizer=f"{RUNS}/{{variant}}/seed{{seed}}/rft/tokenizer.json",
        summary=f"{RUNS}/{{variant}}/seed{{seed}}/rft/rft_summary.json",
    params:
        rft=lambda wc: CFG.variant_params(wc.variant, "rft", seed=int(wc.seed)),
        text_embedder=CFG.params("text_embedder"),
        body=CFG.params("body"),
        checkpoint_dir=lambda wc: f"{RUNS}/{wc.variant}/seed{wc.seed}/rft_checkpoints",
    log:
        "logs/rft/{variant}_seed{seed}.log",
    benchmark:
        "results/benchmarks/rft_{variant}_seed{seed}.tsv"
    resources:
        # Processes: one rank per GPU when the job has gpu > 1 (slurm/config.yaml), else
        # nproc_per_node CPU ranks (gloo); 1 = in-process. poserft.train.launch, docs/cluster.md.
        mem_mb=6000, runtime=120, nproc_per_node=1,
    script:
        "../workflow_scripts/rft.py"
