"""AsymVLM: a frozen encoder plus a probabilistic text head — the model users save and share.

``AsymVLM(head, encoder=None)``. With an encoder it takes raw images and strings; without one
it works on precomputed embeddings alone (e.g. from :mod:`asymvlm.cache`), so users with cached
features can train and serve heads.

Saved layout (``save_pretrained(dir)``)::

    asymvlm_config.json   type "asymvlm", format_version, head (HeadConfig), encoder (spec,
                          pretrained, fingerprint, dim) or null, logit_scale
    head.safetensors      the head's weights (its metadata records the head config they were saved
                          with: a config edited against them is an error on load)
    README.md             the model card (:func:`asymvlm.hub.model_card`; never read on load, and
                          never written over when it is the user's own)

The encoder's weights are referenced (by spec) and not copied; ``from_pretrained`` loads the
encoder again and checks its fingerprint. Unknown keys written by a newer asymvlm are dropped
with a warning; missing required keys are an error. No pickle anywhere. The layout's names and the
checks of every field and header before a load builds anything are :mod:`asymvlm.model_format`'s.

Example:
    >>> import tempfile, torch
    >>> from asymvlm.heads import TextHead
    >>> m = AsymVLM(TextHead(dim=8, hidden_dims=(16,)))
    >>> text = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    >>> m.uncertainty(text).shape
    torch.Size([3])
    >>> d = tempfile.mkdtemp()
    >>> _ = m.save_pretrained(d)
    >>> torch.equal(AsymVLM.from_pretrained(d).uncertainty(text), m.uncertainty(text))
    True
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from asymvlm.distributions import SphericalDistribution
from asymvlm.errors import ConfigError, EncoderMismatchError, InputError
from asymvlm.heads import HeadConfig, TextHead, check_embeddings
from asymvlm.io import (
    ArtefactError,
    atomic_save_safetensors,
    atomic_write_json,
    inside_folder,
    load_safetensors,
    non_finite_key,
    read_tagged_json,
    require_finite,
)
from asymvlm.losses import log_likelihood
from asymvlm.model_format import (
    ADAPTER_DIR,
    BASE_DELTA_NAME,
    CONFIG_NAME,
    ENCODER_KEYS,
    MODEL_TYPE,
    MODEL_VERSION,
    WEIGHTS_NAME,
    check_delta_header,
    check_model_config,
    check_weights_header,
    config_file,
    config_json,
    encoder_problem,
    head_config_of,
    lineage_problem,
    logit_scale_problem,
    provenance_json,
    tensors_json,
)

__all__ = [
    "AsymVLM",
    "EncoderMismatchError",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "ADAPTER_DIR",
    "BASE_DELTA_NAME",
    "apply_text_adapter",
]


@torch.no_grad()
def _add_to_weights(encoder: Any, deltas: dict[str, Tensor]) -> None:
    params = dict(encoder.model.named_parameters())
    unknown = sorted(set(deltas) - set(params))
    if unknown:
        raise ArtefactError(f"text base deltas name parameters the encoder does not have: {unknown[:4]}")
    for name, d in deltas.items():
        if params[name].shape != d.shape:
            raise ArtefactError(
                f"text base delta {name!r} has shape {tuple(d.shape)}, the weight {tuple(params[name].shape)}"
            )
        params[name].add_(d.to(params[name].dtype))
    encoder._fingerprint = None


def apply_text_adapter(encoder: Any, adapter_dir: str | Path) -> Any:
    """Load a peft LoRA adapter of the text tower and merge it into ``encoder`` (in place).

    The encoder's fingerprint is recomputed afterwards (its weights changed).
    """
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ArtefactError(f"{adapter_dir} is not a peft adapter (no adapter_config.json)")
    merged = PeftModel.from_pretrained(encoder.model, str(adapter_dir)).merge_and_unload()
    encoder.model = merged.eval().requires_grad_(False)
    encoder._fingerprint = None
    return encoder


class AsymVLM(nn.Module):
    """Frozen dual encoder + text head.

    Args:
        head: the :class:`~asymvlm.heads.TextHead`.
        encoder: a :class:`~asymvlm.encoders.FrozenEncoder`, or None to work on embeddings only.
        logit_scale: the trained log temperature (kept for reference and for zero-shot posteriors).
        encoder_source: for an encoder-less model, how its embeddings were made
            (``{"spec", "pretrained", "fingerprint", "dim"}``); saved and checked on load.
    """

    def __init__(
        self,
        head: TextHead,
        encoder: Any | None = None,
        *,
        logit_scale: float = 0.0,
        encoder_source: dict[str, Any] | None = None,
        text_adapter: nn.Module | None = None,
        text_base_delta: dict[str, Tensor] | None = None,
        lineage: dict[str, Any] | None = None,
        confidence: Any = None,
    ):
        super().__init__()
        if encoder is not None and encoder.dim != head.dim:
            raise InputError(
                f"encoder dimension {encoder.dim} ({encoder.spec}) does not match the head's dimension {head.dim}"
            )
        problem = logit_scale_problem(logit_scale)
        if problem:
            raise ConfigError(f"logit_scale {problem}")
        for name, value in (("encoder_source", encoder_source), ("lineage", lineage)):
            if value is not None and not isinstance(value, Mapping):
                raise ConfigError(f"{name} must be a mapping or None, got {type(value).__name__}")
        if lineage:
            problem = lineage_problem(lineage)
            if problem:
                raise ConfigError(f"lineage{problem}")
        self.head = head
        self.encoder = encoder
        self.logit_scale = float(logit_scale)
        if encoder is not None and encoder_source is None:
            encoder_source = {**encoder.source, "fingerprint": encoder.fingerprint, "dim": encoder.dim}
        if encoder_source is not None:
            # saved with every key (those not given as null, dim the head's): a load requires all of them
            unknown = sorted(str(k) for k in set(encoder_source) - set(ENCODER_KEYS))
            if unknown:
                raise ConfigError(f"encoder_source has unknown key(s) {unknown}; it records {list(ENCODER_KEYS)}")
            encoder_source = {**dict.fromkeys(ENCODER_KEYS), "dim": head.dim, **encoder_source}
            problem = encoder_problem(encoder_source, head.dim, allow_null_fingerprint=True)
            if problem:
                raise ConfigError(f"encoder_source{problem}")
        self.encoder_source = encoder_source
        # a peft model wrapping the encoder's text tower (saved in peft's format by save_pretrained)
        self.text_adapter = text_adapter
        self._adapter_files: Path | None = None  # an adapter loaded (and merged) from disk
        # dense updates folded into the frozen text tower (exact federated LoRA aggregation)
        self.text_base_delta = text_base_delta
        # what the head was fine-tuned from: {"init_from": path, "init_from_fingerprint": sha256 of
        # its head weights}; merges check that every expert comes from the --base they are given
        self.lineage = dict(lineage) if lineage else None
        # how likely its answers are right: familiarity density + calibrator (asymvlm.confidence)
        self.confidence = confidence

    @property
    def dim(self) -> int:
        return self.head.dim

    @property
    def family(self) -> str:
        return self.head.family

    @property
    def adapts_text_tower(self) -> bool:
        """True when the model changes the frozen text tower (a LoRA adapter or folded updates): its
        text embeddings then differ from the frozen encoder's and must come from ``text_embeddings``."""
        return bool(self.text_base_delta) or self.text_adapter is not None or self._adapter_files is not None

    def _require_encoder(self, what: str) -> Any:
        if self.encoder is None:
            raise InputError(
                f"this AsymVLM has no encoder, so it cannot {what}; pass embeddings instead, or "
                f"build it with an encoder (AsymVLM(head, encoder=load_encoder(...)))"
            )
        return self.encoder

    # -- encoding -------------------------------------------------------------------------------
    def encode_image(self, images: Sequence[Any] | Tensor, **kwargs) -> Tensor:
        """Unit image embeddings (N, d) from PIL images (or preprocessed pixels) via the encoder."""
        return self._require_encoder("encode images").encode_image(images, **kwargs)

    def text_embeddings(self, texts: Sequence[str] | Tensor, **kwargs) -> Tensor:
        """Frozen text embeddings (N, d): strings go through the encoder, tensors are checked."""
        if isinstance(texts, Tensor):
            check_embeddings(texts, self.dim, "text embeddings")
            return texts
        if isinstance(texts, str):
            texts = [texts]
        if len(texts) == 0:
            raise InputError("no texts given")
        return self._require_encoder("encode strings").encode_text(list(texts), **kwargs)

    def encode_text(self, texts: Sequence[str] | Tensor, **kwargs) -> SphericalDistribution:
        """The distribution over image embeddings of each text (batch (N,), event (d,))."""
        emb = self.text_embeddings(texts, **kwargs)
        return self.head(emb.to(next(self.head.parameters()).device))

    def forward(self, texts: Sequence[str] | Tensor) -> SphericalDistribution:
        return self.encode_text(texts)

    def uncertainty(self, texts: Sequence[str] | Tensor) -> Tensor:
        """``1 / concentration`` of each text, (N,)."""
        return 1.0 / self.encode_text(texts).concentration

    def log_likelihood(
        self,
        texts: Sequence[str] | Tensor | SphericalDistribution,
        image_embeddings: Tensor,
        *,
        chunk_size: int | None = 65536,
    ) -> Tensor:
        """``log q_t(x_i)``, (T, I), for texts (strings, embeddings or a distribution) and unit image embeddings."""
        q = texts if isinstance(texts, SphericalDistribution) else self.encode_text(texts)
        if q.dim != self.dim:
            raise InputError(f"the distribution has dimension {q.dim}, the model {self.dim}")
        return log_likelihood(q, image_embeddings.to(q.loc.device), chunk_size=chunk_size)

    # -- persistence ----------------------------------------------------------------------------
    def model_card(self, kind: str = "model", **info: Any) -> Any:
        """This model's ``README.md`` card (:func:`asymvlm.hub.model_card`): encoder, family, head,
        temperature and lineage from the model, the rest (``data``, ``recipe``, ``metrics``,
        ``evaluation``, ``license``, ``tags``, ``repo_id``) from ``info``.

        Example:
            >>> card = AsymVLM(TextHead(dim=8, hidden_dims=(16,))).model_card(metrics={"loss": 0.5})
            >>> card.data.library_name, card.data.asymvlm["head"]["family"], card.data.asymvlm["metrics"]
            ('asymvlm', 'vmf', {'loss': 0.5})
        """
        from asymvlm.hub import model_card

        return model_card(
            kind,
            encoder=self.encoder_source,
            head=self.head.config.to_dict(),
            logit_scale=self.logit_scale,
            lineage=self.lineage,
            **info,
        )

    def save_pretrained(self, directory: str | Path, *, card: bool | Mapping[str, Any] = True) -> Path:
        """Write ``asymvlm_config.json``, ``head.safetensors`` and the ``README.md`` model card
        (each atomically) to ``directory``.

        Args:
            directory: the folder (created if needed).
            card: True: a card from the model itself; a mapping: :meth:`model_card`'s ``info``
                (``kind``, ``data``, ``recipe``, ``metrics``, ``evaluation``, ``license``, ``tags``,
                ``repo_id``); False: no card. A ``README.md`` already there that asymvlm did not
                write is kept (with a warning), never overwritten.
        """
        directory = Path(directory)
        self._check_finite(directory)  # nothing non-finite is saved: checked before anything is written
        directory.mkdir(parents=True, exist_ok=True)
        state = self.head.state_dict()
        atomic_save_safetensors(
            state,
            directory / WEIGHTS_NAME,
            metadata={
                "format": "pt",
                "type": MODEL_TYPE,
                "head_config": config_json(self.head.config),
                "tensors": tensors_json(state),
                "provenance": provenance_json(self.encoder_source, self.lineage),
            },
        )
        config = {
            "type": MODEL_TYPE,
            "format_version": MODEL_VERSION,
            "head": self.head.config.to_dict(),
            "encoder": self.encoder_source,
            "logit_scale": self.logit_scale,
        }
        if self.lineage:
            config["lineage"] = self.lineage
        if self.text_adapter is not None or self._adapter_files is not None:
            import shutil

            from asymvlm.io import atomic_directory

            with atomic_directory(directory / ADAPTER_DIR) as tmp:
                if self.text_adapter is not None:
                    self.text_adapter.save_pretrained(str(tmp))
                else:
                    shutil.copytree(self._adapter_files, tmp, dirs_exist_ok=True)
            config["text_adapter"] = ADAPTER_DIR
        if self.text_base_delta:
            atomic_save_safetensors(
                self.text_base_delta,
                directory / BASE_DELTA_NAME,
                metadata={"format": "pt", "type": f"{MODEL_TYPE}.text_base_delta",
                          "tensors": tensors_json(self.text_base_delta)},
            )  # fmt: skip
            config["text_base_delta"] = BASE_DELTA_NAME
        elif (directory / BASE_DELTA_NAME).is_file() and not (directory / BASE_DELTA_NAME).is_symlink():
            # a previous save's updates: not this model's (a load would refuse a folder holding them unnamed)
            (directory / BASE_DELTA_NAME).unlink()
        if self.confidence is not None:
            from asymvlm.confidence import CONFIDENCE_NAME

            self.confidence.save(directory)
            config["confidence"] = CONFIDENCE_NAME
        atomic_write_json(config, directory / CONFIG_NAME)
        if card is not False:
            from asymvlm.hub import write_model_card

            write_model_card(directory, self.model_card(**(dict(card) if isinstance(card, Mapping) else {})))
        return directory

    def _check_finite(self, directory: Path) -> None:
        """An :class:`ArtefactError` naming the tensor and the file it would go to when anything this
        model saves is NaN or infinite (the head's weights, the log temperature, the text tower's
        folded updates or LoRA adapter)."""
        if not math.isfinite(self.logit_scale):
            raise ArtefactError(
                f"logit_scale is {self.logit_scale}: not saved to {directory / CONFIG_NAME}; nothing was written"
            )
        require_finite(self.head.state_dict(), directory / WEIGHTS_NAME)
        if self.text_base_delta:
            require_finite(self.text_base_delta, directory / BASE_DELTA_NAME)
        if self.text_adapter is not None:
            lora = {k: p for k, p in self.text_adapter.named_parameters() if "lora_" in k}
            require_finite(lora, directory / ADAPTER_DIR)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        commit_message: str = "Upload AsymVLM",
        create_pr: bool = False,
        card: bool | Mapping[str, Any] = True,
    ) -> Any:
        """Save the model to a temporary folder and upload it to the Hub repo ``repo_id``
        (:func:`asymvlm.hub.push_to_hub`: the repo is created if needed; ``private`` applies to a new
        one). Needs the network and a token with write access. To keep the card of a saved run
        (its data, recipe and metrics), push its folder with :func:`asymvlm.hub.push_to_hub` instead.

        Args:
            repo_id: ``user/repo``.
            private, token, revision, commit_message, create_pr: as ``huggingface_hub.HfApi``'s.
            card: as :meth:`save_pretrained` (the card's loading example names ``repo_id``).

        Returns:
            The upload's ``CommitInfo``.
        """
        import tempfile

        from asymvlm.hub import push_to_hub

        info = {**(dict(card) if isinstance(card, Mapping) else {}), "repo_id": repo_id}
        with tempfile.TemporaryDirectory(prefix="asymvlm-push-") as tmp:
            folder = self.save_pretrained(Path(tmp) / "model", card=info if card is not False else False)
            return push_to_hub(
                folder,
                repo_id,
                private=private,
                token=token,
                revision=revision,
                commit_message=commit_message,
                create_pr=create_pr,
            )

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        *,
        load_encoder: bool | str = "auto",
        device: str | torch.device | None = None,
        check_fingerprint: bool = True,
        revision: str | None = None,
        **encoder_kwargs,
    ) -> AsymVLM:
        """Load a saved model.

        Args:
            directory: what :meth:`save_pretrained` wrote: a folder, or a Hugging Face Hub model id
                (``user/repo``; fetched into the Hub cache, which ``HF_HUB_OFFLINE`` keeps to; see
                :mod:`asymvlm.hub`).
            revision: the Hub revision (branch, tag or commit) of a model id.
            load_encoder: ``"auto"`` (load it when the config names one), True (require it) or
                False (embeddings only).
            device: device for the head (and the encoder).
            check_fingerprint: raise :class:`EncoderMismatchError` if the loaded encoder's weights
                differ from those the model was saved with.
            **encoder_kwargs: passed to :func:`~asymvlm.encoders.load_encoder` (e.g. ``cache_dir``).
        """
        from asymvlm.hub import resolve_artefact

        directory = resolve_artefact(directory, revision=revision, cache_dir=encoder_kwargs.get("cache_dir"))
        if not directory.is_dir():
            raise ArtefactError(f"no saved AsymVLM at {directory}")
        cfg_path = inside_folder(directory, CONFIG_NAME)  # a link to another model's config is refused
        cfg = read_tagged_json(
            cfg_path,
            MODEL_TYPE,
            MODEL_VERSION,
            required=("head", "encoder", "logit_scale"),
            known=("text_adapter", "text_base_delta", "lineage", "confidence"),
            allow_nan=False,
        )
        head_config = head_config_of(cfg["head"], cfg_path)
        check_model_config(cfg, cfg_path, head_config, check_fingerprint=check_fingerprint)
        head = _load_head(directory, head_config, cfg, check_fingerprint=check_fingerprint, device=device)
        source = cfg["encoder"]
        encoder = _load_frozen_encoder(directory, source, load_encoder, check_fingerprint, device, encoder_kwargs)
        base_delta, adapter_path = _load_text_updates(directory, cfg_path, cfg, encoder)
        try:
            model = cls(
                head,
                encoder,
                logit_scale=float(cfg["logit_scale"]),
                encoder_source=source,
                text_base_delta=base_delta,
                lineage=cfg.get("lineage"),
            )
        except ConfigError as err:  # checked above; a rule of the constructor's that the load missed
            raise ArtefactError(f"{cfg_path}: {err}") from None
        if adapter_path is not None:
            model._adapter_files = adapter_path
        if cfg.get("confidence"):
            model.confidence = _load_confidence(directory, cfg, model.dim)
        return model

    def extra_repr(self) -> str:
        enc = self.encoder.spec if self.encoder is not None else (self.encoder_source or {}).get("spec")
        return f"family={self.family!r}, dim={self.dim}, encoder={enc!r}"


