"""Offline worlds and toy encoders: plug-ins of the core.

The layer above the model (``asymvlm``) that makes the package run with nothing downloaded:

* :mod:`asymvlm.worlds.shapeworld`: ShapeWorld, captioned images whose captions have a known
  ambiguity; one API over its versions (:mod:`~asymvlm.worlds.shapeworld.v2`,
  :mod:`~asymvlm.worlds.shapeworld.v3`);
* :mod:`asymvlm.worlds.toyclip`: the toy CLIP pretrained on ShapeWorld, the offline default encoder;
* :mod:`asymvlm.worlds.data`: dataset specs (local COCO, Flickr30k, image folders) and
  :func:`~asymvlm.worlds.data.cache_for_config`, the embedding cache a config names.

The core never imports this layer. The worlds register themselves in the core's registries from
:mod:`asymvlm.worlds.plugin` (the toy CLIPs' pretrained tag ``shapeworld`` in
:func:`asymvlm.encoders.register_pretrained`, the ShapeWorld data world of
:class:`asymvlm.config.DataArguments` in :func:`asymvlm.plugins.register_data_world`), which the
core's lookups import through the entry point ``asymvlm.plugins`` (:func:`asymvlm.plugins.load_plugins`).
This package's ``__init__`` imports nothing, so ``python -m asymvlm.worlds.toyclip`` runs cleanly.
"""

__all__ = ["shapeworld", "toyclip", "data", "plugin"]
