"""The whole workflow config: one typed section per stage, built from the validated YAML.

Sections live next to the code that reads them (``poserft/<pkg>/config.py``) and are
aggregated here. ``schemas/config.schema.yaml`` is generated from these dataclasses::

    python -m poserft.config --write-schema schemas/config.schema.yaml

and a test checks that the committed schema is current. The Snakefile validates the YAML
against that schema (types, unknown keys, defaults) and then calls :func:`load_config`,
which checks the cross-field invariants, so a bad config stops the workflow before any job.

Stdlib-only at import time (the Snakefile imports it while parsing).
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import sys
from dataclasses import dataclass
from typing import Any

from poserft.configbase import ConfigError, Section, json_schema, option

__all__ = ["ConfigError", "SECTIONS", "TrackingConfig", "ReportConfig", "VariantConfig",
           "WorkflowConfig", "load_config", "section_class", "variant_section",
           "config_hash", "deep_merge"]


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
    """All sections, typed. ``sections[name]`` is the section object."""

    sections: dict[str, Section]
    variants: dict[str, VariantConfig]
    seeds: list[int]


def deep_merge(base: dict, override: dict) -> dict:
    """Recursively merge ``override`` into a copy of ``base`` (dicts merge, the rest replaces)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def variant_section(config: dict, variant: str, section: str, seed: int | None = None) -> dict:
    """The plain-dict ``section`` ('model', 'sft' or 'rft') for ``variant``: base + overrides.

    ``seed`` (when given) replaces the seed of the run: ``model.seed`` (initialisation) or
    ``sft.engine.seed`` / ``rft.engine.seed`` (data order, sampling). The result is what a rule passes
    as ``params:``, so editing a variant's override reruns exactly that variant's jobs.
    """
    if variant not in config.get("variants", {}):
        raise ConfigError(f"variants.{variant}: no such variant; defined: {sorted(config.get('variants', {}))}")
    v = config["variants"][variant] or {}
    if section == "rft" and v.get("rft") is None:
        raise ConfigError(f"variants.{variant}.rft is null: this variant has no RFT stage")
    merged = deep_merge(config.get(section, {}) or {}, v.get(section) or {})
    if seed is not None:
        if section == "model":          # initialisation of the tiny model
            merged["seed"] = int(seed)
        else:                           # data order, dropout, sampling
            merged["engine"] = {**(merged.get("engine") or {}), "seed": int(seed)}
    return merged


def load_config(config: dict) -> WorkflowConfig:
    """Build every typed section from the (schema-validated) YAML dict and check invariants.

    Raises :class:`ConfigError` naming the key, e.g. ``rft.batch_size``.
    """
    known = set(SECTIONS) | {"variants", "seeds"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown top-level key; known: {sorted(known)}")
    sections = {name: section_class(name).from_dict(config.get(name) or {}, where=name)
                for name in SECTIONS}
    seeds = config.get("seeds", [0])
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"seeds: expected a non-empty list of integers, got {seeds!r}")
    variants = {}
    for name, raw in (config.get("variants") or {}).items():
        v = VariantConfig.from_dict(raw or {}, where=f"variants.{name}")
        if v.sft_from is not None:
            if v.sft_from not in config["variants"]:
                raise ConfigError(f"variants.{name}.sft_from: unknown variant {v.sft_from!r}")
            if (config["variants"][v.sft_from] or {}).get("sft_from"):
                raise ConfigError(f"variants.{name}.sft_from: {v.sft_from!r} itself reuses another "
                                  "variant's SFT; point at the variant that trains it")
            if v.model or v.sft:
                raise ConfigError(f"variants.{name}: a variant with sft_from cannot override "
                                  "model/sft (it reuses that variant's SFT checkpoint); "
                                  "override them in the variant named by sft_from instead")
        # every override must still form a valid section
        for sec in ("model", "sft") + (("rft",) if v.rft is not None else ()):
            section_class(sec).from_dict(variant_section(config, name, sec), where=f"variants.{name}.{sec}")
        variants[name] = v
    if not variants:
        raise ConfigError("variants: define at least one variant (see config.yaml)")
    return WorkflowConfig(sections=sections, variants=variants, seeds=list(seeds))


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
        import os
        import tempfile
        text = schema_yaml()
        d = os.path.dirname(os.path.abspath(args.write_schema))
        os.makedirs(d, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=d, delete=False, suffix=".tmp") as fh:
            fh.write(text)
        os.replace(fh.name, args.write_schema)
    if args.check:
        import yaml
        with open(args.check) as fh:
            load_config(yaml.safe_load(fh))
        print(f"{args.check}: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
