"""The workflow's config: schema current, configs valid, bad configs stop before any job."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from workflow_helpers import changed_keys
from snakemake.utils import validate

from poserft.config import ConfigError, full_schema, load_config, schema_yaml

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
def test_shipped_configs_validate(overlay, tmp_path, monkeypatch):
    path = ROOT / overlay if overlay else None
    if path is not None and not path.exists():
        pytest.skip(f"{overlay} not present")
    cfg = _config(path)
    if cfg["body"].get("model_path"):   # licensed SMPL files: present on a real cluster only
        monkeypatch.chdir(tmp_path)
        (tmp_path / cfg["body"]["model_path"]).mkdir(parents=True)
        if cfg["body"].get("h36m_regressor_path"):      # likewise; an empty stand-in
            regressor = tmp_path / cfg["body"]["h36m_regressor_path"]
            regressor.parent.mkdir(parents=True, exist_ok=True)
            regressor.touch()
    validate(cfg, str(SCHEMA))  # the generated schema (for editors) accepts them too
    wf = load_config(cfg)
    assert set(wf.variants) >= {"baseline", "dist", "dist_rft", "grpo"}


def test_variant_sections_merge_overrides():
    wf = load_config(_config())
    base = wf.params("model")
    assert wf.variant_params("baseline", "model")["head"] == "deterministic"
    assert wf.variant_params("dist", "model") == base
    assert wf.variant_params("dist", "model", seed=2)["seed"] == 2
    assert wf.variant_params("grpo", "rft", seed=3)["mode"] == "grpo"
    assert wf.variant_params("grpo", "rft", seed=3)["engine"]["seed"] == 3
    assert wf.variant_params("dist", "sft", seed=4)["engine"]["seed"] == 4
    assert wf.variant_params("dist", "sft", seed=4)["engine"]["checkpoint_every"] == \
        wf.params("sft")["engine"]["checkpoint_every"]   # the seed merges, the rest stays
    with pytest.raises(ConfigError, match="variants.dist.rft is null"):
        wf.variant_section("dist", "rft")


def test_free_key_mappings_replace_sections_merge():
    """Nested sections merge key by key; a mapping of free keys (data such as a dataset's
    splits, or reward weights) replaces the default whole, so a user can drop an entry."""
    cfg = _config()
    cfg["datasets"] = {"amass": {"splits": {"train": ["CMU"], "val": ["HumanEva"]}}}
    cfg["rft"] = {"reward_weights": {"format": 1.0, "joint": 2.0}}
    wf = load_config(cfg)
    assert set(wf["datasets"].amass.splits) == {"train", "val"}
    assert wf["rft"].reward_weights == {"format": 1.0, "joint": 2.0}
    # the same through a variant's override of the base section
    cfg["variants"]["grpo"]["rft"]["reward_weights"] = {"format": 1.0}
    assert load_config(cfg).variant_section("grpo", "rft").reward_weights == {"format": 1.0}


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
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert key.split(".")[-1] in str(info.value)


def test_a_partial_nested_section_changes_only_that_key():
    """`rft: {optim: {lr: X}}` must not reset optim's other keys to OptimConfig's class
    defaults (the rft section's own optim default has warmup 0 and a constant LR)."""
    cfg = _config()
    before = load_config(cfg)
    edited = copy.deepcopy(cfg)
    edited.setdefault("rft", {})["optim"] = {"lr": 2.0e-6}
    after = load_config(edited)
    for variant in ("dist_rft", "grpo"):
        old = before.variant_params(variant, "rft", seed=0)
        new = after.variant_params(variant, "rft", seed=0)
        assert changed_keys(old, new) == {"optim.lr"}
        assert new["optim"]["lr"] == 2.0e-6 and new["optim"]["warmup_steps"] == 0
    # the same through one variant's nested override: only that variant, only that key
    edited = copy.deepcopy(cfg)
    edited["variants"]["dist_rft"]["rft"]["optim"] = {"lr": 3.0e-6}
    after = load_config(edited)
    assert changed_keys(before.variant_params("dist_rft", "rft", 0),
                         after.variant_params("dist_rft", "rft", 0)) == {"optim.lr"}
    assert before.variant_params("grpo", "rft", 0) == after.variant_params("grpo", "rft", 0)
    # and a nested engine override keeps the section's own engine defaults
    edited = copy.deepcopy(cfg)
    edited["sft"] = {"engine": {"log_every": 7}}
    assert changed_keys(before.variant_params("dist", "sft", 0),
                         load_config(edited).variant_params("dist", "sft", 0)) == {"engine.log_every"}


def test_params_are_canonical_whatever_the_key_order_or_explicit_defaults():
    cfg = _config()
    canonical = load_config(cfg)
    resorted = yaml.safe_load(yaml.safe_dump(cfg, sort_keys=True))
    resorted["rft"] = {**(resorted.get("rft") or {}), "clip_eps_pose": 0.2}       # a default, explicit
    resorted["sft"] = {**(resorted.get("sft") or {}), "optim": {"warmup_steps": 20}}
    other = load_config(resorted)
    for name in ("synth", "body", "tokenizer", "retrieval", "pose_encoder", "eval", "report"):
        assert repr(canonical.params(name)) == repr(other.params(name)), name
    for variant in canonical.variants:
        for section in ("model", "sft") + (("rft",) if canonical.has_rft(variant) else ()):
            # repr: what Snakemake stores and compares for a dict param (key order counts)
            assert repr(canonical.variant_params(variant, section, 0)) == \
                repr(other.variant_params(variant, section, 0)), (variant, section)


def test_a_misspelt_key_names_the_key_and_the_close_match():
    cfg = _config()
    cfg["rft"] = {"optim": {"lrr": 1e-6}}
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    msg = str(info.value)
    assert msg.startswith("rft.optim.lrr: unknown key (did you mean 'lr'?)") and "\n" not in msg
    cfg = _config()
    cfg["retreival"] = {}
    with pytest.raises(ConfigError, match=r"retreival: unknown key \(did you mean 'retrieval'\?\)"):
        load_config(cfg)


def test_rft_batch_group_invariant_names_both_keys():
    cfg = _config()
    cfg = copy.deepcopy(cfg)
    cfg["rft"]["group_size"] = 3
    cfg["rft"]["batch_size"] = 4
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert "group_size" in str(info.value)


@pytest.mark.parametrize("bad_yaml, message", [
    ("rft:\n  optim: {lrr: 1.0e-6}\n", "rft.optim.lrr: unknown key (did you mean 'lr'?)"),
    ("body:\n  model: smpl\n  model_path: /nonexistent\n",
     "body.model_path: /nonexistent does not exist"),
], ids=["misspelt-key", "missing-smpl-files"])
def test_snakemake_stops_before_any_job_on_a_bad_config(tmp_path, bad_yaml, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(bad_yaml)
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1",
                           "--configfile", str(bad)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert message in out and str(bad) in out, out[-2000:]
    assert len(out.splitlines()) < 20, out   # not the section's whole JSON schema
    assert "Building DAG of jobs" not in out  # stopped while parsing, before planning any job


def test_lint_reports_only_the_deliberate_missing_conda_envs():
    """`snakemake --lint` may only flag per-rule environments (README: we ship one .venv)."""
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--lint"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    lints = [line.strip() for line in (proc.stdout + proc.stderr).splitlines()
             if line.startswith("    * ")]
    assert lints, "expected the conda/container lint for each rule"
    assert all(lint.startswith("* Specify a conda environment or container") for lint in lints), lints
