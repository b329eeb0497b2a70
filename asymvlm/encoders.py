"""Frozen CLIP / SigLIP encoders from open_clip and transformers behind one loader.

Spec grammar (``load_encoder(spec, pretrained=None, ...)``):

================================================  ==========================================================
spec                                              meaning
================================================  ==========================================================
``open_clip:<name>``                              a built-in (or registered) open_clip architecture, e.g.
                                                  ``open_clip:ViT-B-32``; ``pretrained`` is an open_clip tag
                                                  (``"openai"``, ``"laion2b_s34b_b79k"``, ...) or the path
                                                  of a checkpoint file (.safetensors/.bin/.pt); None keeps
                                                  random weights.
``open_clip:hf-hub:<org>/<repo>``                 an open_clip model on the Hugging Face Hub.
``open_clip:local-dir:<dir>`` or
``open_clip:<dir>``                               a directory with ``open_clip_config.json`` and its
                                                  weights (what ``save_open_clip_dir`` writes).
``hf:<org>/<repo>`` or ``hf:<dir>``               a transformers ``CLIPModel`` / ``SiglipModel`` (any model
                                                  with ``get_text_features`` / ``get_image_features``), from
                                                  the Hub or a ``save_pretrained`` directory.
``hf-text:<org>/<repo>`` or ``hf-text:<dir>``     a text-only transformers model (BERT, MiniLM, any
                                                  ``AutoModel``), mean-pooled over the attention mask (the
                                                  sentence-transformers convention): for captions whose
                                                  image embeddings were made elsewhere (``write_cache``);
                                                  ``encode_image`` is an error.
``<dir>``                                         a local directory, detected: ``open_clip_config.json``
                                                  -> open_clip, ``config.json`` -> transformers.
================================================  ==========================================================

Nothing is downloaded when the weights are local; Hub ids and pretrained tags use the libraries'
own download and cache (and fail with a clear message offline).

Every encoder is frozen (eval mode, no gradients) and returns L2-normalised float32 ``(N, d)``
embeddings from ``encode_image`` / ``encode_text``. ``fingerprint`` is a stable hash of the
spec and the weights (sha256 over every tensor of the state dict in name order), used by the
embedding cache and by saved models to detect a different encoder.

Example (a tiny open_clip architecture shipped with asymvlm, random weights):
    >>> enc = load_encoder("open_clip:asymvlm-tiny-vit")
    >>> enc.encode_text(["a red circle", "a blue square"]).shape
    torch.Size([2, 32])
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from asymvlm.errors import ConfigError, EncoderLoadError, InputError, MissingExtraError
from asymvlm.plugins import load_plugins

__all__ = [
    "FrozenEncoder",
    "OpenCLIPEncoder",
    "HFEncoder",
    "HFTextEncoder",
    "load_encoder",
    "parse_spec",
    "register_open_clip_configs",
    "register_pretrained",
    "LOCAL_PRETRAINED",
    "save_open_clip_dir",
    "weights_fingerprint",
    "MissingExtraError",
    "PACKAGE_MODEL_CONFIGS",
]

PACKAGE_MODEL_CONFIGS = Path(__file__).resolve().parent / "model_configs"


# (open_clip architecture, pretrained tag) -> a function returning the local directory of those
# weights: the same role as open_clip's own pretrained registry, for weights that are built or
# found on this machine instead of downloaded. Plug-ins register here (the toy CLIPs of
# asymvlm.worlds); a lookup loads them first (asymvlm.plugins.load_plugins): the core never imports them.
LOCAL_PRETRAINED: dict[tuple[str, str], Callable[[], str | Path]] = {}
_EXCLUSIVE: set[str] = set()


def register_pretrained(name: str, tag: str, resolve: Callable[[], str | Path], *, exclusive: bool = False) -> None:
    """Make ``load_encoder(f"open_clip:{name}", pretrained=tag)`` load the open_clip directory that
    ``resolve()`` returns (called on each load: it may build and cache the weights first).

    Args:
        name: the open_clip architecture (its config must be registered with open_clip).
        tag: the pretrained tag users pass.
        resolve: returns the local directory (``open_clip_config.json`` + weights).
        exclusive: the architecture has no other weights: any other tag (or none) is an error.

    Example:
        >>> register_pretrained("asymvlm-tiny-vit", "zeros", lambda: "/nonexistent")  # doctest: +SKIP
    """
    LOCAL_PRETRAINED[(name, tag)] = resolve
    if exclusive:
        _EXCLUSIVE.add(name)


def weights_fingerprint(module: nn.Module, spec: str = "") -> str:
    """sha256 over ``spec`` and every tensor of ``module.state_dict()`` (name, dtype, shape, bytes).

    Example:
        >>> fp = weights_fingerprint(torch.nn.Linear(2, 2), "demo")
        >>> len(fp)
        64
    """
    h = hashlib.sha256()
    h.update(spec.encode())
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"|{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class FrozenEncoder:
    """A frozen dual encoder. Subclasses implement ``_image_features`` and ``_text_features``.

    Attributes:
        spec: the spec string it was loaded from (plus ``pretrained``, see :attr:`source`).
        model: the underlying ``torch.nn.Module`` (eval mode, ``requires_grad=False``).
        dim: embedding dimension d.
        device: where the model runs.
        tokenizer: the backend's tokenizer; :meth:`tokenize` applies it with the right padding.
        preprocess: PIL images -> the pixel tensor the model expects.
    """

    backend = "abstract"

    def __init__(self, spec: str, pretrained: str | None, model: nn.Module, device: torch.device):
        self.spec = spec
        self.pretrained = pretrained
        if not hasattr(self, "_resolved_name"):
            self._resolved_name = spec.split(":", 1)[1]
        self.model = model.eval().requires_grad_(False)
        self.device = device
        self._fingerprint: str | None = None
        with torch.no_grad():
            self.dim = int(self.encode_text(["a"]).shape[1])

    @property
    def tokenizer(self) -> Any:
        """The backend's own tokenizer (open_clip tokenizer or a transformers tokenizer)."""
        return self._tokenizer

    @property
    def source(self) -> dict[str, Any]:
        """How to load this encoder again: ``load_encoder(**source)``."""
        return {"spec": self.spec, "pretrained": self.pretrained}

    @property
    def fingerprint(self) -> str:
        """Stable hash of what determines the embeddings: the backend, the model name (local paths
        excluded, so a moved checkpoint keeps its fingerprint), the preprocessing and tokenizer
        settings, and every weight tensor. Computed once (~1 s per 500 MB of weights)."""
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.model, self._fingerprint_spec())
        return self._fingerprint

    def _fingerprint_spec(self) -> str:
        name = self._resolved_name
        if name.startswith("local-dir:") or os.path.isdir(name):  # where a local model lives is irrelevant
            return f"{self.backend}|<local>|None|{self._settings()}"
        pretrained = self.pretrained
        if pretrained is not None and os.path.isfile(str(pretrained)):
            pretrained = "<file>"
        return f"{self.backend}|{name}|{pretrained}|{self._settings()}"

    def _settings(self) -> str:
        """Preprocessing/tokenizer settings that change the embeddings (part of the fingerprint)."""
        return ""

    # -- to implement --------------------------------------------------------------------------
    def preprocess(self, images: Sequence[Any]) -> Tensor:
        """PIL images -> pixel tensor (N, 3, H, W) as the model expects."""
        raise NotImplementedError

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """Strings -> model inputs (token ids and, where used, an attention mask)."""
        raise NotImplementedError

    def _image_features(self, pixels: Tensor) -> Tensor:
        raise NotImplementedError

    def _text_features(self, tokens: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    # -- public ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_image(self, images: Sequence[Any] | Tensor, *, batch_size: int = 64, progress: bool = False) -> Tensor:
        """Unit image embeddings (N, d), float32, on CPU.

        Args:
            images: PIL images (or anything ``preprocess`` accepts), or an already preprocessed
                pixel tensor (N, 3, H, W).
            batch_size: images per forward pass.
            progress: show a progress bar.
        """
        n = len(images)
        if n == 0:
            raise InputError("encode_image got no images")
        out = []
        for s in tqdm(range(0, n, batch_size), desc="encode images", disable=not progress, leave=False):
            chunk = images[s : s + batch_size]
            pixels = chunk if isinstance(chunk, Tensor) else self.preprocess(chunk)
            feats = self._image_features(pixels.to(self.device, dtype=self._input_dtype()))
            out.append(nn.functional.normalize(feats.float(), dim=-1).cpu())
        return _checked(torch.cat(out), "image")

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], *, batch_size: int = 256, progress: bool = False) -> Tensor:
        """Unit text embeddings (N, d), float32, on CPU."""
        if isinstance(texts, str):
            raise TypeError("encode_text expects a list of strings, got a single str")
        n = len(texts)
        if n == 0:
            raise InputError("encode_text got no texts")
        out = []
        for s in tqdm(range(0, n, batch_size), desc="encode texts", disable=not progress, leave=False):
            tokens = {k: v.to(self.device) for k, v in self.tokenize(list(texts[s : s + batch_size])).items()}
            out.append(nn.functional.normalize(self._text_features(tokens).float(), dim=-1).cpu())
        return _checked(torch.cat(out), "text")

    def _input_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spec={self.spec!r}, pretrained={self.pretrained!r}, dim={self.dim})"


