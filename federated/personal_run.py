"""The rounds' personal side: personalised client rounds, their persistent state, per-client evaluation.

:class:`PersonalRun` is what :class:`asymvlm.federated.rounds.Federation` holds when a run
personalises (``--personalize``) or evaluates every client on its own test split
(``--client_test_fraction``). It trains each sampled client with the :class:`~asymvlm.federated.personal.Personalizer`
(whose personal parameters it keeps in :class:`~asymvlm.federated.personal_store.ClientStates`,
on the client's side of the simulation, never in an upload), tells the server which parameters
are shared, and on evaluation rounds scores every client's global and personal model on its own
test split with the ``evaluate_client`` function the command hands in (the rounds import no eval
code): per client and summarised as mean, worst 10% and spread (:func:`client_summary`).

Example:
    >>> client_summary({"0": {"R@1": 0.5}, "1": {"R@1": 0.9}})["R@1"]
    {'mean': 0.7, 'worst10': 0.5, 'std': 0.2, 'min': 0.5, 'max': 0.9}
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from asymvlm.errors import ConfigError
from asymvlm.federated.client import ClientResult, update_needs
from asymvlm.federated.core import Params
from asymvlm.federated.personal import ClientJob, Personalizer, encode_with, make_personalizer, routed_encode
from asymvlm.federated.personal_store import ClientStates

__all__ = [
    "PersonalRun",
    "client_summary",
    "EvaluateClient",
    "CLIENT_EVALUATOR_GROUP",
    "register_client_evaluator",
    "client_evaluator_factory",
]

# evaluate_client(client, encode) -> {metric: value}; encode(text) -> (loc (T, d), concentration (T,))
EvaluateClient = Callable[[int, Callable[[Any], tuple[torch.Tensor, torch.Tensor]]], dict[str, float]]
# the extra batch orders of a client's round (each its own stream: seed_sequence(seed, "personal", t, k, i))
SUBSTREAMS = {"personal": 0, "fedrep_body": 1, "finetune": 2}


def client_summary(per_client: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Per metric over clients: mean, mean of the worst 10% (at least one client; the lowest: every
    metric here is higher-is-better), population std, min and max. NaN values (a client whose test
    split gives no value, e.g. AUROC with no error) are left out of that metric."""
    metrics = sorted({m for v in per_client.values() for m in v})
    out = {}
    for m in metrics:
        v = np.asarray([float(c[m]) for c in per_client.values() if m in c], dtype=np.float64)
        v = v[np.isfinite(v)]
        if not len(v):
            continue
        worst = np.sort(v)[: max(1, int(math.ceil(0.1 * len(v))))]
        out[m] = {
            "mean": round(float(v.mean()), 12), "worst10": float(worst.mean()), "std": round(float(v.std()), 12),
            "min": float(v.min()), "max": float(v.max()),
        }  # fmt: skip
    return out


