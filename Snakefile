# poserft: Pose-RFT as a reproducible DAG. See README.md and ../shared/design.md.
#   snakemake --cores 2 all                 # the embedded default (tiny synthetic world, CPU)
#   snakemake --profile slurm all           # on a SLURM cluster (see slurm/config.yaml)
#   snakemake --cores 2 all --configfile configs/seeds.yaml   # 3 seeds per variant
from snakemake.utils import min_version

min_version("9.19")

configfile: "config.yaml"


# The one parse: typed sections from the YAML (types, unknown keys, ranges, cross-field
# invariants). A bad key stops the workflow before any job, with one line naming it. Every
# rule takes its params from CFG in canonical form (schemas/config.schema.yaml is generated
# from the same dataclasses, for editors and docs).
from poserft.config import ConfigError, load_config

try:
    CFG = load_config(config)
except ConfigError as exc:
    _files = ", ".join(map(str, workflow.configfiles)) or "the config"
    raise WorkflowError(f"config error in {_files}: {exc}") from None


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
