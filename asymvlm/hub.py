"""Sharing saved artefacts the way the Hugging Face ecosystem does: loading by Hub id, model cards,
and pushing to the Hub.

**Loading.** :func:`resolve_artefact` is what every reader of a saved artefact calls first
(:meth:`asymvlm.AsymVLM.from_pretrained`, ``asymvlm-merge --base/--inputs``, training's and the
federation's ``init_from``, ``asymvlm-eval --model``): an existing path is used as it is; otherwise a
name shaped like a Hub id (``user/repo``, optionally ``user/repo@revision``) is fetched with
``huggingface_hub.snapshot_download`` into the Hub cache — which honours ``HF_HUB_OFFLINE`` (then
only the local cache is read) and ``HF_HUB_CACHE`` / ``cache_dir`` — and the snapshot folder is
used. Anything else is one :class:`~asymvlm.errors.ArtefactError` line saying what was tried.

**Model cards** (:mod:`asymvlm.cards`). Every save of an artefact writes a ``README.md`` built by
:func:`model_card`: front matter the Hub renders, asymvlm's own record under the ``asymvlm`` key and
a short text; its kind (``model``, ``federated``, ``merged``, ...) is registered by the package that
writes it. A ``README.md`` without :data:`CARD_MARK` is the user's and is never overwritten.

**Pushing.** :func:`push_to_hub` uploads a saved artefact folder (``HfApi.create_repo(exist_ok=True)``
then one ``HfApi.create_commit`` of its files, the card naming the repo; the folder is not changed)
after checking that it is one (:func:`artefact_kind`); :meth:`asymvlm.AsymVLM.push_to_hub`
saves the model to a temporary folder and pushes that.

Example::

    model = AsymVLM.from_pretrained("alice/asymvlm-vmf-coco")            # the Hub (or its cache)
    model = AsymVLM.from_pretrained("alice/asymvlm-vmf-coco", revision="v1")
    model = AsymVLM.from_pretrained("runs/vmf/model")                     # a folder here
    push_to_hub("runs/vmf/model", "alice/asymvlm-vmf-coco")               # needs the network and a token

A model card, offline: the example of :mod:`asymvlm.cards`.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from asymvlm.cards import (
    CARD_KINDS,
    CARD_MARK,
    CARD_NAME,
    DEFAULT_LICENSE,
    CardKind,
    artefact_files,
    card_from_folder,
    describe_data,
    eval_metrics,
    hub_base_model,
    is_asymvlm_card,
    model_card,
    write_model_card,
)
from asymvlm.errors import ArtefactError
from asymvlm.naming import check_revision, looks_like_hub_id, public_name, public_text, split_revision

__all__ = [
    "resolve_artefact",
    "looks_like_hub_id",
    "split_revision",
    "check_revision",
    "public_text",
    "model_card",
    "card_from_folder",
    "write_model_card",
    "is_asymvlm_card",
    "describe_data",
    "eval_metrics",
    "public_name",
    "hub_base_model",
    "artefact_kind",
    "push_to_hub",
    "CARD_KINDS",
    "CardKind",
    "CARD_NAME",
    "CARD_MARK",
    "DEFAULT_LICENSE",
]


def resolve_artefact(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    what: str = "saved AsymVLM",
) -> Path:
    """The local folder of ``name_or_path``: the path itself when it exists, else the Hub snapshot
    of the model id (``user/repo`` or ``user/repo@revision``; downloaded, or from the cache when
    offline)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if revision is not None:
            raise ArtefactError(f"revision={revision!r} is for Hub ids; {path} is a local folder")
        return path
    name, at = split_revision(str(name_or_path))
    if at is None and "@" in str(name_or_path):
        repo, _, rev = str(name_or_path).partition("@")
        if looks_like_hub_id(repo):  # user/repo@<not a revision>: say so, never fall back to a path
            check_revision(rev)
    if at is not None:
        if revision is not None and revision != at:
            raise ArtefactError(f"{name_or_path!r} names revision {at!r} and revision={revision!r} another")
        revision = at
    if revision is not None:
        check_revision(revision)  # before anything touches the Hub cache
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