@dataclass
class PersonalRun:
    """A run's personalisation and per-client evaluation (see the module docstring)."""

    personalizer: Personalizer
    store: ClientStates
    personal_keys: list[str]

    @classmethod
    def build(cls, fed: Any, model: Any, recipe: Any, masks: Any) -> PersonalRun:
        """The run's personalizer, checked against the model, the recipe and the LoRA mode."""
        personalizer = make_personalizer(fed.personalize, fed.personalizer_options())
        names = list(model.get_params())
        keys = personalizer.personal_keys(names)
        if not personalizer.takes_client_terms and (recipe.client_terms or masks):
            raise ConfigError(
                f"personalize {fed.personalize!r} trains with its own local rule: the recipe's client terms "
                f"({sorted(recipe.client_terms)}) and sparse masks do not apply; choose a recipe without them"
            )
        personalizer.check(fed)
        lora_keys = [k for k in keys if ".lora_" in k]
        if lora_keys and fed.lora_mode != "factors":
            raise ConfigError(
                f"personalize {fed.personalize!r} keeps LoRA factors on the clients: it needs lora_mode factors "
                f"(each shared factor averaged as a parameter), got {fed.lora_mode!r}"
            )
        return cls(personalizer, ClientStates(Path(fed.output_dir) / "clients"), keys)

    # -- the server's view ---------------------------------------------------------------------------
    def shared(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The parameters the clients upload and the server steps (all but the personal ones)."""
        return {k: v for k, v in params.items() if k not in set(self.personal_keys)}

    # -- one round ------------------------------------------------------------------------------------
    def job(
        self, run: Any, params: Params, client: int, rnd: int, client_config: Any, seed: int, slot: int | None = None
    ) -> ClientJob:
        """Client ``client``'s :class:`ClientJob` of round ``rnd`` (0-based) from ``params``; its data
        are ``run.data``'s entry ``slot`` (default ``client``; a Flower node holds one client, at 0)."""
        from asymvlm.federated.seeds import int_seed

        needs = run.recipe.needs
        at = client if slot is None else slot
        return ClientJob(
            run.model, dict(params), run.data.batchers[at], run.options, client, run.data.num_examples[at],
            seed, client_config, **update_needs(needs),
            reseed=lambda name: int_seed(run.fed.seed, "personal", rnd, client, SUBSTREAMS[name]),
        )  # fmt: skip

    def client_round(
        self,
        run: Any,
        params: Params,
        client: int,
        rnd: int,
        client_config: Any,
        seed: int,
        slot: int | None = None,
        store: ClientStates | None = None,
    ) -> ClientResult:
        """One client's personalised round ``rnd`` (0-based) on its own side: its state as of the
        round's start (saved at a round ``<= rnd``), the update with shared keys only, its new state
        saved as of round ``rnd + 1`` (in ``store``, default the run's)."""
        store = store or self.store
        job = self.job(run, params, client, rnd, client_config, seed, slot)
        res, mine = self.personalizer.client_round(job, store.load(client, upto=rnd))
        res.delta = self.shared(res.delta)
        if mine is not None:
            store.save(client, rnd + 1, mine)
        return res

    def train(self, run: Any, state: Any, active: list[int], rnd: int, client_config: Any) -> list[ClientResult]:
        """Round ``rnd``'s personalised client updates (only shared keys in each upload); every
        client's new personal state is saved as of round ``rnd + 1`` before the server's checkpoint."""
        from asymvlm.federated.seeds import int_seed

        results = []
        for c in active:
            seed = int_seed(run.fed.seed, "client", rnd, c)
            run.data.batchers[c].reseed(seed)
            results.append(self.client_round(run, state.params, c, rnd, client_config, seed))
        return results

    # -- evaluation -----------------------------------------------------------------------------------
    def client_metrics(
        self,
        run: Any,
        params: Params,
        client: int,
        rnd: int,
        upto: int,
        evaluate_client: EvaluateClient,
        slot: int | None = None,
        store: ClientStates | None = None,
    ) -> dict[str, dict[str, float]]:
        """Client ``client``'s metrics on its own test split, ``{model: {metric: value}}``, for
        ``global`` (when nothing is personal) and ``personal``; its state is read as of round
        ``upto`` (its data are ``run.data``'s entry ``slot``, default ``client``, as in :meth:`job`)."""
        from asymvlm.federated.seeds import int_seed

        p, at = self.personalizer, client if slot is None else slot
        out = {}
        if not self.personal_keys:
            out["global"] = evaluate_client(client, encode_with(run.model, params))
        if p.name != "none":
            seed = int_seed(run.fed.seed, "personal_eval", rnd, client)
            run.data.batchers[at].reseed(seed)
            job = self.job(run, params, client, rnd, None, seed, slot)
            mine = p.client_model(job, (store or self.store).load(client, upto=upto))
            if p.routes:
                encode = routed_encode(run.model, params, mine, run.data.batchers[at].text)
            else:
                encode = encode_with(run.model, mine)
            out["personal"] = evaluate_client(client, encode)
        run.model.set_params(params)
        return out

    def evaluate(self, run: Any, state: Any, evaluate_client: EvaluateClient, rnd: int) -> dict[str, Any]:
        """Every client's metrics on its own test split: ``client_metrics`` ``{model: {client: {metric:
        value}}}`` and ``client_eval`` ``{model: client_summary}`` for the models ``global`` (when
        nothing is personal: the one model everyone gets) and ``personal`` (the personalizer's)."""
        per: dict[str, dict[str, dict[str, float]]] = {}
        for c in range(run.fed.num_clients):
            for model, metrics in self.client_metrics(run, state.params, c, rnd, state.round, evaluate_client).items():
                per.setdefault(model, {})[str(c)] = metrics
        return {"client_metrics": per, "client_eval": {m: client_summary(v) for m, v in per.items()}}


# the evaluator of a client's own test split: registered by a layer above (asymvlm.training.client_eval,
# declared under this entry-point group), so that a Flower node can evaluate its clients without the
# federated layer importing the evaluation code
CLIENT_EVALUATOR_GROUP = "asymvlm.client_evaluators"
_FACTORY: list[Callable[[Any], EvaluateClient]] = []


def register_client_evaluator(factory: Callable[[Any], EvaluateClient]) -> Callable[[Any], EvaluateClient]:
    """Register ``factory(tests) -> evaluate_client`` (the last registered wins)."""
    _FACTORY[:] = [factory]
    return factory


def client_evaluator_factory() -> Callable[[Any], EvaluateClient]:
    """The registered ``factory(tests) -> evaluate_client`` (plug-ins of :data:`CLIENT_EVALUATOR_GROUP` loaded)."""
    from asymvlm.plugins import load_plugins

    load_plugins(CLIENT_EVALUATOR_GROUP)
    if not _FACTORY:
        raise ConfigError(
            f"no per-client evaluator is installed (entry-point group {CLIENT_EVALUATOR_GROUP!r}; asymvlm declares "
            "asymvlm.training.client_eval there: reinstall the package)"
        )
    return _FACTORY[0]
