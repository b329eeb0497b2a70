"""Configuration shared by every package: dataclass configs parsed from YAML and flags.

Configs are frozen dataclasses with ``metadata={"help": ...}`` on every field, parsed by
``transformers.HfArgumentParser``: values come from a YAML file (``--config exp.yaml``), then
command-line flags override them. Field names are unique across the dataclasses of one command,
so a flat YAML file maps onto them; unknown YAML keys and flags are a :class:`ConfigError` that
names the key. :class:`DataArguments` (where the embeddings come from) is shared by
``asymvlm-train`` and ``asymvlm-federate``.

Example:
    >>> (data,) = parse_dataclass_args((DataArguments,), ["--train_images", "100"], "demo")
    >>> data.train_images, data.dataset
    (100, 'shapeworld')
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from asymvlm.errors import ArtefactError, ConfigError

__all__ = [
    "ConfigError",
    "DataArguments",
    "HeadArguments",
    "check_choice",
    "check_fields",
    "claim_output_dir",
    "clear_run_outputs",
    "model_entries",
    "check_resume_config",
    "argument_parser",
    "config_fields",
    "load_yaml",
    "parse_dataclass_args",
]


def check_choice(name: str, value: Any, allowed: tuple) -> None:
    """Raise a :class:`ConfigError` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of {allowed}")


def _type_error(name: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"{name} must be {expected}, got {value!r} ({type(value).__name__})")


def _check_value(name: str, value: Any, tp: Any) -> Any:
    """``value`` checked against the annotation ``tp`` (returns it, an int widened for a float)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_value(name, value, inner[0]) if len(inner) == 1 else value
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{name}={value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _type_error(name, value, "a list")
        item = args[0] if args else Any
        return type(value)(_check_value(f"{name}[{i}]", v, item) for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise _type_error(name, value, "true or false")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(name, value, "an integer")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _type_error(name, value, "a number")
        if math.isnan(value):
            raise ConfigError(f"{name} must be a number, got NaN")
        return float(value)
    elif tp is str:
        if not isinstance(value, str):
            raise _type_error(name, value, "a string")
    return value


def check_fields(obj: Any) -> None:
    """Check every field of the dataclass instance ``obj`` against its annotation (YAML values
    reach a config untyped: ``max_steps: 5.7`` or ``hidden_dims: 64`` must be an error, not a
    crash later). Ints given for floats are widened in place."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        checked = _check_value(f.name, value, hints[f.name])
        if checked is not value:
            object.__setattr__(obj, f.name, checked)