# ----------------------------------------------------------------------------------------------
# model cards
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# push
# ----------------------------------------------------------------------------------------------
def artefact_kind(folder: str | os.PathLike) -> str:
    """What a folder asymvlm saved is (``model``, ``merge output``, ``task vector``: the kind of the
    first registered artefact file it holds: :func:`asymvlm.cards.artefact_files`); anything else is
    an :class:`~asymvlm.errors.ArtefactError` (one line, naming where a run folder keeps its model)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ArtefactError(f"no folder at {folder}: nothing to push")
    files = artefact_files()
    for file in files:
        try:
            doc = json.loads((folder / file.name).read_bytes())
        except (OSError, ValueError, RecursionError):
            continue
        if isinstance(doc, dict) and doc.get("type") == file.type_tag:
            return file.kind
    hint = ""
    if (folder / "model" / "asymvlm_config.json").is_file():
        hint = f"; it is a run folder: push its model, {folder / 'model'}"
    names = ", ".join(file.name for file in files)
    raise ArtefactError(f"{folder} is not an asymvlm artefact (none of {names}){hint}: nothing pushed")


def _public_json(path: Path) -> bytes | None:
    """The JSON file as it is uploaded when it names an absolute path (a local encoder's folder in
    ``asymvlm_config.json``, a merge's inputs, a peft adapter's base): every such path by its last two
    parts (:func:`public_text`); None when the file names none (it is uploaded as it is) or is not
    JSON. The folder itself is not changed."""
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    public = public_text(doc)
    if json.dumps(public, sort_keys=True) == json.dumps(doc, sort_keys=True):
        return None
    return (json.dumps(public, indent=2, sort_keys=True) + "\n").encode()


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
) -> Any:
    """Upload a saved asymvlm artefact folder to the Hugging Face Hub model repo ``repo_id``.

    Creates the repo if needed (``HfApi.create_repo(exist_ok=True)``; ``private`` applies to a new
    repo), the branch ``revision`` if given, and uploads the folder's files in one commit
    (``HfApi.create_commit``; hidden files such as asymvlm's bookkeeping stay behind, and so does every
    file asymvlm did not record writing there — a user's notes kept in the folder — with a warning;
    a symbolic link out of the folder is an :class:`ArtefactError`, nothing pushed). An asymvlm
    card is uploaded rendered again with ``repo_id`` in its loading example, and a JSON file that
    names an absolute path (a local encoder's folder, a merge's inputs) with each such path by its
    last two parts; the folder itself is not changed. Needs the network and a token with write
    access (``hf auth login`` or ``token=``).

    Returns:
        The ``CommitInfo`` of the upload (its ``pr_url`` with ``create_pr=True``).

    Raises:
        ArtefactError: the folder is not an asymvlm artefact, or ``repo_id`` is not ``user/repo``.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(folder)
    kind = artefact_kind(folder)
    if not looks_like_hub_id(repo_id):
        raise ArtefactError(f"{repo_id!r} is not a Hub model id (user/repo): nothing pushed")
    from asymvlm.io import inside_folder, owned_entries

    card = card_from_folder(folder, repo_id=repo_id)
    owned = owned_entries(folder)  # what asymvlm recorded writing there; None: an older folder, all of it
    operations, kept = [], []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue  # .asymvlm-files.json and any temporary file
        if owned is not None and rel.parts[0] not in owned:
            if len(rel.parts) == 1:
                kept.append(rel.parts[0])  # a user's own file kept in the folder: it stays private
            continue
        inside_folder(folder, rel.as_posix())  # a link out of the folder would upload another file: refused
        if not path.is_file():
            continue
        name = rel.as_posix()
        content: str | bytes = str(card).encode("utf-8") if name == CARD_NAME and card is not None else str(path)
        if name.endswith(".json"):
            content = _public_json(path) or content
        operations.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=content))
    if kept:
        warnings.warn(
            f"{folder}: not uploaded, as asymvlm did not write them there: {kept[:6]}{' ...' if len(kept) > 6 else ''}",
            stacklevel=2,
        )
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model", token=token)
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model", token=token)
    return api.create_commit(
        repo_id,
        operations,
        repo_type="model",
        revision=revision,
        commit_message=commit_message or f"Upload asymvlm {kind}",
        create_pr=create_pr,
        token=token,
    )
