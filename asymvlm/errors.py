"""Every error the package raises on purpose, under one root: :class:`AsymVLMError`.

Catch ``AsymVLMError`` to handle any of them; the console scripts print its message as one line
and exit 2 (``asymvlm.cli``). Each class also derives from the builtin a caller would expect
(``ValueError``, ``TypeError``, ``ImportError``, ``FileNotFoundError``, ``OSError``), so existing
``except ValueError`` code keeps working.

A user's mistake (an option, an input, a file) raises one of these where it is found; a plain
``ValueError`` / ``TypeError`` / ``RuntimeError`` from the package is a bug (a broken internal
invariant) and the console scripts show its traceback.

=============================  ===================================================================
class                          raised when
=============================  ===================================================================
:class:`ConfigError`           a config key, option or value is unknown or invalid (names it)
:class:`MissingExtraError`     an optional dependency is missing (names the extra to install)
:class:`EncoderLoadError`      a pretrained encoder cannot be loaded (offline, unknown checkpoint)
:class:`ArtefactError`         a saved file is missing, corrupt, truncated or of another type
:class:`CacheMismatchError`    an embedding cache was built by another encoder or dataset
:class:`EncoderMismatchError`  a saved model is loaded with another encoder than it was trained on
:class:`DatasetLayoutError`    a local dataset is not laid out as its loader expects
:class:`InputError`            inputs do not fit: shapes, NaN/inf, non-unit vectors, empty or
                               mismatched inputs (base of the three below)
:class:`InputTypeError`        an input (a dataset row, an embedding matrix) is of the wrong type
:class:`ClientUpdateError`     a federated client's update does not fit the global state
:class:`MergeInputError`       the inputs of a merge do not fit together
:class:`TrainingDiverged`      the training loss became NaN or infinite
:class:`CheckpointWriteError`  a checkpoint could not be written (the previous one is intact)
=============================  ===================================================================

Example:
    >>> issubclass(ConfigError, AsymVLMError) and issubclass(ConfigError, ValueError)
    True
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AsymVLMError",
    "ConfigError",
    "MissingExtraError",
    "EncoderLoadError",
    "ArtefactError",
    "CacheMismatchError",
    "EncoderMismatchError",
    "DatasetLayoutError",
    "InputError",
    "InputTypeError",
    "ClientUpdateError",
    "MergeInputError",
    "TrainingDiverged",
    "CheckpointWriteError",
]


class AsymVLMError(Exception):
    """The root of every error the package raises on purpose."""


class ConfigError(AsymVLMError, ValueError):
    """A configuration key, option or value is invalid (the message names it and what is valid)."""


class MissingExtraError(AsymVLMError, ImportError):
    """An optional dependency is missing; the message names the extra to install."""


class EncoderLoadError(AsymVLMError, OSError, RuntimeError):
    """A pretrained encoder cannot be loaded (no network, an unknown or unreadable checkpoint); the
    message says how to load it offline. An ``OSError`` (what transformers raises) and a ``RuntimeError``
    (what open_clip raises)."""


class ArtefactError(AsymVLMError, ValueError):
    """A saved artefact is missing, corrupt, truncated or of another type (the message names the file)."""


class CacheMismatchError(ArtefactError):
    """An embedding cache was built by another encoder (or from another dataset) than requested."""


class EncoderMismatchError(ArtefactError):
    """A saved model is loaded with another encoder than the one it was trained on."""


class DatasetLayoutError(AsymVLMError, FileNotFoundError):
    """A local dataset is not laid out as its loader expects (the message shows the layout)."""


class InputError(AsymVLMError, ValueError):
    """Inputs do not fit: a shape, a dimension, NaN/inf, a non-unit vector, an empty batch, inputs
    that must fit together (client updates, merge inputs) and do not; nothing is written."""


class InputTypeError(InputError, TypeError):
    """An input is of the wrong type (a dataset row's captions, a non-float embedding matrix)."""


class ClientUpdateError(InputError):
    """A client's update does not fit the global state or is not finite (names client and key)."""

    def __init__(self, message: str, client: Any = None, key: str | None = None):
        super().__init__(message)
        self.client = client
        self.key = key


class MergeInputError(InputError):
    """The inputs of a merge do not fit together (keys, shapes, bases, values); nothing is written."""


class TrainingDiverged(AsymVLMError, FloatingPointError):
    """The loss became NaN or infinite (the message names the step and the last good checkpoint)."""


class CheckpointWriteError(AsymVLMError, OSError):
    """A checkpoint could not be written; the previous one is intact."""
