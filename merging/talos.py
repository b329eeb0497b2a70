"""TaLoS: sparse fine-tuning masks for interference-free merging.

Iurada, Ciccone & Tommasi, "Efficient Model Editing with Task-Localized Sparse Fine-tuning",
ICLR 2025 (https://arxiv.org/abs/2504.02620). Fine-tuning only the parameters to which
the pre-trained model is *least* sensitive keeps task vectors from interfering when they are
added (task arithmetic): each expert moves weights that the others' inputs barely use.

:func:`calibrate_mask` scores every entry of the chosen parameters by the accumulated squared
per-sample gradient of the model's own sampled prediction (an empirical diagonal Fisher): for
AsymVLM, each text of a calibration batch draws "its" image among the batch's images from the
model's likelihood ``softmax(s * log q_t(x_i))`` and back-propagates ``log q_t(x_j)`` of the image
drawn. One global threshold over all scored entries keeps the least-sensitive fraction
trainable. It runs in ``rounds``: round ``r`` of ``R`` keeps ``density ** (r / R)`` of all entries
(``density = 1 - sparsity``), re-scoring with fresh samples and holding out the entries already
frozen (they stay frozen and take no part in the threshold), so the frozen set only grows.
Ties at the threshold are broken by position, so exactly ``round(density * N)`` entries stay
trainable.

The masks (``{parameter name: bool tensor}``, True = trainable) are what ``asymvlm-train
--mask_file`` and federated clients (``--mask_file``) apply (:mod:`asymvlm.masks`); the
resulting sparse task vectors are merged by task arithmetic (``method="talos"``).

Example:
    >>> import torch
    >>> from asymvlm.heads import HeadConfig, TextHead
    >>> head = TextHead(config=HeadConfig(dim=8, hidden_dims=(16,)), validate=False)
    >>> model = torch.nn.ModuleDict({"head": head})
    >>> x = torch.nn.functional.normalize(torch.randn(32, 8), dim=-1)
    >>> masks = calibrate_mask(model, [{"text": x, "images": x}], sparsity=0.9, rounds=2)
    >>> round(mask_density(masks), 2)
    0.1
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from asymvlm.errors import ConfigError, InputError
from asymvlm.masks import mask_density, save_masks

__all__ = ["calibrate_mask", "sensitivity_scores", "save_masks", "mask_density", "sampled_log_likelihood"]


def _text_embeddings(model: nn.Module, text: Any) -> Tensor:
    """What the head sees: cached embeddings, or token ids through a LoRA-adapted text tower."""
    peft_model = getattr(model, "peft_model", None)
    if peft_model is not None and (not isinstance(text, Tensor) or not text.is_floating_point()):
        from asymvlm.lora import text_features

        return nn.functional.normalize(text_features(model.encoder, text).float(), dim=-1)
    return text


def _scale(model: nn.Module) -> float:
    loss_fn = getattr(model, "loss_fn", None)
    if loss_fn is not None and hasattr(loss_fn, "scale"):
        return float(loss_fn.scale().detach())
    return math.exp(float(getattr(model, "logit_scale", 0.0)))


def sampled_log_likelihood(model: nn.Module, batch: Mapping[str, Any], generator: torch.Generator) -> Tensor:
    """Per-text objective of TaLoS for AsymVLM: ``log q_t(x_j)`` for ``j`` drawn from the model's own
    in-batch posterior ``softmax_j(s * log q_t(x_j))`` (s: the trained temperature). Returns (B,).

    ``model`` has a ``head`` (:class:`~asymvlm.heads.TextHead`) and optionally ``loss_fn`` (the
    temperature) and ``peft_model`` + ``_encoder`` (a LoRA text tower, as in ``asymvlm.training.loop``)."""
    from asymvlm.losses import log_likelihood

    q = model.head(_text_embeddings(model, batch["text"]))
    images = batch["images"].to(q.loc.dtype)
    ll = log_likelihood(q, images, chunk_size=None, validate=False)  # (B, I)
    with torch.no_grad():
        probs = torch.softmax(_scale(model) * ll.detach().double(), dim=1)
        j = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(ll.device)
    return ll.gather(1, j[:, None]).squeeze(1)


def _as_batches(data: Any, num_batches: int | None) -> list[Mapping[str, Any]]:
    if hasattr(data, "batch") and callable(data.batch):  # asymvlm.batching.IndexBatcher
        n = num_batches if num_batches is not None else int(getattr(data, "num_batches", 1))
        return [data.batch(i) for i in range(n)]
    out = []
    for i, b in enumerate(data):
        if num_batches is not None and i >= num_batches:
            break
        if isinstance(b, (tuple, list)):
            b = {"text": b[0], "images": b[1]}
        if not isinstance(b, Mapping) or "text" not in b or "images" not in b:
            raise TypeError("calibration batches must be dicts with 'text' and 'images' (or (text, images) pairs)")
        out.append(b)
    if not out:
        raise InputError("no calibration batches")
    return out


def _per_sample_sq_grads(objective: Tensor, params: list[Tensor], chunk: int) -> list[Tensor]:
    """sum_i (d objective_i / d theta)^2 for every parameter, by batched vector-Jacobian products
    (``is_grads_batched``), falling back to one backward pass per sample."""
    n = objective.shape[0]
    acc = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    eye = torch.eye(n, dtype=objective.dtype, device=objective.device)
    try:
        for s in range(0, n, chunk):
            g = torch.autograd.grad(
                objective,
                params,
                grad_outputs=eye[s : s + chunk],
                retain_graph=True,
                is_grads_batched=True,
                allow_unused=True,
            )
            for a, gi in zip(acc, g):
                if gi is not None:
                    a += gi.double().pow(2).sum(0)
        return acc
    except RuntimeError:  # an op without a batching rule: plain per-sample backward passes
        acc = [torch.zeros_like(p, dtype=torch.float64) for p in params]
        for i in range(n):
            g = torch.autograd.grad(objective[i], params, retain_graph=True, allow_unused=True)
            for a, gi in zip(acc, g):
                if gi is not None:
                    a += gi.double().pow(2)
        return acc


def _linear_owners(model: nn.Module, params: Mapping[str, Tensor]) -> dict[nn.Linear, tuple[str | None, str | None]]:
    """Linear modules whose weight/bias are among ``params``: {module: (weight name, bias name)}."""
    by_id = {id(p): k for k, p in params.items()}
    owners = {}
    for mod in model.modules():
        if isinstance(mod, nn.Linear) and not mod._forward_hooks:
            w = by_id.get(id(mod.weight))
            b = by_id.get(id(mod.bias)) if mod.bias is not None else None
            if w is not None or b is not None:
                owners[mod] = (w, b)
    return owners


def _linear_sq_grads(
    model: nn.Module,
    batch: Mapping[str, Any],
    objective: Callable,
    generator: torch.Generator,
    owners: dict[nn.Linear, tuple[str | None, str | None]],
) -> tuple[Tensor, dict[str, Tensor]] | None:
    """Exact per-sample squared gradients of Linear layers whose input rows are the samples:
    ``sum_i (g_i x_i^T)^2 = (G * G)^T (X * X)`` and ``sum_i g_i^2`` for the bias (G: per-sample
    gradients of the layer output, which one backward pass of ``sum_i objective_i`` gives because
    objective_i depends on row i only). Returns None when a layer sees other than one row per
    sample (sequences), so the caller falls back to batched vector-Jacobian products."""
    seen: dict[nn.Linear, tuple[Tensor, Tensor]] = {}

    def hook(mod, inputs, output):
        seen[mod] = (inputs[0].detach(), output)

    handles = [m.register_forward_hook(hook) for m in owners]
    try:
        obj = objective(model, batch, generator)
    finally:
        for h in handles:
            h.remove()
    n = obj.shape[0]
    if obj.dim() != 1 or any(m not in seen or seen[m][0].dim() != 2 or seen[m][0].shape[0] != n for m in owners):
        return None
    mods = list(owners)
    grads = torch.autograd.grad(obj.sum(), [seen[m][1] for m in mods], retain_graph=True, allow_unused=True)
    out = {}
    for m, g in zip(mods, grads):
        w, b = owners[m]
        x = seen[m][0].double()
        g = torch.zeros(n, m.out_features, dtype=torch.float64) if g is None else g.double()
        g2 = g * g
        if w is not None:
            out[w] = g2.T @ (x * x)
        if b is not None:
            out[b] = g2.sum(0)
    return obj, out


def sensitivity_scores(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    params: Mapping[str, Tensor],
    *,
    objective: Callable[[nn.Module, Mapping[str, Any], torch.Generator], Tensor] = sampled_log_likelihood,
    generator: torch.Generator | None = None,
    per_sample: bool = True,
    chunk: int = 32,
) -> dict[str, Tensor]:
    """Accumulated squared gradients (float64) of ``objective`` (per sample, or of its batch sum
    when ``per_sample=False``: cheaper and coarser) for the named parameters."""
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    names = list(params)
    acc = {k: torch.zeros_like(p, dtype=torch.float64) for k, p in params.items()}
    owners = _linear_owners(model, params) if per_sample else {}
    for batch in batches:
        fast = None
        if owners:
            state = generator.get_state()
            fast = _linear_sq_grads(model, batch, objective, generator, owners)
            if fast is None:
                generator.set_state(state)  # replay the same samples on the general path
        if fast is not None:
            obj, done = fast
        else:
            obj, done = objective(model, batch, generator), {}
        if obj.dim() != 1:
            raise InputError(f"the objective must return one value per sample, got shape {tuple(obj.shape)}")
        if not bool(torch.isfinite(obj).all()):
            raise FloatingPointError("the TaLoS objective is not finite on a calibration batch")
        rest = [k for k in names if k not in done]
        if rest and per_sample:
            sq = _per_sample_sq_grads(obj, [params[k] for k in rest], chunk)
        elif rest:
            g = torch.autograd.grad(obj.sum(), [params[k] for k in rest], allow_unused=True)
            sq = [
                torch.zeros_like(params[k], dtype=torch.float64) if gi is None else gi.double().pow(2)
                for gi, k in zip(g, rest)
            ]
        else:
            sq = []
        for k, s in [*done.items(), *zip(rest, sq)]:
            acc[k] += s.to(acc[k].device)
    return acc


def _default_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every trainable parameter of the head and of LoRA adapters; the loss temperature is left out."""
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("head.") or ".lora_" in name:
            out[name] = p
    return out


