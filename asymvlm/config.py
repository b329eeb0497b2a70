"""Configuration shared by every package: dataclass configs parsed from YAML and flags.

Configs are frozen dataclasses with ``metadata={"help": ...}`` on every field, parsed by
``transformers.HfArgumentParser``: values come from a YAML file (``--config exp.yaml``), then
command-line flags override them. Field names are unique across the dataclasses of one command,
so a flat YAML file maps onto them; unknown YAML keys and flags are a :class:`ConfigError` that
names the key. ``asymvlm-train`` and ``asymvlm-federate`` share :class:`DataArguments` (where the
embeddings come from), the head's :class:`~asymvlm.heads.HeadConfig` (parsed directly; its ``dim``
comes from the data, :data:`FROM_DATA`), and, as the bases of each command's own arguments,
:class:`LoraArguments` (what is trained, the LoRA adapter) and :class:`RunArguments` (output folder,
seed, resume, overwrite, progress, init_from, mask_file, evaluation cadence, checkpoints kept).
What a run does with its output folder and its resume (``claim_output_dir``,
``check_resume_config``, ...) lives in :mod:`asymvlm.runs`.

Example:
    >>> (data,) = parse_dataclass_args((DataArguments,), ["--train_images", "100"], "demo")
    >>> data.train_images, data.dataset
    (100, 'shapeworld')
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from asymvlm.errors import ConfigError
from asymvlm.plugins import data_world

__all__ = [
    "ConfigError",
    "DataArguments",
    "FROM_DATA",
    "LoraArguments",
    "RunArguments",
    "command_default",
    "check_choice",
    "check_fields",
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
            "help": "Frozen encoder spec (asymvlm.load_encoder grammar); needed to build a cache and to train a "
            "LoRA adapter ('' = the toy CLIP of the ShapeWorld version: open_clip:asymvlm-toy-clip-v3, or -clip "
            "for shapeworld:2)."
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
        # the data world of the dataset (a plug-in, asymvlm.plugins: ShapeWorld from asymvlm.worlds)
        # fills in the encoder its data were made for and rejects what it cannot serve
        world = data_world(self.dataset)
        for name, value in (world.resolve(self) if world is not None else {}).items():
            object.__setattr__(self, name, value)
        unknown = [c for c in self.styles() if world is not None and c not in world.caption_styles]
        if unknown:
            raise ConfigError(f"unknown caption_styles {unknown}; choose from {list(world.caption_styles)}")

    def styles(self) -> tuple[str, ...]:
        """The caption styles of the training split: those named, or (``caption_styles`` empty)
        every style of the dataset's data world (ShapeWorld's)."""
        picked = tuple(c.strip() for c in self.caption_styles.split(",") if c.strip())
        if picked:
            return picked
        world = data_world(self.dataset)
        return tuple(world.caption_styles) if world is not None else ()


# Fields no flag or YAML key sets: a run takes them from its data (the head's embedding dimension,
# ``dataclasses.replace(head, dim=data.dim)``). HeadConfig is parsed directly; its ``dim`` is not a flag.
FROM_DATA = frozenset({"dim"})


def command_default(base: type, name: str, default: Any) -> Any:
    """A field of ``base`` redeclared with another default for one command (its help and checks
    stay those of ``base``): ``output_dir: str = command_default(RunArguments, "output_dir", "runs/x")``."""
    return field(default=default, metadata=base.__dataclass_fields__[name].metadata)


# LoraArguments' default targets where they are not asymvlm.lora's: open_clip's attention is an
# nn.MultiheadAttention (no Linear q/k/v), so the default is the Linear layers of every text block's MLP
MLP_TARGETS = {"open_clip": r"transformer\.resblocks\.\d+\.mlp\.(c_fc|c_proj)"}


@dataclass(frozen=True)
class LoraArguments:
    """What is trained, and the text-tower LoRA adapter (one declaration for ``asymvlm-train`` and
    ``asymvlm-federate``: both commands' argument classes are LoraArguments).

    Example:
        >>> lora = LoraArguments(trainable="both", lora_r=4)
        >>> lora.lora_config("open_clip")["r"], lora.target_modules("open_clip").endswith("(c_fc|c_proj)")
        (4, True)
    """

    trainable: Literal["head", "lora", "both"] = field(
        default="head",
        metadata={
            "help": "What is trained (and, federated, sent): 'head' (the text head and temperature on cached "
            "embeddings, the fast path), 'lora' (a peft LoRA adapter on the frozen text tower; the head stays as it "
            "starts) or 'both'. Image embeddings always come from the cache."
        },
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; the update is scaled by alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout, in [0, 1)."})
    lora_target_modules: str = field(
        default="",
        metadata={
            "help": "Regex (full match) of the text-tower Linear modules to adapt; empty = open_clip: every text "
            "block's MLP (mlp.c_fc, mlp.c_proj); transformers: every text block's q/k/v/out_proj and mlp.fc1/fc2."
        },
    )

    def __post_init__(self) -> None:
        check_fields(self)
        self._check_lora()

    def _check_lora(self) -> None:
        if self.lora_r < 1:
            raise ConfigError(f"lora_r must be >= 1, got {self.lora_r}")
        if not (self.lora_alpha > 0 and math.isfinite(self.lora_alpha)):
            raise ConfigError(f"lora_alpha must be > 0 and finite, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")

    def target_modules(self, backend: str) -> str:
        """The regex of the modules to adapt on an encoder of ``backend`` (``lora_target_modules``,
        or the default: on open_clip the Linear layers of every text block's MLP, the layers every
        federated LoRA aggregation can handle; on transformers :data:`asymvlm.lora.DEFAULT_TARGETS`)."""
        from asymvlm.lora import DEFAULT_TARGETS

        if self.lora_target_modules:
            return self.lora_target_modules
        return MLP_TARGETS.get(backend) or DEFAULT_TARGETS[backend]

    def lora_config(self, backend: str) -> dict[str, Any]:
        """The keyword arguments of :func:`asymvlm.lora.add_text_lora`."""
        return {
            "r": self.lora_r,
            "alpha": self.lora_alpha,
            "dropout": self.lora_dropout,
            "target_modules": self.target_modules(backend),
        }


@dataclass(frozen=True)
class RunArguments:
    """Run control, one meaning per name for ``asymvlm-train`` and ``asymvlm-federate`` (both
    commands' argument classes are RunArguments; a command may only change a default, with
    :func:`command_default`).

    The run's iterations are optimizer steps (``asymvlm-train``) or rounds (``asymvlm-federate``);
    ``eval_every`` counts them.

    Example:
        >>> run = RunArguments(eval_every=3)
        >>> [n for n in range(1, 8) if run.evaluates_at(n, last=7)]
        [3, 6, 7]
    """

    # what may change between a run and its --resume (plus each command's own: rounds, log_every...)
    RESUMABLE: ClassVar[tuple[str, ...]] = ("output_dir", "resume", "overwrite", "progress", "eval_every", "keep_last")

    output_dir: str = field(
        default="runs/asymvlm",
        metadata={"help": "Run folder: checkpoints/, the run's log (train_log.jsonl / metrics.jsonl) and model/."},
    )
    seed: int = field(
        default=0, metadata={"help": "Seed of everything random in the run (except secure DP noise), >= 0."}
    )
    init_from: str = field(
        default="",
        metadata={
            "help": "A saved AsymVLM (a folder or a Hub id, user/repo[@revision]) whose head and temperature (and "
            "text adapter, asymvlm-train) start the run."
        },
    )
    mask_file: str = field(
        default="",
        metadata={
            "help": "safetensors of boolean masks {parameter name: mask} (from calibrate_mask, e.g. TaLoS): updates "
            "and weight decay are zero outside the mask; federated clients send only the masked values. "
            "Parameters without a mask train normally."
        },
    )
    eval_every: int = field(
        default=0,
        metadata={
            "help": "Evaluate every N iterations (optimizer steps / rounds) and after the last; 0: after the last "
            "only; -1: never."
        },
    )
    keep_last: int = field(
        default=2, metadata={"help": "Checkpoints kept, the latest (>= 1: the last is what --resume needs)."}
    )
    resume: bool = field(
        default=False, metadata={"help": "Resume from the latest checkpoint in output_dir (its config must match)."}
    )
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "Start afresh in a used output_dir: removes what a run writes there (checkpoints/, its log, "
            "model/), nothing else."
        },
    )
    progress: bool = field(
        default=True,
        metadata={"help": "Progress bar on the main process (off: one summary line per logged step / round)."},
    )

    def __post_init__(self) -> None:
        check_fields(self)
        self._check_run()

    def _check_run(self) -> None:
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")
        if self.eval_every < -1:
            raise ConfigError(
                f"eval_every must be >= -1 (0: after the last iteration only; -1: never), got {self.eval_every}"
            )
        if self.keep_last < 1:
            raise ConfigError(
                f"keep_last must be >= 1 (the latest checkpoint is what --resume needs), got {self.keep_last}"
            )
        if self.resume and self.overwrite:
            raise ConfigError("resume and overwrite exclude each other: continue the run, or replace it")
        if not self.output_dir:
            raise ConfigError("output_dir must not be empty")

    def evaluates_at(self, done: int, last: int) -> bool:
        """Whether the run evaluates after iteration ``done`` (1-based) of ``last``."""
        if self.eval_every < 0:
            return False
        return (self.eval_every > 0 and done % self.eval_every == 0) or done == last


def config_fields(types: tuple[type, ...]) -> dict[str, type]:
    """``{field name: dataclass}`` over ``types`` (the config keys: :data:`FROM_DATA` fields are
    none); a name in two of them is an error."""
    out = {}
    for klass in types:
        for f in dataclasses.fields(klass):
            if f.name in FROM_DATA:
                continue
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

        def _add_dataclass_arguments(self, dtype: type) -> None:
            # HfArgumentParser's, except: a FROM_DATA field is no flag (its default fills the
            # namespace), and a variadic tuple (HeadConfig.hidden_dims) is a list flag
            hints = typing.get_type_hints(dtype)
            named = hasattr(dtype, "_argument_group_name")
            group = self.add_argument_group(dtype._argument_group_name) if named else self
            for f in dataclasses.fields(dtype):
                if not f.init:
                    continue
                if f.name in FROM_DATA:
                    self.set_defaults(**{f.name: f.default})
                    continue
                tp = hints[f.name]
                if typing.get_origin(tp) is tuple and len(typing.get_args(tp)) == 2 and typing.get_args(tp)[1] is ...:
                    tp = list[typing.get_args(tp)[0]]
                flag = copy.copy(f)
                flag.type = tp
                if isinstance(f.default, tuple):  # argparse reads a list flag's default from a factory
                    flag.default, flag.default_factory = dataclasses.MISSING, functools.partial(list, f.default)
                self._parse_dataclass_field(group, flag)

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