@dataclass(frozen=True)
class DataArguments:
    """Where the (cached) embeddings come from."""

    cache_dir: str = field(
        default="",
        metadata={
            "help": "An embedding cache (asymvlm.embed_dataset / write_cache). Empty: build one from --dataset with "
            "--encoder under the asymvlm cache folder."
        },
    )
    dataset: str = field(
        default="shapeworld",
        metadata={
            "help": "Used when --cache_dir is empty: 'shapeworld' (world v3; 'shapeworld:2' the earlier world) or a "
            "local "
            "dataset spec (imagefolder:<root>, coco-karpathy:<json>:<root>[:split], coco2017:<json>:<dir>, "
            "flickr30k:<json>:<dir>[:split])."
        },
    )
    encoder: str = field(
        default="",
        metadata={
            "help": "Frozen encoder spec (asymvlm.load_encoder grammar); needed to build a cache and for mode=lora "
            "('' = the toy CLIP of the ShapeWorld version: open_clip:asymvlm-toy-clip-v3, or -clip for shapeworld:2)."
        },
    )
    pretrained: str = field(default="shapeworld", metadata={"help": "open_clip pretrained tag or file ('' = none)."})
    train_images: int = field(default=20000, metadata={"help": "ShapeWorld training images (dataset=shapeworld)."})
    data_seed: int = field(default=0, metadata={"help": "Seed of the generated ShapeWorld training split."})
    caption_styles: str = field(
        default="",
        metadata={
            "help": "ShapeWorld caption styles of the training split, comma-separated (plain, photo, synonyms, "
            "reordered); empty = all (e.g. one style per expert for merging)."
        },
    )
    eval_images: int = field(
        default=1000,
        metadata={
            "help": "Held-out images for periodic evaluation (ShapeWorld: a fresh split; otherwise the last "
            "eval_fraction of the cache)."
        },
    )
    eval_fraction: float = field(
        default=0.0,
        metadata={
            "help": "For non-ShapeWorld caches: fraction of images (with their captions) held out for evaluation."
        },
    )
    device_resident: bool = field(
        default=True,
        metadata={"help": "Keep the cached embeddings on the training device (GPU) and draw batches by index there."},
    )

    def __post_init__(self) -> None:
        check_fields(self)
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.train_images < 1 or self.eval_images < 0:
            raise ConfigError("train_images must be >= 1 and eval_images >= 0")
        from asymvlm.shapeworld import CAPTION_STYLES, dataset_version

        try:
            version = dataset_version(self.dataset)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        from asymvlm.shapeworld import DEFAULT_DATASET_VERSION
        from asymvlm.toyclip import TOY_CLIP_SPECS as toy

        if not self.encoder:  # the toy CLIP trained on the world the data come from
            object.__setattr__(self, "encoder", toy[version if version is not None else DEFAULT_DATASET_VERSION])
        if version is not None and self.encoder in toy.values() and self.encoder != toy[version]:
            raise ConfigError(
                f"the toy CLIP {self.encoder} was trained on another ShapeWorld version than {self.dataset!r} "
                f"(version {version}); use --encoder {toy[version]}"
            )
        unknown = [c for c in self.styles() if c not in CAPTION_STYLES]
        if unknown:
            raise ConfigError(f"unknown caption_styles {unknown}; choose from {list(CAPTION_STYLES)}")

    def styles(self) -> tuple[str, ...]:
        """The ShapeWorld caption styles of the training split (all when ``caption_styles`` is empty)."""
        from asymvlm.shapeworld import CAPTION_STYLES

        picked = tuple(c.strip() for c in self.caption_styles.split(",") if c.strip())
        return picked or tuple(CAPTION_STYLES)


