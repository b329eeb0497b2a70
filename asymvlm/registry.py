"""Registries that declare their parameters and reject what they do not know.

Every named choice of the package (federated recipes, merge methods, LoRA aggregation modes,
partitioners, distribution families, vMF normalisers, abstention criteria, dataset specs) is an
:class:`Entry` of a :class:`Registry`: a factory plus the :class:`Param` list it accepts (name,
type, default, help, reference). :meth:`Registry.resolve` checks options against that list, so
an option an entry does not use is a :class:`~asymvlm.errors.ConfigError` naming the key, the
entry and the valid keys, never silently dropped; :meth:`Registry.describe` prints every entry
with its parameters (``asymvlm-federate --list-recipes``, ``asymvlm-merge --list-methods``).

Parameters are declared once. The :class:`Param` list is the declaration (type, default, help,
check, reference) and :meth:`Registry.resolve` always passes the factory every declared option,
defaults filled in; the factory's signature must agree with it, which :meth:`Registry.add` checks
when the entry is registered (as mergekit reads a merge method's parameters from its signature):
the same names (a factory parameter the registry would never pass, or a Param the factory does
not take, is an error), the same default where the signature gives one, and an annotation, where
the signature gives one, that admits the Param's type. A disagreement is a
:class:`~asymvlm.errors.ConfigError` naming the entry and the parameter. A factory whose signature
Python cannot read (a builtin such as ``dict``, which returns the options as given) is not checked.

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

import dataclasses
import inspect
import math
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from asymvlm.errors import ConfigError

__all__ = [
    "Param",
    "Entry",
    "Registry",
    "check_signature",
    "flag_settings",
    "dataclass_flags",
    "at_least",
    "in_range",
    "positive",
    "non_negative",
    "probability",
]


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


# ----------------------------------------------------------------------------------------------
# a factory's signature against its declared parameters
# ----------------------------------------------------------------------------------------------
_KEYWORD = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def _signature(factory: Callable[..., Any]) -> inspect.Signature | None:
    """The factory's signature with its annotations evaluated (left as written where they cannot
    be), or None where Python cannot read one (a builtin such as ``dict``)."""
    try:
        return inspect.signature(factory, eval_str=True)
    except (TypeError, ValueError):
        return None
    except Exception:  # an annotation naming what its module imports only for type checkers
        try:
            return inspect.signature(factory)
        except (TypeError, ValueError):  # pragma: no cover - read above
            return None


def _admits(member: Any, value: Any) -> bool:
    """Whether one member of an annotation admits ``value``."""
    if member is Any or isinstance(member, (str, typing.TypeVar)):  # Any, or an annotation left unevaluated
        return True
    if typing.get_origin(member) is typing.Literal:
        return value in typing.get_args(member)
    origin = typing.get_origin(member) or member
    if not isinstance(origin, type):
        return True  # a construct this check does not read (Callable[...], a Protocol alias, ...)
    if origin is float and isinstance(value, int) and not isinstance(value, bool):
        return True  # PEP 484: an int is acceptable where a float is annotated
    return isinstance(value, origin)


def _admits_type(member: Any, tp: type) -> bool:
    """Whether one member of an annotation admits every value of the class ``tp``."""
    if member is Any or isinstance(member, (str, typing.TypeVar)):
        return True
    if typing.get_origin(member) is typing.Literal:
        return False  # a Literal admits some strings, not every one
    origin = typing.get_origin(member) or member
    if not isinstance(origin, type):
        return True
    return issubclass(tp, origin) or (tp is int and origin is float)


def _annotation_problem(annotation: Any, param: Param) -> str | None:
    """Why the annotation does not admit the Param's values (None when it does)."""
    if annotation is inspect.Parameter.empty:
        return None
    members = typing.get_args(annotation) if _is_union(annotation) else (annotation,)
    if param.choices is not None:
        bad = [c for c in param.choices if not any(_admits(m, c) for m in members)]
        return f"choices {bad} are not admitted by the annotation {_show(annotation)}" if bad else None
    if isinstance(param.type, type) and not any(_admits_type(m, param.type) for m in members):
        return f"type {param.type_name()} is not admitted by the annotation {_show(annotation)}"
    return None


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) is typing.Union or isinstance(annotation, types.UnionType)


