"""Sharing saved artefacts the way the Hugging Face ecosystem does: loading by Hub id, model cards,
and pushing to the Hub.

**Loading.** :func:`resolve_artefact` is what every reader of a saved artefact calls first
(:meth:`asymvlm.AsymVLM.from_pretrained`, ``asymvlm-merge --base/--inputs``, training's and the
federation's ``init_from``, ``asymvlm-eval --model``): an existing path is used as it is; otherwise a
name shaped like a Hub id (``user/repo``, optionally ``user/repo@revision``) is fetched with
``huggingface_hub.snapshot_download`` into the Hub cache — which honours ``HF_HUB_OFFLINE`` (then
only the local cache is read) and ``HF_HUB_CACHE`` / ``cache_dir`` — and the snapshot folder is
used. Anything else is one :class:`~asymvlm.errors.ArtefactError` line saying what was tried.

**Model cards.** Every save of an artefact (an AsymVLM, a training run's model, a federated export,
a merge output, a task vector) writes a ``README.md`` built by :func:`model_card` with
``huggingface_hub``'s :class:`~huggingface_hub.ModelCard` / :class:`~huggingface_hub.ModelCardData`:
YAML front matter the Hub renders (``library_name: asymvlm``, ``license``, tags, ``base_model`` when
the encoder is a Hub model, ``model-index`` evaluation results) with asymvlm's own record under the
``asymvlm`` key (kind, encoder spec + fingerprint, family, head, training data, recipe, metrics),
then a short text: what the model is, how to load it, its tables. A card asymvlm wrote carries the
line :data:`CARD_MARK` and is replaced by the next save; a ``README.md`` without it is the user's and
is never overwritten (a warning says so). Loading never reads the card.

**Pushing.** :func:`push_to_hub` uploads a saved artefact folder (``HfApi.create_repo(exist_ok=True)``
then one ``HfApi.create_commit`` of its files, the card naming the repo; the folder is not changed)
after checking that it is one; :meth:`asymvlm.AsymVLM.push_to_hub`
saves the model to a temporary folder and pushes that.

Example::

    model = AsymVLM.from_pretrained("alice/asymvlm-vmf-coco")            # the Hub (or its cache)
    model = AsymVLM.from_pretrained("alice/asymvlm-vmf-coco", revision="v1")
    model = AsymVLM.from_pretrained("runs/vmf/model")                     # a folder here
    push_to_hub("runs/vmf/model", "alice/asymvlm-vmf-coco")               # needs the network and a token

Example (a card, offline):
    >>> card = model_card("model", encoder={"spec": "hf:openai/clip-vit-base-patch32", "dim": 512},
    ...                   head={"dim": 512, "family": "ps"}, metrics={"loss": 1.25})
    >>> card.data.library_name, card.data.base_model, card.data.tags
    ('asymvlm', 'openai/clip-vit-base-patch32', ['asymvlm', 'vision-language', 'uncertainty', 'power-spherical'])
    >>> is_asymvlm_card(str(card)), card.data.asymvlm["metrics"]
    (True, {'loss': 1.25})
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asymvlm.errors import ArtefactError

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

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")

CARD_NAME = "README.md"
# the first line of the text of every card asymvlm writes (an HTML comment: the Hub does not show it)
CARD_MARK = "<!-- asymvlm:model-card"
DEFAULT_LICENSE = "apache-2.0"
LIBRARY_NAME = "asymvlm"
PLACEHOLDER_REPO = "<user>/<repo>"  # the loading example's id until the card is pushed somewhere

# what makes a folder an asymvlm artefact: (file, its JSON type tag) -> kind
_ARTEFACT_FILES = (
    ("asymvlm_config.json", "asymvlm", "model"),
    ("merge.json", "asymvlm.merge", "merge output"),
    ("task_vector.json", "asymvlm.task_vector", "task vector"),
)
_FAMILIES = {"vmf": ("vmf", "von Mises–Fisher"), "ps": ("power-spherical", "Power Spherical")}


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
_LOAD_MODEL = """from asymvlm import AsymVLM

