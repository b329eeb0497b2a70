"""Local training of one simulated client: from the global state to a delta.

Every client trains a :class:`~asymvlm.trainable.TrainableModel` (the AsymVLM head and loss
temperature, plus a peft LoRA adapter on the text tower when LoRA is federated) and exchanges its
:meth:`~asymvlm.trainable.TrainableModel.exchanged` parameters, named as in training
(``head.*``, ``loss_fn.logit_scale``, ``peft_model.*``). :func:`client_update` loads the global
parameters, optionally measures the loss and the full gradient norm at the global model (q-FFL,
AdaFedAdam), runs ``local_steps`` of SGD on index-drawn batches of the client's data with the
client-side terms the recipe's ``client_config`` names for the round, and returns
``delta = theta_local - theta_global`` with the client's diagnostics.

Client-side terms are registered in :data:`CLIENT_TERMS` (name, declared options, paper); a
recipe's ``client_config(state, params)`` returns ``{term: {option: value}}`` and
:func:`client_update` builds each named :class:`ClientTerm` and calls its hooks at every local
step: ``proximal`` (FedProx: the gradient of ``mu/2 ||theta - theta_global||^2``) and
``heavy_ball`` (GHBM's momentum: a displacement ``-beta / J m_t`` per step, outside the local
optimizer's momentum). A new term is one registered factory; :func:`pack_client_config` and
:func:`unpack_client_config` carry any configuration over a transport that sends numbers and
named tensors separately (Flower's config and array records). With
``options.masks`` (TaLoS sparse fine-tuning) only the masked entries move
(:class:`asymvlm.masks.SparseMasks`, the mechanism ``asymvlm-train --mask_file`` uses), so the delta
is exactly zero elsewhere and a client need only send the masked values (:func:`upload_bytes`).

Example:
    >>> import torch
    >>> from asymvlm.batching import IndexBatcher
    >>> from asymvlm.heads import HeadConfig
    >>> model = build_client_model(HeadConfig(dim=8, hidden_dims=(16,)), seed=0)
    >>> x = torch.nn.functional.normalize(torch.randn(32, 8), dim=-1)
    >>> data = IndexBatcher(x, x, torch.arange(32), batch_size=8, seed=0)
    >>> res = client_update(model, model.get_params(), data, ClientOptions(local_steps=2), client=0)
    >>> sorted(res.delta) == sorted(model.exchanged()) and res.loss_after > 0
    True
    >>> opts = ClientOptions(local_steps=2)
    >>> prox = client_update(model, model.get_params(), data, opts, client_config={"proximal": {"mu": 0.1}})
    >>> sorted(prox.delta) == sorted(res.delta)
    True
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from asymvlm.errors import ConfigError, InputError
from asymvlm.federated.core import Params, Recipe
from asymvlm.heads import HeadConfig, TextHead
from asymvlm.losses import AsymVLMLoss
from asymvlm.masks import SparseMasks
from asymvlm.registry import Param, Registry, non_negative, probability
from asymvlm.trainable import Trainable, TrainableModel

__all__ = [
    "ClientOptions",
    "ClientResult",
    "ClientTerm",
    "ProximalTerm",
    "HeavyBallTerm",
    "RelationshipTerm",
    "CLIENT_TERMS",
    "build_client_terms",
    "round_client_config",
    "pack_client_config",
    "unpack_client_config",
    "build_client_model",
    "init_head_from",
    "local_optimizer",
    "LOCAL_OPTIMIZERS",
    "client_update",
    "local_step",
    "client_loss",
    "check_masks",
    "server_inputs",
    "update_needs",
    "upload_bytes",
    "trained_params",
]


@dataclass(frozen=True)
class ClientOptions:
    """Local training of a round."""

    local_steps: int = 10
    local_lr: float = 0.1
    batch_size: int = 256
    momentum: float = 0.0
    loss_batches: int = 4  # batches used for the loss / gradient norm at the global model
    optimizer: str = "sgd"  # the local optimizer: "sgd" (with momentum) or "adamw" (LOCAL_OPTIMIZERS)
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    masks: Mapping[str, Tensor] | None = None  # sparse fine-tuning (TaLoS): {exchanged name: bool}, True = trained


@dataclass
class ClientResult:
    client: Any
    delta: Params
    num_examples: int
    loss_before: float | None = None
    loss_after: float | None = None
    grad_norm: float | None = None
    group: int | None = None  # the server model it updates (clustered FL's cluster; None: the global one)


def update_needs(needs: set[str]) -> dict[str, bool]:
    """The :func:`client_update` flags a recipe's ``needs`` ask for: the loss before training
    (q-FFL, AdaFedAdam) and the gradient norm at the global model."""
    return {"need_loss_before": bool(needs & {"loss_before", "loss_initial"}), "need_grad_norm": "grad_norm" in needs}


def server_inputs(
    needs: set[str], results: Sequence[ClientResult], initial_losses: Mapping[str, float]
) -> dict[str, list[Any]]:
    """What a recipe's server step needs of each update besides its delta (``recipe.needs``), as
    :func:`~asymvlm.federated.core.server_update` takes it: the losses before training, the gradient
    norms, the clients' initial losses (q-FFL, AdaFedAdam)."""
    out: dict[str, list[Any]] = {}
    if needs & {"loss_before", "loss_initial"}:
        out["loss_before"] = [r.loss_before for r in results]
    if "grad_norm" in needs:
        out["grad_norm"] = [r.grad_norm for r in results]
    if "loss_initial" in needs:
        out["loss_initial"] = [initial_losses[str(r.client)] for r in results]
    return out