def _checked(x: Tensor, what: str) -> Tensor:
    if not bool(torch.isfinite(x).all()):
        row = int(torch.nonzero(~torch.isfinite(x).all(-1))[0, 0])
        raise FloatingPointError(f"the encoder produced a non-finite {what} embedding (row {row})")
    return x


# ----------------------------------------------------------------------------------------------
# open_clip
# ----------------------------------------------------------------------------------------------
def register_open_clip_configs(path: str | Path = PACKAGE_MODEL_CONFIGS) -> None:
    """Make the JSON model configs in ``path`` (a file or a folder) known to open_clip."""
    import open_clip

    open_clip.add_model_config(Path(path))


def _require_timm(what: str) -> None:
    try:
        import timm  # noqa: F401
    except ImportError as err:
        raise MissingExtraError(
            f"{what} uses a timm vision tower (SigLIP-style open_clip models); install the extra: "
            f"pip install 'asymvlm[siglip]'  (or: pip install timm)"
        ) from err


class OpenCLIPEncoder(FrozenEncoder):
    """An open_clip model (``open_clip.create_model_and_transforms``) as a frozen encoder."""

    backend = "open_clip"

    def __init__(
        self,
        name: str,
        pretrained: str | None = None,
        *,
        device=None,
        precision: str = "fp32",
        cache_dir: str | None = None,
    ):
        import open_clip

        register_open_clip_configs()
        device = _resolve_device(device)
        spec_name, spec_pretrained = name, pretrained
        load_plugins()  # the plug-ins' registered tags (asymvlm.plugins), before the lookup
        resolve = LOCAL_PRETRAINED.get((name, pretrained))
        if resolve is not None:  # a registered local tag: built or found on this machine, no download
            name, pretrained = f"local-dir:{resolve()}", None
        elif name in _EXCLUSIVE:
            tags = sorted(tag for n, tag in LOCAL_PRETRAINED if n == name)
            raise ConfigError(
                f"{name} is loaded with pretrained={tags[0]!r} (built on first use), or from its local directory"
                if len(tags) == 1
                else f"{name} is loaded with one of the pretrained tags {tags}, or from its local directory"
            )
        cfg = self._config(name)
        if cfg is not None and "timm_model_name" in cfg.get("vision_cfg", {}):
            _require_timm(f"open_clip model {name!r}")
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=pretrained, device=device, precision=precision, cache_dir=cache_dir
            )
        except RuntimeError as err:
            if pretrained and not os.path.isfile(str(pretrained)):
                raise EncoderLoadError(
                    f"could not load open_clip {name!r} with pretrained={pretrained!r}: {err}. Without network "
                    f"access, pass the path of a local checkpoint file as pretrained=..."
                ) from err
            if pretrained:  # the user's checkpoint file: unreadable, or of another architecture
                raise EncoderLoadError(f"could not load open_clip {name!r} from {pretrained}: {err}") from err
            raise
        self._transform = preprocess
        self._tokenizer = open_clip.get_tokenizer(name)
        self._resolved_name = name
        super().__init__(f"open_clip:{spec_name}", spec_pretrained, model, device)

    @staticmethod
    def _config(name: str) -> dict | None:
        import open_clip

        if name.startswith("local-dir:"):
            path = Path(name[len("local-dir:") :]) / "open_clip_config.json"
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path} not found: an open_clip directory holds open_clip_config.json "
                    f"({{'model_cfg': ..., 'preprocess_cfg': ...}}) and the weights (open_clip_model.safetensors)"
                )
            from asymvlm.io import read_json

            doc = read_json(path)  # an ArtefactError naming the file when corrupt or nested too deeply
            if not isinstance(doc, dict) or not isinstance(doc.get("model_cfg", {}), dict):
                from asymvlm.errors import ArtefactError

                raise ArtefactError(f"{path}: expected an object whose 'model_cfg' is an object")
            return doc.get("model_cfg")
        if name.startswith("hf-hub:"):
            return None
        cfg = open_clip.get_model_config(name)
        if cfg is None:
            raise ConfigError(f"unknown open_clip model {name!r}; known: {', '.join(sorted(open_clip.list_models()))}")
        return cfg

    def preprocess(self, images: Sequence[Any]) -> Tensor:
        return torch.stack([self._transform(im) for im in images])

    def _settings(self) -> str:
        ctx = getattr(self._tokenizer, "context_length", None)
        transform = re.sub(r" at 0x[0-9a-fA-F]+", "", repr(self._transform))  # no memory addresses
        return f"{transform}|{type(self._tokenizer).__name__}|{ctx}"

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        return {"input_ids": self._tokenizer(list(texts))}

    def _image_features(self, pixels: Tensor) -> Tensor:
        return self.model.encode_image(pixels)

    def _text_features(self, tokens: dict[str, Tensor]) -> Tensor:
        return self.model.encode_text(tokens["input_ids"])


