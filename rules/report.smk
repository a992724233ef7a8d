# Tables (paper layout), plots, the pose gallery and the summary page that
# `snakemake --report report.html` shows (captions: report/*.rst).

_REPORT = CFG["report"]
TABLES = f"{RESULTS}/tables"
PLOTS = f"{RESULTS}/plots"


VARIANT_DESCRIPTIONS = {v: CFG.variants[v].description for v in VARIANTS}
# Table 3 follows the config: ablation title -> its variants, in config order.
ABLATIONS = {}
for _v in VARIANTS:
    for _title in CFG.variants[_v].ablations:
        ABLATIONS.setdefault(_title, []).append(_v)
RFT_SUMMARIES = [f"{RUNS}/{v}/seed{s}/rft/rft_summary.json" for v in rft_variants() for s in SEEDS]
RECALL_FILES = {r: f"{retrieval_dir(r)}/recall.json" for r in sorted({"reward", evaluator_role()})}
# Per variant (first seed): its SFT policy, RFT policy and RFT checkpoint folder.
GALLERY_SOURCES = [
    {"variant": v, "sft_variant": sft_owner(v), "sft_dir": sft_dir(v, SEEDS[0]),
     "rft_dir": f"{RUNS}/{v}/seed{SEEDS[0]}/rft" if has_rft(v) else None,
     "rft_checkpoint_dir": f"{RUNS}/{v}/seed{SEEDS[0]}/rft_checkpoints" if has_rft(v) else None}
    for v in VARIANTS
]


rule tables:
    """Tables 1-3 (Markdown + CSV): mean ± std over seeds, floor/ceiling rows (reference)
    and published numbers alongside."""
    input:
        metrics=metrics_files(),
        reference=f"{RESULTS}/reference/metrics.json",
    output:
        main_md=report(f"{TABLES}/main.md", caption="../report/tables.rst", category="Tables"),
        main_csv=f"{TABLES}/main.csv",
        image2pose_md=f"{TABLES}/image2pose.md",
        image2pose_csv=report(f"{TABLES}/image2pose.csv", caption="../report/tables.rst", category="Tables"),
        text2pose_md=f"{TABLES}/text2pose.md",
        text2pose_csv=report(f"{TABLES}/text2pose.csv", caption="../report/tables.rst", category="Tables"),
        ablation_md=f"{TABLES}/ablation.md",
        ablation_csv=report(f"{TABLES}/ablation.csv", caption="../report/tables.rst", category="Tables"),
    params:
        include_paper_numbers=_REPORT.include_paper_numbers,
        variants=VARIANT_DESCRIPTIONS,
        ablations=ABLATIONS,
    log:
        "logs/report/tables.log",
    benchmark:
        "results/benchmarks/tables.tsv"
    script:
        "../workflow_scripts/tables.py"


rule plots:
    """RFT reward curves (MLflow history + held-out before/after) and metric bars per variant."""
    input:
        metrics=metrics_files(),
        rft_summaries=RFT_SUMMARIES,
    output:
        reward_curves=report(f"{PLOTS}/reward_curves.png", caption="../report/plots.rst", category="Plots"),
        metric_bars=report(f"{PLOTS}/metric_bars.png", caption="../report/plots.rst", category="Plots"),
    params:
        tracking=CFG.params("tracking"),
        variants=list(VARIANTS),
    log:
        "logs/report/plots.log",
    benchmark:
        "results/benchmarks/plots.tsv"
    script:
        "../workflow_scripts/plots.py"


rule gallery:
    """Generated poses for report.gallery_prompts: SFT, RFT checkpoints, final RFT."""
    input:
        sft=sorted({f"{src['sft_dir']}/model.safetensors" for src in GALLERY_SOURCES}),
        rft=[f"{src['rft_dir']}/model.safetensors" for src in GALLERY_SOURCES if src["rft_dir"]],
    output:
        gallery=report(f"{PLOTS}/gallery.png", caption="../report/gallery.rst", category="Plots"),
    params:
        gallery_prompts=_REPORT.gallery_prompts,
        sources=GALLERY_SOURCES,
        body=CFG.params("body"),
    log:
        "logs/report/gallery.log",
    benchmark:
        "results/benchmarks/gallery.tsv"
    script:
        "../workflow_scripts/gallery.py"


rule summary:
    """One page: tables, retrieval models, RFT before/after, figures."""
    input:
        tables=f"{TABLES}/main.md",
        reward_curves=f"{PLOTS}/reward_curves.png",
        metric_bars=f"{PLOTS}/metric_bars.png",
        gallery=f"{PLOTS}/gallery.png",
        rft_summaries=RFT_SUMMARIES,
        **{f"recall_{role}": path for role, path in RECALL_FILES.items()},
    output:
        summary=report(f"{RESULTS}/report/summary.md", caption="../report/summary.rst", category="Summary"),
    params:
        variants=VARIANT_DESCRIPTIONS,
    log:
        "logs/report/summary.log",
    benchmark:
        "results/benchmarks/summary.tsv"
    script:
        "../workflow_scripts/summary.py"
