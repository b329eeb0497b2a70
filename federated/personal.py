"""Personalised federated learning: every client ends with a model of its own.

A :class:`Personalizer` says three things, and the rounds (:mod:`asymvlm.federated.rounds`) do the
rest on the one core (sampling, the recipe's server step, checkpoints, resume):

* **what never leaves the client** (:meth:`Personalizer.personal_keys`): those parameters are
  not uploaded and the server steps only the others (partial personalisation);
* **how a client trains a round** (:meth:`Personalizer.client_round`): from the global model and
  its own persistent state (``None`` on its first round) to the update it uploads and its new
  state, which stays on the client (:class:`asymvlm.federated.personal_store.ClientStates`);
* **its own model** (:meth:`Personalizer.client_model`), which per-client evaluation scores.

Entries of :data:`PERSONALIZERS` (``asymvlm-federate --personalize NAME``, ``--list_personalizers``):

======================  ====================================================================
``none``                one global model (FedAvg and every recipe as they are)
``local_ft``            fine-tuning the global model on the client's data at evaluation
``fedper``              FedPer: the head's last layer stays local
``lg_fedavg``           LG-FedAvg: the head's first layer (local representation) stays local
``fedsa_lora``          FedSA-LoRA: LoRA A shared, LoRA B personal
``fedrep``              FedRep: personal last layer trained first with the body frozen, then the body
``ditto``               Ditto: a personal model pulled towards the global one (lambda)
``pfedme``              pFedMe: Moreau envelopes, K inner steps per local step
``kappa_route``         ours: Ditto's personal head, and each query answered by the head that is
                        the more concentrated on it relative to its usual concentration
======================  ====================================================================

Parts are named by ``parts``: comma-separated globs over the exchanged parameter names
(``fnmatch``) or the tokens ``@head_first`` / ``@head_last`` (the first / last linear layer of the
head) and ``@lora_A`` / ``@lora_B``.

Example:
    >>> names = ["head.mlp.0.weight", "head.mlp.0.bias", "head.mlp.2.weight", "head.mlp.2.bias",
    ...          "loss_fn.logit_scale"]
    >>> resolve_parts("@head_last", names)
    ['head.mlp.2.bias', 'head.mlp.2.weight']
    >>> PERSONALIZERS.build("fedper").personal_keys(names)
    ['head.mlp.2.bias', 'head.mlp.2.weight']
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from asymvlm.errors import ConfigError
from asymvlm.federated.client import ClientOptions, ClientResult, client_loss, client_update
from asymvlm.federated.core import Params
from asymvlm.registry import Param, Registry, at_least, non_negative

__all__ = [
    "ClientJob",
    "Personalizer",
    "Partial",
    "FedRep",
    "Ditto",
    "PFedMe",
    "LocalFineTune",
    "KappaRoute",
    "PERSONALIZERS",
    "resolve_parts",
    "make_personalizer",
    "encode_with",
]

_LINEAR = re.compile(r"^head\.mlp\.(\d+)\.(weight|bias)$")


def resolve_parts(parts: str, names: Sequence[str]) -> list[str]:
    """The exchanged names that ``parts`` selects, sorted (a :class:`ConfigError` when a term
    selects nothing: a typo never silently personalises nothing)."""
    layers = sorted({int(m.group(1)) for n in names if (m := _LINEAR.match(n))})
    out: set[str] = set()
    for term in (t.strip() for t in parts.split(",") if t.strip()):
        if term in ("@head_first", "@head_last"):
            if not layers:
                raise ConfigError(f"personal part {term!r}: the model has no head layers among {list(names)[:4]}...")
            i = layers[0] if term == "@head_first" else layers[-1]
            got = {n for n in names if (m := _LINEAR.match(n)) and int(m.group(1)) == i}
        elif term in ("@lora_A", "@lora_B"):
            got = {n for n in names if f".lora_{term[-1]}." in n}
        else:
            got = set(fnmatch.filter(names, term))
        if not got:
            raise ConfigError(f"personal part {term!r} selects no parameter; the exchanged ones: {list(names)[:6]}...")
        out |= got
    return sorted(out)


@dataclass
class ClientJob:
    """One client's round, as the rounds hand it to a :class:`Personalizer`."""

    model: Any  # the TrainableModel every client trains
    global_params: Params  # the global model (with the server's copy of the personal parts: their start)
    batcher: Any
    options: ClientOptions
    client: int
    num_examples: int
    seed: int
    client_config: Mapping[str, Any] | None = None  # the recipe's client-side terms for the round
    need_loss_before: bool = False
    need_grad_norm: bool = False
    reseed: Callable[[str], int] | None = None  # seed of a named extra stream of this client and round

    def update(self, start: Params, options: ClientOptions | None = None, **kw: Any) -> ClientResult:
        """:func:`~asymvlm.federated.client.client_update` from ``start`` (delta relative to it)."""
        args = dict(
            client=self.client, num_examples=self.num_examples, seed=self.seed, client_config=self.client_config,
            need_loss_before=self.need_loss_before, need_grad_norm=self.need_grad_norm,
        )  # fmt: skip
        args.update(kw)
        return client_update(self.model, start, self.batcher, options or self.options, **args)

    def stream(self, name: str) -> int:
        """A fresh seed for a second pass over the client's data (``name``), batches reseeded."""
        seed = self.reseed(name) if self.reseed is not None else self.seed + 1
        self.batcher.reseed(seed)
        return seed