# ----------------------------------------------------------------------------------------------
# client-side terms: what a recipe's client_config names, applied at every local step
# ----------------------------------------------------------------------------------------------
class ClientTerm:
    """A client-side term of a federated recipe, built for one client update from the options the
    recipe's ``client_config`` gives it; :func:`client_update` calls its hooks in this order."""

    def start(self, anchor: Mapping[str, Tensor], names: Sequence[str], options: ClientOptions) -> None:
        """Before the first local step: ``anchor`` is the global model the client starts from,
        ``names`` the parameters it trains."""

    def on_gradient(self, names: Sequence[str], params: Sequence[Tensor]) -> None:
        """After the backward pass, before the optimizer step (under ``no_grad``; every
        ``p.grad`` exists): add the term's gradient in place."""

    def after_step(self, names: Sequence[str], params: Sequence[Tensor]) -> None:
        """After the optimizer step (under ``no_grad``): move the parameters directly."""


@dataclass
class ProximalTerm(ClientTerm):
    """FedProx (Li et al. 2020, https://arxiv.org/abs/1812.06127): the gradient of
    ``mu/2 ||theta - theta_global||^2``, ``mu (theta - theta_global)``, added to every local step's.
    ``center`` pulls towards other parameters than the start (Ditto's personal model towards the
    global one, Li et al. 2021, https://arxiv.org/abs/2012.04221)."""

    mu: float = 0.0
    center: Mapping[str, Tensor] | None = None
    anchor: dict[str, Tensor] = field(default_factory=dict, init=False)

    def start(self, anchor, names, options):
        source = anchor if self.center is None else self.center
        self.anchor = {k: source[k].detach() for k in names}

    def on_gradient(self, names, params):
        if self.mu > 0:
            for k, p in zip(names, params):
                p.grad.add_(p.detach() - self.anchor[k], alpha=self.mu)


@dataclass
class HeavyBallTerm(ClientTerm):
    """GHBM's momentum term (Zaccone et al. 2024, https://arxiv.org/abs/2311.18578, Algorithm 1).

    Every local step adds ``beta / (eta_l J) m_t`` to the gradient, so the J steps move the client
    by exactly ``-beta m_t`` (the heavy-ball term). Applied as that displacement,
    ``eta_l * beta / (eta_l J) m_t = beta / J m_t`` per step, outside the optimizer: through SGD's
    momentum buffer (the clients' --local_momentum mu) it would be multiplied by
    ``(1/J) sum_j (1 - mu^j) / (1 - mu)`` (3.6 at mu 0.9, J 8), a heavy-ball coefficient of 3.2 for
    beta 0.9: unstable at server lr 1 and on the edge at 0.3 (issue 26: the demo's GHBM at chance on
    another machine). Without local momentum the two are the same algorithm (tests/federated/test_ghbm.py).
    """

    beta: float = 0.0
    momentum: Mapping[str, Tensor] | None = None
    step: dict[str, Tensor] | None = field(default=None, init=False)

    def start(self, anchor, names, options):
        if self.momentum is not None and self.beta > 0:
            c = self.beta / options.local_steps
            self.step = {k: c * self.momentum[k] for k in names}

    def after_step(self, names, params):
        if self.step is not None:
            for k, p in zip(names, params):
                p.sub_(self.step[k].to(p.dtype))


