"""The workflow's config: schema current, configs valid, bad configs stop before any job."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from snakemake.utils import validate

from poserft.config import ConfigError, full_schema, load_config, schema_yaml, variant_section

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "schemas" / "config.schema.yaml"


def _config(extra: Path | None = None) -> dict:
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    if extra is not None:  # what --configfile does: a recursive update
        def update(a, b):
            for k, v in b.items():
                a[k] = update(a.get(k, {}), v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
            return a
        cfg = update(cfg, yaml.safe_load(extra.read_text()))
    return cfg


def test_schema_is_generated_from_the_dataclasses():
    assert SCHEMA.read_text() == schema_yaml(), \
        "schemas/config.schema.yaml is stale: run `make schema` and commit it"


def test_every_schema_key_is_described():
    missing = []

    def walk(node, where):
        for key, sub in (node.get("properties") or {}).items():
            if not sub.get("description"):
                missing.append(f"{where}.{key}")
            walk(sub, f"{where}.{key}")
    walk(full_schema(), "config")
    assert not missing, missing


@pytest.mark.parametrize("overlay", [None, "configs/seeds.yaml", "configs/paper.yaml"])
def test_shipped_configs_validate(overlay):
    path = ROOT / overlay if overlay else None
    if path is not None and not path.exists():
        pytest.skip(f"{overlay} not present")
    cfg = _config(path)
    validate(cfg, str(SCHEMA))  # fills defaults, like the Snakefile
    wf = load_config(cfg)
    assert set(wf.variants) >= {"baseline", "dist", "dist_rft", "grpo"}


def test_variant_sections_merge_overrides():
    cfg = _config()
    validate(cfg, str(SCHEMA))
    base = cfg["model"]
    assert variant_section(cfg, "baseline", "model")["head"] == "deterministic"
    assert variant_section(cfg, "dist", "model") == base
    assert variant_section(cfg, "dist", "model", seed=2)["seed"] == 2
    assert variant_section(cfg, "grpo", "rft", seed=3)["mode"] == "grpo"
    assert variant_section(cfg, "grpo", "rft", seed=3)["engine"]["seed"] == 3
    assert variant_section(cfg, "dist", "sft", seed=4)["engine"]["seed"] == 4
    for section in ("model", "sft", "rft"):  # the seeded sections are still valid
        load_config({**cfg, section: variant_section(cfg, "grpo", section, seed=5)})
    with pytest.raises(ConfigError, match="variants.dist.rft is null"):
        variant_section(cfg, "dist", "rft")


@pytest.mark.parametrize("mutate, key", [
    (lambda c: c["rft"].update(group_size="four"), "group_size"),          # wrong type
    (lambda c: c["sft"].update(bogus_key=1), "bogus_key"),                 # unknown key
    (lambda c: c.pop("variants"), "variants"),                             # missing required key
    (lambda c: c["variants"]["grpo"].update(sft_from="nope"), "variants.grpo.sft_from"),
    (lambda c: c["variants"]["baseline"]["model"].update(head="laplace"), "variants.baseline.model.head"),
])
def test_malformed_config_is_rejected_naming_the_key(mutate, key):
    cfg = _config()
    mutate(cfg)
    with pytest.raises(Exception) as info:
        validate(cfg, str(SCHEMA))
        load_config(cfg)
    assert key.split(".")[-1] in str(info.value)


def test_rft_batch_group_invariant_names_both_keys():
    cfg = _config()
    validate(cfg, str(SCHEMA))
    cfg = copy.deepcopy(cfg)
    cfg["rft"]["group_size"] = 3
    cfg["rft"]["batch_size"] = 4
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert "group_size" in str(info.value)


def test_snakemake_stops_before_any_job_on_a_bad_config(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sft:\n  no_such_option: 1\n")
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1",
                           "--configfile", str(bad)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "no_such_option" in out
    assert "Building DAG of jobs" not in out  # stopped while parsing, before planning any job


def test_lint_reports_only_the_deliberate_missing_conda_envs():
    """`snakemake --lint` may only flag per-rule environments (README: we ship one .venv)."""
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--lint"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    lints = [line.strip() for line in (proc.stdout + proc.stderr).splitlines()
             if line.startswith("    * ")]
    assert lints, "expected the conda/container lint for each rule"
    assert all(lint.startswith("* Specify a conda environment or container") for lint in lints), lints