def _show(annotation: Any) -> str:
    if isinstance(annotation, type) and typing.get_origin(annotation) is None:
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _same_default(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    try:
        return bool(a == b)
    except Exception:  # pragma: no cover - an array-like default
        return False


def check_signature(kind: str, entry: Entry) -> None:
    """That ``entry.factory``'s signature agrees with ``entry.params`` (see the module docstring):
    the same keyword names, the same defaults where the signature has them, annotations that admit
    the declared types. Called by :meth:`Registry.add` for every entry.

    Raises:
        ConfigError: naming the entry, the parameter and both declarations.

    Example:
        >>> def f(times=2):
        ...     return times
        >>> check_signature("greeting", Entry("hello", f, (Param("times", int, 1, "How often"),)))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        asymvlm.errors.ConfigError: greeting 'hello': parameter 'times' has default 1 in its Param but 2 in its ...
    """
    sig = _signature(entry.factory)
    if sig is None:
        return
    name = (getattr(entry.factory, "__qualname__", None) or type(entry.factory).__name__).rsplit("<locals>.", 1)[-1]
    where = f"{kind} {entry.name!r}"
    shown = f"its factory {name}{sig}" if "<lambda>" not in name else f"its factory lambda{sig}"
    args = sig.parameters
    takes_any = any(a.kind is inspect.Parameter.VAR_KEYWORD for a in args.values())
    declared = {p.name: p for p in entry.params}
    for arg in args.values():
        if arg.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        if arg.kind is inspect.Parameter.POSITIONAL_ONLY:
            if arg.default is inspect.Parameter.empty:
                raise ConfigError(
                    f"{where}: parameter {arg.name!r} of {shown} is positional-only; the registry passes the "
                    "declared options by keyword"
                )
            continue  # never passed
        if arg.name not in declared:
            raise ConfigError(
                f"{where}: parameter {arg.name!r} of {shown} is not declared as a Param (the registry passes "
                f"the declared options by keyword, and only those); declared: {list(declared) or 'none'}"
            )
    for p in entry.params:
        arg = args.get(p.name)
        if arg is None or arg.kind not in _KEYWORD:
            if takes_any:
                continue
            raise ConfigError(f"{where}: Param {p.name!r} is not a keyword parameter of {shown}")
        if arg.default is not inspect.Parameter.empty and not _same_default(arg.default, p.default):
            raise ConfigError(
                f"{where}: parameter {p.name!r} has default {p.default!r} in its Param but {arg.default!r} in {shown}"
            )
        problem = _annotation_problem(arg.annotation, p)
        if problem:
            raise ConfigError(f"{where}: parameter {p.name!r}: the Param's {problem} in {shown}")


# ----------------------------------------------------------------------------------------------
# declared parameters as command-line flags
# ----------------------------------------------------------------------------------------------
def flag_settings(tp: Any) -> dict[str, Any]:
    """argparse settings of a flag whose value has type ``tp`` (a :class:`Param`'s type or a config
    field's annotation): ``X | None`` is ``X``; ``list[X]`` / ``tuple[X, ...]`` one or more values;
    a ``Literal`` its choices; ``bool`` a switch that sets True; ``int`` / ``float`` their type.

    Example:
        >>> flag_settings(list[float] | None), flag_settings(typing.Literal["a", "b"])
        ({'nargs': '+', 'type': <class 'float'>}, {'choices': ('a', 'b')})
    """
    if _is_union(tp):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(members) != 1:
            return {}
        tp = members[0]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (list, tuple) and args:
        return {"nargs": "+", **flag_settings(args[0])}
    if origin is typing.Literal:
        return {"choices": args}
    if tp is bool:
        return {"action": "store_const", "const": True}
    return {"type": tp} if tp in (int, float) else {}


def dataclass_flags(cls: type) -> dict[str, dict[str, Any]]:
    """``{field name: argparse settings}`` of a config dataclass, one flag per field: the settings of
    its annotation (:func:`flag_settings`), its default, and its ``metadata`` (``help`` and what the
    annotation does not say: ``metavar``, ``choices``; a ``type`` or an ``action`` of its own
    replaces the annotation's settings: a custom type parses one token into the whole value).

    Example:
        >>> @dataclasses.dataclass(frozen=True)
        ... class Args:
        ...     steps: int = dataclasses.field(default=10, metadata={"help": "Steps."})
        >>> dataclass_flags(Args)
        {'steps': {'type': <class 'int'>, 'default': 10, 'help': 'Steps.'}}
    """
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        own = dict(f.metadata)
        settings = {} if "type" in own or "action" in own else flag_settings(hints[f.name])
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        out[f.name] = {**settings, "default": None if default is dataclasses.MISSING else default, **own}
    return out


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
        """Register ``entry``: a :class:`~asymvlm.errors.ConfigError` for a name registered twice, a
        parameter declared twice, or a factory whose signature disagrees with the declared
        parameters (:func:`check_signature`)."""
        if entry.name in self._entries:
            raise ConfigError(f"{self.kind} {entry.name!r} is already registered")
        names = [p.name for p in entry.params]
        if len(set(names)) != len(names):
            raise ConfigError(f"{self.kind} {entry.name!r} declares a parameter twice: {names}")
        check_signature(self.kind, entry)
        self._entries[entry.name] = entry
        return entry

    def unregister(self, name: str) -> Entry:
        """Remove the entry ``name`` and return it (a plug-in's tests register an entry for one test
        and remove it after); an unknown name is a :class:`~asymvlm.errors.ConfigError`.

        Example:
            >>> reg = Registry("greeting")
            >>> _ = reg.register("hello")(lambda: "hi")
            >>> reg.unregister("hello").name, "hello" in reg
            ('hello', False)
        """
        entry = self.entry(name)
        del self._entries[name]
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

    def options(self) -> dict[str, tuple[Param, tuple[str, ...]]]:
        """Every option some entry declares: its :class:`Param` (as the first entry declares it) and
        the entries that declare it, in registration order (what a command line makes one flag of).

        Raises:
            ConfigError: an option declared with different types by two entries (one flag, one type).

        Example:
            >>> reg = Registry("greeting")
            >>> _ = reg.register("hi", params=[Param("times", int, 1, "How often.")])(lambda times: "hi" * times)
            >>> _ = reg.register("yo", params=[Param("times", int, 2, "How often.")])(lambda times: "yo" * times)
            >>> {k: names for k, (p, names) in reg.options().items()}
            {'times': ('hi', 'yo')}
        """
        out: dict[str, tuple[Param, tuple[str, ...]]] = {}
        for entry in self._entries.values():
            for p in entry.params:
                first, names = out.get(p.name, (p, ()))
                if first.type != p.type:
                    raise ConfigError(
                        f"{self.kind} option {p.name!r} is declared as {first.type_name()} by {names[0]!r} "
                        f"but as {p.type_name()} by {entry.name!r}"
                    )
                out[p.name] = (first, (*names, entry.name))
        return out

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
