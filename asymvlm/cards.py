"""Model cards: the ``README.md`` every save of an artefact writes, and the kinds of artefact they present.

Every save of an artefact (an AsymVLM, a training run's model, a federated export, a merge output,
a task vector) writes a ``README.md`` built by :func:`model_card` with ``huggingface_hub``'s
:class:`~huggingface_hub.ModelCard` / :class:`~huggingface_hub.ModelCardData`: YAML front matter
the Hub renders (``library_name: asymvlm``, ``license``, tags, ``base_model`` when the encoder is a
Hub model, ``model-index`` evaluation results) with asymvlm's own record under the ``asymvlm`` key
(kind, encoder spec + fingerprint, family, head, training data, recipe, metrics), then a short
text: what the model is, how to load it, its tables. A card asymvlm wrote carries the line
:data:`CARD_MARK` and is replaced by the next save; a ``README.md`` without it is the user's and is
never overwritten (a warning says so). Loading never reads the card.

**Card kinds** (:class:`CardKind`: title, what it is, tags, how to load it) are registered by the
package that writes them (:func:`register_card_kind`): the core registers ``model`` (an
:class:`asymvlm.AsymVLM`); :mod:`asymvlm.federated` registers ``federated`` and
:mod:`asymvlm.merging` its outputs (``merged``, ``checkpoint``, ``task_vector``, ``lora``), when
their writers are imported. A card of a kind whose writer is not imported yet is still read: the
modules declared under the entry-point group ``asymvlm.cards`` (:data:`asymvlm.plugins.CARD_GROUP`,
in ``pyproject.toml``; never imported by name here) are imported on a lookup that misses. The
files that make a folder an artefact (:func:`register_artefact_file`, what
:func:`asymvlm.hub.push_to_hub` checks) are registered the same way.

:mod:`asymvlm.hub` exports every name of this module.

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
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asymvlm.errors import ConfigError
from asymvlm.naming import looks_like_hub_id, public_name, public_text
from asymvlm.plugins import CARD_GROUP, load_plugins

__all__ = [
    "model_card",
    "card_from_folder",
    "write_model_card",
    "is_asymvlm_card",
    "describe_data",
    "eval_metrics",
    "hub_base_model",
    "CardKind",
    "asymvlm_card_kind",
    "register_card_kind",
    "card_kind",
    "CARD_KINDS",
    "ArtefactFile",
    "register_artefact_file",
    "artefact_files",
    "CARD_NAME",
    "CARD_MARK",
    "DEFAULT_LICENSE",
]


CARD_NAME = "README.md"
# the first line of the text of every card asymvlm writes (an HTML comment: the Hub does not show it)
CARD_MARK = "<!-- asymvlm:model-card"
DEFAULT_LICENSE = "apache-2.0"
LIBRARY_NAME = "asymvlm"
PLACEHOLDER_REPO = "<user>/<repo>"  # the loading example's id until the card is pushed somewhere

_FAMILIES = {"vmf": ("vmf", "von Mises–Fisher"), "ps": ("power-spherical", "Power Spherical")}


# ----------------------------------------------------------------------------------------------
# card kinds and artefact files: registered by the packages that write them
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CardKind:
    """How a card presents one kind of artefact: its title, what it is, extra tags, how to load it.

    Attributes:
        title: the card's heading when it names no Hub repo.
        what: the paragraph saying what the artefact is; ``{family}`` is replaced by the family's name.
        tags: the kind's Hub tags, after asymvlm's own.
        load: the loading example (Python); ``{repo}`` is replaced by the Hub id, and for an
            AsymVLM ``{kwargs}``, ``{comment}`` and ``{texts}`` by what loading it needs.
    """

    title: str
    what: str
    tags: tuple[str, ...]
    load: str


@dataclass(frozen=True)
class ArtefactFile:
    """The file that makes a folder an asymvlm artefact: a JSON object whose ``type`` is ``type_tag``.

    Attributes:
        name: the file's name in the folder (``asymvlm_config.json``).
        type_tag: its ``type`` tag (``asymvlm``).
        kind: what the folder is, as messages name it (``model``).
    """

    name: str
    type_tag: str
    kind: str


_LOAD_MODEL = """from asymvlm import AsymVLM

model = AsymVLM.from_pretrained("{repo}"{kwargs})  # {comment}
q = model.encode_text({texts})  # one distribution on the sphere per text
model.uncertainty({texts})  # 1 / concentration: the texts' uncertainty"""
_HEAD_WHAT = (
    "a small text head on a frozen vision-language encoder that maps each text to a {family} distribution "
    "on the unit sphere over image embeddings. Image embeddings stay deterministic; `1 / concentration` is the "
    "text's uncertainty (AsymVLM, NeurIPS 2025)."
)

CARD_KINDS: dict[str, CardKind] = {}
_ARTEFACT_FILES: dict[str, ArtefactFile] = {}
# The modules that register card kinds and artefact files when they are imported are declared under
# the entry-point group asymvlm.plugins.CARD_GROUP (pyproject.toml) and imported only when a lookup
# misses (the core imports no layer above it and names none): a card of a kind whose writer this
# process has not imported yet is still read. Another distribution adds its kinds the same way.


def asymvlm_card_kind(title: str, intro: str, tags: Sequence[str] = ()) -> CardKind:
    """The card kind of a saved :class:`asymvlm.AsymVLM` made some way: ``intro`` (what made it,
    ending in ``": "``) followed by what an AsymVLM is, and the AsymVLM loading example.

    Example:
        >>> asymvlm_card_kind("AsymVLM (distilled)", "An AsymVLM model distilled from a teacher: ").what[:52]
        'An AsymVLM model distilled from a teacher: a small t'
    """
    return CardKind(title, intro + _HEAD_WHAT, tuple(tags), _LOAD_MODEL)