class Personalizer:
    """One global model for everyone (the base): nothing personal, the recipe's client update."""

    name = "none"
    #: whether the recipe's client-side terms (FedProx, GHBM) and TaLoS masks apply to the upload's training
    takes_client_terms = True
    #: whether evaluation answers each query with one of two heads (:class:`KappaRoute`)
    routes = False

    def personal_keys(self, names: Sequence[str]) -> list[str]:
        return []

    def check(self, fed: Any) -> None:
        """Refuse a run this method cannot do (a :class:`~asymvlm.errors.ConfigError`); base: none."""

    def client_round(self, job: ClientJob, personal: Params | None) -> tuple[ClientResult, Params | None]:
        return job.update(job.global_params), None

    def client_model(self, job: ClientJob, personal: Params | None) -> Params:
        return {**job.global_params, **(personal or {})}


@dataclass
class Partial(Personalizer):
    """Partial personalisation: ``parts`` stay on the client and are trained with the rest every
    local step; only the other parameters are uploaded. FedPer (Arivazhagan et al. 2019,
    https://arxiv.org/abs/1912.00818: the last layer local), LG-FedAvg (Liang et al. 2020,
    https://arxiv.org/abs/2001.01523: the local representation, here the head's first layer) and
    FedSA-LoRA (Guo et al. 2025, https://arxiv.org/abs/2410.01463: LoRA A shared, B personal)."""

    parts: str = "@head_last"
    name: str = "partial"

    def personal_keys(self, names):
        keys = resolve_parts(self.parts, names)
        if len(keys) == len(names):
            raise ConfigError(f"{self.name}: parts {self.parts!r} select every parameter; nothing would be shared")
        return keys

    def client_round(self, job, personal):
        keys = self.personal_keys(list(job.global_params))
        start = {**job.global_params, **(personal or {})}
        res = job.update(start)
        mine = {k: start[k] + res.delta[k] for k in keys}
        res.delta = {k: v for k, v in res.delta.items() if k not in mine}
        return res, mine