def save_open_clip_dir(
    model: nn.Module, model_cfg: dict, directory: str | Path, preprocess_cfg: dict | None = None
) -> Path:
    """Write an open_clip model as ``open_clip_config.json`` + ``open_clip_model.safetensors``.

    The layout is open_clip's own ``local-dir:`` / Hub format, so
    ``load_encoder("open_clip:<directory>")`` (or ``open_clip.create_model("local-dir:...")``)
    loads it back. Files are written atomically.
    """
    from asymvlm.io import atomic_save_safetensors, atomic_write_json

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_save_safetensors(state, directory / "open_clip_model.safetensors")
    atomic_write_json(
        {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg or {}}, directory / "open_clip_config.json"
    )
    return directory


# ----------------------------------------------------------------------------------------------
# transformers
# ----------------------------------------------------------------------------------------------
class HFEncoder(FrozenEncoder):
    """A transformers dual encoder (``CLIPModel``, ``SiglipModel``, ...) as a frozen encoder."""

    backend = "hf"

    def __init__(
        self,
        name_or_path: str,
        *,
        device=None,
        precision: str = "fp32",
        cache_dir: str | None = None,
        revision: str | None = None,
    ):
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        device = _resolve_device(device)
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
        if dtype is None:
            raise ConfigError(f"precision must be fp32, fp16 or bf16, got {precision!r}")
        kwargs = {"cache_dir": cache_dir, "revision": revision}
        try:
            model = AutoModel.from_pretrained(name_or_path, dtype=dtype, **kwargs)
        except TypeError:  # transformers < 4.56 spells it torch_dtype
            model = AutoModel.from_pretrained(name_or_path, torch_dtype=dtype, **kwargs)
        except OSError as err:
            raise EncoderLoadError(
                f"could not load transformers model {name_or_path!r}: {err}. Without network access pass a local "
                f"directory written by save_pretrained (config.json, model.safetensors, tokenizer, preprocessor)"
            ) from err
        if not (hasattr(model, "get_text_features") and hasattr(model, "get_image_features")):
            raise ConfigError(
                f"{name_or_path!r} loads as {type(model).__name__}, which is not a dual encoder "
                f"(no get_text_features/get_image_features); use a CLIP or SigLIP checkpoint"
            )
        self._tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
        self._image_processor = AutoImageProcessor.from_pretrained(name_or_path, **kwargs)
        text_cfg = getattr(model.config, "text_config", model.config)
        self._max_length = int(getattr(text_cfg, "max_position_embeddings", 77))
        # SigLIP was trained on max-length padded sequences; CLIP pools at the EOS token.
        self._padding = "max_length" if "siglip" in model.config.model_type else True
        super().__init__(f"hf:{name_or_path}", None, model.to(device), device)

    def preprocess(self, images: Sequence[Any]) -> Tensor:
        return self._image_processor(images=list(images), return_tensors="pt")["pixel_values"]

    def _settings(self) -> str:
        return (
            f"{self._image_processor.to_json_string()}|{type(self._tokenizer).__name__}|"
            f"{len(self._tokenizer)}|{self._padding}|{self._max_length}"
        )

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        enc = self._tokenizer(
            list(texts), padding=self._padding, truncation=True, max_length=self._max_length, return_tensors="pt"
        )
        keep = ("input_ids", "attention_mask") if self._padding is True else ("input_ids",)
        return {k: enc[k] for k in keep if k in enc}

    @staticmethod
    def _pooled(out: Any) -> Tensor:
        # transformers >= 5 returns a BaseModelOutputWithPooling, earlier versions a tensor
        return out if isinstance(out, Tensor) else out.pooler_output

    def _image_features(self, pixels: Tensor) -> Tensor:
        return self._pooled(self.model.get_image_features(pixel_values=pixels))

    def _text_features(self, tokens: dict[str, Tensor]) -> Tensor:
        return self._pooled(self.model.get_text_features(**tokens))


