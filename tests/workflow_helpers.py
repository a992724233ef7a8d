"""Test helpers for the workflow tests: config-dict diffs and Snakemake dry-run plans."""
from __future__ import annotations

import re


def changed_keys(a: dict, b: dict, where: str = "") -> set[str]:
    """Dotted keys whose values differ between two nested dicts."""
    out = set()
    for k in set(a) | set(b):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out |= changed_keys(va, vb, f"{where}{k}.")
        elif va != vb:
            out.add(f"{where}{k}")
    return out


def planned_jobs(text: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run's output: rule -> job count ({} when nothing to do)."""
    if "Nothing to be done" in text:
        return {}
    table = text.split("Job stats:", 1)[1]
    jobs = {}
    for line in table.splitlines()[3:]:
        m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if not m or m.group(1) == "total":
            break
        jobs[m.group(1)] = int(m.group(2))
    return jobs
