"""Test helper: which keys of two nested config dicts differ."""
from __future__ import annotations


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
