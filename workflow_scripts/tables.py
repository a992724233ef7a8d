"""Rule tables: results/runs/*/seed*/metrics.json (+ results/reference/metrics.json, the
floor/ceiling rows) -> results/tables/*.md, *.csv."""
from poserft.eval.tables import TABLE_FILES, build_tables
from poserft.workflow import job

with job(snakemake) as (params, tracker):  # noqa: F821 (snakemake is injected)
    out = {k: getattr(snakemake.output, k) for k in TABLE_FILES}  # noqa: F821
    build_tables(list(snakemake.input.metrics), out, variants=params["variants"],  # noqa: F821
                 include_paper_numbers=params["include_paper_numbers"],
                 ablations=params["ablations"],
                 reference=snakemake.input.reference)  # noqa: F821
    for path in out.values():
        tracker.log_artifact(path, "tables")
