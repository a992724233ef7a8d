# poserft: Pose-RFT as a reproducible DAG. See README.md and ../shared/design.md.
#   snakemake --cores 2 all                 # the embedded default (tiny synthetic world, CPU)
#   snakemake --profile slurm all           # on a SLURM cluster (see slurm/config.yaml)
#   snakemake --cores 2 all --configfile configs/seeds.yaml   # 3 seeds per variant
from snakemake.utils import min_version, validate

min_version("9.19")

configfile: "config.yaml"


# Types, unknown keys and defaults first (the schema is generated from poserft's config
# dataclasses), then the cross-field invariants; either stops the workflow before any job.
validate(config, "schemas/config.schema.yaml")

from poserft.config import ConfigError, load_config, variant_section

try:
    load_config(config)
except ConfigError as exc:
    raise WorkflowError(f"config error: {exc}") from None


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/retrieval.smk"
include: "rules/pretrain.smk"
include: "rules/rft.smk"
include: "rules/evaluate.smk"
include: "rules/report.smk"


onstart:
    resolve_experiment()


rule all:
    input:
        all_targets(),
    default_target: True