@dataclass
class RelationshipTerm(ClientTerm):
    """MOCHA's task-relationship regulariser (Smith et al. 2017, https://arxiv.org/abs/1705.10467):
    the gradient of ``lam tr(W Omega^-1 W^T)`` with respect to this client's column ``w_k``,
    ``2 lam (a w_k + others)``, where ``a = (Omega^-1)_kk`` and ``others = sum_{j != k}
    (Omega^-1)_kj w_j`` come from the server."""

    lam: float = 0.0
    self_weight: float = 0.0
    others: Mapping[str, Tensor] | None = None

    def on_gradient(self, names, params):
        if self.lam > 0:
            for k, p in zip(names, params):
                extra = self.self_weight * p.detach()
                if self.others is not None:
                    extra = extra + self.others[k].to(p.dtype)
                p.grad.add_(extra, alpha=2.0 * self.lam)


CLIENT_TERMS = Registry("client term")
CLIENT_TERMS.register(
    "proximal",
    help="FedProx's proximal term: every local gradient gets mu (theta - theta_global)",
    reference="https://arxiv.org/abs/1812.06127",
    params=(
        Param("mu", float, 0.0, "Proximal coefficient mu (0 = off).", check=non_negative),
        Param("center", dict, None, "The parameters it pulls towards, {name: tensor} (None = the start)."),
    ),
)(ProximalTerm)
CLIENT_TERMS.register(
    "heavy_ball",
    help="GHBM's momentum: the client moves by -beta m_t over its local steps, outside its optimizer",
    reference="https://arxiv.org/abs/2311.18578",
    params=(
        Param("beta", float, 0.0, "Momentum coefficient beta in [0, 1) (0 = off).", check=probability),
        Param("momentum", dict, None, "The server's momentum m_t, {exchanged name: tensor} (None = off)."),
    ),
)(HeavyBallTerm)
CLIENT_TERMS.register(
    "relationship",
    help="MOCHA's task-relationship term: local gradients get 2 lam ((Omega^-1)_kk w_k + sum_j (Omega^-1)_kj w_j)",
    reference="https://arxiv.org/abs/1705.10467",
    params=(
        Param("lam", float, 0.0, "Regularisation strength lam (0 = off).", check=non_negative),
        Param("self_weight", float, 0.0, "(Omega^-1)_kk, this task's own entry."),
        Param("others", dict, None, "sum_{j != k} (Omega^-1)_kj w_j, {name: tensor} (None = 0)."),
    ),
)(RelationshipTerm)


def build_client_terms(client_config: Mapping[str, Mapping[str, Any]] | None) -> list[ClientTerm]:
    """One :class:`ClientTerm` per entry of a recipe's client configuration, in its order (an
    unknown term or option is a :class:`~asymvlm.errors.ConfigError` naming it)."""
    return [CLIENT_TERMS.build(name, **dict(opts)) for name, opts in (client_config or {}).items()]


def round_client_config(recipe: Recipe, opt_state: Any, params: Mapping[str, Tensor]) -> dict[str, Any]:
    """The round's client configuration, ``recipe.client_config(opt_state, params)``, checked: every
    term it names is registered and declared in ``recipe.client_terms`` (a
    :class:`~asymvlm.errors.ConfigError` naming it otherwise). The simulator and Flower's server
    both send this."""
    config = dict(recipe.client_config(opt_state, params))
    for term in config:
        CLIENT_TERMS.entry(term)
        if term not in recipe.client_terms:
            raise ConfigError(
                f"recipe {recipe.name!r} configures the client term {term!r} but declares only "
                f"{sorted(recipe.client_terms)} in client_terms"
            )
    return config


