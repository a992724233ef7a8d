"""Rule summary: results/report/summary.md (tables, retrieval, RFT before/after, figures)."""
from poserft.eval.summary import write_summary
from poserft.workflow import job

with job(snakemake) as (params, tracker):  # noqa: F821 (snakemake is injected)
    inp = snakemake.input  # noqa: F821
    recall = {k[len("recall_"):]: v for k, v in inp.items() if k.startswith("recall_")}
    figures = {"RFT reward curves": inp.reward_curves, "Metrics per variant": inp.metric_bars,
               "Pose gallery": inp.gallery}
    write_summary(snakemake.output.summary, inp.tables, figures, recall,  # noqa: F821
                  list(inp.rft_summaries), variants=params["variants"])
    tracker.log_artifact(snakemake.output.summary, "report")  # noqa: F821