class HFTextEncoder(FrozenEncoder):
    """A text-only transformers model as the frozen text tower: mean of the last hidden states over
    the attention mask (sentence-transformers' pooling), L2-normalised. Image embeddings come from
    elsewhere (a cache written with ``write_cache``); ``encode_image`` raises."""

    backend = "hf-text"

    def __init__(self, name_or_path: str, *, device=None, precision: str = "fp32", cache_dir: str | None = None):
        from transformers import AutoModel, AutoTokenizer

        device = _resolve_device(device)
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
        if dtype is None:
            raise ConfigError(f"precision must be fp32, fp16 or bf16, got {precision!r}")
        try:
            model = AutoModel.from_pretrained(name_or_path, cache_dir=cache_dir).to(dtype)
            self._tokenizer = AutoTokenizer.from_pretrained(name_or_path, cache_dir=cache_dir)
        except OSError as err:
            raise EncoderLoadError(
                f"could not load transformers text model {name_or_path!r}: {err}. Without network access pass a "
                f"local directory (config.json, weights, tokenizer files)"
            ) from err
        self._max_length = min(int(getattr(model.config, "max_position_embeddings", 512)), 512)
        super().__init__(f"hf-text:{name_or_path}", None, model.to(device), device)

    def _no_images(self) -> ConfigError:
        return ConfigError(
            f"{self.spec} is a text-only encoder: it embeds no images. Write the image embeddings you have "
            f"with asymvlm.cache.write_cache (README: 'Precomputed embeddings')"
        )

    def preprocess(self, images: Sequence[Any]) -> Tensor:
        raise self._no_images()

    def _image_features(self, pixels: Tensor) -> Tensor:
        raise self._no_images()

    def _settings(self) -> str:
        return f"{type(self._tokenizer).__name__}|{len(self._tokenizer)}|mean|{self._max_length}"

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        enc = self._tokenizer(
            list(texts), padding=True, truncation=True, max_length=self._max_length, return_tensors="pt"
        )
        return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}

    def _text_features(self, tokens: dict[str, Tensor]) -> Tensor:
        hidden = self.model(**tokens).last_hidden_state  # (N, L, d)
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


