# Pose MLLM pretraining (SFT), and the optional pose-aware encoder pretraining.


rule pretrain_pose_encoder:
    """Pretrain the pose-aware ViT on synthetic 2D keypoints (optional, pose_encoder.enabled)."""
    input:
        **synthetic_splits(),
    output:
        f"{RESULTS}/pose_encoder/model.safetensors",
    params:
        pose_encoder=CFG.params("pose_encoder"),
    log:
        "logs/pretrain_pose_encoder.log",
    benchmark:
        "results/benchmarks/pretrain_pose_encoder.tsv"
    resources:
        mem_mb=4000, runtime=60,
    script:
        "../workflow_scripts/pretrain_pose_encoder.py"


rule sft:
    """Supervised pretraining of one variant's pose MLLM (text->pose, image->pose, VQA)."""
    input:
        # the train/val splits of the variant's sft.data sources (<source>__<split>)
        unpack(lambda wc: CFG.training_files("sft", wc.variant)),
        tokenizer=f"{RESULTS}/tokenizer/tokenizer.json",
        pose_encoder=pose_encoder_inputs(),
    output:
        model=f"{RUNS}/{{variant}}/seed{{seed}}/sft/final/model.safetensors",
        config=f"{RUNS}/{{variant}}/seed{{seed}}/sft/final/config.json",
        tokenizer=f"{RUNS}/{{variant}}/seed{{seed}}/sft/final/tokenizer.json",
    params:
        model=lambda wc: CFG.variant_params(wc.variant, "model", seed=int(wc.seed)),
        sft=lambda wc: CFG.variant_params(wc.variant, "sft", seed=int(wc.seed)),
        body=CFG.params("body"),
    log:
        "logs/sft/{variant}_seed{seed}.log",
    benchmark:
        "results/benchmarks/sft_{variant}_seed{seed}.tsv"
    resources:
        # Processes: one rank per GPU when the job has gpu > 1 (slurm/config.yaml), else
        # nproc_per_node CPU ranks (gloo); 1 = in-process. poserft.train.launch, docs/cluster.md.
        mem_mb=6000, runtime=120, nproc_per_node=1,
    script:
        "../workflow_scripts/sft.py"