def register_card_kind(name: str, kind: CardKind) -> CardKind:
    """Add (or replace) the card kind ``name``; a package calls this when its writer is imported
    (and declares that module under the entry-point group ``asymvlm.cards`` so that its cards are
    read before it is imported)."""
    CARD_KINDS[name] = kind
    return kind


def register_artefact_file(file: ArtefactFile) -> ArtefactFile:
    """Add (or replace) a file that makes a folder an asymvlm artefact (:func:`artefact_files`)."""
    _ARTEFACT_FILES[file.name] = file
    return file


def _import_writers() -> None:
    """Import the card writers declared under :data:`asymvlm.plugins.CARD_GROUP` (once)."""
    load_plugins(CARD_GROUP)


def _registered(name: Any) -> bool:
    """Whether a card kind ``name`` is registered, once every writer has been imported."""
    if name not in CARD_KINDS:
        _import_writers()
    return name in CARD_KINDS


def card_kind(name: str) -> CardKind:
    """The registered card kind ``name``; a :class:`~asymvlm.errors.ConfigError` naming the known
    ones when no package registers it."""
    if not _registered(name):
        raise ConfigError(f"unknown model card kind {name!r}; known: {sorted(CARD_KINDS)}")
    return CARD_KINDS[name]


def artefact_files() -> list[ArtefactFile]:
    """Every registered artefact file, in registration order (the core's ``asymvlm_config.json``
    first), every declared card writer imported."""
    _import_writers()
    return list(_ARTEFACT_FILES.values())


register_card_kind("model", asymvlm_card_kind("AsymVLM", "An AsymVLM model: "))
register_artefact_file(ArtefactFile("asymvlm_config.json", "asymvlm", "model"))


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
        kind: a registered card kind (:func:`card_kind`): ``model`` (the core's), ``federated``
            (:mod:`asymvlm.federated`), ``merged``, ``checkpoint``, ``task_vector``, ``lora``
            (:mod:`asymvlm.merging`).
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
    from huggingface_hub import ModelCard

    spec = card_kind(kind)
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
    record: dict[str, Any] = {"kind": kind}
    record.update({key: _plain(value) for key, value in sections.items() if value is not None and value != {}})
    family = (head or {}).get("family")
    family_tag, family_name = _FAMILIES.get(str(family), (str(family), str(family))) if family else (None, None)
    all_tags = ["asymvlm", "vision-language", "uncertainty", *([family_tag] if family_tag else []), *spec.tags]
    all_tags += [t for t in tags if t not in all_tags]
    title = repo_id.split("/")[-1] if repo_id else spec.title
    card_data = _card_data(record, sections, tags=all_tags, base=base, license=license, title=title)
    text = _card_text(spec, sections, family_name=family_name, base=base, title=title, repo=repo_id or PLACEHOLDER_REPO)
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{text}")


def _card_data(
    record: dict[str, Any],
    sections: Mapping[str, Any],
    *,
    tags: list[str],
    base: str | None,
    license: str | None,
    title: str,
) -> Any:
    """The card's YAML front matter (a :class:`huggingface_hub.ModelCardData`): the Hub's fields, the
    evaluation as ``model-index`` results, and asymvlm's ``record``."""
    from huggingface_hub import EvalResult, ModelCardData

    evaluation, data = sections["evaluation"], sections["data"]
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
    return ModelCardData(
        library_name=LIBRARY_NAME,
        license=license or DEFAULT_LICENSE,
        tags=tags,
        base_model=base,
        datasets=datasets,
        model_name=title if eval_results else None,  # model-index's
        eval_results=eval_results,
        asymvlm=record,
    )


def _card_facts(sections: Mapping[str, Any], family_name: str | None, base: str | None) -> list[str]:
    """The card's list of facts: encoder, family and head, temperature, lineage, base model."""
    encoder, head, lineage = sections["encoder"], sections["head"], sections["lineage"]
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
    if sections["logit_scale"] is not None:
        facts.append(f"- **Log temperature**: {_cell(float(sections['logit_scale']))}")
    if lineage and lineage.get("init_from"):
        facts.append(f"- **Fine-tuned from**: `{lineage['init_from']}`")
    if base:
        facts.append(f"- **Base model**: [{base}](https://huggingface.co/{base})")
    return facts


def _card_text(
    spec: CardKind, sections: Mapping[str, Any], *, family_name: str | None, base: str | None, title: str, repo: str
) -> str:
    """The card's text (Markdown after the front matter): the mark, what it is, its facts, how to
    load it, and the tables of its data, recipe and metrics."""
    data, recipe, metrics, evaluation = (sections[k] for k in ("data", "recipe", "metrics", "evaluation"))
    what = spec.what.format(family=family_name or "spherical")
    lines = [
        f"{CARD_MARK} (written by asymvlm, replaced on every save; delete this line to keep your own edits) -->",
        "",
        f"# {title}",
        "",
        what,
        "",
    ]
    facts = _card_facts(sections, family_name, base)
    lines += [*facts, ""] if facts else []
    texts = '["a red circle", "a photo"]'
    has_encoder = bool((sections["encoder"] or {}).get("spec"))
    load = spec.load.format(  # an artefact that is no AsymVLM has only {repo} in its example
        repo=repo,
        kwargs="" if has_encoder else ", load_encoder=False",
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
    return "\n".join(lines)


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
    if not _registered(record.get("kind")):
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