# ----------------------------------------------------------------------------------------------
# the loader
# ----------------------------------------------------------------------------------------------
def parse_spec(spec: str) -> tuple[str, str]:
    """Split a spec into ``(backend, name)`` with backend ``"open_clip"``, ``"hf"`` or ``"hf-text"``.

    Example:
        >>> parse_spec("open_clip:ViT-B-32"), parse_spec("hf:openai/clip-vit-base-patch32")
        (('open_clip', 'ViT-B-32'), ('hf', 'openai/clip-vit-base-patch32'))
    """
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"encoder spec must be a non-empty string, got {spec!r}")
    for prefix, backend in (("open_clip:", "open_clip"), ("hf-text:", "hf-text"), ("hf:", "hf")):
        if spec.startswith(prefix):
            name = spec[len(prefix) :]
            if not name:
                raise ConfigError(f"encoder spec {spec!r} names no model")
            if backend == "open_clip" and name.startswith("local-dir:"):
                name = f"local-dir:{os.path.abspath(name[len('local-dir:') :])}"
            elif backend == "open_clip" and not name.startswith("hf-hub:") and Path(name).is_dir():
                name = f"local-dir:{os.path.abspath(name)}"
            elif backend in ("hf", "hf-text") and Path(name).is_dir():
                name = os.path.abspath(name)
            return backend, name
    path = Path(spec)
    if path.is_dir():
        if (path / "open_clip_config.json").is_file():
            return "open_clip", f"local-dir:{os.path.abspath(spec)}"
        if (path / "config.json").is_file():
            return "hf", os.path.abspath(spec)
        raise ConfigError(
            f"directory {spec!r} holds neither open_clip_config.json (open_clip) nor config.json (transformers)"
        )
    raise ConfigError(
        f"cannot parse encoder spec {spec!r}: use 'open_clip:<name>', 'open_clip:hf-hub:<repo>', "
        f"'open_clip:<dir>', 'hf:<hub id or dir>', 'hf-text:<hub id or dir>' or an existing local directory"
    )