# ----------------------------------------------------------------------------------------------
# the parts of a load (from_pretrained), each after the checks of asymvlm.model_format
# ----------------------------------------------------------------------------------------------
def _load_head(
    directory: Path, head_config: HeadConfig, cfg: dict[str, Any], *, check_fingerprint: bool, device: Any
) -> TextHead:
    """The head with its saved weights; their header is checked first, before any allocation: keys,
    shapes, dtypes and the head config they were saved with must be this config's."""
    weights = inside_folder(directory, WEIGHTS_NAME)
    check_weights_header(weights, head_config, cfg, check_fingerprint=check_fingerprint)
    head = TextHead(config=head_config)
    state = load_safetensors(weights, mmap=False)
    bad = non_finite_key(state)
    if bad is not None:
        raise ArtefactError(f"{weights}: tensor {bad!r} holds NaN or inf")
    try:
        head.load_state_dict(state)
    except RuntimeError as err:
        raise ArtefactError(f"{weights} does not fit the head config in {CONFIG_NAME}: {err}") from err
    if device is not None:
        head = head.to(device)
    return head


def _load_frozen_encoder(
    directory: Path,
    source: Mapping[str, Any] | None,
    load_encoder: bool | str,
    check_fingerprint: bool,
    device: Any,
    encoder_kwargs: Mapping[str, Any],
) -> Any | None:
    """The frozen encoder the config names (None when it names none and ``load_encoder`` is "auto",
    or when ``load_encoder`` is False), its fingerprint checked against the saved one."""
    has_spec = bool(source and source.get("spec"))
    want = load_encoder is True or (load_encoder == "auto" and has_spec)
    if load_encoder is True and not has_spec:
        raise ConfigError(f"{directory} was saved without an encoder; load it with load_encoder=False")
    if not want:
        return None
    from asymvlm.encoders import load_encoder as _load

    encoder = _load(source["spec"], source.get("pretrained"), device=device, **encoder_kwargs)
    if check_fingerprint and source.get("fingerprint") and encoder.fingerprint != source["fingerprint"]:
        raise EncoderMismatchError(
            f"the encoder {source['spec']!r} (pretrained={source.get('pretrained')!r}) loaded now has "
            f"other weights (fingerprint {encoder.fingerprint[:16]}...) than when the model was saved "
            f"({source['fingerprint'][:16]}...); pass check_fingerprint=False to use it anyway"
        )
    return encoder