model = AsymVLM.from_pretrained("{repo}"{kwargs})  # {comment}
q = model.encode_text({texts})  # one distribution on the sphere per text
model.uncertainty({texts})  # 1 / concentration: the texts' uncertainty"""
_LOAD_CHECKPOINT = """from huggingface_hub import hf_hub_download
from safetensors.torch import load_file

state = load_file(hf_hub_download("{repo}", "model.safetensors"))  # the merged state dict"""
_LOAD_TASK_VECTOR = """from asymvlm.hub import resolve_artefact
from asymvlm.merging.task_vectors import LazyTaskVector

tau = LazyTaskVector(resolve_artefact("{repo}"))  # {{name: fine-tuned minus base}}, read lazily
# or merge it: asymvlm-merge --base BASE --inputs {repo} OTHER --method ties --output_dir merged"""
_LOAD_LORA = """from peft import PeftModel

model = PeftModel.from_pretrained(base_model, "{repo}")  # base_model: what the adapters were trained on"""


@dataclass(frozen=True)
class CardKind:
    """How a card presents one kind of artefact: its title, what it is, extra tags, how to load it."""

    title: str
    what: str
    tags: tuple[str, ...]
    load: str


_HEAD_WHAT = (
    "a small text head on a frozen vision-language encoder that maps each text to a {family} distribution "
    "on the unit sphere over image embeddings. Image embeddings stay deterministic; `1 / concentration` is the "
    "text's uncertainty (AsymVLM, NeurIPS 2025)."
)
CARD_KINDS: dict[str, CardKind] = {
    "model": CardKind("AsymVLM", "An AsymVLM model: " + _HEAD_WHAT, (), _LOAD_MODEL),
    "federated": CardKind(
        "AsymVLM (federated)",
        "An AsymVLM model trained by federated learning (`asymvlm-federate`: clients train on their own data, "
        "the server combines their updates): " + _HEAD_WHAT,
        ("federated-learning",),
        _LOAD_MODEL,
    ),
    "merged": CardKind(
        "AsymVLM (merged)",
        "An AsymVLM model merged from separately fine-tuned experts of one base (`asymvlm-merge`): " + _HEAD_WHAT,
        ("merge",),
        _LOAD_MODEL,
    ),
    "checkpoint": CardKind(
        "Merged checkpoint",
        "A checkpoint (`model.safetensors`) merged by `asymvlm-merge` from fine-tuned checkpoints, task vectors "
        "or LoRA updates of one base.",
        ("merge",),
        _LOAD_CHECKPOINT,
    ),
    "task_vector": CardKind(
        "Task vector",
        "A task vector (fine-tuned minus base weights, `task_vector.safetensors`) written by asymvlm: an input "
        "of `asymvlm-merge`.",
        ("task-vector",),
        _LOAD_TASK_VECTOR,
    ),
    "lora": CardKind(
        "Merged LoRA adapter",
        "A peft LoRA adapter merged by `asymvlm-merge` from adapters of one base, on their exact `B @ A` updates.",
        ("merge", "lora", "peft"),
        _LOAD_LORA,
    ),
}


def hub_base_model(encoder: Mapping[str, Any] | None) -> str | None:
    """The Hub model id of an encoder spec (``hf:org/name``, ``hf-text:org/name``,
    ``open_clip:hf-hub:org/name``), or None (open_clip tags, local folders).

    Example:
        >>> hub_base_model({"spec": "open_clip:hf-hub:timm/ViT-B-16-SigLIP"})
        'timm/ViT-B-16-SigLIP'
        >>> hub_base_model({"spec": "open_clip:ViT-B-32", "pretrained": "openai"}) is None
        True
    """
    spec = str((encoder or {}).get("spec") or "")
    for prefix in ("open_clip:hf-hub:", "hf-text:", "hf:"):
        if spec.startswith(prefix):
            name = spec[len(prefix) :]
            return name if looks_like_hub_id(name) and not Path(name).exists() else None
    return None


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


def describe_data(data_args: Any = None, cache: Any = None, **counts: Any) -> dict[str, Any]:
    """The training data as a card records it: the dataset name or the cache's folder name (never a
    local path), the cache's dataset fingerprint and its numbers of images and texts, plus ``counts``
    (e.g. the training split's sizes)."""
    out: dict[str, Any] = {}
    if data_args is not None:
        if getattr(data_args, "cache_dir", ""):
            out["cache"] = Path(data_args.cache_dir).name
        elif getattr(data_args, "dataset", ""):
            out["dataset"] = str(data_args.dataset)
    if cache is not None:
        manifest = getattr(cache, "manifest", {}) or {}
        out["cache"] = Path(getattr(cache, "path", "") or "").name or out.get("cache")
        for key in ("dataset_fingerprint", "num_images", "num_texts"):
            if manifest.get(key) is not None:
                out[key] = manifest[key]
    out.update({k: v for k, v in counts.items() if v is not None})
    return {k: v for k, v in out.items() if v not in (None, "")}


