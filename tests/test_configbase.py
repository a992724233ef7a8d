"""The config-section machinery: typing, unknown keys, bounds, invariants, schema."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import jsonschema
import pytest

from poserft.configbase import ConfigError, Section, json_schema, option


@dataclass
class Inner(Section):
    """An inner section."""

    width: int = option(4, "Width.", minimum=1)


@dataclass
class Toy(Section):
    """A toy section."""

    batch_size: int = option(8, "Prompts per step.", minimum=1)
    group_size: int = option(4, "Candidates per prompt.", minimum=1)
    lr: float = option(1e-3, "Learning rate.", exclusive_minimum=0.0)
    mode: Literal["a", "b"] = option("a", "Mode.")
    name: str | None = option(None, "Optional name.")
    tags: list[str] = option(["x"], "Tags.")
    inner: Inner = option(Inner(), "Nested section.")

    def check(self, where: str) -> None:
        if self.batch_size % self.group_size:
            raise ConfigError(f"{where}.batch_size ({self.batch_size}) must be divisible by "
                              f"{where}.group_size ({self.group_size})")


def test_defaults_and_coercion():
    t = Toy.from_dict({"lr": 1, "inner": {"width": 2}}, where="toy")
    assert t.lr == 1.0 and isinstance(t.lr, float)
    assert t.inner.width == 2 and t.batch_size == 8
    assert Toy.from_dict({}).tags == ["x"]
    assert Toy.from_dict({}).tags is not Toy.from_dict({}).tags  # no shared mutable default


@pytest.mark.parametrize("data, key", [
    ({"batch_size": "8"}, "toy.batch_size"),
    ({"batch_size": True}, "toy.batch_size"),
    ({"bogus": 1}, "toy.bogus"),
    ({"mode": "c"}, "toy.mode"),
    ({"lr": 0.0}, "toy.lr"),
    ({"group_size": 0}, "toy.group_size"),
    ({"inner": {"width": 0}}, "toy.inner.width"),
    ({"tags": [1]}, "toy.tags[0]"),
    ({"batch_size": 6}, "toy.batch_size"),
])
def test_errors_name_the_key(data, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        Toy.from_dict(data, where="toy")


def test_invariant_names_both_keys():
    with pytest.raises(ConfigError) as info:
        Toy.from_dict({"batch_size": 6, "group_size": 4}, where="rft")
    assert "rft.batch_size" in str(info.value) and "rft.group_size" in str(info.value)


def test_json_schema_matches_dataclass():
    schema = json_schema(Toy)
    assert set(schema["properties"]) == {"batch_size", "group_size", "lr", "mode", "name", "tags", "inner"}
    assert all(p["description"] for p in schema["properties"].values())
    assert schema["properties"]["inner"]["default"] == {"width": 4}
    jsonschema.validate({"batch_size": 4, "name": None, "inner": {"width": 3}}, schema)
    for bad in ({"batch_size": "x"}, {"bogus": 1}, {"mode": "z"}, {"inner": {"width": 0}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_option_requires_help():
    with pytest.raises(TypeError):
        option(1)