def pack_client_config(client_config: Mapping[str, Mapping[str, Any]]) -> tuple[dict[str, Any], dict[str, Params]]:
    """A client configuration as ``(numbers, tensors)`` for a transport that sends scalars and named
    tensors apart (Flower's ``ConfigRecord`` and ``ArrayRecord``s), keyed ``"<term>.<option>"``;
    an option that is ``None`` is left out (every term's default is "off")."""
    numbers: dict[str, Any] = {}
    tensors: dict[str, Params] = {}
    for term, opts in client_config.items():
        for option, value in opts.items():
            if "." in term or "." in option:
                raise ConfigError(f"client term {term!r} option {option!r}: names may not contain '.'")
            if value is None:
                continue
            if isinstance(value, Mapping):
                tensors[f"{term}.{option}"] = dict(value)
            else:
                numbers[f"{term}.{option}"] = value
    return numbers, tensors


def unpack_client_config(numbers: Mapping[str, Any], tensors: Mapping[str, Mapping[str, Tensor]]) -> dict[str, Any]:
    """Inverse of :func:`pack_client_config` (keys without a ``.`` are ignored: a transport's own)."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in [*numbers.items(), *tensors.items()]:
        if "." in key:
            term, option = key.split(".", 1)
            out.setdefault(term, {})[option] = dict(value) if isinstance(value, Mapping) else value
    return out


LOCAL_OPTIMIZERS = ("sgd", "adamw")
NO_WEIGHT_DECAY = frozenset({"loss_fn.logit_scale"})  # the temperature is not decayed (TrainableModel.no_weight_decay)


def local_optimizer(
    params: Sequence[Tensor], options: ClientOptions, names: Sequence[str] | None = None
) -> torch.optim.Optimizer:
    """The client's local optimizer over ``params`` (named ``names``): SGD with
    ``options.momentum`` (the default), or AdamW (Loshchilov & Hutter 2019,
    https://arxiv.org/abs/1711.05101) with ``options.weight_decay`` on every parameter but the
    loss temperature (as ``asymvlm-train``), both at ``options.local_lr``; a fresh state every round."""
    # torch's fused kernels (one pass over each tensor; AdamW 4.5x, SGD 1.25x the default on this
    # CPU for a 100-client stack): the sequential loop and every Flower node use them too, so all
    # paths run the same arithmetic
    fused = {"fused": True} if all(p.is_floating_point() for p in params) else {}
    if options.optimizer == "sgd":
        return torch.optim.SGD(params, lr=options.local_lr, momentum=options.momentum, **fused)
    if options.optimizer == "adamw":
        names = list(names) if names is not None else [""] * len(params)
        decay = [p for k, p in zip(names, params) if k not in NO_WEIGHT_DECAY]
        keep = [p for k, p in zip(names, params) if k in NO_WEIGHT_DECAY]
        groups = [{"params": decay, "weight_decay": options.weight_decay}, {"params": keep, "weight_decay": 0.0}]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=options.local_lr, **fused)
    raise ConfigError(f"unknown local optimizer {options.optimizer!r}; choose one of {LOCAL_OPTIMIZERS}")


def build_client_model(
    head_config: HeadConfig,
    *,
    trainable: Trainable = "head",
    encoder: Any = None,
    lora: dict[str, Any] | None = None,
    freeze_lora_a: bool = False,
    seed: int = 0,
    loss_kwargs: dict[str, Any] | None = None,
) -> TrainableModel:
    """The model every client trains: a fresh head (seeded), the loss temperature and, for
    ``trainable`` in (lora, both), a peft LoRA adapter on ``encoder``'s text tower
    (``lora = dict(r, alpha, dropout, target_modules)``)."""
    if trainable not in ("head", "lora", "both"):
        raise ConfigError(f"trainable must be head, lora or both, got {trainable!r}")
    torch.manual_seed(seed)
    head = TextHead(config=head_config, validate=False)
    loss_fn = AsymVLMLoss(**(loss_kwargs or {}))
    peft_model = None
    if trainable in ("lora", "both"):
        if encoder is None:
            raise ConfigError("federating a LoRA adapter needs the encoder")
        from asymvlm.lora import add_text_lora

        peft_model = add_text_lora(encoder, **(lora or {}))
    return TrainableModel(head, loss_fn, encoder, peft_model, trainable=trainable, freeze_lora_a=freeze_lora_a)


def client_loss(model: TrainableModel, batcher: Any, batches: int, *, grad: bool = False) -> tuple[float, float | None]:
    """Mean loss over the first ``batches`` batches of a client's data (and the norm of the mean
    gradient there when ``grad``); the model is left unchanged."""
    trained = set(model.trained_names())
    params = [p for k, p in model.exchanged().items() if k in trained]
    total, n = 0.0, 0
    grads = None
    for i in range(batches):
        batch = batcher.batch(i)
        if grad:
            loss = model.batch_loss(batch)
            live = [p for p in params if p.requires_grad]  # a fixed temperature is a buffer
            got = iter(torch.autograd.grad(loss, live, allow_unused=True))
            g = [next(got) if p.requires_grad else None for p in params]
            g = [torch.zeros_like(p) if gi is None else gi for gi, p in zip(g, params)]
            grads = g if grads is None else [a + b for a, b in zip(grads, g)]
        else:
            with torch.no_grad():
                loss = model.batch_loss(batch)
        total += float(loss.detach())
        n += 1
    norm = None
    if grads is not None:
        norm = math.sqrt(sum(float((g / n).double().pow(2).sum()) for g in grads))
    return total / n, norm


def local_step(
    opt: torch.optim.Optimizer,
    terms: Sequence[ClientTerm],
    names: Sequence[str],
    params: Sequence[Tensor],
    masks: SparseMasks | None,
) -> None:
    """One local step after the backward pass, in the order every client loop applies it: a
    missing gradient is zero, each client term adds its gradient, the masks zero what they freeze,
    the optimizer steps, each term moves the parameters, the masks restore the frozen entries
    (:func:`client_update`, and the stacked clients of :mod:`asymvlm.federated.vectorized`)."""
    with torch.no_grad():
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for term in terms:
            term.on_gradient(names, params)
    if masks is not None:  # entries outside the mask keep their value exactly, whatever SGD does there
        masks.before_step()
    opt.step()
    if terms:
        with torch.no_grad():
            for term in terms:
                term.after_step(names, params)
    if masks is not None:
        masks.after_step()


def client_update(
    model: TrainableModel,
    global_params: Mapping[str, Tensor],
    batcher: Any,
    options: ClientOptions,
    *,
    client: Any = None,
    num_examples: int | None = None,
    seed: int = 0,
    client_config: Mapping[str, Mapping[str, Any]] | None = None,
    need_loss_before: bool = False,
    need_grad_norm: bool = False,
) -> ClientResult:
    """Train one client locally from ``global_params`` and return its delta.

    ``batcher`` yields this client's batches by index (``batcher.batch(i)``; seeded, so the same
    round replays identically). ``seed`` seeds anything else random (LoRA dropout).
    ``client_config`` is the round's ``recipe.client_config(state, params)``: the client-side terms
    (:data:`CLIENT_TERMS`) applied at every step.
    """
    torch.manual_seed(seed)
    model.set_params(global_params)
    model.train()
    names = model.trained_names()
    named = model.exchanged()
    params = [named[k] for k in names]
    loss_before = grad_norm = None
    lb = min(options.loss_batches, max(1, getattr(batcher, "num_batches", options.loss_batches)))
    if need_loss_before or need_grad_norm:
        loss_before, grad_norm = client_loss(model, batcher, lb, grad=need_grad_norm)
    opt = local_optimizer(params, options, names)
    terms = build_client_terms(client_config)
    for term in terms:
        term.start(global_params, names, options)
    masks = SparseMasks(dict(options.masks), model) if options.masks else None
    loss = None
    for step in range(options.local_steps):
        batch = batcher.batch(step)
        loss = model.batch_loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        local_step(opt, terms, names, params, masks)
    loss_after, _ = client_loss(model, batcher, lb)
    new = model.get_params()
    delta = {k: new[k] - global_params[k] for k in global_params}
    return ClientResult(
        client, delta, int(num_examples if num_examples is not None else 0), loss_before, loss_after, grad_norm
    )


def check_masks(model: TrainableModel, masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Masks for federated clients: bool tensors named like the model's parameters (a mask file
    from :func:`asymvlm.merging.talos.calibrate_mask` or for ``asymvlm-train --mask_file``), each
    naming a parameter the clients train; anything else is an :class:`~asymvlm.errors.InputError`
    naming it."""
    trained = set(model.trained_names())
    named = dict(model.named_parameters())
    for name, m in masks.items():
        if name not in trained:
            where = "is not trained by the clients" if name in named else "names no parameter"
            raise InputError(f"mask {name!r} {where}; the clients train: {sorted(trained)[:6]}...")
        if m.dtype != torch.bool:
            raise InputError(f"mask {name!r} must be a bool tensor, got {m.dtype}")
    SparseMasks(dict(masks), model)  # shapes
    return dict(masks)