def _keep_lowest(scores: dict[str, Tensor], active: dict[str, Tensor], k: int) -> dict[str, Tensor]:
    """New trainable masks: the ``k`` lowest scores among active entries (ties by position)."""
    names = list(scores)
    flat = torch.cat([torch.where(active[n], scores[n], torch.inf).reshape(-1) for n in names])
    n_active = int(sum(int(active[n].sum()) for n in names))
    k = max(0, min(k, n_active))
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    if k > 0:
        t = torch.kthvalue(flat, k).values
        below = flat < t
        keep |= below
        need = k - int(below.sum())
        if need > 0:
            at = torch.nonzero(flat == t).squeeze(1)[:need]
            keep[at] = True
    out, start = {}, 0
    for n in names:
        m = scores[n].numel()
        out[n] = keep[start : start + m].reshape(scores[n].shape)
        start += m
    return out


def calibrate_mask(
    model: nn.Module,
    data: Any,
    sparsity: float,
    rounds: int = 4,
    *,
    params: Mapping[str, Tensor] | None = None,
    include: str | None = None,
    num_batches: int | None = None,
    objective: Callable[[nn.Module, Mapping[str, Any], torch.Generator], Tensor] = sampled_log_likelihood,
    per_sample: bool = True,
    seed: int = 0,
    progress: bool = False,
    on_round: Callable[[int, dict[str, Tensor]], None] | None = None,
) -> dict[str, Tensor]:
    """TaLoS masks: True where the parameter entry is fine-tuned.

    Args:
        model: a module with a ``head`` (:class:`~asymvlm.trainable.TrainableModel`, an :class:`~asymvlm.AsymVLM`,
            or any ``ModuleDict(head=...)``); mask names are its parameter names.
        data: calibration batches: an iterable of ``{"text", "images"}`` dicts or ``(text, images)``
            pairs (cached embeddings, or token ids for a LoRA text tower), or a
            ``asymvlm.batching.IndexBatcher``.
        sparsity: fraction of the scored entries kept *frozen*, in [0, 1); ``1 - sparsity`` trains.
        rounds: calibration rounds (>= 1); the trainable fraction after round r is
            ``(1 - sparsity) ** (r / rounds)``.
        params: the parameters to score (default: every trainable head and LoRA parameter).
        include: regular expression restricting the default parameters by name.
        num_batches: use only the first batches of ``data``.
        objective: ``(model, batch, generator) -> (B,)`` per-sample objective (default
            :func:`sampled_log_likelihood`).
        per_sample: per-sample squared gradients (the paper's) or squared batch gradients.
        seed: seed of the sampled predictions.
        on_round: called as ``on_round(r, masks)`` after each round (progress reports, tests).
    """
    import re

    from tqdm.auto import tqdm

    if not (isinstance(sparsity, (int, float)) and 0.0 <= float(sparsity) < 1.0):
        raise ConfigError(f"sparsity must be in [0, 1) (the frozen fraction), got {sparsity}")
    if int(rounds) != rounds or rounds < 1:
        raise ConfigError(f"rounds must be a positive integer, got {rounds}")
    if params is None:
        params = _default_params(model)
        if include is not None:
            pat = re.compile(include)
            params = {k: p for k, p in params.items() if pat.search(k)}
    if not params:
        raise InputError("no parameters to calibrate (the model has no trainable head or LoRA parameters?)")
    batches = _as_batches(data, num_batches)
    total = sum(p.numel() for p in params.values())
    density = 1.0 - float(sparsity)
    active = {k: torch.ones(p.shape, dtype=torch.bool) for k, p in params.items()}
    was_training = model.training
    model.eval()  # deterministic forward (no dropout) while scoring
    try:
        for r in tqdm(range(1, rounds + 1), desc="TaLoS rounds", disable=not progress):
            gen = torch.Generator().manual_seed(seed * 1000003 + r)
            live = {k: p for k, p in params.items() if bool(active[k].any())}
            scores = sensitivity_scores(model, batches, live, objective=objective, generator=gen, per_sample=per_sample)
            scores = {
                k: scores[k].cpu() if k in scores else torch.zeros(params[k].shape, dtype=torch.float64) for k in params
            }
            k_keep = round(total * density ** (r / rounds))
            active = _keep_lowest(scores, active, k_keep)
            if on_round is not None:
                on_round(r, active)
    finally:
        model.train(was_training)
    return active