@dataclass(frozen=True)
class HeadArguments:
    """The text head (shared by ``asymvlm-train`` and ``asymvlm-federate``)."""

    family: Literal["vmf", "ps"] = field(
        default="vmf", metadata={"help": "Distribution family: von Mises-Fisher (vmf) or Power Spherical (ps)."}
    )
    hidden_dims: list[int] = field(
        default_factory=lambda: [1024, 1024, 1024],
        metadata={"help": "Hidden widths of the head MLP (the paper: 1024 1024 1024)."},
    )
    activation: Literal["relu", "gelu", "silu", "tanh"] = field(default="relu", metadata={"help": "Head activation."})
    direction: Literal["frozen", "learned"] = field(
        default="frozen",
        metadata={
            "help": "Mean direction of each text's distribution: 'frozen' keeps the frozen text embedding (text->image "
            "retrieval stays exactly the frozen model's; only the concentration is learned), 'learned' is the "
            "paper's loc = eta / |eta|."
        },
    )
    residual: bool = field(
        default=False,
        metadata={
            "help": "Residual head: eta = init_concentration * x + MLP(x), starting exactly at CLIP's directions."
        },
    )
    init_concentration: float = field(default=10.0, metadata={"help": "Concentration of an untrained residual head."})
    min_concentration: float = field(default=1e-3, metadata={"help": "Lower bound on the concentration."})
    max_concentration: float = field(default=1e5, metadata={"help": "Upper bound on the concentration."})

    def __post_init__(self) -> None:
        from asymvlm.heads import MAX_WIDTH

        check_fields(self)
        if not self.hidden_dims or any(not 1 <= h <= MAX_WIDTH for h in self.hidden_dims):
            raise ConfigError(
                f"hidden_dims must be a non-empty list of widths in [1, {MAX_WIDTH}], got {self.hidden_dims}"
            )
        for name in ("init_concentration", "min_concentration", "max_concentration"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{name} must be a finite number, got {getattr(self, name)}")
        if not 0 < self.min_concentration < self.max_concentration:
            raise ConfigError(
                f"need 0 < min_concentration < max_concentration, got {self.min_concentration}, "
                f"{self.max_concentration}"
            )
        if self.residual and not self.init_concentration > 0:
            raise ConfigError(f"init_concentration must be > 0, got {self.init_concentration}")

    def head_config(self, dim: int) -> Any:
        """The :class:`~asymvlm.heads.HeadConfig` of these arguments for embeddings of dimension ``dim``."""
        from asymvlm.heads import HeadConfig

        return HeadConfig(
            dim=dim,
            family=self.family,
            hidden_dims=tuple(self.hidden_dims),
            activation=self.activation,
            direction=self.direction,
            residual=self.residual,
            init_concentration=self.init_concentration,
            min_concentration=self.min_concentration,
            max_concentration=self.max_concentration,
        )


def claim_output_dir(
    out: Path,
    outputs: tuple[str, ...],
    *,
    overwrite: bool,
    ours: Callable[[Path], bool] | None = None,
) -> None:
    """A new run's output folder: new or empty; or (``overwrite``) cleared by :func:`clear_run_outputs`
    of what an earlier run wrote there, and nothing else. A non-empty folder without ``overwrite`` is a
    :class:`ConfigError`."""
    out = Path(out)
    if overwrite:
        clear_run_outputs(out, outputs, ours=ours)
    elif out.is_dir() and any(out.iterdir()):
        raise ConfigError(
            f"output_dir {out} is not empty (a previous run?): pass --resume to continue that run, --overwrite to "
            "replace it, or choose a new output_dir"
        )


def model_entries(model_dir: Path) -> tuple[set[str], bool]:
    """The entries of a saved model folder asymvlm wrote, and whether a record says so: its
    ``.asymvlm-files.json`` (:func:`asymvlm.io.atomic_directory`), or, for a folder saved without one,
    the names :meth:`asymvlm.model.AsymVLM.save_pretrained` writes (its README only when it is an
    asymvlm card). Anything else there is the user's."""
    from asymvlm.confidence import CONFIDENCE_NAME
    from asymvlm.hub import CARD_NAME, is_asymvlm_card
    from asymvlm.io import owned_entries
    from asymvlm.model import ADAPTER_DIR, BASE_DELTA_NAME, CONFIG_NAME, WEIGHTS_NAME

    owned = owned_entries(model_dir)
    if owned is not None:
        return owned, True
    legacy = {CONFIG_NAME, WEIGHTS_NAME, ADAPTER_DIR, BASE_DELTA_NAME, CONFIDENCE_NAME}
    card = model_dir / CARD_NAME
    if card.is_file() and is_asymvlm_card(card):
        legacy.add(CARD_NAME)
    return legacy, False


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def clear_run_outputs(out: Path, outputs: tuple[str, ...], *, ours: Callable[[Path], bool] | None = None) -> None:
    """``--overwrite``: remove what an earlier run wrote into ``out`` and nothing else.

    Of each name in ``outputs``: a file goes (a run's log); a ``model`` folder loses the entries
    :func:`model_entries` says asymvlm wrote; any other folder loses the entries ``ours(path)``
    accepts (a run's checkpoint folders, a tracker's event files) and, inside sub-folders that carry
    an asymvlm record, the recorded entries; everything else stays (a user's notes, also inside
    ``model/`` and ``checkpoints/``) and a warning names it. A ``model/`` folder without a record that
    holds anything but a model's files is a :class:`ConfigError` and nothing is removed: asymvlm
    cannot tell what is the user's. Empty folders left behind go.
    """
    import logging

    from asymvlm.io import MANIFEST_NAME, owned_entries

    out = Path(out)
    ours = ours or (lambda p: False)
    plan: list[Path] = []
    kept: list[str] = []
    folders: list[Path] = []

    def walk(folder: Path) -> None:
        record = owned_entries(folder)
        for p in sorted(folder.iterdir()):
            if ours(p) or (record is not None and p.name in record and p.name != MANIFEST_NAME):
                plan.append(p)
            elif p.is_dir() and not p.is_symlink():
                folders.append(p)
                walk(p)
            elif p.name == MANIFEST_NAME and record is not None:
                plan.append(p)  # re-checked below: it stays while a user's file does
            else:
                kept.append(str(p.relative_to(out)))

    for name in outputs:
        target = out / name
        if name == "model" and (target.is_dir() and not target.is_symlink()):
            owned, recorded = model_entries(target)
            present = sorted(p.name for p in target.iterdir())
            theirs = [n for n in present if n not in owned]
            if not recorded and theirs:
                raise ConfigError(
                    f"--overwrite: {target} holds {theirs[:4]}, which asymvlm did not write, and no record "
                    f"({MANIFEST_NAME}) of what it wrote there: nothing was removed; move those files out of it, "
                    "or choose a new output_dir"
                )
            plan += [target / n for n in present if n in owned and n != MANIFEST_NAME]
            kept += [f"{name}/{n}" for n in theirs]
            folders.append(target)
        elif name == "model" and (target.exists() or target.is_symlink()):
            raise ConfigError(f"--overwrite: {target} is not a folder asymvlm wrote: nothing was removed")
        elif target.is_dir() and not target.is_symlink():
            folders.append(target)
            walk(target)
        elif target.exists() or target.is_symlink():
            plan.append(target)
    keep_records = {Path(out / k).parent for k in kept}
    for p in plan:
        if p.name == MANIFEST_NAME and p.parent in keep_records:
            continue  # the record stays while the user's files do: a new save replaces the folder around them
        _remove(p)
    for folder in sorted(folders, key=lambda d: -len(d.parts)):  # empty folders go (sub-folders first)
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    if kept:
        logging.getLogger(__name__).warning(
            "--overwrite kept %d file(s) in %s that asymvlm did not write: %s%s",
            len(kept), out, ", ".join(kept[:6]), " ..." if len(kept) > 6 else "",
        )  # fmt: skip


def _json_kind(value: Any) -> str:
    """The JSON type of ``value`` as a config file holds it (int and float are one kind: a number)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "list"
    return "object" if isinstance(value, dict) else type(value).__name__


def _kind_mismatch(saved: Any, now: Any) -> str | None:
    """Why ``saved`` cannot be a value of the config key whose value in this run is ``now`` (another
    JSON type; null is a value a key may change to or from), or None."""
    a, b = _json_kind(saved), _json_kind(now)
    if "null" in (a, b):
        return None
    if a != b:
        return f"is a {a}, this run's is a {b}"
    if a == "list" and now:
        want = {_json_kind(x) for x in now}
        bad = [_json_kind(x) for x in saved if _json_kind(x) not in want]
        if bad:
            return f"holds a {bad[0]}, this run's holds {', '.join(sorted(want))} values"
    return None


def check_resume_config(
    saved: dict[str, Any],
    now: dict[str, Any],
    may_change: tuple[str, ...],
    where: Path,
    *,
    source: str | Path | None = None,
) -> None:
    """A resumed run is the same run: every key outside ``may_change`` must equal the saved one.

    ``source`` is the file the saved config was read from (default: ``where``); every message names
    it. A saved config that is not an object, lacks a key, has a key this version does not know, or
    holds a value of another JSON type is an :class:`ArtefactError` (the file was altered or written
    by another version); a key whose value differs is a :class:`ConfigError` naming the keys
    (old -> new) and asking for the same config.

    Example:
        >>> check_resume_config({"lr": 0.1, "seed": 0}, {"lr": 0.1, "seed": 0}, (), Path("run"))
        >>> check_resume_config({"lr": 0.1}, {"lr": 0.1, "seed": 0}, (), Path("run"), source="run/state.json")
        Traceback (most recent call last):
        ...
        asymvlm.errors.ArtefactError: run/state.json: config lacks the key 'seed'...
        >>> check_resume_config({"lr": 0.1}, {"lr": 0.2}, (), Path("run"), source="run/state.json")
        Traceback (most recent call last):
        ...
        asymvlm.errors.ConfigError: cannot resume run: run/state.json records another config; differing keys: lr...
    """
    source = source if source is not None else where
    altered = "the file was altered, or written by another asymvlm version: resume with that version, or start again"
    if not isinstance(saved, dict):
        raise ArtefactError(f"{source}: config is a {_json_kind(saved)}, not an object; {altered}")
    missing = sorted(k for k in now if k not in saved and k not in may_change)
    if missing:
        raise ArtefactError(f"{source}: config lacks the key {missing[0]!r}"
                            f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; {altered}")  # fmt: skip
    unknown = sorted((str(k) for k in saved if k not in now and k not in may_change), key=str)
    if unknown:
        raise ArtefactError(f"{source}: config.{unknown[0][:60]!r} is not a config key of this run; {altered}")
    for k in sorted(now):
        why = None if k in may_change or k not in saved else _kind_mismatch(saved[k], now[k])
        if why:
            raise ArtefactError(f"{source}: config.{k} {why}; {altered}")
    differ = sorted(k for k in set(saved) | set(now) if k not in may_change and saved.get(k) != now.get(k))
    if differ:
        shown = ", ".join(f"{k} ({_short(saved.get(k))} -> {_short(now.get(k))})" for k in differ[:6])
        raise ConfigError(
            f"cannot resume {where}: {source} records another config; differing keys: {shown}. Use the same config "
            f"(only {', '.join(may_change)} may change), or a new output_dir"
        )


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def config_fields(types: tuple[type, ...]) -> dict[str, type]:
    """``{field name: dataclass}`` over ``types``; a name in two of them is an error."""
    out = {}
    for klass in types:
        for f in dataclasses.fields(klass):
            if f.name in out:  # pragma: no cover - guarded by tests
                raise RuntimeError(f"duplicate config field {f.name}")
            out[f.name] = klass
    return out


def load_yaml(
    path: str | Path,
    types: tuple[type, ...] = (),
    prog: str = "asymvlm",
    known: Any = None,
) -> dict[str, Any]:
    """Read a flat YAML mapping of config keys; unknown keys are a :class:`ConfigError` naming them.
    The known keys are the fields of the dataclasses ``types``, or ``known``."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    except RecursionError:
        raise ConfigError(f"{path} is not valid YAML: nested too deeply") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text: {err}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys")
    unknown = sorted(set(doc) - set(known if known is not None else config_fields(types)))
    if unknown:
        raise ConfigError(f"{path}: unknown config key(s) {unknown}; see {prog} --help")
    return doc


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in ``--help`` (not for flags, nor where there is none, nor twice: a field whose
    default is ``None`` or ``""`` says in its help what it falls back to), the epilog as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.nargs == 0 or action.default in (None, [], "") or "(default:" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def argument_parser(
    types: tuple[type, ...], prog: str, description: str = "", epilog: str = ""
) -> argparse.ArgumentParser:
    """The flag parser of a command made of config dataclasses (``transformers.HfArgumentParser``):
    every field is a flag spelled with underscores or dashes (``--max_steps`` / ``--max-steps``),
    choices and defaults show in ``--help``, abbreviations are not accepted (``--max_step`` is an
    error, not ``--max_steps``), and a parse error is a :class:`ConfigError`, not an exit."""
    from transformers import HfArgumentParser

    class Parser(HfArgumentParser):
        def error(self, message: str):  # argparse would print the usage and exit
            raise ConfigError(message)

    return Parser(
        types, prog=prog, description=description, epilog=epilog, formatter_class=HelpFormatter, allow_abbrev=False
    )


def parse_dataclass_args(types: tuple[type, ...], argv: list[str] | None, prog: str) -> tuple[Any, ...]:
    """``[--config exp.yaml] [--flag value ...]`` into instances of ``types``: YAML values first,
    flags override them; unknown keys or flags, bad values and abbreviations are a :class:`ConfigError`."""
    config_fields(types)  # field names must be unique across the groups
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)
    return dataclasses_from_values(types, load_yaml(known.config, types, prog) if known.config else {}, prog, rest)


def dataclasses_from_values(
    types: tuple[type, ...], values: dict[str, Any], prog: str, argv: list[str] | None = None
) -> tuple[Any, ...]:
    """Instances of ``types`` from config ``values`` (keys already checked), overridden by flags in
    ``argv``: the parse behind :func:`parse_dataclass_args` and Flower's run config; bad values,
    unknown flags and abbreviations are a :class:`ConfigError`."""
    parser = argument_parser(types, prog)
    if values:
        parser.set_defaults(**values)
    try:
        *outputs, extra = parser.parse_args_into_dataclasses(args=argv or [], return_remaining_strings=True)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:  # a dataclass's own validation
        raise ConfigError(str(err)) from err
    if extra:
        raise ConfigError(f"unknown argument(s) {extra}; see {prog} --help")
    return tuple(o for o in outputs if dataclasses.is_dataclass(o))
