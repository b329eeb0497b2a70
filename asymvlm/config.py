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

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asymvlm.errors import ConfigError

__all__ = ["ConfigError", "DataArguments", "check_choice", "config_fields", "load_yaml", "parse_dataclass_args"]


def check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of {allowed}")


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
            "help": "Used when --cache_dir is empty: 'shapeworld' or a local dataset spec "
            "(imagefolder:<root>, coco-karpathy:<json>:<root>[:split], coco2017:<json>:<dir>, "
            "flickr30k:<json>:<dir>[:split])."
        },
    )
    encoder: str = field(
        default="open_clip:asymvlm-toy-clip",
        metadata={
            "help": "Frozen encoder spec (asymvlm.load_encoder grammar); needed to build a cache and for mode=lora."
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
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.train_images < 1 or self.eval_images < 0:
            raise ConfigError("train_images must be >= 1 and eval_images >= 0")
        from asymvlm.shapeworld import CAPTION_STYLES

        unknown = [c for c in self.styles() if c not in CAPTION_STYLES]
        if unknown:
            raise ConfigError(f"unknown caption_styles {unknown}; choose from {list(CAPTION_STYLES)}")

    def styles(self) -> tuple[str, ...]:
        """The ShapeWorld caption styles of the training split (all when ``caption_styles`` is empty)."""
        from asymvlm.shapeworld import CAPTION_STYLES

        picked = tuple(c.strip() for c in self.caption_styles.split(",") if c.strip())
        return picked or tuple(CAPTION_STYLES)


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
    if not isinstance(doc, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys")
    unknown = sorted(set(doc) - set(known if known is not None else config_fields(types)))
    if unknown:
        raise ConfigError(f"{path}: unknown config key(s) {unknown}; see {prog} --help")
    return doc


def parse_dataclass_args(types: tuple[type, ...], argv: list[str] | None, prog: str) -> tuple[Any, ...]:
    """``[--config exp.yaml] [--flag value ...]`` into instances of ``types`` (HfArgumentParser):
    YAML values first, flags override them; unknown keys or flags are a :class:`ConfigError`."""
    import argparse

    from transformers import HfArgumentParser

    config_fields(types)  # field names must be unique across the groups
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)
    parser = HfArgumentParser(types, prog=prog)
    if known.config:
        parser.set_defaults(**load_yaml(known.config, types, prog))
    try:
        *outputs, extra = parser.parse_args_into_dataclasses(args=rest, return_remaining_strings=True)
    except ValueError as err:  # a dataclass's own validation
        raise ConfigError(str(err)) from err
    if extra:
        raise ConfigError(f"unknown argument(s) {extra}; see {prog} --help")
    return tuple(o for o in outputs if dataclasses.is_dataclass(o))
