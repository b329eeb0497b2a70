"""Plug-ins: layers above the core that add to its registries, without the core importing them.

The core (``asymvlm``) imports no layer above it (``tests/test_layering.py``). A layer that adds
entries to the core's registries declares a module under the entry-point group
:data:`PLUGIN_GROUP` of its distribution; asymvlm's own offline worlds do, in ``pyproject.toml``::

    [project.entry-points."asymvlm.plugins"]
    worlds = "asymvlm.worlds.plugin"

:func:`load_plugins` imports every module declared there, once per process, the first time a
lookup needs them: the encoders' local pretrained tags (``load_encoder("open_clip:asymvlm-toy-clip-v3",
pretrained="shapeworld")``) and the data worlds of :class:`asymvlm.config.DataArguments`
(``dataset="shapeworld"``). The module is named by a string in the package metadata, not by an import,
and another distribution can add its own worlds or encoders the same way.

A data world (:class:`DataWorld`, :func:`register_data_world`) is what a generated dataset brings
to the shared data arguments: the dataset names it owns, its caption styles (an empty
``caption_styles`` means all of them) and a ``resolve`` hook that fills in what the arguments leave
empty (the encoder its data were made for) and rejects what it cannot serve.

Example:
    >>> from asymvlm.config import DataArguments
    >>> world = data_world("shapeworld:2")   # loads the plug-ins: the ShapeWorld world of asymvlm.worlds
    >>> world.name, world.caption_styles[0], DataArguments(dataset="shapeworld:2").encoder
    ('shapeworld', 'plain', 'open_clip:asymvlm-toy-clip')
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, distributions
from typing import Any

from asymvlm.errors import ConfigError

__all__ = [
    "PLUGIN_GROUP",
    "CARD_GROUP",
    "declared_plugins",
    "load_plugins",
    "DataWorld",
    "register_data_world",
    "data_world",
    "DATA_WORLDS",
]

PLUGIN_GROUP = "asymvlm.plugins"
# the modules that register model-card kinds and artefact files (asymvlm.cards) when imported: the
# federated checkpoint writer and the merge writers declare themselves here in pyproject.toml
CARD_GROUP = "asymvlm.cards"

_LOCK = threading.RLock()
_STATE: dict[str, dict[str, bool]] = {}


def declared_plugins(group: str = PLUGIN_GROUP) -> list[EntryPoint]:
    """The entry points of ``group`` (default :data:`PLUGIN_GROUP`) over every installed
    distribution, one per name (the first found), sorted by name. Every distribution is read, as
    pluggy does, not the first of each name: a stale ``asymvlm.egg-info`` left in the working
    directory (ahead of the installed metadata on ``sys.path``) must not hide the installed plug-ins."""
    found: dict[str, EntryPoint] = {}
    for dist in distributions():
        for ep in dist.entry_points:
            if ep.group == group:
                found.setdefault(ep.name, ep)
    return [found[name] for name in sorted(found)]


def load_plugins(group: str = PLUGIN_GROUP) -> None:
    """Import every module declared under the entry-point group ``group`` (default
    :data:`PLUGIN_GROUP`; :data:`CARD_GROUP` for the writers of model-card kinds), once per process
    and group (later calls return at once). A plug-in that fails to import raises here, and the next
    call tries again. Called by the core's registry lookups; a plug-in's own import may call it
    (it returns at once while the plug-ins load)."""
    state = _STATE.setdefault(group, {"loaded": False, "loading": False})
    if state["loaded"]:
        return
    with _LOCK:
        if state["loaded"] or state["loading"]:
            return
        state["loading"] = True
        try:
            for ep in declared_plugins(group):
                ep.load()
            state["loaded"] = True
        finally:
            state["loading"] = False


@dataclass(frozen=True)
class DataWorld:
    """A generated dataset as the shared data arguments see it.

    Attributes:
        name: the dataset name it owns: ``name`` itself and ``name:<variant>`` (``shapeworld``,
            ``shapeworld:2``).
        caption_styles: every caption style it generates; an empty ``caption_styles`` argument
            means all of them, and any other name is a :class:`~asymvlm.errors.ConfigError`.
        resolve: ``DataArguments -> {field: value}``: the fields to fill in (the encoder its data
            were made for, when none is given); raises a :class:`~asymvlm.errors.ConfigError` on a
            combination it cannot serve (an unknown variant, an encoder made for another variant).
        default: the world of every dataset name no world owns (a local dataset spec): its
            caption styles and defaults apply there too.
    """

    name: str
    caption_styles: tuple[str, ...]
    resolve: Callable[[Any], dict[str, Any]] = field(default=lambda args: {})
    default: bool = False

    def owns(self, dataset: str) -> bool:
        """Whether the dataset name ``dataset`` is this world's."""
        return isinstance(dataset, str) and dataset.partition(":")[0] == self.name


DATA_WORLDS: dict[str, DataWorld] = {}


def register_data_world(world: DataWorld) -> DataWorld:
    """Add a data world (a plug-in calls this when :func:`load_plugins` imports it); registering a
    name again replaces its world. A second default world is a :class:`~asymvlm.errors.ConfigError`."""
    other_default = [w.name for w in DATA_WORLDS.values() if w.default and w.name != world.name]
    if world.default and other_default:
        raise ConfigError(f"data world {world.name!r}: {other_default[0]!r} is the default world already")
    DATA_WORLDS[world.name] = world
    return world


def data_world(dataset: str) -> DataWorld | None:
    """The data world of a dataset name: the world that owns it, else the default world (for a
    local dataset spec), else None (no plug-in registers one)."""
    load_plugins()
    for world in DATA_WORLDS.values():
        if world.owns(dataset):
            return world
    return next((w for w in DATA_WORLDS.values() if w.default), None)