def _only(model: Any, moving: Sequence[str], masks: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
    """Masks that let only ``moving`` change (and only inside the run's own masks)."""
    named = dict(model.named_parameters())
    moving = set(moving)
    out = {}
    for k in model.trained_names():
        m = torch.full(named[k].shape, k in moving, dtype=torch.bool)
        out[k] = m & masks[k] if masks is not None and k in masks else m
    return out


@dataclass
class FedRep(Partial):
    """FedRep (Collins et al. 2021, https://arxiv.org/abs/2102.07078, Algorithm 1): each round the
    client first trains its personal ``parts`` for ``head_steps`` with the shared body frozen, then
    the body for ``local_steps`` with the personal parts frozen, and uploads the body's update."""

    head_steps: int = 10
    name: str = "fedrep"

    def client_round(self, job, personal):
        keys = self.personal_keys(list(job.global_params))
        start = {**job.global_params, **(personal or {})}
        opts = job.options
        head = dataclasses.replace(opts, local_steps=self.head_steps, masks=_only(job.model, keys, opts.masks))
        first = job.update(start, head, client_config=None)  # the personal parts alone, no recipe terms
        mid = {k: start[k] + first.delta[k] for k in start}
        job.stream("fedrep_body")
        body_keys = [k for k in job.model.trained_names() if k not in keys]
        body = dataclasses.replace(opts, masks=_only(job.model, body_keys, opts.masks))
        res = job.update(mid, body, need_loss_before=False, need_grad_norm=False)
        res.loss_before, res.grad_norm = first.loss_before, first.grad_norm  # at the round's start
        res.delta = {k: mid[k] + res.delta[k] - job.global_params[k] for k in start if k not in keys}
        return res, {k: mid[k] for k in keys}


@dataclass
class Ditto(Personalizer):
    """Ditto (Li et al. 2021, https://arxiv.org/abs/2012.04221, Algorithm 1): the client trains
    the global objective as the recipe says and uploads that; besides, its personal model ``v``
    (the global one on its first round) takes ``personal_steps`` SGD steps on
    ``F_k(v) + lam/2 ||v - w||^2`` with ``w`` the round's global model, and stays local."""

    lam: float = 0.1
    personal_steps: int = 0  # 0: the run's local_steps
    personal_lr: float = 0.0  # 0: the run's local_lr
    name: ClassVar[str] = "ditto"

    def client_round(self, job, personal):
        res = job.update(job.global_params)
        start = dict(personal) if personal is not None else dict(job.global_params)
        seed = job.stream("personal")
        opts = dataclasses.replace(
            job.options,
            local_steps=self.personal_steps or job.options.local_steps,
            local_lr=self.personal_lr or job.options.local_lr,
        )
        pull = {"proximal": {"mu": self.lam, "center": dict(job.global_params)}}
        own = job.update(start, opts, client_config=pull, seed=seed, need_loss_before=False, need_grad_norm=False)
        return res, {k: start[k] + own.delta[k] for k in start}

    def client_model(self, job, personal):
        return dict(personal) if personal is not None else dict(job.global_params)


@dataclass
class PFedMe(Personalizer):
    """pFedMe (Dinh et al. 2020, https://arxiv.org/abs/2006.08848, Algorithm 1). Every local step
    draws a batch and solves the Moreau envelope's inner problem
    ``theta = argmin f(theta; batch) + lam/2 ||theta - w_k||^2`` approximately by ``inner_steps``
    gradient steps of ``personal_lr`` (from the previous theta), then moves the local model
    ``w_k <- w_k - local_lr * lam * (w_k - theta)``; the client uploads ``w_k - w`` and keeps
    ``theta``, its personal model. The server's ``beta`` is the recipe's server step (FedAvg's
    ``server_lr``)."""

    lam: float = 15.0
    inner_steps: int = 5
    personal_lr: float = 0.0  # 0: the run's local_lr
    name: ClassVar[str] = "pfedme"
    takes_client_terms: ClassVar[bool] = False

    def check(self, fed):
        if not fed.local_lr * self.lam < 2:  # w <- w - lr lam (w - theta) overshoots
            raise ConfigError(
                f"pfedme: local_lr x lam = {fed.local_lr * self.lam:g} must be < 2 (the local model's step "
                "w <- w - local_lr lam (w - theta) diverges); lower lam or local_lr"
            )
        plr = self.personal_lr or fed.local_lr
        if not plr * self.lam < 2:
            raise ConfigError(f"pfedme: personal_lr x lam = {plr * self.lam:g} must be < 2 (the inner steps diverge)")

    def client_round(self, job, personal):
        model, opts = job.model, job.options
        torch.manual_seed(job.seed)
        model.set_params(job.global_params)
        model.train()
        names = model.trained_names()
        named = model.exchanged()
        params = [named[k] for k in names]
        loss_before = grad_norm = None
        lb = min(opts.loss_batches, max(1, getattr(job.batcher, "num_batches", opts.loss_batches)))
        if job.need_loss_before or job.need_grad_norm:
            loss_before, grad_norm = client_loss(model, job.batcher, lb, grad=job.need_grad_norm)
        local = [p.detach().clone() for p in params]
        plr = self.personal_lr or opts.local_lr
        for step in range(opts.local_steps):
            batch = job.batcher.batch(step)
            for _ in range(self.inner_steps):
                grads = torch.autograd.grad(model.batch_loss(batch), params, allow_unused=True)
                with torch.no_grad():
                    for p, g, w in zip(params, grads, local):
                        p.sub_(plr * ((g if g is not None else 0.0) + self.lam * (p - w)))
            with torch.no_grad():
                for p, w in zip(params, local):
                    w.sub_(opts.local_lr * self.lam * (w - p))
        loss_after, _ = client_loss(model, job.batcher, lb)
        theta = model.get_params()
        new_local = dict(zip(names, local))
        delta = {k: (new_local[k] - v if k in new_local else torch.zeros_like(v)) for k, v in job.global_params.items()}
        res = ClientResult(job.client, delta, job.num_examples, loss_before, loss_after, grad_norm)
        return res, {k: theta[k] for k in job.global_params}

    def client_model(self, job, personal):
        return dict(personal) if personal is not None else dict(job.global_params)


@dataclass
class LocalFineTune(Personalizer):
    """Local fine-tuning after federation (Wang et al. 2019, https://arxiv.org/abs/1910.10252;
    Yu et al. 2020, https://arxiv.org/abs/2002.04758): training is the recipe's, and a client's
    model is the global one after ``steps`` local SGD steps of ``lr`` on its own data (done when
    it is evaluated; nothing persists)."""

    steps: int = 20
    lr: float = 0.0  # 0: the run's local_lr
    name: ClassVar[str] = "local_ft"

    def client_model(self, job, personal):
        job.stream("finetune")
        opts = dataclasses.replace(job.options, local_steps=self.steps, local_lr=self.lr or job.options.local_lr)
        res = job.update(job.global_params, opts, client_config=None, need_loss_before=False, need_grad_norm=False)
        return {k: job.global_params[k] + res.delta[k] for k in job.global_params}


@dataclass
class KappaRoute(Ditto):
    """Ours: concentration routing between the global and the personal head. Training is Ditto's
    (a personal head pulled towards the global one); at inference each query is answered by the
    head that is the more concentrated on it *relative to its usual concentration on this client*
    (``log kappa - median log kappa`` over the client's own training captions), so the personal
    head answers what it is sure of and the global one the rest. No framework has it: it needs a
    model that says how sure it is per query."""

    name: ClassVar[str] = "kappa_route"
    routes: ClassVar[bool] = True


PERSONALIZERS = Registry("personalization method")
_PARTS = "Personal parts: comma-separated globs over parameter names or @head_first/@head_last/@lora_A/@lora_B."


def _partial(name: str, default: str, help: str, reference: str) -> None:
    @PERSONALIZERS.register(name, params=[Param("parts", str, default, _PARTS)], help=help, reference=reference)
    def _make(parts: str) -> Partial:
        return Partial(parts=parts, name=name)


PERSONALIZERS.register(
    "none", help="One global model for every client.", reference="McMahan et al. 2017 https://arxiv.org/abs/1602.05629"
)(Personalizer)
_partial(
    "fedper", "@head_last", "FedPer: the head's last layer stays on the client.", "https://arxiv.org/abs/1912.00818"
)
_partial(
    "lg_fedavg", "@head_first", "LG-FedAvg: the head's first layer (local representation) stays on the client.",
    "https://arxiv.org/abs/2001.01523",
)  # fmt: skip
_partial("fedsa_lora", "@lora_B", "FedSA-LoRA: LoRA A is shared, LoRA B personal.", "https://arxiv.org/abs/2410.01463")


@PERSONALIZERS.register(
    "fedrep",
    params=[
        Param("parts", str, "@head_last", _PARTS),
        Param("head_steps", int, 10, "Steps on the personal parts (body frozen) before the body's.", check=at_least(1)),
    ],
    help="FedRep: personal head first (body frozen), then the shared body (head frozen).",
    reference="https://arxiv.org/abs/2102.07078",
)
def _fedrep(parts: str, head_steps: int) -> FedRep:
    return FedRep(parts=parts, head_steps=head_steps)


_DITTO = [
    Param("lam", float, 0.1, "Pull of the personal model towards the global one (lambda).", check=non_negative),
    Param("personal_steps", int, 0, "Personal SGD steps per round (0: local_steps).", check=non_negative),
    Param("personal_lr", float, 0.0, "Personal learning rate (0: local_lr).", check=non_negative),
]
PERSONALIZERS.register(
    "ditto", params=_DITTO, help="Ditto: a personal model with a proximal pull lam towards the global one.",
    reference="https://arxiv.org/abs/2012.04221",
)(Ditto)  # fmt: skip
PERSONALIZERS.register(
    "kappa_route",
    params=_DITTO,
    help="Ours: Ditto's personal head; each query answered by the head more concentrated on it than usual.",
    reference="asymvlm (concentration routing; training: Ditto https://arxiv.org/abs/2012.04221)",
)(KappaRoute)
PERSONALIZERS.register(
    "pfedme",
    params=[
        Param("lam", float, 15.0, "Moreau-envelope coefficient lambda.", check=non_negative),
        Param("inner_steps", int, 5, "Inner steps K solving the personal problem per local step.", check=at_least(1)),
        Param("personal_lr", float, 0.0, "Inner-step learning rate (0: local_lr).", check=non_negative),
    ],
    help="pFedMe: Moreau-envelope personal models, K inner steps per local step.",
    reference="https://arxiv.org/abs/2006.08848",
)(PFedMe)
PERSONALIZERS.register(
    "local_ft",
    params=[
        Param("steps", int, 20, "Fine-tuning steps on the client's data at evaluation.", check=at_least(1)),
        Param("lr", float, 0.0, "Fine-tuning learning rate (0: local_lr).", check=non_negative),
    ],
    help="Local fine-tuning of the global model after federation (at evaluation).",
    reference="https://arxiv.org/abs/1910.10252",
)(LocalFineTune)


def make_personalizer(name: str, options: Mapping[str, Any] | None = None) -> Personalizer:
    """:data:`PERSONALIZERS` entry ``name`` with its options (unknown ones are a ConfigError)."""
    return PERSONALIZERS.build(name, **dict(options or {}))


def encode_with(model: Any, params: Params, *, distribution: bool = False) -> Callable[[Any], Any]:
    """``encode(text) -> (loc, concentration)`` of ``model`` with ``params`` (for evaluation); with
    ``distribution`` the head's distribution itself."""

    @torch.no_grad()
    def encode(text: Any) -> Any:
        model.set_params(params)
        was = model.training
        model.eval()
        q = model.head(model.embed_text(text))
        model.train(was)
        return q if distribution else (q.loc.float(), q.concentration.float())

    return encode


def routed_encode(
    model: Any, global_params: Params, personal_params: Params, train_text: Any
) -> Callable[[Any], tuple[Tensor, Tensor]]:
    """:class:`KappaRoute`'s encoder: per query, the head whose ``log kappa`` exceeds its own median
    on ``train_text`` (the client's training captions) by more; ties go to the personal head."""
    enc_g, enc_p = encode_with(model, global_params), encode_with(model, personal_params)
    ref_g = torch.log(enc_g(train_text)[1]).median()
    ref_p = torch.log(enc_p(train_text)[1]).median()

    def encode(text: Any) -> tuple[Tensor, Tensor]:
        (loc_g, k_g), (loc_p, k_p) = enc_g(text), enc_p(text)
        use_p = (torch.log(k_p) - ref_p) >= (torch.log(k_g) - ref_g)
        return torch.where(use_p[:, None], loc_p, loc_g), torch.where(use_p, k_p, k_g)

    return encode