def _load_text_updates(
    directory: Path, cfg_path: Path, cfg: dict[str, Any], encoder: Any | None
) -> tuple[dict[str, Tensor] | None, Path | None]:
    """The text tower's saved updates: ``(folded dense updates, LoRA adapter folder)``, each None when
    the config names none; both are applied to ``encoder`` when there is one (a warning otherwise)."""
    base_delta = None
    delta_path = config_file(directory, cfg_path, "text_base_delta", cfg, BASE_DELTA_NAME)
    adapter_path = config_file(directory, cfg_path, "text_adapter", cfg, None)
    if delta_path is not None:
        check_delta_header(delta_path)
        base_delta = load_safetensors(delta_path, mmap=False)
        bad = non_finite_key(base_delta)
        if bad is not None:
            raise ArtefactError(f"{delta_path}: tensor {bad!r} holds NaN or inf")
        if encoder is not None:
            try:
                _add_to_weights(encoder, base_delta)
            except ArtefactError as err:
                raise ArtefactError(f"{delta_path}: {err}") from None
    if adapter_path is not None and encoder is not None:
        apply_text_adapter(encoder, adapter_path)
    if (cfg.get("text_adapter") or cfg.get("text_base_delta")) and encoder is None:
        warnings.warn(
            f"{directory} adapts the text tower (LoRA / folded updates), which needs the encoder; text "
            f"embeddings passed to this encoder-less model must come from the adapted tower",
            stacklevel=3,
        )
    return base_delta, adapter_path


def _load_confidence(directory: Path, cfg: dict[str, Any], dim: int) -> Any:
    """The saved confidence model (:mod:`asymvlm.confidence`), its familiarity density of the head's dimension."""
    from asymvlm.confidence import CONFIDENCE_NAME, ConfidenceModel

    if cfg["confidence"] != CONFIDENCE_NAME:
        raise ArtefactError(f"{directory / CONFIG_NAME}: 'confidence' must be {CONFIDENCE_NAME!r}")
    confidence = ConfidenceModel.load(directory)
    fam = confidence.familiarity
    if fam is not None and fam.dim != dim:
        raise ArtefactError(f"{directory}: the familiarity density has dimension {fam.dim}, the head {dim}")
    return confidence
