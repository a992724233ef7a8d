"""Typed config sections: the one pattern every stage's config follows.

A section is a dataclass whose fields are declared with :func:`option` (a default and a
help text, optionally ``choices``/``minimum``/``maximum``). From these declarations we get

* ``Section.from_dict(d, where="rft")``: build from a (partial) plain dict. Keys left out
  take their defaults; a partial nested section (``rft: {optim: {lr: 2e-6}}``) merges key
  by key into that field's default section, so its other keys keep the section's own
  defaults. Unknown keys, wrong types and out-of-range values raise :class:`ConfigError`
  naming the full key (``rft.group_size``) and the fix;
* ``section.to_dict()``: the canonical plain dict (every key, defaults filled, in field
  order), which rules pass as ``params:`` so that only a changed value reruns a stage;
* ``Section.check()``: cross-field invariants, overridden per section;
* ``json_schema(cls)``: the JSON schema fragment (types, defaults, descriptions) that
  ``schemas/config.schema.yaml`` is generated from, so the schema and the code cannot drift.

This module is stdlib-only on purpose: the Snakefile imports it at parse time.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import MISSING, dataclass, field
from typing import Any, Literal, TypeVar, get_args, get_origin

__all__ = ["ConfigError", "Section", "option", "json_schema", "unknown_key_message"]


class ConfigError(ValueError):
    """A config value is missing, malformed or violates an invariant."""


def option(default: Any = MISSING, help: str = "", *, choices: tuple | None = None,
           minimum: float | None = None, maximum: float | None = None,
           exclusive_minimum: float | None = None) -> Any:
    """Declare a config field with its default and documentation.

    Mutable defaults (lists, dicts, nested sections) are copied per instance.
    """
    if not help:
        raise TypeError("every config option needs a help text")
    meta = {"help": help, "choices": choices, "minimum": minimum, "maximum": maximum,
            "exclusive_minimum": exclusive_minimum}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


S = TypeVar("S", bound="Section")


def unknown_key_message(key: str, known, where: str) -> str:
    """``rft.optim.lrr: unknown key (did you mean 'lr'?); keys of rft.optim: ...``"""
    close = difflib.get_close_matches(str(key), [str(k) for k in known], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{where}.{key}: unknown key{hint}; keys of {where}: {', '.join(sorted(map(str, known)))}"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against annotation ``tp``; return it (ints widen to floats)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"{where}: {value!r} matches none of {[_type_name(a) for a in args]}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        _, val_tp = get_args(tp) or (str, Any)
        return {str(k): _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, Section):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping (section {tp.__name__})")
        return tp.from_dict(value, where=where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


@dataclass
class Section:
    """Base class of config sections. Subclasses are ``@dataclass`` with :func:`option` fields."""

    @classmethod
    def from_dict(cls: type[S], data: dict | None, where: str = "", base: S | None = None) -> S:
        """Build from a (partial) plain dict: keys left out keep ``base``'s values (default:
        the field defaults). A nested section given as a partial mapping merges key by key
        into the base's (or default's) nested section, at any depth; any other value,
        including a mapping of free keys (``dict[str, float]``), replaces it whole."""
        data = dict(data or {})
        hints = typing.get_type_hints(cls)
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(unknown_key_message(unknown[0], known, where or cls.__name__))
        kwargs = {}
        for name, f in known.items():
            key = f"{where}.{name}" if where else name
            if name not in data:
                if base is not None:
                    kwargs[name] = copy.deepcopy(getattr(base, name))
                elif f.default is MISSING and f.default_factory is MISSING:
                    raise ConfigError(f"{key}: required key is missing ({f.metadata.get('help', '')})")
                continue
            value = data[name]
            inner = getattr(base, name) if base is not None else (
                f.default_factory() if f.default_factory is not MISSING else None)
            if isinstance(value, dict) and isinstance(inner, Section):
                value = type(inner).from_dict(value, where=key, base=inner)   # partial: merge
            value = _coerce(value, hints[name], key)
            meta = f.metadata
            if meta.get("choices") and value not in meta["choices"]:
                raise ConfigError(f"{key}: {value!r} is not one of {list(meta['choices'])}")
            for bound, ok in (("minimum", lambda v, b: v >= b), ("maximum", lambda v, b: v <= b),
                              ("exclusive_minimum", lambda v, b: v > b)):
                b = meta.get(bound)
                if b is not None and isinstance(value, (int, float)) and not ok(value, b):
                    raise ConfigError(f"{key}: {value!r} violates {bound} {b}")
            kwargs[name] = value
        obj = cls(**kwargs)
        obj.check(where or cls.__name__)
        return obj

    @classmethod
    def expect(cls: type[S], value: S | None, what: str) -> S:
        """``value`` if it is this section (None: the defaults). Libraries take typed
        sections and never parse plain dicts: the Snakefile parses the config once, and a
        job's params arrive typed (``poserft.workflow.job``)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        raise TypeError(f"{what}: expected a {cls.__name__}, got {type(value).__name__}; build "
                        f"it with {cls.__name__}.from_dict(d) (the config is parsed once, by "
                        "poserft.config.load_config)")

    def check(self, where: str) -> None:
        """Cross-field invariants; raise :class:`ConfigError` naming the keys. Override."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _schema_of(tp: Any) -> dict:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        inner = _schema_of(args[0]) if len(args) == 1 else {"anyOf": [_schema_of(a) for a in args]}
        if type(None) in get_args(tp):
            if "type" in inner and isinstance(inner["type"], str):
                inner = {**inner, "type": [inner["type"], "null"]}
            else:
                inner = {"anyOf": [inner, {"type": "null"}]}
        return inner
    if origin is Literal:
        return {"enum": list(get_args(tp))}
    if origin in (list, tuple):
        (item_tp, *_) = get_args(tp) or (Any,)
        return {"type": "array", "items": _schema_of(item_tp)}
    if origin is dict:
        _, val_tp = get_args(tp) or (str, Any)
        return {"type": "object", "additionalProperties": _schema_of(val_tp)}
    if isinstance(tp, type) and issubclass(tp, Section):
        return json_schema(tp)
    return {bool: {"type": "boolean"}, int: {"type": "integer"}, float: {"type": "number"},
            str: {"type": "string"}}.get(tp, {})


def json_schema(cls: type[Section]) -> dict:
    """JSON-schema object for a section: every key typed, described, with its default."""
    hints = typing.get_type_hints(cls)
    props, required = {}, []
    for f in dataclasses.fields(cls):
        s = dict(_schema_of(hints[f.name]))
        s["description"] = f.metadata.get("help", "")
        meta = f.metadata
        if meta.get("choices"):
            s["enum"] = list(meta["choices"])
        for bound, key in (("minimum", "minimum"), ("maximum", "maximum"),
                           ("exclusive_minimum", "exclusiveMinimum")):
            if meta.get(bound) is not None:
                s[key] = meta[bound]
        if f.default is not MISSING:
            d = f.default
            s["default"] = d
        elif f.default_factory is not MISSING:
            d = f.default_factory()
            s["default"] = d.to_dict() if isinstance(d, Section) else d
        else:
            required.append(f.name)
        props[f.name] = s
    out = {"type": "object", "description": (cls.__doc__ or "").strip().split("\n")[0],
           "additionalProperties": False, "properties": props}
    if required:
        out["required"] = required
    return out