_BACKENDS: dict[str, Callable[..., FrozenEncoder]] = {
    "open_clip": lambda name, pretrained, **kw: OpenCLIPEncoder(name, pretrained, **kw),
    "hf": lambda name, pretrained, **kw: HFEncoder(name, **kw),
    "hf-text": lambda name, pretrained, **kw: HFTextEncoder(name, **kw),
}


def load_encoder(
    spec: str,
    pretrained: str | None = None,
    *,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    cache_dir: str | None = None,
) -> FrozenEncoder:
    """Load a frozen CLIP/SigLIP encoder (see the module docstring for the spec grammar).

    Args:
        spec: ``open_clip:<name>``, ``open_clip:hf-hub:<repo>``, ``open_clip:<dir>``, ``hf:<id or dir>``
            or a local directory.
        pretrained: open_clip only: a pretrained tag or a checkpoint file.
        device: ``"cpu"``, ``"cuda"``, ... or ``"auto"``/None (CUDA when available).
        precision: ``"fp32"`` (default), ``"fp16"`` or ``"bf16"``.
        cache_dir: download cache for Hub ids and tags.

    Raises:
        ConfigError: an unparseable spec or an unknown architecture.
        EncoderLoadError: the weights cannot be loaded (offline without a local copy, a bad checkpoint).
        MissingExtraError: an optional dependency (timm) is missing; names the extra.
    """
    backend, name = parse_spec(spec)
    if backend in ("hf", "hf-text") and pretrained is not None:
        raise ConfigError("pretrained= is for open_clip specs; a transformers spec names its weights itself")
    return _BACKENDS[backend](name, pretrained, device=device, precision=precision, cache_dir=cache_dir)
