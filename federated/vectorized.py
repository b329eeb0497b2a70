"""Vectorised clients: a group of head clients trained together as one batched computation.

A federated round of head clients on cached embeddings is many small, independent trainings of
the same architecture. :func:`train_group` stacks the group's parameters along a new leading
dimension (``(G, *shape)`` per exchanged tensor), builds every client's batch from its own
batcher (its own data order), and runs the head, the AsymVLM loss and the local optimizer on the
stack: one ``baddbmm`` per layer instead of G matmuls, one optimizer step for every client. The
clients stay independent: the loss that is differentiated is the *sum* of the clients' losses,
so each client's gradient is its own, and the local optimizers (SGD with momentum, AdamW) are
elementwise, so torch's own optimizer on the stacked tensors is exactly G separate optimizers
(they share the step count, as clients of one round take the same number of local steps). The
client-side terms of :data:`~asymvlm.federated.client.CLIENT_TERMS` (FedProx's proximal pull,
GHBM's heavy ball) and TaLoS masks broadcast over the stack unchanged.

Same result as the sequential :func:`~asymvlm.federated.client.client_update` (to rounding: the
batched GEMMs sum in another order; ``tests/federated/test_vectorized.py`` checks 1e-9 in float64),
the same losses before and after training and the same gradient norms.

Hand-written on purpose rather than ``torch.func.vmap`` over the model: the loss masks rows
without a positive by boolean indexing and validates inputs with host syncs, neither of which
vmap can batch; the batched loss below is the same arithmetic with the masks as weights.

Streaming (:class:`StreamedMean`): where the recipe's aggregate is a weighted mean of the round's
updates, the round adds every chunk's weighted deltas into one accumulator and drops the chunk,
so memory is bounded by the chunk (``client_memory_mb``), not by the number of clients.

Example:
    >>> import torch
    >>> from asymvlm.batching import IndexBatcher
    >>> from asymvlm.federated.client import ClientOptions, build_client_model, client_update
    >>> from asymvlm.heads import HeadConfig
    >>> model = build_client_model(HeadConfig(dim=8, hidden_dims=(16,)), seed=0).double()
    >>> x = torch.nn.functional.normalize(torch.randn(64, 8, dtype=torch.float64), dim=-1)
    >>> data = [IndexBatcher(x[i::2], x, torch.arange(i, 64, 2), batch_size=8, seed=i) for i in range(2)]
    >>> opts = ClientOptions(local_steps=3, local_lr=0.1, momentum=0.9)
    >>> together = train_group(model, model.get_params(), data, opts, clients=[0, 1])
    >>> alone = client_update(model, model.get_params(), data[1], opts, client=1)
    >>> max(float((together[1].delta[k] - alone.delta[k]).abs().max()) for k in alone.delta) < 1e-12
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from asymvlm.batching import IndexBatcher
from asymvlm.errors import ConfigError
from asymvlm.federated.client import (
    ClientOptions,
    ClientResult,
    build_client_terms,
    client_loss,
    local_optimizer,
    local_step,
)  # fmt: skip
from asymvlm.federated.core import AggregateResult, WeightedMean, check_stacked
from asymvlm.heads import family_class
from asymvlm.losses import VMF_NORMALIZER_REGISTRY
from asymvlm.masks import SparseMasks
from asymvlm.trainable import TrainableModel

__all__ = [
    "vectorizable",
    "sequential_reason",
    "chunk_size",
    "group_loss",
    "GroupBatches",
    "train_group",
    "StreamedMean",
    "streamable",
    "train_round",
    "chunks",
    "population_losses",
]


def vectorizable(model: TrainableModel, batchers: Sequence[Any], client_config: Mapping[str, Any] | None) -> str:
    """Why the clients cannot train as one batched computation, or ``""`` when they can: head
    clients on cached embeddings (no LoRA tower), a head that is a stack of linear layers and
    elementwise activations, every batcher with ``batch(i)`` of cached rows, and client terms
    that are the same for every client (the round's shared configuration)."""
    if model.trainable != "head" or model.peft_model is not None:
        return "the clients train a LoRA adapter on the text tower (the tower runs per client)"
    for m in model.head.mlp:
        if not isinstance(m, nn.Linear) and sum(1 for _ in m.parameters()):
            return f"the head has a layer with parameters that is not linear ({type(m).__name__})"
    for term, opts in (client_config or {}).items():
        if term == "proximal" and (opts or {}).get("center") is not None:
            return "the proximal term pulls every client towards its own centre"
        if term == "relationship":
            return "MOCHA's relationship term differs per client"
    for b in batchers:
        text = getattr(b, "text", None)
        if text is not None and not isinstance(text, Tensor):
            return "the clients' captions are token ids, not cached embeddings"
    return ""


def sequential_reason(fed: Any, model: TrainableModel, batchers: Sequence[Any], own_models: bool) -> str:
    """Why a run's clients train one by one (``""`` when they train vectorised): ``client_batch``
    1, a model of each client's own (personalised, clustered, per-client evaluated runs), or what
    :func:`vectorizable` says. ``client_batch`` N > 1 where the clients cannot be vectorised is a
    :class:`~asymvlm.errors.ConfigError` naming why."""
    if fed.client_batch == "1":
        return "client_batch is 1"
    why = vectorizable(model, batchers, None)
    if own_models:
        why = "personalised, clustered and per-client-evaluated runs train each client's own model"
    if why and fed.client_batch != "auto":
        raise ConfigError(f"client_batch={fed.client_batch}: these clients cannot be vectorised: {why}")
    return why


def chunk_size(model: TrainableModel, batch_size: int, budget_mb: float, cap: int | None = None) -> int:
    """Clients per chunk within ``budget_mb``: per client its parameters six times (value, gradient,
    two optimizer moments, the start and the delta) and its batch's activations (every layer's
    input and output with their gradients, and the ``(B, B)`` score matrices of the loss)."""
    params = sum(p.numel() for p in model.exchanged().values())
    widths = [model.head.dim] + [m.out_features for m in model.head.mlp if isinstance(m, nn.Linear)]
    item = next(iter(model.exchanged().values())).element_size()
    per_client = item * (6 * params + 4 * batch_size * sum(widths) + 12 * batch_size * batch_size)
    n = max(1, int(budget_mb * 2**20 // per_client))
    return min(n, cap) if cap else n


# ----------------------------------------------------------------------------------------------
# the batched head and loss: the arithmetic of TextHead.loc_concentration and AsymVLMLoss
# ----------------------------------------------------------------------------------------------
class _StackedLinear(torch.autograd.Function):
    """``W @ h + b`` for every client, whose backward writes the weight gradient ``g @ h^T`` into a
    buffer kept across the local steps (``torch.bmm(..., out=)``) instead of a fresh tensor: a
    fresh (G, out, in) gradient every step costs its page faults, measured at twice the matmul.
    It returns no gradient for ``W``: the caller sets ``W.grad`` to the buffer after the backward."""

    @staticmethod
    def forward(ctx, h: Tensor, w: Tensor, b: Tensor | None, buf: Tensor) -> Tensor:
        ctx.save_for_backward(h, w)
        ctx.buf, ctx.has_bias = buf, b is not None
        return torch.bmm(w, h) if b is None else torch.baddbmm(b.unsqueeze(2), w, h)

    @staticmethod
    def backward(ctx, g: Tensor):
        h, w = ctx.saved_tensors
        dh = torch.bmm(w.transpose(1, 2), g) if ctx.needs_input_grad[0] else None
        torch.bmm(g, h.transpose(1, 2), out=ctx.buf)
        return dh, None, g.sum(2) if ctx.has_bias else None, None


def _head(
    model: TrainableModel, p: Mapping[str, Tensor], text: Tensor, grads: dict[str, Tensor] | None = None
) -> tuple[Tensor, Tensor]:
    """``(loc (G, B, d), kappa (G, B))`` of every client's head on its batch ``text (G, B, d)``;
    with ``grads``, the weights' gradients go into its buffers (:class:`_StackedLinear`)."""
    cfg = model.head.config
    x = text.to(p["head.mlp.0.weight"].dtype)
    # feature-major activations (G, features, B): every layer is W @ h, so the weights' gradients
    # g @ h^T come out in the weights' own (G, out, in) layout (h @ W^T would need a transposed copy
    # of every weight gradient, measured at a third of the round)
    h = x.transpose(1, 2)
    for i, m in enumerate(model.head.mlp):
        if isinstance(m, nn.Linear):
            key = f"head.mlp.{i}.weight"
            w, b = p[key], p.get(f"head.mlp.{i}.bias")  # (G, out, in), (G, out)
            if grads is not None and w.requires_grad:
                h = _StackedLinear.apply(h, w, b, grads.setdefault(key, torch.empty_like(w)))
            else:
                h = torch.bmm(w, h) if b is None else torch.baddbmm(b.unsqueeze(2), w, h)
        else:
            h = m(h)  # elementwise activation
    h = h.transpose(1, 2)  # (G, B, d)
    eta = h + cfg.init_concentration * x if cfg.residual else h
    norm = torch.linalg.vector_norm(eta, dim=-1)  # (G, B)
    if cfg.direction == "frozen":
        loc = text.to(eta.dtype)
    else:
        loc = eta / norm.clamp_min(torch.finfo(eta.dtype).tiny).unsqueeze(-1)
    return loc, norm.clamp(cfg.min_concentration, cfg.max_concentration)


def _nce(logits: Tensor, positives: Tensor, mode: str) -> Tensor:
    """(G,) the mean over rows with a positive of each client's NCE term (one direction of
    losses.symmetric_infonce, batched over clients)."""
    has_pos = positives.any(-1)  # (G, T)
    if mode == "exclude":
        neg_inf = torch.finfo(logits.dtype).min
        neg_lse = torch.logsumexp(logits.masked_fill(positives, neg_inf), dim=-1, keepdim=True)
        neg_lse = torch.where((~positives).any(-1, keepdim=True), neg_lse, torch.full_like(neg_lse, -math.inf))
        terms = F.softplus(neg_lse - logits)
        per_row = (terms * positives).sum(-1) / positives.sum(-1).clamp_min(1)
    else:  # "sum"
        pos_lse = torch.logsumexp(logits.masked_fill(~positives, torch.finfo(logits.dtype).min), dim=-1)
        per_row = torch.logsumexp(logits, dim=-1) - pos_lse
    per_row = torch.where(has_pos, per_row, torch.zeros_like(per_row))
    return per_row.sum(-1) / has_pos.sum(-1)


def group_loss(
    model: TrainableModel, p: Mapping[str, Tensor], batch: Mapping[str, Tensor], grads: dict[str, Tensor] | None = None
) -> Tensor:
    """Every client's AsymVLM loss on its own batch: ``(G,)``.

    ``p`` holds the stacked exchanged parameters ``(G, *shape)``; ``batch`` the stacked batches
    (``text``, ``images`` ``(G, B, d)`` and ``positives`` ``(G, B, B)``). With ``grads`` (a dict
    of buffers, filled on first use) the backward writes the linear weights' gradients there and
    leaves their ``.grad`` unset (:class:`_StackedLinear`); the caller assigns them.
    """
    loc, kappa = _head(model, p, batch["text"], grads)
    cls = family_class(model.head.family)
    g, b, d = loc.shape
    if model.head.family == "vmf":
        log_norm = VMF_NORMALIZER_REGISTRY.build(model.loss_fn.vmf_normalizer)(d, kappa.reshape(-1)).view(g, b)
    else:
        log_norm = cls(loc.reshape(-1, d), kappa.reshape(-1), validate_args=False).log_normalizer.view(g, b)
    cos = torch.bmm(loc, batch["images"].to(loc.dtype).transpose(1, 2))  # (G, B, B)
    ll = cls._log_prob_from_cosine(cos, kappa.unsqueeze(-1), log_norm.unsqueeze(-1))
    ls = p["loss_fn.logit_scale"] if "loss_fn.logit_scale" in p else model.loss_fn.logit_scale.expand(g)
    if model.loss_fn.max_logit_scale is not None:
        ls = ls.clamp(max=model.loss_fn.max_logit_scale)
    logits = ls.exp().to(ll.dtype).view(g, 1, 1) * ll
    if model.loss_fn.positive_mode == "diagonal":
        eye = torch.eye(b, dtype=torch.bool, device=logits.device).expand(g, b, b)
        return 0.5 * (_diag_ce(logits, eye) + _diag_ce(logits.transpose(1, 2), eye))
    pos = batch["positives"]
    mode = model.loss_fn.positive_mode
    return 0.5 * (_nce(logits, pos, mode) + _nce(logits.transpose(1, 2), pos.transpose(1, 2), mode))


def _diag_ce(logits: Tensor, eye: Tensor) -> Tensor:
    """(G,) cross-entropy of every row against its diagonal label, averaged over rows."""
    return (torch.logsumexp(logits, dim=-1) - logits.diagonal(dim1=-2, dim2=-1)).mean(-1)


def _stack_batches(batchers: Sequence[Any], index: int) -> dict[str, Tensor]:
    parts = [b.batch(index) for b in batchers]
    return {k: torch.stack([q[k] for q in parts]) for k in ("text", "images", "positives")}


class GroupBatches:
    """Batch ``i`` of every client of a group, stacked: ``text``, ``images`` ``(G, B, d)`` and
    ``positives`` ``(G, B, B)``, exactly what each client's ``batcher.batch(i)`` gives.

    Plain :class:`~asymvlm.batching.IndexBatcher` clients with the default in-batch caption scope
    are gathered from the group's concatenated captions (and images, unless the clients share one
    image table) with a few tensor ops per step, the clients' own permutations picking the rows;
    any other batcher (temporal phases, poisoned captions, the data-wide caption scope) is asked
    one by one.
    """

    def __init__(self, batchers: Sequence[Any]):
        self.batchers = list(batchers)
        first = self.batchers[0]
        self.fast = all(
            type(b) is IndexBatcher and "batch" not in vars(b)  # not a batcher whose batches are replaced
            and b.caption_scope == "batch" and isinstance(b.text, Tensor) and b.images.dtype == first.images.dtype
            and (b.groups is None) == (first.groups is None)
            for b in self.batchers
        )  # fmt: skip
        if self.fast:
            sizes = torch.tensor([b.num_texts for b in self.batchers])
            self.offset = (torch.cumsum(sizes, 0) - sizes).view(-1, 1)  # (G, 1) each client's first row
            self.text = torch.cat([b.text for b in self.batchers])
            self.groups = None if first.groups is None else torch.cat([b.groups for b in self.batchers])
            if all(b.images is first.images for b in self.batchers):  # one table (get_federated_data's)
                self.images = first.images
                self.owner = torch.cat([b.owner for b in self.batchers])
            else:  # each client's own images, one after the other; its image ids shifted with them
                counts = torch.tensor([b.images.shape[0] for b in self.batchers])
                starts = (torch.cumsum(counts, 0) - counts).tolist()
                self.images = torch.cat([b.images for b in self.batchers])
                self.owner = torch.cat([b.owner + s for b, s in zip(self.batchers, starts)])

    def batch(self, index: int) -> dict[str, Tensor]:
        if not self.fast:
            return _stack_batches(self.batchers, index)
        rows = torch.stack([b.global_rows(index) for b in self.batchers]) + self.offset  # (G, B)
        ids = self.owner[rows]
        positives = ids.unsqueeze(2) == ids.unsqueeze(1)  # (G, B, B) the same image
        if self.groups is not None:  # or the same caption (IndexBatcher.positives, caption_scope "batch")
            g = self.groups[rows]
            positives |= g.unsqueeze(2) == g.unsqueeze(1)
        return {"text": self.text[rows], "images": self.images[ids], "positives": positives}


class _Stack:
    """The stacked parameters as a module-like object (SparseMasks reads ``named_parameters``)."""

    def __init__(self, params: dict[str, Tensor]):
        self.params = params

    def named_parameters(self):
        return iter(self.params.items())


# ----------------------------------------------------------------------------------------------
# one group's local training
# ----------------------------------------------------------------------------------------------
def _group_losses(
    model: TrainableModel, p: dict[str, Tensor], names: Sequence[str], batchers: GroupBatches, batches: Sequence[int],
    grad: bool,
) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """(G,) every client's mean loss over its first ``batches[i]`` batches and (G,) the norm of its
    mean gradient there (:func:`~asymvlm.federated.client.client_loss` for every client)."""
    count = torch.tensor(batches, dtype=torch.float64)  # (G,)
    total, grads = torch.zeros(len(batches), dtype=torch.float64), None
    for i in range(max(batches)):
        use = count > i  # (G,) the clients that average this batch
        batch = batchers.batch(i)
        if grad:
            loss = group_loss(model, p, batch)
            live = [k for k in names if p[k].requires_grad]
            got = dict(zip(live, torch.autograd.grad(loss[use].sum(), [p[k] for k in live], allow_unused=True)))
            g = [torch.zeros_like(p[k]) if got.get(k) is None else got[k] for k in names]
            grads = g if grads is None else [a + b for a, b in zip(grads, g)]
        else:
            with torch.no_grad():
                loss = group_loss(model, p, batch)
        total += torch.where(use, loss.detach().double(), 0.0)
    norm = None
    if grads is not None:
        n = len(batches)
        sq = [
            (g / count.to(g.dtype).view(n, *([1] * (g.dim() - 1)))).double().pow(2).reshape(n, -1).sum(1) for g in grads
        ]
        norm = torch.stack(sq).sum(0).sqrt()
    return total / count, norm


def train_group(
    model: TrainableModel,
    global_params: Mapping[str, Tensor],
    batchers: Sequence[Any],
    options: ClientOptions,
    *,
    clients: Sequence[Any],
    num_examples: Sequence[int] | None = None,
    client_config: Mapping[str, Mapping[str, Any]] | None = None,
    need_loss_before: bool = False,
    need_grad_norm: bool = False,
    stacked: bool = False,
) -> list[ClientResult] | tuple[list[ClientResult], dict[str, Tensor]]:
    """Train a group of clients from ``global_params`` together; one :class:`ClientResult` each,
    as :func:`~asymvlm.federated.client.client_update` gives it for that client alone.

    Every client has its own ``batchers[i]`` (seeded by the caller, as for the sequential loop)
    with the same batch size. ``stacked``: also return the
    ``(G, *shape)`` deltas (the results' deltas are views into them). Clients with fewer batches
    than ``options.loss_batches`` measure their losses on as many as they have, as alone.
    """
    names = model.trained_names()
    grads = {k for k, v in model.exchanged().items() if v.requires_grad}  # a fixed temperature is a buffer
    g = len(batchers)
    p = {
        k: v.detach().unsqueeze(0).repeat(g, *([1] * v.dim())).requires_grad_(k in names and k in grads)
        for k, v in global_params.items()
    }  # (G, *shape) every client from the global model
    trained = [p[k] for k in names]
    lb = [min(options.loss_batches, max(1, getattr(b, "num_batches", options.loss_batches))) for b in batchers]
    data = GroupBatches(batchers)
    loss_before = grad_norm = None
    if need_loss_before or need_grad_norm:
        loss_before, grad_norm = _group_losses(model, p, names, data, lb, grad=need_grad_norm)
    opt = local_optimizer(trained, options, names)
    terms = build_client_terms(client_config)
    for term in terms:
        term.start(global_params, names, options)
    masks = None
    if options.masks:
        masks = SparseMasks({k: m.expand(g, *m.shape) for k, m in options.masks.items()}, _Stack(p))
    buffers: dict[str, Tensor] = {}  # the linear weights' gradients, written in place every step
    for step in range(options.local_steps):
        loss = group_loss(model, p, data.batch(step), buffers).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for k, buf in buffers.items():  # the linear weights' gradients, written by _StackedLinear
            p[k].grad = buf
        local_step(opt, terms, names, trained, masks)
    loss_after, _ = _group_losses(model, p, names, data, lb, grad=False)
    with torch.no_grad():  # in place: the trained stack is not needed any more (no second (G, ...) tensor)
        deltas = {k: p[k].detach().sub_(v) for k, v in global_params.items()}
    after = loss_after.tolist()
    before = loss_before.tolist() if loss_before is not None else [None] * g
    norms = grad_norm.tolist() if grad_norm is not None else [None] * g
    sizes = list(num_examples) if num_examples is not None else [0] * g
    results = [
        ClientResult(c, {k: d[i] for k, d in deltas.items()}, int(sizes[i]), before[i], after[i], norms[i])
        for i, c in enumerate(clients)
    ]
    return (results, deltas) if stacked else results


# ----------------------------------------------------------------------------------------------
# streamed aggregation
# ----------------------------------------------------------------------------------------------
def streamable(recipe: Any) -> bool:
    """A recipe whose aggregate is a weighted mean of the updates and needs nothing else of each
    client (FedAvg, FedAvgM, FedProx, FedAdam, FedYogi, FedAdagrad, GHBM), without DP."""
    return type(recipe.aggregator) is WeightedMean and not recipe.needs and recipe.dp is None


def _check_finite(deltas: Mapping[str, Tensor], clients: Sequence[Any]) -> list[str]:
    return check_stacked({k: v[0] for k, v in deltas.items()}, deltas, clients)


class StreamedMean:
    """The recipe's weighted mean of a round's updates, accumulated chunk by chunk.

    Built with the round's clients and their weights (known before they train), it adds every
    accepted update ``p_k delta_k`` into one accumulator in the order the updates come, the
    arithmetic of :class:`~asymvlm.federated.core.WeightedMean` (bit-identical when they come in
    the round's order and none is rejected). An update that is not finite is rejected (named, as
    the round's validation would) and the mean is renormalised over the accepted ones.
    """

    def __init__(
        self,
        aggregator: WeightedMean,
        clients: Sequence[Any],
        weights: Sequence[float],
        check: Callable[[Mapping[str, Tensor], Sequence[Any]], list[str]] | None = None,
    ):
        w = [max(1.0, float(x)) for x in weights]
        self.p = dict(zip(clients, aggregator.normalised(w, len(w)))) if w else {}
        self.check = check or _check_finite
        self.sum: dict[str, Tensor] = {}
        self.accepted: list[Any] = []
        self.rejected: list[dict[str, Any]] = []

    def add(self, clients: Sequence[Any], deltas: Mapping[str, Tensor]) -> list[bool]:
        """Add a chunk of stacked deltas ``(G, *shape)``, checked by ``check(deltas, clients)`` (the
        round's validation, :func:`~asymvlm.federated.core.check_stacked`: a reason rejects that
        client); returns which were accepted."""
        reasons = self.check(deltas, list(clients))
        for i, c in enumerate(clients):
            if reasons[i]:
                self.rejected.append({"client": c, "reason": reasons[i]})
                continue
            pk = self.p[c]
            for k, d in deltas.items():
                self.sum[k] = d[i] * pk if k not in self.sum else self.sum[k].add_(d[i], alpha=pk)
            self.accepted.append(c)
        return [not r for r in reasons]

    def result(self) -> AggregateResult | None:
        """The weighted mean of the accepted updates (None when none was)."""
        if not self.accepted:
            return None
        total = sum(self.p[c] for c in self.accepted)
        mean = self.sum if not self.rejected else {k: v / total for k, v in self.sum.items()}
        weights = [self.p[c] / (total if self.rejected else 1.0) for c in self.accepted]
        return AggregateResult(mean, {"weights": weights, "streamed": True})


# ----------------------------------------------------------------------------------------------
# a round's clients, grouped and chunked
# ----------------------------------------------------------------------------------------------
def chunks(
    model: TrainableModel, batchers: Sequence[Any], budget_mb: float, cap: int | None = None
) -> Iterator[list[int]]:
    """The positions of ``batchers`` in the stacks they train in: grouped by batch size (one stack
    needs equal shapes), each group cut into chunks of :func:`chunk_size` clients, in order."""
    groups: dict[int, list[int]] = {}
    for i, b in enumerate(batchers):
        groups.setdefault(b.batch_size, []).append(i)
    for bs, members in groups.items():
        n = chunk_size(model, bs, budget_mb, cap)
        for s in range(0, len(members), n):
            yield members[s : s + n]


def train_round(
    model: TrainableModel,
    global_params: Mapping[str, Tensor],
    batchers: Sequence[Any],
    options: ClientOptions,
    *,
    clients: Sequence[int],
    seeds: Sequence[int],
    num_examples: Sequence[int],
    client_config: Mapping[str, Mapping[str, Any]] | None,
    budget_mb: float,
    cap: int | None = None,
    stream: StreamedMean | None = None,
    upload: Callable[[list[Any], dict[str, Tensor]], dict[str, Tensor]] | None = None,
    **needs: bool,
) -> list[ClientResult]:
    """Every client of a round, vectorised: reseeded (``seeds[i]``, the sequential loop's data
    order), in the stacks of :func:`chunks` (``budget_mb``, at most ``cap`` clients), returned in
    the order of ``clients``. ``upload(clients,
    deltas)`` turns a chunk's stacked deltas into what the server receives (compression:
    :class:`asymvlm.federated.uploads.Uploads`). With ``stream`` the chunks' deltas go into it and
    the results carry no delta."""
    for b, seed in zip(batchers, seeds):
        b.reseed(seed)
    out: dict[int, ClientResult] = {}
    for part in chunks(model, batchers, budget_mb, cap):
        res, deltas = train_group(
            model, global_params, [batchers[i] for i in part], options, clients=[clients[i] for i in part],
            num_examples=[num_examples[i] for i in part], client_config=client_config, stacked=True, **needs,
        )  # fmt: skip
        if upload is not None:
            deltas = upload([r.client for r in res], deltas)
            for i, r in enumerate(res):
                r.delta = {k: d[i] for k, d in deltas.items()}
        if stream is not None:
            stream.add([r.client for r in res], deltas)
            for r in res:
                r.delta = {}
        out.update(zip(part, res))
    return [out[i] for i in range(len(clients))]


def population_losses(
    model: TrainableModel,
    params: Mapping[str, Tensor],
    batchers: Sequence[Any],
    seeds: Sequence[int],
    batches: int,
    *,
    vectorised: bool,
    budget_mb: float,
) -> list[float]:
    """Every client's mean loss at ``params`` over its first ``batches`` batches of the order
    ``seeds[i]`` (:func:`~asymvlm.federated.client.client_loss` for each: the fairness report, the
    clients' initial losses), computed in chunks of clients when ``vectorised``."""
    for b, s in zip(batchers, seeds):
        b.reseed(s)
    if not vectorised:
        model.set_params(params)
        return [client_loss(model, b, batches)[0] for b in batchers]
    names = model.trained_names()
    out: dict[int, float] = {}
    for part in chunks(model, batchers, budget_mb):
        p = {k: v.detach().unsqueeze(0).expand(len(part), *v.shape) for k, v in params.items()}
        data = GroupBatches([batchers[i] for i in part])
        losses, _ = _group_losses(model, p, names, data, [batches] * len(part), grad=False)
        out.update(zip(part, losses.tolist()))
    return [out[i] for i in range(len(batchers))]
