"""Fisher-weighted merging of AsymVLM heads, with the Fisher of each head's own output distribution.

Fisher merging (Matena & Raffel 2022, "Merging Models with Fisher-Weighted Averaging",
https://arxiv.org/abs/2111.09832) reads each fine-tuned model as a Laplace approximation of its
posterior, a Gaussian at ``theta_t`` with precision ``F_t`` (the diagonal Fisher information), and
merges by the mode of their weighted product, per coordinate::

    theta* = sum_t w_t F_t theta_t / sum_t w_t F_t                (the paper's eq. 3, diagonal)

On task vectors (``tau_t = theta_t - theta_base``) it is the same average of the ``tau_t``, so the
merge method is an aggregator of the federated core: ``base + lam * FisherWeighted(taus)``.

An AsymVLM head is a conditional density ``q(y | x)`` over image embeddings ``y`` on the sphere
given a text embedding ``x`` (vMF or Power Spherical, :mod:`asymvlm.heads`), so its Fisher is the
paper's, with no classifier softmax in between (:func:`head_fisher`)::

    F = 1/N sum_i E_{y ~ q(.|x_i)} [ (d/dtheta log q(y | x_i))^2 ]      ("sampled": the true Fisher)
    F = 1/N sum_i (d/dtheta log q(y_i | x_i))^2, y_i the paired image  ("empirical")

``sampled`` draws one ``y`` per text from the head's own distribution (the paper's definition,
section 2: the expectation is over the model's predictive distribution, not the labels);
``empirical`` uses the cache's paired image (cheaper to explain, biased: Kunstner et al. 2019).

The per-example gradients come from ``torch.func`` (``functional_call`` + ``vmap(grad)``): one
batched backward per batch, squared and summed in float64. The log-normaliser ``log C(kappa)`` is a
custom autograd function (log-space Bessel functions, :mod:`asymvlm.special`) with data-dependent
branches that ``vmap`` cannot trace; inside ``vmap`` it is replaced by its first-order expansion at
the batch's concentrations ``log C(k0) + log C'(k0) (kappa - k0)`` (``k0`` and ``log C'(k0)``
computed outside by ordinary autograd): equal in value and in first derivative at ``kappa = k0``,
which is all a gradient needs. The test compares against a plain per-example
``torch.autograd.grad`` loop through the real ``log_prob`` in float64.

A Fisher is saved next to its model (:func:`save_fisher`): ``fisher.safetensors`` (one float32
tensor per head parameter) + ``fisher.json`` (type tag, version, estimator, pairs, the cache, the
head's weight fingerprint: a Fisher of other weights is refused on load). :func:`compute_fisher`
does both from a saved model and an embedding cache.

The merge (:class:`FisherWeighted`, registry entry ``fisher``) needs a ``.fisher`` on every task
vector (:func:`with_fisher`); :func:`attach_fishers` does it for saved AsymVLM inputs, and adds the
base as one more task whose task vector is zero and whose Fisher is the base's own (when the base
has one): coordinates the base's data pins down stay near the base.

Example:
    >>> import torch
    >>> a = with_fisher({"w": torch.tensor([1.0, 1.0])}, {"w": torch.tensor([3.0, 0.0])})
    >>> b = with_fisher({"w": torch.tensor([0.0, 2.0])}, {"w": torch.tensor([1.0, 1.0])})
    >>> FisherWeighted(floor=0.0)([a, b]).delta["w"].tolist()  # (3*1 + 1*0) / 4, and b alone
    [0.75, 2.0]
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from asymvlm.errors import MergeInputError
from asymvlm.federated.core import AggregateResult, Aggregator, Params, check_weights, keys_of, stack_key

__all__ = [
    "ESTIMATORS",
    "FISHER_NAME",
    "FISHER_META",
    "FISHER_TYPE",
    "FisherWeighted",
    "FisherDelta",
    "SavedFisher",
    "with_fisher",
    "fisher_pairs",
    "head_fisher",
    "save_fisher",
    "load_fisher",
    "compute_fisher",
    "attach_fishers",
]

ESTIMATORS = ("sampled", "empirical")
FISHER_NAME = "fisher.safetensors"
FISHER_META = "fisher.json"
FISHER_TYPE = "asymvlm.fisher"
FISHER_VERSION = 1
# what fisher.json records (compute_fisher writes them all; other keys are dropped on load, with a warning)
_META_KEYS = ("estimator", "pairs", "seed", "cache", "head_fingerprint", "family", "reference", "keys")
_HOW = (
    "compute it with `asymvlm-merge --compute_fisher MODEL --fisher_cache CACHE` or "
    "asymvlm.merging.fisher.compute_fisher(model_dir, cache) (the head's Fisher on an embedding cache of its task, "
    "saved as fisher.safetensors next to the model)"
)


# ----------------------------------------------------------------------------------------------
# the Fisher of a head
# ----------------------------------------------------------------------------------------------
def _open_cache(cache: Any) -> Any:
    from asymvlm.cache import EmbeddingCache

    return cache if isinstance(cache, EmbeddingCache) else EmbeddingCache.load(cache)


def fisher_pairs(
    head: torch.nn.Module,
    cache: Any,
    *,
    estimator: str = "sampled",
    max_pairs: int | None = None,
    batch_size: int = 32,
    seed: int = 0,
) -> Iterator[tuple[Tensor, Tensor]]:
    """The ``(x (B, d), y (B, d))`` batches :func:`head_fisher` averages over, in the head's dtype
    and device: the cache's texts (all, or ``max_pairs`` of them drawn without replacement with
    ``seed``) with their paired images (``empirical``) or one draw from ``head(x)`` each
    (``sampled``; the draws of batch ``j`` are seeded by ``(seed, j)``, so they do not depend on
    anything else that uses the random number generator).

    Example:
        >>> import tempfile
        >>> from asymvlm.cache import write_cache
        >>> from asymvlm.heads import TextHead
        >>> img = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
        >>> c = write_cache(tempfile.mkdtemp() + "/c", img, img, torch.arange(4))
        >>> [tuple(x.shape) for x, y in fisher_pairs(TextHead(8, hidden_dims=(16,)), c, batch_size=3)]
        [(3, 8), (1, 8)]
    """
    if estimator not in ESTIMATORS:
        from asymvlm.errors import ConfigError

        raise ConfigError(f"estimator={estimator!r} is not one of {list(ESTIMATORS)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        from asymvlm.errors import ConfigError

        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    cache = _open_cache(cache)
    n = int(cache.text_embeddings.shape[0])
    if n == 0:
        raise MergeInputError(f"the cache at {cache.path} holds no texts: a Fisher needs at least one pair")
    idx = torch.arange(n)
    if max_pairs is not None:
        if isinstance(max_pairs, bool) or not isinstance(max_pairs, int) or max_pairs < 1:
            from asymvlm.errors import ConfigError

            raise ConfigError(f"max_pairs must be a positive integer or None, got {max_pairs!r}")
        if max_pairs < n:
            idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_pairs].sort().values
    p = next(head.parameters())
    for j, start in enumerate(range(0, len(idx), batch_size)):
        rows = idx[start : start + batch_size]
        x = cache.text_embeddings[rows].to(device=p.device, dtype=p.dtype)  # (B, d)
        if estimator == "empirical":
            y = cache.image_embeddings[cache.text_image_index[rows]].to(device=p.device, dtype=p.dtype)
        else:
            devices = [p.device] if p.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                torch.manual_seed(seed * 1_000_003 + j)
                y = head(x).sample().to(p.dtype)  # (B, d): y ~ q(. | x), one draw per text
        yield x, y


@contextlib.contextmanager
def _unvalidated(head: torch.nn.Module) -> Iterator[None]:
    """The head without its per-call input checks (a host sync ``vmap`` cannot trace; the cache's
    rows were checked when it was loaded)."""
    before = getattr(head, "validate", None)
    if before is not None:
        head.validate = False
    try:
        yield
    finally:
        if before is not None:
            head.validate = before


def _batch_square_grads(head: torch.nn.Module, params: dict[str, Tensor], x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """``sum_i (d/dtheta log q(y_i | x_i))^2`` over one batch, per parameter, in float64."""
    from torch.func import functional_call, grad, vmap

    with torch.no_grad():
        q = head(x)
    cls = type(q)
    # the log-normaliser outside vmap: its value and slope at the batch's concentrations (N,)
    k0 = q.concentration.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        log_c = cls(q.loc.detach(), k0, validate_args=False).log_normalizer
        (slope,) = torch.autograd.grad(log_c.sum(), k0)  # elementwise in kappa: d log C / d kappa
    log_c, k0 = log_c.detach(), k0.detach()

    def log_q(p: dict[str, Tensor], xi: Tensor, yi: Tensor, c0: Tensor, s0: Tensor, kk: Tensor) -> Tensor:
        qi = functional_call(head, p, (xi.unsqueeze(0),))
        cos = (yi.unsqueeze(0).to(qi.loc.dtype) * qi.loc).sum(-1)  # (1,)
        kappa = qi.concentration  # (1,)
        # log C(kappa) to first order at k0 (exact value and gradient at kappa = k0; see the module docstring)
        return cls._log_prob_from_cosine(cos, kappa, c0 + s0 * (kappa - kk)).sum()

    grads = vmap(grad(log_q), in_dims=(None, 0, 0, 0, 0, 0))(params, x, y, log_c, slope, k0)  # {key: (B, ...)}
    return {k: g.to(torch.float64).square().sum(0) for k, g in grads.items()}


def head_fisher(
    head: torch.nn.Module,
    cache: Any,
    *,
    estimator: str = "sampled",
    max_pairs: int | None = None,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Tensor]:
    """The diagonal Fisher information of ``log q(y | x)`` w.r.t. the head's parameters, averaged
    over the cache's texts (Matena & Raffel 2022, https://arxiv.org/abs/2111.09832, section 2).

    Args:
        head: a :class:`~asymvlm.heads.TextHead` (any module whose call returns a vMF/PS
            distribution from :mod:`asymvlm.distributions`).
        cache: an :class:`~asymvlm.cache.EmbeddingCache` or its directory.
        estimator: ``"sampled"`` (``y ~ q(.|x)``: the true Fisher, the paper's) or ``"empirical"``
            (``y`` = the image paired with ``x`` in the cache).
        max_pairs: use at most this many texts (drawn with ``seed``); None: all.
        batch_size: texts per ``vmap``'ed batch (memory: ``batch_size`` copies of the gradient).
        seed: the subset's and the draws' seed (:func:`fisher_pairs`).
        progress: a progress bar over the batches.

    Returns:
        ``{parameter name: (shape) float64 tensor}``, every entry finite and ``>= 0``.

    Example:
        >>> import tempfile
        >>> from asymvlm.cache import write_cache
        >>> from asymvlm.heads import TextHead
        >>> img = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
        >>> c = write_cache(tempfile.mkdtemp() + "/c", img, img, torch.arange(6))
        >>> f = head_fisher(TextHead(8, hidden_dims=(16,)), c, estimator="empirical")
        >>> sorted(f), f["mlp.0.weight"].dtype, bool((f["mlp.0.weight"] >= 0).all())
        (['mlp.0.bias', 'mlp.0.weight', 'mlp.2.bias', 'mlp.2.weight'], torch.float64, True)
    """
    from tqdm.auto import tqdm

    params = {k: v.detach() for k, v in head.named_parameters()}
    if not params:
        raise MergeInputError("the head has no parameters: there is no Fisher to compute")
    total = {k: torch.zeros(v.shape, dtype=torch.float64, device=v.device) for k, v in params.items()}
    n = 0
    batches = fisher_pairs(head, cache, estimator=estimator, max_pairs=max_pairs, batch_size=batch_size, seed=seed)
    with _unvalidated(head):
        for x, y in tqdm(batches, desc=f"Fisher ({estimator})", disable=not progress, unit="batch"):
            for k, v in _batch_square_grads(head, params, x, y).items():
                total[k] += v
            n += x.shape[0]
    out = {k: (v / n).cpu() for k, v in total.items()}
    bad = next((k for k, v in out.items() if not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise MergeInputError(f"the Fisher of {bad!r} is not finite (a NaN or overflowing gradient of log q)")
    return out


# ----------------------------------------------------------------------------------------------
# saved next to the model
# ----------------------------------------------------------------------------------------------
class SavedFisher(dict):
    """A loaded Fisher: ``{parameter name: tensor}`` with its ``meta`` (``fisher.json``) and ``path``."""

    def __init__(self, tensors: Mapping[str, Tensor], meta: dict[str, Any], path: Path):
        super().__init__(tensors)
        self.meta, self.path = meta, path


def _head_weights(model_dir: Path) -> Any:
    from asymvlm.merging.task_vectors import LazyTaskVector, folder_file
    from asymvlm.model_format import WEIGHTS_NAME

    return LazyTaskVector(folder_file(model_dir, WEIGHTS_NAME))


def _check_fisher_values(fisher: Mapping[str, Tensor], where: str) -> None:
    """Floating, finite and ``>= 0`` everywhere (a :class:`MergeInputError` naming the key)."""
    for k, v in fisher.items():
        if not isinstance(v, Tensor) or not v.is_floating_point():
            raise MergeInputError(f"{where}: the Fisher of {k!r} is not a floating-point tensor")
        if not bool(torch.isfinite(v).all()):
            raise MergeInputError(f"{where}: the Fisher of {k!r} contains NaN or inf")
        if bool((v < 0).any()):
            raise MergeInputError(f"{where}: the Fisher of {k!r} has negative entries (a Fisher is >= 0)")


def save_fisher(fisher: Mapping[str, Tensor], model_dir: str | Path, meta: Mapping[str, Any] | None = None) -> Path:
    """Write ``fisher.safetensors`` (float32) and ``fisher.json`` next to the saved model in
    ``model_dir``, each atomically; returns the ``.safetensors`` path. ``meta`` (JSON-ready: the
    estimator, pairs, the cache, ``head_fingerprint``...) goes into ``fisher.json`` with the type
    tag, the version and the fingerprint of the stored tensors (a half-replaced pair is detected).

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> save_fisher({"w": torch.ones(2)}, d, {"estimator": "sampled"}).name
        'fisher.safetensors'
        >>> load_fisher(d, check_model=False)["w"].tolist()
        [1.0, 1.0]
    """
    from asymvlm.io import atomic_save_safetensors, atomic_write_json, json_safe, tensor_fingerprint

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise MergeInputError(f"no model folder at {model_dir} to save a Fisher into")
    _check_fisher_values(fisher, str(model_dir))
    stored = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in fisher.items()}
    record = {
        **json_safe(dict(meta or {})),
        "type": FISHER_TYPE,
        "format_version": FISHER_VERSION,
        "keys": len(stored),
        "fisher_fingerprint": tensor_fingerprint(stored),
    }
    path = atomic_save_safetensors(stored, model_dir / FISHER_NAME, metadata={"type": FISHER_TYPE})
    atomic_write_json(record, model_dir / FISHER_META)
    return Path(path)


def _read_record(model_dir: Path) -> tuple[Path, dict[str, Any]]:
    from asymvlm.errors import ArtefactError
    from asymvlm.io_read import read_tagged_json
    from asymvlm.merging.task_vectors import folder_file

    path = folder_file(model_dir, FISHER_NAME)
    if not path.is_file():
        raise MergeInputError(f"{model_dir} has no Fisher ({FISHER_NAME}): {_HOW}")
    side = folder_file(model_dir, FISHER_META)
    if not side.is_file():
        raise MergeInputError(f"{model_dir} has {FISHER_NAME} but no {FISHER_META}: {_HOW}")
    try:
        record = read_tagged_json(
            side, FISHER_TYPE, FISHER_VERSION, required=("fisher_fingerprint",), known=_META_KEYS, allow_nan=False
        )
    except ArtefactError as err:
        raise MergeInputError(str(err)) from None
    except RecursionError:
        raise MergeInputError(f"corrupt JSON in {side}: nested too deeply") from None
    return path, record


def load_fisher(model_dir: str | Path, *, check_model: bool = True) -> SavedFisher:
    """The Fisher saved next to the model in ``model_dir`` (:func:`save_fisher`), read as untrusted.

    Missing or corrupt files, a ``fisher.json`` that does not describe this ``fisher.safetensors``,
    and NaN, inf or negative entries are :class:`MergeInputError` naming the file and the key. With
    ``check_model`` (default) the keys and shapes must be those of the model's ``head.safetensors``
    and the weights the Fisher was computed for (``head_fingerprint``) those saved there now.

    Example:
        >>> load_fisher("/nonexistent")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        asymvlm.errors.MergeInputError: /nonexistent has no Fisher (fisher.safetensors): compute it with ...
    """
    from asymvlm.errors import ArtefactError
    from asymvlm.io import tensor_fingerprint
    from asymvlm.io_read import load_safetensors

    model_dir = Path(model_dir)
    path, record = _read_record(model_dir)
    try:
        tensors = load_safetensors(path, mmap=False)
    except ArtefactError as err:
        raise MergeInputError(str(err)) from None
    if tensor_fingerprint(tensors) != record["fisher_fingerprint"]:
        raise MergeInputError(f"{model_dir / FISHER_META} does not describe {path} (another Fisher's record): {_HOW}")
    _check_fisher_values(tensors, str(path))
    if check_model:
        head = _head_weights(model_dir)
        missing, extra = sorted(set(head) - set(tensors)), sorted(set(tensors) - set(head))
        if missing or extra:
            raise MergeInputError(
                f"{path}: its keys are not the head's (missing {missing[:3]}, not in the head {extra[:3]}): {_HOW}"
            )
        for k in head:
            if tuple(tensors[k].shape) != tuple(head.shape(k)):
                raise MergeInputError(
                    f"{path}: {k!r} has shape {tuple(tensors[k].shape)}, the head's is {head.shape(k)}"
                )
        fp = record.get("head_fingerprint")
        if fp is not None and fp != tensor_fingerprint(head):
            raise MergeInputError(f"{path} was computed for other head weights than {model_dir}'s (stale): {_HOW}")
    return SavedFisher(tensors, record, path)


def compute_fisher(
    model_dir: str | Path,
    cache_path: str | Path,
    *,
    estimator: str = "sampled",
    max_pairs: int | None = None,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = False,
) -> Path:
    """:func:`head_fisher` of the saved AsymVLM in ``model_dir`` on the cache at ``cache_path``
    (made by the model's encoder: another encoder's cache is an error, one without a recorded encoder
    a warning), saved next to the model (:func:`save_fisher`); returns the ``fisher.safetensors`` path.

    Example:
        >>> import tempfile
        >>> from asymvlm.cache import write_cache
        >>> from asymvlm.heads import TextHead
        >>> from asymvlm.model import AsymVLM
        >>> d = AsymVLM(TextHead(8, hidden_dims=(16,))).save_pretrained(tempfile.mkdtemp() + "/m")
        >>> img = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
        >>> c = write_cache(tempfile.mkdtemp() + "/c", img, img, torch.arange(6))
        >>> compute_fisher(d, c.path, estimator="empirical").name  # (a warning: the cache records no encoder)
        'fisher.safetensors'
    """
    from asymvlm.cache import check_cache_encoder
    from asymvlm.io import tensor_fingerprint
    from asymvlm.model import AsymVLM

    model = AsymVLM.from_pretrained(model_dir, load_encoder=False)
    cache = _open_cache(cache_path)
    check_cache_encoder(cache, (model.encoder_source or {}).get("fingerprint"), what=str(model_dir), allow_missing=True)
    fisher = head_fisher(
        model.head, cache, estimator=estimator, max_pairs=max_pairs, batch_size=batch_size, seed=seed,
        progress=progress,
    )  # fmt: skip
    n = int(cache.text_embeddings.shape[0])
    meta = {
        "estimator": estimator,
        "pairs": n if max_pairs is None else min(n, max_pairs),
        "seed": seed,
        "cache": {
            "path": str(cache.path),
            "dataset_fingerprint": cache.manifest.get("dataset_fingerprint"),
            "encoder_fingerprint": (cache.manifest.get("encoder") or {}).get("fingerprint"),
        },
        "head_fingerprint": tensor_fingerprint(model.head.state_dict()),
        "family": model.head.config.family,
        "reference": "https://arxiv.org/abs/2111.09832",
    }
    return save_fisher(fisher, model_dir, meta)


# ----------------------------------------------------------------------------------------------
# the merge
# ----------------------------------------------------------------------------------------------
class FisherDelta(Mapping):
    """A task vector (any mapping; read lazily) carrying its Fisher as ``.fisher``; ``path``,
    ``meta``, ``shape`` and ``stored_dtype`` are the wrapped vector's where it has them."""

    def __init__(self, delta: Mapping[str, Tensor], fisher: Mapping[str, Tensor]):
        self.delta, self.fisher = delta, fisher
        self.path = getattr(delta, "path", None)
        self.meta = getattr(delta, "meta", {})

    def __getitem__(self, key: str) -> Tensor:
        return self.delta[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.delta)

    def __len__(self) -> int:
        return len(self.delta)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.delta.shape(key) if hasattr(self.delta, "shape") else tuple(self.delta[key].shape)

    def stored_dtype(self, key: str) -> torch.dtype:
        return self.delta.stored_dtype(key) if hasattr(self.delta, "stored_dtype") else self.delta[key].dtype


def with_fisher(delta: Mapping[str, Tensor], fisher: Mapping[str, Tensor]) -> FisherDelta:
    """``delta`` with its Fisher attached (what :class:`FisherWeighted` reads).

    Example:
        >>> with_fisher({"w": torch.zeros(2)}, {"w": torch.ones(2)}).fisher["w"].tolist()
        [1.0, 1.0]
    """
    return FisherDelta(delta, fisher)


def _fisher_of(delta: Mapping[str, Tensor], i: int) -> Mapping[str, Tensor]:
    fisher = getattr(delta, "fisher", None)
    if fisher is None:
        where = f"task vector {i}" + (f" ({delta.path})" if getattr(delta, "path", None) else "")
        raise MergeInputError(
            f"{where} carries no Fisher: the fisher method weights each task by its head's diagonal Fisher; "
            f"{_HOW}, or attach one with asymvlm.merging.fisher.with_fisher(delta, fisher)"
        )
    return fisher


@dataclass
class FisherWeighted(Aggregator):
    """Fisher-weighted averaging of task vectors (https://arxiv.org/abs/2111.09832): per coordinate
    ``sum_t w_t F_t tau_t / sum_t w_t F_t``, each task's Fisher ``F_t`` read from its ``.fisher``.

    The floor is the one of the authors' code (``model_merging/merging.py``: every Fisher clamped
    from below, ``max(F_t, fisher_floor)``; their ``favor_target_model=False`` branch, symmetric in
    the tasks), made scale-free: ``max(F_t, floor * m)`` with ``m`` the mean over the tensor of the
    weighted mean Fisher ``sum_t w_t F_t / sum_t w_t``. So where no task has Fisher mass the merge is
    the weighted mean of the deltas (equal Fishers, zero included, give the weighted mean), and a
    task with zero Fisher on a coordinate gives way there to the others (exactly at ``floor=0``).
    A tensor on which every Fisher is zero is averaged (counted in ``info["unweighted_keys"]``).
    Computed in float64 for float64 task vectors, else in float32 (the authors' dtype; the Fisher mean
    is summed in float64), returned in each delta's dtype.
    """

    floor: float = 1e-6
    reference = "https://arxiv.org/abs/2111.09832"

    def __post_init__(self) -> None:
        if isinstance(self.floor, bool) or not (isinstance(self.floor, (int, float)) and 0 <= self.floor <= 1):
            from asymvlm.errors import ConfigError

            raise ConfigError(f"floor must be in [0, 1], got {self.floor!r}")

    def __call__(self, deltas, weights=None, **_):
        fishers = [_fisher_of(d, i) for i, d in enumerate(deltas)]
        wk = check_weights(weights, len(deltas))  # finite, >= 0, not all zero
        total = sum(wk)
        out: Params = {}
        unweighted = []
        for key in keys_of(deltas):
            tau = stack_key(deltas, key)  # (K, ...) of this key only
            # float64 inputs are merged in float64, others in float32 (the authors' dtype), each task's
            # terms accumulated one task at a time: no (K, ...) temporaries beyond the two stacks
            dt = torch.float64 if tau.dtype == torch.float64 else torch.float32
            f = _stack_fisher(fishers, key, tau.shape[1:], deltas, dt).to(tau.device)  # (K, ...)
            m = sum(wt * float(f[k].sum(dtype=torch.float64)) for k, wt in enumerate(wk)) / (f[0].numel() * total)
            f = torch.clamp(f, min=self.floor * m)  # the tensor's mean (weighted-mean) Fisher, floored
            den = torch.zeros(tau.shape[1:], dtype=dt, device=tau.device)
            num, mean = torch.zeros_like(den), torch.zeros_like(den)
            for k, wt in enumerate(wk):
                wf = f[k] * wt
                den += wf
                num.addcmul_(wf, tau[k].to(dt))
                mean.add_(tau[k].to(dt), alpha=wt / total)
            zero = den <= 0  # only where every Fisher is 0 and floor * m is 0
            if bool(zero.all()):
                unweighted.append(key)
            merged = torch.where(zero, mean, num / torch.where(zero, torch.ones_like(den), den))
            out[key] = merged.to(tau.dtype)
        return AggregateResult(out, {"floor": self.floor, "unweighted_keys": unweighted})


def _stack_fisher(
    fishers: Sequence[Mapping[str, Tensor]],
    key: str,
    shape: torch.Size,
    deltas: Sequence[Any],
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """``(K, ...)`` in ``dtype``: the tasks' Fishers of ``key``, checked (present, shape, finite, >= 0)."""
    out = []
    for i, f in enumerate(fishers):
        where = f"task vector {i}" + (f" ({deltas[i].path})" if getattr(deltas[i], "path", None) else "")
        if key not in f:
            raise MergeInputError(f"{where}: its Fisher has no {key!r}; {_HOW}")
        t = f[key]
        if tuple(t.shape) != tuple(shape):
            raise MergeInputError(
                f"{where}: the Fisher of {key!r} has shape {tuple(t.shape)}, the delta {tuple(shape)}"
            )
        t = t.to(dtype)
        if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
            raise MergeInputError(f"{where}: the Fisher of {key!r} has NaN, inf or negative entries")
        out.append(t)
    return torch.stack(out)


def attach_fishers(
    base: Path, inputs: Sequence[Path], vectors: Sequence[Mapping[str, Tensor]], weights: Sequence[float] | None
) -> tuple[list[FisherDelta], list[float] | None, bool]:
    """The merge's task vectors with each input's saved Fisher (:func:`load_fisher`), and, when the
    base has a Fisher, one more task: a zero task vector carrying the base's Fisher (its weight the
    mean of ``weights``). Returns ``(vectors, weights, whether the base was added)``; an input
    without a Fisher is a :class:`MergeInputError` naming it and how to compute one."""
    out = []
    for p, v in zip(inputs, vectors):
        if not (Path(p) / FISHER_NAME).is_file():
            raise MergeInputError(f"merge method 'fisher': the input {p} has no Fisher ({FISHER_NAME}); {_HOW}")
        out.append(with_fisher(v, load_fisher(p)))
    if not (Path(base) / FISHER_NAME).is_file():
        return out, (list(weights) if weights is not None else None), False
    from asymvlm.merging.task_vectors import MemoryParams

    fb = load_fisher(base)
    first = vectors[0]
    zero = MemoryParams(
        {k: torch.zeros(tuple(first[k].shape), dtype=first[k].dtype) for k in first},
        path=f"{base} (the base, task vector 0)",
        meta={"source": "fisher_base"},
    )
    out.append(with_fisher(zero, fb))
    w = None if weights is None else [*map(float, weights), sum(map(float, weights)) / len(weights)]
    return out, w, True
