"""How artefacts are named: Hugging Face Hub ids and the public names of local paths.

A saved artefact is named by a local path or by a Hub id (``user/repo``, optionally
``user/repo@revision``): :func:`looks_like_hub_id`, :func:`split_revision` and :func:`check_revision`
tell them apart before anything touches the Hub cache (:func:`asymvlm.hub.resolve_artefact`).
What is shared (a model card, a report, a server's response) names no local path:
:func:`public_name` and :func:`public_text` name each absolute path by its last two parts.
:mod:`asymvlm.hub` exports every name of this module.

Example:
    >>> looks_like_hub_id("alice/heads"), split_revision("alice/heads@v1"), public_name("/home/alice/runs/m")
    (True, ('alice/heads', 'v1'), 'runs/m')
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from asymvlm.errors import ArtefactError

__all__ = ["looks_like_hub_id", "check_revision", "split_revision", "public_name", "public_text"]


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def looks_like_hub_id(name: str) -> bool:
    """``owner/name`` with Hub-valid characters (no further slashes, no ``..``)."""
    return bool(_HUB_ID.match(name)) and ".." not in name and not name.endswith((".", "-"))


_REVISION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._/+-]{0,254}")


def check_revision(revision: Any) -> str:
    """``revision`` when it is a plain Hub revision (a branch, tag, ``refs/pr/N`` or commit hash);
    anything shaped like a path (``..``, a leading ``/``, a backslash, an empty part, whitespace or
    control characters) is an :class:`~asymvlm.errors.ArtefactError`, before any lookup: the Hub
    cache keeps refs as files (``refs/<revision>``), so such a name would reach a local folder.

    Example:
        >>> check_revision("refs/pr/1")
        'refs/pr/1'
    """
    text = revision if isinstance(revision, str) else None
    if (
        text is None
        or not _REVISION.fullmatch(text)
        or ".." in text
        or "//" in text
        or text.endswith(("/", ".", ".lock"))
        or any(part.startswith(".") for part in text.split("/"))
    ):
        raise ArtefactError(
            f"revision {revision!r} is not a Hub revision (a branch, tag, refs/pr/N or commit hash; no '..', "
            "no leading '/' or '.', no backslash or whitespace)"
        )
    return text


def split_revision(name: str) -> tuple[str, str | None]:
    """``"user/repo@v1"`` -> ``("user/repo", "v1")``; anything else -> ``(name, None)``.

    Example:
        >>> split_revision("alice/heads@refs/pr/1"), split_revision("alice/heads"), split_revision("a/b/c@v1")
        (('alice/heads', 'refs/pr/1'), ('alice/heads', None), ('a/b/c@v1', None))
    """
    repo, sep, rev = str(name).partition("@")
    if sep and rev and looks_like_hub_id(repo) and not any(c.isspace() for c in rev):
        return repo, rev
    return str(name), None


def public_name(value: Any) -> Any:
    """A path as a public card names it: a Hub id (``user/repo[@rev]``) or a bare name as given, a
    local path by its last two parts (``/home/alice/runs/base/model`` -> ``base/model``).

    Example:
        >>> public_name("alice/heads@v1"), public_name("/home/alice/runs/base/model"), public_name("")
        ('alice/heads@v1', 'base/model', '')
    """
    if value is None or value == "":
        return value
    text = str(value)
    name, _ = split_revision(text)
    if looks_like_hub_id(name) and not Path(text).exists():
        return text
    parts = Path(text).parts
    return "/".join(p for p in parts[-2:] if p not in ("/", "\\")) if len(parts) > 1 else text


# an absolute path inside a string: a "/" that starts a path (not "//", not inside a word, a URL or
# a relative path), or a Windows drive or home folder; it runs to the next whitespace, quote, ":" or ","
_ABSOLUTE = re.compile(r"(?<![\w./~-])(?:/(?!/)|~/|[A-Za-z]:[\\/])[^\s'\",:;|()\[\]{}<>`]*")


def public_text(value: Any) -> Any:
    """``value`` with every absolute path in it named by its last two parts (:func:`public_name`):
    strings (also inside specs such as ``open_clip:local-dir:/srv/models/clip`` -> ``open_clip:local-dir:
    models/clip``, ``imagefolder:/data/photos``), mapping keys and values, list items; anything else
    as it is. What a card, a report or a response shows names no server path.

    Example:
        >>> public_text({"spec": "open_clip:local-dir:/srv/team/models/clip", "url": "https://x.org/a/b"})
        {'spec': 'open_clip:local-dir:models/clip', 'url': 'https://x.org/a/b'}
    """
    if isinstance(value, str):
        return _ABSOLUTE.sub(lambda m: _tail(m.group(0)), value.replace("file:///", "/"))
    if isinstance(value, Mapping):
        return {public_text(k): public_text(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [public_text(v) for v in value]
    return value


def _tail(path: str) -> str:
    parts = [p for p in re.split(r"[\\/]+", path) if p and p != "~" and not re.fullmatch(r"[A-Za-z]:", p)]
    return "/".join(parts[-2:]) if parts else path