def eval_metrics(record: Mapping[str, Any]) -> dict[str, Any]:
    """The evaluation metrics of a logged record (its ``eval/<name>`` keys), by name."""
    return {k[len("eval/") :]: v for k, v in record.items() if k.startswith("eval/")}


def _plain(obj: Any) -> Any:
    """YAML-safe plain data: non-finite floats -> None, tuples -> lists, anything else -> str."""
    from asymvlm.io import json_safe

    return json.loads(json.dumps(json_safe(obj), default=str))


def _flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [2, 3]}`` -> ``{"a/b": 1, "c/0": 2, "c/1": 3}``."""
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}/{k}" if prefix else str(k)))
        return out
    if isinstance(obj, (list, tuple)) and any(isinstance(v, (Mapping, list, tuple)) for v in obj):
        out = {}
        for i, v in enumerate(obj):
            out.update(_flat(v, f"{prefix}/{i}"))
        return out
    return {prefix: obj}


def _cell(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, (list, tuple)):
        text = json.dumps(list(value)) if len(value) <= 12 else json.dumps(list(value[:12]))[:-1] + ", ...]"
    elif value is None:
        text = "—"
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(rows: Mapping[str, Any], header: tuple[str, str]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in rows.items()]
    return "\n".join(lines)


def _numbers(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a (nested) metrics mapping, flattened."""
    out = {}
    for k, v in _flat(metrics).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf"):
            out[k] = v
    return out