def trained_params(params: Mapping[str, Tensor], model: TrainableModel) -> dict[str, Tensor]:
    """The entries of ``params`` the clients train (what they send)."""
    trained = set(model.trained_names())
    return {k: v for k, v in params.items() if k in trained}


def upload_bytes(params: Mapping[str, Tensor], masks: Mapping[str, Tensor] | None = None) -> dict[str, float]:
    """Bytes one client uploads per round: dense (every exchanged value) and sparse (only the values
    inside the masks: server and clients share the mask, so no indices travel)."""
    dense = sum(v.numel() * v.element_size() for v in params.values())
    sent = sum(
        (int(masks[k].sum()) if masks is not None and k in masks else v.numel()) * v.element_size()
        for k, v in params.items()
    )
    return {"dense_bytes": dense, "sent_bytes": sent, "saving": 1.0 - sent / dense if dense else 0.0}


# ----------------------------------------------------------------------------------------------
# the LoRA layers of a client model, and the frozen base weights the exact modes fold into
# ----------------------------------------------------------------------------------------------
_PEFT_ROOT = "peft_model.base_model.model."


def lora_layer_keys(params: Mapping[str, Tensor]) -> dict[str, tuple[str, str]]:
    """``{layer: (key of A, key of B)}`` for the LoRA factors among exchanged ``params``."""
    out: dict[str, dict[str, str]] = {}
    for k in params:
        for ab in ("A", "B"):
            marker = f".lora_{ab}."
            if marker in k:
                out.setdefault(k.split(marker)[0], {})[ab] = k
    return {layer: (d["A"], d["B"]) for layer, d in out.items()}


