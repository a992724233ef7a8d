"""The whole workflow config: one typed section per stage, built from the validated YAML.

Sections live next to the code that reads them (``poserft/<pkg>/config.py``) and are
aggregated here. ``schemas/config.schema.yaml`` is generated from these dataclasses::

    python -m poserft.config --write-schema schemas/config.schema.yaml

and a test checks that the committed schema is current; it serves editors and the docs. The
one validator is :func:`load_config`: the Snakefile calls it once at parse time (types,
unknown keys, ranges, cross-field invariants), so a bad config stops the workflow before any
job with one line naming the key, and every rule takes its params from that one object.

Stdlib-only at import time (the Snakefile imports it while parsing).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import sys
from dataclasses import dataclass
from typing import Any

from poserft.configbase import ConfigError, Section, json_schema, option, unknown_key_message

__all__ = ["ConfigError", "SECTIONS", "TrackingConfig", "ReportConfig", "VariantConfig",
           "WorkflowConfig", "load_config", "section_class", "variant_section",
           "config_hash"]


@dataclass
class TrackingConfig(Section):
    """MLflow tracking: where runs go and how they are grouped."""

    experiment: str = option("poserft-embedded", "MLflow experiment that groups every run of this workflow.")
    tracking_uri: str | None = option(
        None, "MLflow tracking URI. null: a SQLite file results/mlflow.db. The environment "
              "variable MLFLOW_TRACKING_URI (e.g. an `mlflow server` URL on a cluster) overrides both.")
    artifact_root: str | None = option(
        None, "Artifact location for a newly created experiment. null: results/mlartifacts "
              "(absolute path) with the SQLite default, the server's own with a server URI.")
    enabled: bool = option(True, "Log to MLflow at all (false: jobs run without tracking).")


@dataclass
class ReportConfig(Section):
    """Tables, plots and the HTML report."""

    gallery_prompts: list[str] = option(
        ["The person is standing with both arms raised above the head.",
         "The person is squatting with the knees completely bent.",
         "The person is lunging forward with the left leg in front."],
        "Fixed text prompts rendered as a pose gallery for every variant.")
    include_paper_numbers: bool = option(True, "Print the paper's published numbers beside ours where the dataset matches.")


@dataclass
class VariantConfig(Section):
    """One named variant: a small override of the base model/sft/rft sections."""

    description: str = option("", "What this variant tests (shown in the tables).")
    sft_from: str | None = option(
        None, "Reuse the SFT checkpoint of this other variant instead of training one "
              "(e.g. dist_rft starts from dist). null: train this variant's own SFT.")
    model: dict[str, Any] = option({}, "Overrides of the base `model` section.")
    sft: dict[str, Any] = option({}, "Overrides of the base `sft` section.")
    rft: dict[str, Any] | None = option(
        None, "Overrides of the base `rft` section; null means this variant has no RFT stage "
              "(evaluated straight after SFT).")
    ablations: list[str] = option(
        [], "Titles of the ablations (Table 3 blocks) this variant is a row of; the ablation "
            "table has one block per title, its rows the variants listing it, in config order.")


# section name -> "module:Class". Each module is stdlib-only.
SECTIONS: dict[str, str] = {
    "tracking": "poserft.config:TrackingConfig",
    "body": "poserft.body.config:BodyConfig",
    "synth": "poserft.data.config:SynthConfig",
    "datasets": "poserft.data.converters.config:DatasetsConfig",
    "tokenizer": "poserft.text.config:TokenizerConfig",
    "text_embedder": "poserft.text.config:TextEmbedderConfig",
    "retrieval": "poserft.retrieval.config:RetrievalConfig",
    "pose_encoder": "poserft.model.config:PoseEncoderConfig",
    "model": "poserft.model.config:ModelConfig",
    "sft": "poserft.train.config:SFTConfig",
    "rft": "poserft.rl.config:RFTConfig",
    "eval": "poserft.eval.config:EvalConfig",
    "report": "poserft.config:ReportConfig",
}


def section_class(name: str) -> type[Section]:
    module, cls = SECTIONS[name].split(":")
    return getattr(importlib.import_module(module), cls)


@dataclass
class WorkflowConfig:
    """The whole config, parsed once: typed sections, variants and seeds.

    Rules take their ``params:`` from :meth:`params` / :meth:`variant_params`: canonical
    plain dicts (every key, defaults filled, in field order), so that reordering keys or
    writing a default out explicitly changes no rule's params and reruns nothing.
    """

    sections: dict[str, Section]
    variants: dict[str, VariantConfig]
    seeds: list[int]

    def __getitem__(self, name: str) -> Section:
        return self.sections[name]

    def params(self, name: str) -> dict:
        """Canonical plain dict of top-level section ``name``."""
        return self.sections[name].to_dict()

    def variant_section(self, variant: str, section: str, seed: int | None = None) -> Section:
        """Typed ``section`` ('model', 'sft' or 'rft') of ``variant``: the variant's override
        merged key by key into the base section (as a partial section merges into its
        defaults), then the run's ``seed``: ``model.seed`` (initialisation) or
        ``sft.engine.seed`` / ``rft.engine.seed`` (data order, sampling)."""
        return variant_section(self.sections[section], self.variants, variant, section, seed)

    def variant_params(self, variant: str, section: str, seed: int | None = None) -> dict:
        """Canonical plain dict of :meth:`variant_section`."""
        return self.variant_section(variant, section, seed).to_dict()

    def sft_owner(self, variant: str) -> str:
        """The variant whose SFT checkpoint ``variant`` uses (itself unless ``sft_from``)."""
        return self.variants[variant].sft_from or variant

    def has_rft(self, variant: str) -> bool:
        return self.variants[variant].rft is not None

    # -------------------------------------------------------------- training data
    def source_splits(self, name: str) -> list[str]:
        """The splits data source ``name`` has: the synthetic world's three, or those its
        ``datasets`` section converts."""
        from poserft.data.config import SYNTHETIC
        if name == SYNTHETIC:
            return ["train", "val", "test"]
        return list(self.sections["datasets"].source(name).splits)

    def training_files(self, section: str, variant: str | None = None,
                       splits: tuple[str, ...] = ("train", "val")) -> dict[str, str]:
        """The split files stage ``section`` ('retrieval', 'sft' or 'rft'; of ``variant``
        when given) reads, as named rule inputs ``<source>__<split>`` ->
        ``data/<source>/<split>.h5``, for each source of its ``data`` mapping and each of
        ``splits`` the source has (``train`` always: :func:`load_config` checked it)."""
        sec = (self.variant_section(variant, section) if variant is not None
               else self.sections[section])
        return {f"{name}__{split}": f"data/{name}/{split}.h5"
                for name in sec.data for split in splits if split in self.source_splits(name)}



def variant_section(base: Section, variants: dict[str, VariantConfig], variant: str,
                    section: str, seed: int | None = None) -> Section:
    """``base`` (the typed top-level ``section``) with ``variants[variant]``'s override of it
    and ``seed``; see :meth:`WorkflowConfig.variant_section`."""
    if variant not in variants:
        raise ConfigError(f"variants.{variant}: no such variant; defined: {sorted(variants)}")
    override = getattr(variants[variant], section)
    if section == "rft" and override is None:
        raise ConfigError(f"variants.{variant}.rft is null: this variant has no RFT stage")
    override = dict(override or {})
    if seed is not None:
        if section == "model":          # initialisation of the tiny model
            override["seed"] = int(seed)
        else:                           # data order, dropout, sampling
            override["engine"] = {**(override.get("engine") or {}), "seed": int(seed)}
    return type(base).from_dict(override, where=f"variants.{variant}.{section}", base=base)


def load_config(config: dict) -> WorkflowConfig:
    """The one validator: build every typed section from the YAML dict (types, unknown keys,
    ranges, defaults) and check the cross-field invariants.

    Raises :class:`ConfigError` naming the key, e.g. ``rft.batch_size``.
    """
    if not isinstance(config, dict):
        raise ConfigError(f"the config must be a mapping of sections, got {type(config).__name__}")
    known = set(SECTIONS) | {"variants", "seeds"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ConfigError(unknown_key_message(unknown[0], known, "config").replace("config.", "", 1))
    sections = {}
    for name in SECTIONS:
        value = config.get(name)
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping of keys (or nothing), got {value!r}")
        sections[name] = section_class(name).from_dict(value or {}, where=name)
    seeds = config.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or \
            not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"seeds: expected a non-empty list of integers, got {seeds!r}")
    raw_variants = config.get("variants")
    if raw_variants is not None and not isinstance(raw_variants, dict):
        raise ConfigError(f"variants: expected a mapping of variant names, got {raw_variants!r}")
    variants = {}
    for name, raw in (raw_variants or {}).items():
        v = VariantConfig.from_dict(raw or {}, where=f"variants.{name}")
        if v.sft_from is not None:
            if v.sft_from not in raw_variants:
                raise ConfigError(f"variants.{name}.sft_from: unknown variant {v.sft_from!r}")
            if (raw_variants[v.sft_from] or {}).get("sft_from"):
                raise ConfigError(f"variants.{name}.sft_from: {v.sft_from!r} itself reuses another "
                                  "variant's SFT; point at the variant that trains it")
            if v.model or v.sft:
                raise ConfigError(f"variants.{name}: a variant with sft_from cannot override "
                                  "model/sft (it reuses that variant's SFT checkpoint); "
                                  "override them in the variant named by sft_from instead")
        variants[name] = v
    for name, v in variants.items():   # every override must still form a valid section
        for sec in ("model", "sft") + (("rft",) if v.rft is not None else ()):
            variant_section(sections[sec], variants, name, sec)
    if not variants:
        raise ConfigError("variants: define at least one variant (see config.yaml)")
    cfg = WorkflowConfig(sections=sections, variants=variants, seeds=list(seeds))
    _check_training_sources(cfg)
    return cfg


def _check_training_sources(cfg: WorkflowConfig) -> None:
    """Every ``data`` source of retrieval/sft/rft (base and variants) is the synthetic
    world or an enabled dataset with a train split."""
    from poserft.data.config import SYNTHETIC
    enabled = cfg.sections["datasets"].enabled
    where_data = [("retrieval", cfg.sections["retrieval"].data), ("sft", cfg.sections["sft"].data),
                  ("rft", cfg.sections["rft"].data)]
    for name, v in cfg.variants.items():
        for sec in ("sft", "rft"):
            override = getattr(v, sec) or {}
            if "data" in override:
                where_data.append((f"variants.{name}.{sec}", override["data"]))
    for where, data in where_data:
        for source in data:
            if source != SYNTHETIC and source not in enabled:
                raise ConfigError(
                    f"{where}.data.{source}: not a data source; use '{SYNTHETIC}' or a dataset of "
                    f"datasets.enabled ({enabled or 'none enabled'}); to train on {source}, add "
                    "it to datasets.enabled")
            if "train" not in cfg.source_splits(source):
                raise ConfigError(
                    f"{where}.data.{source}: the dataset has no 'train' split (its splits: "
                    f"{cfg.source_splits(source)}); add one under datasets.{source}.splits or "
                    "drop it from the mixture")


def config_hash(section: Any) -> str:
    """Stable short hash of a (plain-dict) config section, for run tags."""
    blob = json.dumps(section, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def full_schema() -> dict:
    props = {name: json_schema(section_class(name)) for name in SECTIONS}
    for name, sub in props.items():
        sub["default"] = {}
    props["variants"] = {"type": "object", "description": "Named variants (Snakemake wildcard "
                         "values), each a small override of model/sft/rft.",
                         "additionalProperties": json_schema(VariantConfig)}
    props["seeds"] = {"type": "array", "items": {"type": "integer"}, "default": [0],
                      "description": "Seeds; every variant's SFT/RFT/evaluation runs once per seed."}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "description": "poserft workflow configuration (generated from poserft/*/config.py: "
                           "python -m poserft.config --write-schema schemas/config.schema.yaml)",
            "type": "object", "additionalProperties": False, "required": ["variants"],
            "properties": props}


def schema_yaml() -> str:
    import yaml  # only needed for writing the schema
    header = ("# GENERATED by `python -m poserft.config --write-schema schemas/config.schema.yaml`\n"
              "# from the config dataclasses; do not edit by hand.\n")
    return header + yaml.safe_dump(full_schema(), sort_keys=False, width=100, allow_unicode=True)


def main(argv: list[str] | None = None) -> int:
    import argparse
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--write-schema", metavar="PATH", help="write the JSON schema (as YAML)")
    p.add_argument("--check", metavar="CONFIG", help="validate a config file and its invariants")
    args = p.parse_args(argv)
    if args.write_schema:
        from poserft.atomic import write_text   # atomic, honours the umask
        write_text(args.write_schema, schema_yaml())
    if args.check:
        import yaml
        with open(args.check) as fh:
            load_config(yaml.safe_load(fh))
        print(f"{args.check}: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
