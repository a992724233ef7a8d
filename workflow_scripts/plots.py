"""Rule plots: reward curves of the RFT runs and metric bars per variant (PNG)."""
from poserft.eval.plots import collect_reward_histories, plot_metric_bars, plot_reward_curves
from poserft.eval.tables import load_runs
from poserft.tracking import resolve_tracking_uri
from poserft.workflow import job

with job(snakemake) as (params, tracker):  # noqa: F821 (snakemake is injected)
    runs = {}
    for run in load_runs(snakemake.input.metrics):  # noqa: F821
        runs.setdefault(run.variant, {})[run.seed] = run.metrics
    plot_metric_bars(runs, snakemake.output.metric_bars, variants=params["variants"])  # noqa: F821
    tracking = params["tracking"]
    mlflow = (resolve_tracking_uri(tracking.tracking_uri, "results"), tracking.experiment) \
        if tracking.enabled else None
    histories = collect_reward_histories(list(snakemake.input.rft_summaries), mlflow)  # noqa: F821
    plot_reward_curves(histories, snakemake.output.reward_curves)  # noqa: F821
    for path in snakemake.output:  # noqa: F821
        tracker.log_artifact(path, "plots")
