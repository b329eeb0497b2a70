"""Registries that declare their parameters and reject what they do not know.

Every named choice of the package (federated recipes, merge methods, LoRA aggregation modes,
partitioners, distribution families, vMF normalisers, abstention criteria, dataset specs) is an
:class:`Entry` of a :class:`Registry`: a factory plus the :class:`Param` list it accepts (name,
type, default, help, reference). :meth:`Registry.resolve` checks options against that list, so
an option an entry does not use is a :class:`~asymvlm.errors.ConfigError` naming the key, the
entry and the valid keys, never silently dropped; :meth:`Registry.describe` prints every entry
with its parameters (``asymvlm-federate --list-recipes``, ``asymvlm-merge --list-methods``).

Example:
    >>> reg = Registry("greeting")
    >>> @reg.register("hello", params=[Param("times", int, 1, "How often.", check=at_least(1))],
    ...               help="Say hello.", reference="https://example.org")
    ... def hello(times):
    ...     return "hello " * times
    >>> reg.build("hello", times=2)
    'hello hello '
    >>> reg.build("hello", tims=2)
    Traceback (most recent call last):
    ...
    asymvlm.errors.ConfigError: unknown option 'tims' for greeting 'hello'; valid options: times
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from asymvlm.errors import ConfigError

__all__ = ["Param", "Entry", "Registry", "at_least", "in_range", "positive", "non_negative", "probability"]


# ----------------------------------------------------------------------------------------------
# value checks (each returns None when fine, else a phrase that completes "must be ...")
# ----------------------------------------------------------------------------------------------
def in_range(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> Callable[[Any], str | None]:
    """``lo <= x <= hi`` (``<`` on an open side); the phrase names the interval."""
    text = f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"

    def check(x: Any) -> str | None:
        ok = (x > lo if lo_open else x >= lo) and (x < hi if hi_open else x <= hi)
        return None if ok and not (isinstance(x, float) and math.isnan(x)) else text

    return check


def at_least(lo: float) -> Callable[[Any], str | None]:
    """``x >= lo``."""
    return lambda x: None if x >= lo else f">= {lo}"


def positive(x: Any) -> str | None:
    """``x > 0`` and finite."""
    return None if x > 0 and math.isfinite(x) else "> 0 and finite"


def non_negative(x: Any) -> str | None:
    """``x >= 0`` and finite."""
    return None if x >= 0 and math.isfinite(x) else ">= 0 and finite"


probability = in_range(0.0, 1.0, hi_open=True)


@dataclass(frozen=True)
class Param:
    """One declared parameter of a registry entry.

    Attributes:
        name: the keyword (also the config key and flag).
        type: ``int``, ``float``, ``bool``, ``str`` or ``typing.Literal[...]`` (an int is accepted
            for a float; nothing else is converted).
        default: used when the option is not given (``None`` means "not set": the entry decides).
        help: one line for listings and ``--help``.
        check: ``value -> None`` or a phrase completing "must be ..." (ranges, see :func:`in_range`).
        reference: where the parameter is defined (paper, library), if it differs from the entry's.
        optional: ``None`` is an accepted value (besides the default).
    """

    name: str
    type: Any
    default: Any
    help: str
    check: Callable[[Any], str | None] | None = None
    reference: str = ""
    optional: bool = False

    @property
    def choices(self) -> tuple[Any, ...] | None:
        return typing.get_args(self.type) if typing.get_origin(self.type) is typing.Literal else None

    def type_name(self) -> str:
        if self.choices is not None:
            return "{" + ",".join(str(c) for c in self.choices) + "}"
        return getattr(self.type, "__name__", str(self.type))

    def validate(self, value: Any, where: str) -> Any:
        """The value, checked (and an int widened to float); a :class:`ConfigError` otherwise."""
        if value is None and (self.optional or self.default is None):
            return None
        expected = self.type
        choices = self.choices
        if choices is not None:
            if value not in choices:
                raise ConfigError(f"{where}: {self.name}={value!r} is not one of {list(choices)}")
            return value
        if expected is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{where}: {self.name} must be a number, got {value!r}")
            value = float(value)
        elif expected is int:
            if isinstance(value, bool) or not isinstance(value, int):
                if isinstance(value, float) and value.is_integer():
                    raise ConfigError(f"{where}: {self.name} must be an integer, got {value!r} (write {int(value)})")
                raise ConfigError(f"{where}: {self.name} must be an integer, got {value!r}")
        elif expected is bool:
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: {self.name} must be true or false, got {value!r}")
        elif expected is str:
            if not isinstance(value, str):
                raise ConfigError(f"{where}: {self.name} must be a string, got {value!r}")
        if self.check is not None:
            problem = self.check(value)
            if problem:
                raise ConfigError(f"{where}: {self.name} must be {problem}, got {value!r}")
        return value

    def describe(self) -> str:
        ref = f" [{self.reference}]" if self.reference else ""
        return f"{self.name} ({self.type_name()}, default {self.default!r}): {self.help}{ref}"


@dataclass(frozen=True)
class Entry:
    """A registered name: its factory, declared parameters, one-line help and reference."""

    name: str
    factory: Callable[..., Any]
    params: tuple[Param, ...] = ()
    help: str = ""
    reference: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}


class Registry(Mapping[str, Entry]):
    """Named entries with declared parameters (a read-only mapping ``name -> Entry``).

    Args:
        kind: what an entry is, for messages ("recipe", "merge method", ...).
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    # -- registration ---------------------------------------------------------------------------
    def register(
        self,
        name: str,
        *,
        params: Sequence[Param] = (),
        help: str = "",
        reference: str = "",
        **extra: Any,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: register ``factory(**resolved options)`` under ``name``."""

        def deco(factory: Callable[..., Any]) -> Callable[..., Any]:
            self.add(Entry(name, factory, tuple(params), help, reference, dict(extra)))
            return factory

        return deco

    def add(self, entry: Entry) -> Entry:
        if entry.name in self._entries:
            raise ValueError(f"{self.kind} {entry.name!r} is already registered")
        names = [p.name for p in entry.params]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.kind} {entry.name!r} declares a parameter twice: {names}")
        self._entries[entry.name] = entry
        return entry

    # -- lookup -----------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Entry:
        return self.entry(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def entry(self, name: str) -> Entry:
        """The entry, or a :class:`ConfigError` listing the valid names."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise ConfigError(f"unknown {self.kind} {name!r}; choose one of {sorted(self._entries)}") from None

    # -- options ----------------------------------------------------------------------------------
    def resolve(self, name: str, options: Mapping[str, Any] | None = None, *, fill: bool = True) -> dict[str, Any]:
        """``options`` checked against ``name``'s parameters (unknown keys, wrong types and values
        out of range are a :class:`ConfigError`), with the defaults filled in (``fill``)."""
        entry = self.entry(name)
        options = dict(options or {})
        where = f"{self.kind} {name!r}"
        unknown = [k for k in options if k not in entry.param_names]
        if unknown:
            valid = ", ".join(entry.param_names) or "none"
            key = unknown[0]
            more = f" (and {unknown[1:]})" if len(unknown) > 1 else ""
            raise ConfigError(f"unknown option {key!r}{more} for {where}; valid options: {valid}")
        out = entry.defaults() if fill else {}
        for key, value in options.items():
            out[key] = entry.param(key).validate(value, where)
        return out

    def build(self, name: str, **options: Any) -> Any:
        """``factory(**resolve(name, options))``."""
        return self.entry(name).factory(**self.resolve(name, options))

    def describe(self, names: Sequence[str] | None = None) -> str:
        """Every entry (or those named): name, help, reference and one line per parameter."""
        lines = []
        for name in names or list(self._entries):
            e = self.entry(name)
            head = f"{e.name}: {e.help}" if e.help else e.name
            lines.append(head + (f"  <{e.reference}>" if e.reference else ""))
            lines.extend(f"    {p.describe()}" for p in e.params)
            if not e.params:
                lines.append("    (no parameters)")
        return "\n".join(lines)
