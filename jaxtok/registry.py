"""Name → function registries: a new paper becomes a small function registered by name (DESIGN.md, principle 2).

Each entry may carry a frozen dataclass of its arguments; :meth:`Registry.parse_args` turns a config mapping into
that dataclass and rejects unknown keys or wrong types with a message naming the key, the value and what is
allowed.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Callable, Mapping, Optional


class ConfigError(ValueError):
    """A configuration problem found before any compute: names the key, the bad value and the allowed ones."""


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    fn: Callable
    config_cls: Optional[type]


class Registry:
    """Registry of named callables of one kind (objectives, tasks, selection rules, decode policies, ...)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, config_cls: Optional[type] = None) -> Callable[[Callable], Callable]:
        """Decorator: ``@OBJECTIVES.register("sft", SFTArgs)``."""

        def deco(fn: Callable) -> Callable:
            if name in self._entries and self._entries[name].fn is not fn:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = Entry(name, fn, config_cls)
            return fn

        return deco

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def entry(self, name: str, key: Optional[str] = None) -> Entry:
        if name not in self._entries:
            where = f"{key}={name!r}" if key else f"{self.kind} {name!r}"
            raise ConfigError(f"{where} is not a known {self.kind}; allowed: {self.names()}")
        return self._entries[name]

    def get(self, name: str, key: Optional[str] = None) -> Callable:
        return self.entry(name, key).fn

    def parse_args(self, name: str, mapping: Optional[Mapping[str, Any]], key: str = "args") -> Any:
        """Build the entry's argument dataclass from ``mapping``; unknown keys and wrong types raise ConfigError."""
        cls = self.entry(name).config_cls
        mapping = dict(mapping or {})
        if cls is None:
            if mapping:
                raise ConfigError(f"{key}: {self.kind} {name!r} takes no arguments, got {sorted(mapping)}")
            return None
        return build_dataclass(cls, mapping, key)


def build_dataclass(cls: type, mapping: Mapping[str, Any], key: str) -> Any:
    """``cls(**mapping)`` with checks: unknown keys, and values that do not match simple field types."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(mapping) - set(fields))
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}: unknown key; allowed keys: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in mapping.items():
        values[name] = _coerce(hints.get(name, Any), value, f"{key}.{name}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{key}: {e}") from None


def _coerce(tp, value, key):
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, key) if len(args) == 1 else value
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r}: allowed values {list(allowed)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected true/false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r}: expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r}: expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r}: expected a string")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r}: expected a list")
        return tuple(value) if origin is tuple else list(value)
    return value


OBJECTIVES = Registry("objective")
TASKS = Registry("task")
SELECTIONS = Registry("selection rule")
DRAFT_POLICIES = Registry("draft-length policy")
COMMIT_POLICIES = Registry("commit policy")
BENCHES = Registry("benchmark")
