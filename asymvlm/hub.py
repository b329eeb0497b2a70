"""Saved artefacts from a local folder or a Hugging Face Hub model id, alike.

:func:`resolve_artefact` is what :meth:`asymvlm.AsymVLM.from_pretrained` calls first: an existing
path is used as it is; otherwise a name shaped like a Hub id (``user/repo``) is fetched with
``huggingface_hub.snapshot_download`` into the Hub cache — which honours ``HF_HUB_OFFLINE`` (then
only the local cache is read) and ``HF_HUB_CACHE`` / ``cache_dir`` — and the snapshot folder is
used. Anything else is one :class:`~asymvlm.errors.ArtefactError` line saying what was tried.

Example::

    model = AsymVLM.from_pretrained("alice/asymvlm-vmf-coco")            # the Hub (or its cache)
    model = AsymVLM.from_pretrained("alice/asymvlm-vmf-coco", revision="v1")
    model = AsymVLM.from_pretrained("runs/vmf/model")                     # a folder here
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from asymvlm.errors import ArtefactError

__all__ = ["resolve_artefact", "looks_like_hub_id"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def looks_like_hub_id(name: str) -> bool:
    """``owner/name`` with Hub-valid characters (no further slashes, no ``..``)."""
    return bool(_HUB_ID.match(name)) and ".." not in name and not name.endswith((".", "-"))


def resolve_artefact(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    what: str = "saved AsymVLM",
) -> Path:
    """The local folder of ``name_or_path``: the path itself when it exists, else the Hub snapshot
    of the model id (downloaded, or from the cache when offline)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if revision is not None:
            raise ArtefactError(f"revision={revision!r} is for Hub ids; {path} is a local folder")
        return path
    name = str(name_or_path)
    if not looks_like_hub_id(name):
        raise ArtefactError(f"no {what} at {path}")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(
            name, revision=revision, cache_dir=None if cache_dir is None else str(cache_dir), token=token
        )
    except LocalEntryNotFoundError as err:
        offline = " (HF_HUB_OFFLINE is set: only the local Hub cache was read)" if constants.HF_HUB_OFFLINE else ""
        raise ArtefactError(
            f"no {what} at {path}, and the Hub model {name!r}{'@' + revision if revision else ''} is not in the "
            f"local Hub cache{offline}: {err}"
        ) from err
    except (HfHubHTTPError, HFValidationError, OSError, ValueError) as err:
        raise ArtefactError(f"no {what} at {path}, and the Hub model {name!r} could not be fetched: {err}") from err
    return Path(folder)