def module_path(layer: str) -> str:
    """The adapted module's path in the encoder's own model (peft's wrapper prefix removed)."""
    return layer[len(_PEFT_ROOT) :] if layer.startswith(_PEFT_ROOT) else layer


def get_base(model: TrainableModel, layers: Mapping[str, Any]) -> Params:
    """The current frozen base weight of every adapted layer."""
    named = dict(model.named_parameters())
    return {layer: named[f"{layer}.base_layer.weight"].detach().clone() for layer in layers}


@torch.no_grad()
def set_base(model: TrainableModel, base: Mapping[str, Tensor]) -> None:
    """Write the frozen base weights (the exact LoRA modes fold the server's Delta W into them)."""
    named = dict(model.named_parameters())
    for layer, w in base.items():
        named[f"{layer}.base_layer.weight"].copy_(w)


def init_head_from(model: TrainableModel, path: str) -> None:
    """Start the clients' model from a saved AsymVLM's head and temperature (``--init_from``; the
    same head architecture, else a :class:`~asymvlm.errors.ConfigError`)."""
    from asymvlm.model import AsymVLM

    start = AsymVLM.from_pretrained(path, load_encoder=False)
    if start.head.config != model.head.config:
        raise ConfigError(
            f"init_from {path}: head {start.head.config} differs from the federated head {model.head.config}"
        )
    with torch.no_grad():
        model.head.load_state_dict(start.head.state_dict())
        model.loss_fn.logit_scale.fill_(start.logit_scale)