def model_card(
    kind: str = "model",
    *,
    encoder: Mapping[str, Any] | None = None,
    head: Mapping[str, Any] | None = None,
    logit_scale: float | None = None,
    lineage: Mapping[str, Any] | None = None,
    data: Mapping[str, Any] | None = None,
    recipe: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    evaluation: Mapping[str, Any] | None = None,
    base_model: str | None = None,
    license: str | None = None,
    tags: Sequence[str] = (),
    repo_id: str | None = None,
) -> Any:
    """The ``README.md`` model card of a saved artefact, as a :class:`huggingface_hub.ModelCard`.

    Every save site of asymvlm calls this (through :meth:`asymvlm.AsymVLM.model_card` for models).
    The YAML front matter holds the Hub's fields and asymvlm's record under ``asymvlm`` (the keyword
    arguments below, as given), so :func:`card_from_folder` can render the same card again (e.g.
    with the repo id it is pushed to).

    Args:
        kind: a key of :data:`CARD_KINDS` (``model``, ``federated``, ``merged``, ``checkpoint``,
            ``task_vector``, ``lora``).
        encoder: the frozen encoder (``{"spec", "pretrained", "fingerprint", "dim"}``).
        head: the head's config (``HeadConfig.to_dict()``); its ``family`` gives the family tag.
        logit_scale: the trained log temperature.
        lineage: what the head was fine-tuned from (``{"init_from", "init_from_fingerprint"}``).
        data: the training data (:func:`describe_data`).
        recipe: how it was made: the training config; the federated recipe, rounds, clients and DP
            epsilon; or the merge method, lambda and the experts' fingerprints.
        metrics: measured numbers (final loss, evaluation metrics, lambda-search scores); nested
            mappings are flattened to ``a/b`` names in the table.
        evaluation: ``{"dataset", "split", "metrics": {name: value}}``: written as the Hub's
            ``model-index`` (its evaluation results widget).
        base_model: the Hub id of the base model (default: the encoder's, see :func:`hub_base_model`).
        license: a Hub license id (default :data:`DEFAULT_LICENSE`).
        tags: extra tags (``asymvlm``, ``vision-language``, ``uncertainty``, the family and the kind's
            tags are always there).
        repo_id: the Hub id the loading example names (default a placeholder).
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    if kind not in CARD_KINDS:
        raise ValueError(f"unknown model card kind {kind!r}; known: {sorted(CARD_KINDS)}")
    spec = CARD_KINDS[kind]
    record: dict[str, Any] = {"kind": kind}
    if lineage and lineage.get("init_from"):
        lineage = {**lineage, "init_from": public_name(lineage["init_from"])}
    base = base_model if base_model is not None else hub_base_model(encoder)
    # a card is shared: every absolute path it would name (a local encoder's folder, a checkpoint
    # file, data and output folders in the recipe) is named by its last two parts
    encoder, lineage, data, recipe, metrics, evaluation = (
        public_text(x) for x in (encoder, lineage, data, recipe, metrics, evaluation)
    )
    sections = {"encoder": encoder, "head": head, "logit_scale": logit_scale, "lineage": lineage, "data": data,
                "recipe": recipe, "metrics": metrics, "evaluation": evaluation}  # fmt: skip
    record.update({key: _plain(value) for key, value in sections.items() if value is not None and value != {}})
    family = (head or {}).get("family")
    family_tag, family_name = _FAMILIES.get(str(family), (str(family), str(family))) if family else (None, None)
    all_tags = ["asymvlm", "vision-language", "uncertainty", *([family_tag] if family_tag else []), *spec.tags]
    all_tags += [t for t in tags if t not in all_tags]
    repo = repo_id or PLACEHOLDER_REPO
    eval_results = None
    if evaluation and _numbers(evaluation.get("metrics") or {}):
        dataset = str(evaluation.get("dataset") or "held-out data")
        eval_results = [
            EvalResult(
                task_type="text-to-image-retrieval",
                task_name="Text-to-image retrieval with uncertainty",
                dataset_type=dataset,
                dataset_name=dataset,
                dataset_split=evaluation.get("split"),
                metric_type=name,
                metric_name=name,
                metric_value=value,
            )
            for name, value in _numbers(evaluation["metrics"]).items()
        ]
    datasets = None
    name = (data or {}).get("dataset")
    if isinstance(name, str) and looks_like_hub_id(name) and not Path(name).exists():
        datasets = [name]
    card_data = ModelCardData(
        library_name=LIBRARY_NAME,
        license=license or DEFAULT_LICENSE,
        tags=all_tags,
        base_model=base,
        datasets=datasets,
        model_name=(repo.split("/")[-1] if repo_id else spec.title) if eval_results else None,  # model-index's
        eval_results=eval_results,
        asymvlm=record,
    )
    # -- the text ---------------------------------------------------------------------------------
    what = spec.what.format(family=family_name or "spherical")
    lines = [
        f"{CARD_MARK} (written by asymvlm, replaced on every save; delete this line to keep your own edits) -->",
        "",
        f"# {repo.split('/')[-1] if repo_id else spec.title}",
        "",
        what,
        "",
    ]
    facts = []
    if encoder:
        pre = f" (pretrained `{encoder['pretrained']}`)" if encoder.get("pretrained") else ""
        fp = f", fingerprint `{str(encoder['fingerprint'])[:16]}…`" if encoder.get("fingerprint") else ""
        facts.append(
            f"- **Frozen encoder**: `{encoder.get('spec')}`{pre}{fp} (referenced, not copied; checked on load)"
        )
    if head:
        arch = ", ".join(f"{k}={_cell(v)}" for k, v in head.items() if k != "family")
        facts.append(f"- **Family**: {family_name}; **head**: {arch}")
    if logit_scale is not None:
        facts.append(f"- **Log temperature**: {_cell(float(logit_scale))}")
    if lineage and lineage.get("init_from"):
        facts.append(f"- **Fine-tuned from**: `{lineage['init_from']}`")
    if base:
        facts.append(f"- **Base model**: [{base}](https://huggingface.co/{base})")
    lines += [*facts, ""] if facts else []
    texts = '["a red circle", "a photo"]'
    has_encoder = bool((encoder or {}).get("spec"))
    load = spec.load.format(
        repo=repo,
        kwargs="" if has_encoder or kind not in ("model", "federated", "merged") else ", load_encoder=False",
        comment="the frozen encoder is reloaded from its spec" if has_encoder else "embeddings only: no encoder",
        texts=texts if has_encoder else "text_embeddings",
    )
    lines += ["## How to load", "", "```python", load, "```", ""]
    if data:
        lines += ["## Training data", "", _table(_flat(data), ("field", "value")), ""]
    if recipe:
        lines += ["## Recipe", "", _table(_flat(recipe), ("option", "value")), ""]
    shown = {**_numbers(metrics or {}), **_numbers((evaluation or {}).get("metrics") or {})}
    if shown:
        where = ""
        if evaluation and evaluation.get("metrics"):
            split = f" ({evaluation['split']})" if evaluation.get("split") else ""
            where = f" Evaluation on {evaluation.get('dataset') or 'held-out data'}{split}."
        lines += ["## Metrics", "", f"What the run measured.{where}", "", _table(shown, ("metric", "value")), ""]
    text = "\n".join(lines)
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{text}")


def is_asymvlm_card(card: str | os.PathLike) -> bool:
    """True for a card asymvlm wrote (its text carries :data:`CARD_MARK`); a path or the card's text."""
    text = str(card)
    if isinstance(card, os.PathLike):
        try:
            text = Path(card).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return False
    return CARD_MARK in text


