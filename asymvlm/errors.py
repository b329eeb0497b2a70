"""Every error the package raises on purpose, under one root: :class:`AsymVLMError`.

Catch ``AsymVLMError`` to handle any of them; the console scripts print its message as one line
and exit 2 (``asymvlm.cli``). Each class also derives from the builtin a caller would expect
(``ValueError``, ``ImportError``, ``FileNotFoundError``, ``OSError``), so existing ``except
ValueError`` code keeps working.

=============================  ===================================================================
class                          raised when
=============================  ===================================================================
:class:`ConfigError`           a config key, option or value is unknown or invalid (names it)
:class:`MissingExtraError`     an optional dependency is missing (names the extra to install)
:class:`ArtefactError`         a saved file is missing, corrupt, truncated or of another type
:class:`CacheMismatchError`    an embedding cache was built by another encoder or dataset
:class:`EncoderMismatchError`  a saved model is loaded with another encoder than it was trained on
:class:`DatasetLayoutError`    a local dataset is not laid out as its loader expects
:class:`InputError`            inputs that must fit together do not (base of the two below)
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
    "ArtefactError",
    "CacheMismatchError",
    "EncoderMismatchError",
    "DatasetLayoutError",
    "InputError",
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


class ArtefactError(AsymVLMError, ValueError):
    """A saved artefact is missing, corrupt, truncated or of another type (the message names the file)."""


class CacheMismatchError(ArtefactError):
    """An embedding cache was built by another encoder (or from another dataset) than requested."""


class EncoderMismatchError(ArtefactError):
    """A saved model is loaded with another encoder than the one it was trained on."""


class DatasetLayoutError(AsymVLMError, FileNotFoundError):
    """A local dataset is not laid out as its loader expects (the message shows the layout)."""


class InputError(AsymVLMError, ValueError):
    """Inputs that must fit together (client updates, merge inputs) do not; nothing is written."""


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
