"""What the offline worlds register in the core's registries.

Imported by :func:`asymvlm.plugins.load_plugins` through the entry point declared in
``pyproject.toml`` (``[project.entry-points."asymvlm.plugins"] worlds = "asymvlm.worlds.plugin"``),
the first time a core lookup needs it:

* the toy CLIPs' pretrained tag: ``load_encoder("open_clip:asymvlm-toy-clip-v3", pretrained="shapeworld")``
  (and ``asymvlm-toy-clip`` for ShapeWorld v2) builds the toy CLIP once (:func:`asymvlm.worlds.toyclip.ensure_toy_clip`)
  and loads it; any other tag of these architectures is an error;
* the ShapeWorld data world (:data:`SHAPEWORLD`) of :class:`asymvlm.config.DataArguments`: the dataset
  names ``shapeworld`` / ``shapeworld:<version>``, its caption styles, the toy CLIP of the dataset's world
  as the default encoder, and the check that a toy CLIP is not used on another world's data. It is the
  default world: local dataset specs take its caption styles and its default encoder too.

Example:
    >>> from asymvlm.config import DataArguments
    >>> DataArguments(dataset="shapeworld:2").encoder, DataArguments().encoder
    ('open_clip:asymvlm-toy-clip', 'open_clip:asymvlm-toy-clip-v3')
"""

from __future__ import annotations

from typing import Any

from asymvlm.encoders import register_pretrained
from asymvlm.errors import ConfigError
from asymvlm.plugins import DataWorld, register_data_world
from asymvlm.worlds import shapeworld as sw
from asymvlm.worlds import toyclip

__all__ = ["SHAPEWORLD", "resolve_data_arguments"]

# `load_encoder(TOY_CLIP_SPEC, pretrained=TOY_CLIP_TAG)` builds (once) and loads this directory
register_pretrained(toyclip.TOY_CLIP_NAME, toyclip.TOY_CLIP_TAG, lambda: toyclip.ensure_toy_clip(), exclusive=True)
register_pretrained(
    toyclip.TOY_CLIP_V3_NAME,
    toyclip.TOY_CLIP_TAG,
    lambda: toyclip.ensure_toy_clip(toyclip.ToyCLIPRecipe(world_version=3)),
    exclusive=True,
)


def resolve_data_arguments(args: Any) -> dict[str, Any]:
    """The fields ShapeWorld fills in on :class:`asymvlm.config.DataArguments` ``args``: the encoder,
    when none is given, is the toy CLIP trained on the world the data come from (the default world's
    for a dataset that is not ShapeWorld).

    Raises:
        ConfigError: an unknown ShapeWorld version, or a toy CLIP trained on another version than the
            dataset's.
    """
    version = sw.dataset_version(args.dataset)
    toy = toyclip.TOY_CLIP_SPECS
    encoder = args.encoder or toy[version if version is not None else sw.DEFAULT_DATASET_VERSION]
    if version is not None and encoder in toy.values() and encoder != toy[version]:
        raise ConfigError(
            f"the toy CLIP {encoder} was trained on another ShapeWorld version than {args.dataset!r} "
            f"(version {version}); use --encoder {toy[version]}"
        )
    return {"encoder": encoder}


SHAPEWORLD = register_data_world(
    DataWorld("shapeworld", tuple(sw.CAPTION_STYLES), resolve_data_arguments, default=True)
)