def card_from_folder(folder: str | os.PathLike, *, repo_id: str | None = None) -> Any | None:
    """The card of an artefact folder rendered again from its own ``asymvlm`` record (with
    ``repo_id`` in the loading example), or None when its ``README.md`` is not asymvlm's."""
    from huggingface_hub import ModelCard

    path = Path(folder) / CARD_NAME
    if not path.is_file() or not is_asymvlm_card(path):
        return None
    try:
        card = ModelCard.load(path)
    except Exception:  # a card edited into invalid YAML: left as it is  # noqa: BLE001
        return None
    record = dict(getattr(card.data, "asymvlm", None) or {})
    if record.get("kind") not in CARD_KINDS:
        return None
    return model_card(
        **{k: record.get(k) for k in ("kind", "encoder", "head", "logit_scale", "lineage", "data", "recipe",
                                      "metrics", "evaluation") if record.get(k) is not None},
        base_model=card.data.base_model,
        license=card.data.license,
        tags=list(card.data.tags or ()),
        repo_id=repo_id,
    )  # fmt: skip


def write_model_card(
    directory: str | os.PathLike, card: Any, *, replacing: str | os.PathLike | None = None
) -> Path | None:
    """Write ``card`` to ``directory/README.md`` atomically, unless the README there is the user's.

    ``replacing``: the folder ``directory`` will replace (an :func:`asymvlm.io.atomic_directory`
    target); its README decides. A README without :data:`CARD_MARK` is the user's: nothing is written
    and a warning says so (when the user took over a card asymvlm once wrote into ``replacing``, it
    is copied into ``directory`` so the replacement keeps it). Returns the written path or None.
    """
    from asymvlm.io import atomic_write_bytes, owned_entries

    directory = Path(directory)
    target = Path(replacing) if replacing is not None else directory
    existing = target / CARD_NAME
    if existing.exists() or existing.is_symlink():
        if not (existing.is_file() and is_asymvlm_card(existing)):
            if replacing is not None and existing.is_file() and CARD_NAME in (owned_entries(target) or set()):
                atomic_write_bytes(existing.read_bytes(), directory / CARD_NAME)
            warnings.warn(
                f"{existing} is not a model card asymvlm wrote (no {CARD_MARK!r} line): kept as it is, no card written",
                stacklevel=3,
            )
            return None
    return atomic_write_bytes(str(card).encode("utf-8"), directory / CARD_NAME)


# ----------------------------------------------------------------------------------------------
# push
# ----------------------------------------------------------------------------------------------
def artefact_kind(folder: str | os.PathLike) -> str:
    """``model``, ``merge output`` or ``task vector`` for a folder asymvlm saved; anything else is an
    :class:`~asymvlm.errors.ArtefactError` (one line, naming where a run folder keeps its model)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ArtefactError(f"no folder at {folder}: nothing to push")
    for name, tag, kind in _ARTEFACT_FILES:
        try:
            doc = json.loads((folder / name).read_bytes())
        except (OSError, ValueError, RecursionError):
            continue
        if isinstance(doc, dict) and doc.get("type") == tag:
            return kind
    hint = ""
    if (folder / "model" / "asymvlm_config.json").is_file():
        hint = f"; it is a run folder: push its model, {folder / 'model'}"
    raise ArtefactError(
        f"{folder} is not an asymvlm artefact (none of asymvlm_config.json, merge.json, task_vector.json){hint}: "
        "nothing pushed"
    )


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
