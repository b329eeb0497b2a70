"""Federated rounds: sample -> client update -> validate -> server step -> checkpoint -> log.

Randomness: every stream of round t (which clients are sampled, drop out or straggle, each
client's batch order and LoRA dropout) comes from :func:`seed_sequence` ``(seed, stream, t,
client)``, so the round number *is* the RNG state: a run killed after round k and resumed replays
rounds k+1... exactly and ends with bit-identical parameters (secure DP noise excepted: it is
drawn from the OS, never stored).

LoRA: with ``trainable`` in (lora, both) the adapter's factors travel as parameters. ``factors``
and ``frozen_a`` aggregate them with the recipe like any parameter (FedIT; FFA-LoRA keeps A
frozen, so averaging B is exact); ``stack``, ``residual`` and ``svd`` fold the exact dense update
into the frozen text-tower weights the server keeps (:mod:`asymvlm.federated.core.lora`); the
recipe's server optimizer then steps the head only.

Differential privacy (``dp_noise_multiplier > 0``): clients are Poisson-sampled with the
configured rate, every client's release is clipped jointly and the aggregate noised inside the
server step (:mod:`asymvlm.federated.core.dp`); invalid updates count as zero updates (so the
release stays a function of the clipped sum); per-client losses are not logged (they are
functions of private data outside the mechanism); epsilon is logged every round. **Every round
is released and accounted**: a round whose Poisson sample is empty (or whose sampled clients all
dropped out) releases the noise alone, never a skip, because whether a round is skipped would
depend on who is in the data and shows in the released sequence (so ``min_clients`` must stay 1
under DP); the accountant steps once per round.

Rounds without a step: outside DP a round with fewer than ``min_clients`` valid updates, and in
any mode a round whose server step gives a value that is not finite (the state stays as it was:
nothing non-finite is checkpointed), makes no server step. Its record says why (``skipped``,
``server_step: false``), it is logged as a warning, and the state lists it
(``ServerState.skipped_rounds``): the command's end summary counts them, and a run in which no
round stepped saves no model (:func:`asymvlm.federated.checkpoint.save_federated_model`).

The streams are in :mod:`asymvlm.federated.seeds`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from asymvlm.federated.asynchronous import run_async
from asymvlm.federated.attacks import DATA_ATTACKS, UPDATE_ATTACKS, ShuffledCaptions, attack_results
from asymvlm.federated.checkpoint import (
    ServerState,
    check_finite_state,
    check_server_state,
    load_server_state,
    prune_rounds,
    round_dirs,
    save_server_state,
)
from asymvlm.federated.client import (
    CLIENT_TERMS,
    ClientOptions,
    ClientResult,
    build_client_model,
    check_masks,
    client_update,
    get_base,
    init_head_from,
    lora_layer_keys,
    round_client_config,
    server_inputs,
    set_base,
    trained_params,
    update_needs,
    upload_bytes,
)
from asymvlm.federated.clustered import ClusterRun
from asymvlm.federated.config import RESUMABLE_CHANGES, RUN_OPTIONS, RUN_OUTPUTS, FederatedArguments
from asymvlm.federated.core import (
    ClientUpdateError,
    DifferentialPrivacy,
    LoraLayers,
    Recipe,
    check_delta,
    check_stacked,
    server_owned,
    server_update,
)
from asymvlm.federated.core.tree import first_non_finite
from asymvlm.federated.data import FederatedData
from asymvlm.federated.diagnostics import initial_g2, model_gradient, round_diagnostics
from asymvlm.federated.participation import STATE_KEY, Correction, check_recipe, corrected_aggregate, make_correction
from asymvlm.federated.personal_run import EvaluateClient, PersonalRun
from asymvlm.federated.recipes import RECIPES, make_recipe
from asymvlm.federated.sampling import attackers, fairness, sample_clients
from asymvlm.federated.seeds import int_seed
from asymvlm.federated.temporal import set_round
from asymvlm.federated.uploads import Uploads, build_uploads
from asymvlm.federated.vectorized import (
    StreamedMean,
    population_losses,
    sequential_reason,
    streamable,
    train_round,
    vectorizable,
)  # fmt: skip
from asymvlm.heads import HeadConfig
from asymvlm.runs import check_resume_config, claim_output_dir
from asymvlm.trainable import TrainableModel

__all__ = [
    "run_federated",
    "Federation",
    "federation_recipe",
    "sample_clients",
    "attackers",
    "fairness",
]

log_ = logging.getLogger(__name__)


def federation_recipe(fed: FederatedArguments, recipe_options: Mapping[str, Any] | None = None) -> Recipe:
    """The run's recipe: ``fed.recipe`` with its declared options, the run's client learning rate
    where the recipe needs it, and DP when asked. Cheap, so commands call it before loading data:
    an unknown option, a rule without a DP analysis or a rule that cannot work with the clients
    per round (its registry entry's ``check_clients``: Krum's n > 2f + 2) fail at once."""
    options = dict(recipe_options or {})
    declared = RECIPES.entry(fed.recipe).param_names
    options.update({k: getattr(fed, k) for k in RUN_OPTIONS if k in declared})  # AdaFedAdam's / q-FFL's eta_l
    dp = None
    if fed.dp_noise_multiplier > 0:
        dp = DifferentialPrivacy(
            fed.dp_noise_multiplier, fed.dp_max_norm, fed.sample_rate, fed.num_clients, fed.dp_delta,
            fed.dp_insecure_seed,
        )  # fmt: skip
    recipe = make_recipe(fed.recipe, dp=dp, **options)
    for term in recipe.client_terms:  # an unknown client term fails here, not in round 1
        CLIENT_TERMS.entry(term)
    recipe.check_clients(round(fed.sample_rate * fed.num_clients))  # the rule's own feasibility check
    return recipe


@dataclass
class Federation:
    """What a run is made of: the recipe, the clients' model and training options, the LoRA layers."""

    fed: FederatedArguments
    data: FederatedData
    recipe: Recipe
    model: TrainableModel
    options: ClientOptions
    lora: LoraLayers | None
    comm: dict[str, float]
    personal: PersonalRun | None = None  # personalisation / per-client evaluation (federated.personal_run)
    cluster: ClusterRun | None = None  # clustered FL: several server models (federated.clustered)
    sequential: str = ""  # why the clients train one by one ("" = vectorised; federated.vectorized)
    stream: StreamedMean | None = None  # the round's streamed weighted mean (federated.vectorized)
    correction: Correction | None = None  # participation correction (federated.participation)
    uploads: Uploads | None = None  # compressed uploads (federated.uploads)

    @classmethod
    def build(
        cls,
        fed: FederatedArguments,
        data: FederatedData,
        head: HeadConfig | None = None,
        recipe_options: Mapping[str, Any] | None = None,
    ) -> Federation:
        recipe = federation_recipe(fed, recipe_options)
        lora_cfg = fed.lora_config(data.encoder.backend) if fed.trainable != "head" else None
        model = build_client_model(
            dataclasses.replace(head or HeadConfig(), dim=data.dim),
            trainable=fed.trainable,
            encoder=data.encoder,
            lora=lora_cfg,
            freeze_lora_a=fed.lora_mode == "frozen_a",
            seed=fed.seed,
        )
        if fed.init_from:
            init_head_from(model, fed.init_from)
        masks = None
        if fed.mask_file:
            from asymvlm.masks import load_masks

            masks = check_masks(model, load_masks(fed.mask_file))
        exchanged = model.get_params()
        personal = None
        if fed.personalize != "none" or fed.client_test_fraction > 0:
            personal = PersonalRun.build(fed, model, recipe, masks)
        sent = personal.shared(exchanged) if personal is not None else exchanged
        comm = upload_bytes(trained_params(sent, model), masks)
        opts = ClientOptions(
            masks=masks,
            local_steps=fed.local_steps,
            local_lr=fed.local_lr,
            batch_size=fed.local_batch_size,
            momentum=fed.local_momentum,
            optimizer=fed.local_optimizer,
            weight_decay=fed.local_weight_decay,
        )
        lora = None
        if fed.trainable != "head" and not (personal is not None and personal.personal_keys):
            lora = LoraLayers(fed.lora_mode, lora_layer_keys(exchanged), fed.lora_alpha / fed.lora_r, fed.lora_r)
        if fed.attack in DATA_ATTACKS:  # poisoned clients train on shuffled caption-image pairs
            bad = attackers(fed)
            batchers = [
                ShuffledCaptions(b, int_seed(fed.seed, "attack", c)) if c in bad else b
                for c, b in enumerate(data.batchers)
            ]
            data = dataclasses.replace(data, batchers=batchers)
        cluster = ClusterRun.build(fed) if fed.cluster != "none" else None
        if cluster is not None:
            lora = None  # factors only: each cluster's LoRA factors are parameters like the head's
        why = sequential_reason(fed, model, data.batchers, personal is not None or cluster is not None)
        correction = make_correction(fed)
        check_recipe(recipe, correction)
        frozen = [a for a, _ in lora_layer_keys(exchanged).values()] if fed.lora_mode == "frozen_a" else []
        uploads = build_uploads(fed, frozen if fed.trainable != "head" else [])
        if uploads is not None:  # the codec's payload: what each client sends (shapes only)
            comm = {
                **comm,
                "sent_bytes": uploads.codec.nbytes(trained_params(sent, model)),
                "codec": uploads.codec.spec,
            }
        return cls(fed, data, recipe, model, opts, lora, comm, personal, cluster, why, None, correction, uploads)

    # -- state --------------------------------------------------------------------------------------
    def config(self, head: HeadConfig | None) -> dict[str, Any]:
        """What identifies the run (saved in every checkpoint; ``--resume`` compares it)."""
        return {
            **asdict(self.fed),
            "recipe_options": dict(self.recipe.options),
            "head": (head or HeadConfig()).to_dict(),  # JSON-shaped (a list, not a tuple): resume compares it
            "data": {
                "encoder_fingerprint": (self.data.encoder_source or {}).get("fingerprint"),
                "client_sizes": list(self.data.num_examples),
            },
        }

    def start(self, config: dict[str, Any], log: Callable[[dict], None] | None) -> ServerState:
        """The state to continue from: the latest checkpoint (``resume``, whose config must match)
        or round 0 (``output_dir`` must be new or empty, or ``overwrite`` clears what a run wrote)."""
        out = Path(self.fed.output_dir)
        ckpt = out / "checkpoints"
        rounds = round_dirs(ckpt)
        if self.fed.resume and rounds:
            state = load_server_state(rounds[-1])
            _check_resumable(rounds[-1], state.config or {}, config)
            params = self.model.get_params()
            base = get_base(self.model, self.lora.layers) if self.lora is not None and self.lora.exact else {}
            owned = server_owned(self._full(self._shared(params), base), self.lora)
            check_server_state(
                state, rounds[-1], params=params, base=base, opt_init=self.recipe.server.init(owned), owned=owned,
                rounds=self.fed.rounds,
            )  # fmt: skip
            if state.base:
                set_base(self.model, state.base)
            for store in self._stores():  # client states written after the checkpoint: a crashed round's
                store.rollback(state.round)
            if self.cluster is not None:
                self.cluster.check(state.extra, params, rounds[-1])
            if self.correction is not None:
                self.correction.check_state(
                    state.extra.get(STATE_KEY), self.fed.num_clients, self._shared(params), rounds[-1]
                )
            return state
        if not self.fed.resume or self.fed.overwrite:
            claim_output_dir(out, RUN_OUTPUTS, overwrite=self.fed.overwrite)
        if self.fed.resume and log:
            log({"event": "no checkpoint to resume from; starting from scratch"})
        params = self.model.get_params()
        base = get_base(self.model, self.lora.layers) if self.lora is not None and self.lora.exact else {}
        owned = server_owned(self._full(self._shared(params), base), self.lora)
        state = ServerState(0, params, self.recipe.server.init(owned))
        state.base = base
        if self.cluster is not None:
            state.extra = self.cluster.init_extra(self, params, self.recipe.server.init(owned))
        if self.correction is not None:
            state.extra = {**state.extra, STATE_KEY: self.correction.init(self.fed.num_clients, self._shared(params))}
        return state

    def _stores(self) -> list[Any]:
        """The client-side state stores of the run (personal models; FedEM's mixture weights)."""
        stores = [self.personal.store] if self.personal is not None else []
        stores += [self.uploads.store] if self.uploads is not None and self.uploads.store is not None else []
        if self.cluster is not None and getattr(self.cluster.clusterer, "store", None) is not None:
            stores.append(self.cluster.clusterer.store)
        return list({s.root: s for s in stores}.values())  # one store per folder (they may share it)

    def _shared(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """What the server steps: every parameter but the clients' personal ones."""
        return self.personal.shared(params) if self.personal is not None else dict(params)

    def _full(self, params: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any]:
        return {**params, **{LoraLayers.base_key(layer): w for layer, w in base.items()}}

    # -- one round's pieces -------------------------------------------------------------------------
    def train_clients(self, state: ServerState, active: list[int], rnd: int) -> list[ClientResult]:
        needs = self.recipe.needs
        client_config = round_client_config(self.recipe, state.opt_state, state.params)  # configure_fit
        up = self.uploads.results if self.uploads is not None else (lambda results, rnd: None)
        if self.cluster is not None or self.personal is not None:
            own = self.cluster if self.cluster is not None else self.personal
            results = own.train(self, state, active, rnd, client_config)
            up(results, rnd)
            return results
        self.stream = None
        if not self.sequential and not vectorizable(self.model, [], client_config):
            if self.streams():
                shared = self._shared(state.params)
                self.stream = StreamedMean(
                    self.recipe.aggregator, active, [self.data.num_examples[c] for c in active],
                    check=lambda d, cs: check_stacked(shared, d, cs),  # the round's validation, chunk by chunk
                )  # fmt: skip
            return train_round(
                self.model, state.params, [self.data.batchers[c] for c in active], self.options, clients=active,
                seeds=[int_seed(self.fed.seed, "client", rnd, c) for c in active],
                num_examples=[self.data.num_examples[c] for c in active], client_config=client_config,
                budget_mb=self.fed.client_memory_mb, cap=self.fed.client_batch_size, stream=self.stream,
                upload=(lambda cs, d: self.uploads.stacked(cs, d, rnd)[0]) if self.uploads is not None else None,
                **update_needs(needs),
            )  # fmt: skip
        results = []
        for c in active:
            seed = int_seed(self.fed.seed, "client", rnd, c)
            self.data.batchers[c].reseed(seed)
            results.append(client_update(
                self.model, state.params, self.data.batchers[c], self.options, client=c,
                num_examples=self.data.num_examples[c], seed=seed, client_config=client_config, **update_needs(needs),
            ))  # fmt: skip
        up(results, rnd)
        return results

    def streams(self) -> bool:
        """Whether the round's updates are summed chunk by chunk (memory bounded by the chunk): a
        weighted-mean recipe, and nothing that needs every client's delta (diagnostics, update
        attacks, LoRA's exact modes)."""
        return (
            streamable(self.recipe)
            and not self.fed.diagnostics
            and self.fed.attack not in UPDATE_ATTACKS
            and (self.lora is None and self.correction is None and self.fed.asynchronous == "none")
        )

    def diagnostics(self, state: ServerState, results: list[ClientResult], rnd: int) -> dict[str, Any]:
        """Round ``rnd``'s drift diagnostics (``fed.diagnostics``; :mod:`asymvlm.federated.diagnostics`)
        of the clients' honest updates: drift and delta cosines from their deltas, and G^2 of their
        gradients at the round's global model, each the mean over the client's first
        ``options.loss_batches`` batches of a batch order of its own (stream ``diagnostics``).
        Training is unaffected: every client reseeds its batches and RNG before it trains."""
        grads = []
        for r in results:
            seed = int_seed(self.fed.seed, "diagnostics", rnd, r.client)
            batcher = self.data.batchers[r.client]
            batcher.reseed(seed)
            grads.append(model_gradient(self.model, state.params, batcher, self.options.loss_batches, seed=seed))
        return round_diagnostics(
            [r.delta for r in results], clients=[r.client for r in results], grads=grads,
            weights=[max(1, r.num_examples) for r in results],
        )  # fmt: skip

    def initial_g2(self) -> float:
        """G^2 of every client's gradient at the initial model (the heterogeneity report's)."""
        return initial_g2(
            self.model, self.data.batchers, self.data.num_examples, self.fed.seed, self.options.loss_batches
        )

    def attack(self, results: list[ClientResult], malicious: set[int], rnd: int) -> list[ClientResult]:
        return attack_results(self.fed, results, malicious, rnd)  # what the attackers send instead

    def validate(self, state: ServerState, results: list[ClientResult]) -> tuple[list[ClientResult], list[dict]]:
        """Valid updates, and the rejected ones with the reason. Under DP an invalid update counts as
        a zero update (dropping it would make the release depend on which client failed)."""
        if self.stream is not None:  # checked as they were summed (federated.vectorized.StreamedMean)
            bad = {x["client"] for x in self.stream.rejected}
            return [r for r in results if r.client not in bad], list(self.stream.rejected)
        accepted, rejected = [], []
        for r in results:
            try:
                check_delta(self._shared(state.params), r.delta, r.client)
                accepted.append(r)
            except ClientUpdateError as err:
                rejected.append({"client": r.client, "reason": str(err)})
                if self.recipe.dp is not None:
                    r.delta = {k: torch.zeros_like(v) for k, v in state.params.items()}
                    accepted.append(r)
        return accepted, rejected

    def server_step(self, state: ServerState, results: list[ClientResult], rnd: int, record: dict) -> ServerState:
        """:func:`~asymvlm.federated.core.server_update` on the accepted updates (each cluster's
        on its own model, clustered FL)."""
        if self.cluster is not None:
            return self.cluster.server_step(self, state, results, rnd, record)
        info_in = server_inputs(self.recipe.needs, results, state.initial_losses)
        lora = self.lora
        if lora is not None:  # stack's re-initialised A: a fresh stream per round
            lora = dataclasses.replace(lora, seed=int_seed(self.fed.seed, "lora_init", rnd))
        full = self._full(self._shared(state.params), state.base)
        agg, extra = (self.stream.result() if self.stream else None), state.extra
        if self.correction is not None:  # FedAU / FedStale: the aggregate of the participation correction
            agg, extra = corrected_aggregate(
                self.correction, self.recipe.aggregator, results, extra, self.data.num_examples, rnd
            )
        new, opt_state, info = server_update(
            self.recipe, [r.delta for r in results], [max(1, r.num_examples) for r in results], state.opt_state,
            full, lora=lora, round_index=rnd, aggregated=agg, **info_in,
        )  # fmt: skip
        params = {k: new.get(k, v) for k, v in state.params.items()}  # personal parts: the server's copy as it was
        base = {layer: new[LoraLayers.base_key(layer)] for layer in state.base}
        if base:
            set_base(self.model, base)
        out = ServerState(
            rnd, params, opt_state, state.initial_losses, base, state.epsilon, state.dp_releases,
            list(state.skipped_rounds), extra=extra,
        )  # fmt: skip
        if self.recipe.dp is not None:
            out.dp_releases += 1
            out.epsilon = self.recipe.dp.epsilon(out.dp_releases)
            record["dp_epsilon"] = out.epsilon
            record["dp"] = {**info["dp"], "participants": sum(1 for r in results if r.client is not None)}
        if "lora" in info:
            record["lora_info"] = info["lora"]
        record["aggregator_info"] = {
            k: v
            for k, v in info["aggregator"].items()
            if isinstance(v, (int, float, list)) and not (isinstance(v, list) and len(v) > 64)
        }
        return out

    def apply_updates(self, state: ServerState, accepted: list[ClientResult], rnd: int, record: dict) -> ServerState:
        """Round ``rnd``'s valid updates into the state and its record: the server step (or why the
        round made none), the round count, and the clients' losses after training (none under DP,
        and none when no update carries one, as for SecAgg+'s sum).

        Under DP every round is released (the noise alone when no update came: module docstring)
        and accounted. A server step that gives a value that is not finite is not taken (the state
        stays as it was; under DP the release still counts)."""
        fed = self.fed
        record["upload_bytes"] = {"per_client": self.comm["sent_bytes"], "dense": self.comm["dense_bytes"]}
        if self.recipe.dp is not None:
            sent = accepted
            if accepted:
                record["dp_release"] = f"noised sum of {len(accepted)} clipped updates"
            else:  # a zero update adds nothing to the clipped sum: the release is the noise alone
                zero = {k: torch.zeros_like(v) for k, v in state.params.items()}
                sent = [ClientResult(None, zero, 0)]
                record["dp_release"] = "noise only: no update this round (nobody sampled, or all dropped out)"
            state = self._step(state, sent, rnd, record)
        elif len(accepted) < fed.min_clients or not accepted:
            record["skipped"] = f"{len(accepted)} valid updates < min_clients={fed.min_clients}"
            if self.correction is not None:  # their updates arrived: they took part
                c = self.correction.observe(state.extra[STATE_KEY], [r.client for r in accepted], fed.num_clients)
                state.extra = {**state.extra, STATE_KEY: c}
        else:
            state = self._step(state, accepted, rnd, record)
        record["server_step"] = "skipped" not in record
        if "skipped" in record and rnd + 1 not in state.skipped_rounds:
            state.skipped_rounds = [*state.skipped_rounds, rnd + 1]
        state.round = rnd + 1
        if self.recipe.dp is not None:
            record["dp_note"] = "per-client losses are not logged under DP; epsilon covers the released model"
        elif any(r.loss_after is not None for r in accepted):
            record["client_loss_after"] = {str(r.client): r.loss_after for r in accepted}
            record["loss_after"] = fairness([r.loss_after for r in accepted if r.loss_after is not None])
        return state

    def _step(self, state: ServerState, results: list[ClientResult], rnd: int, record: dict) -> ServerState:
        """:meth:`server_step`, not taken when it gives a value that is not finite (the record says
        which key; the state is returned as it was, with the DP release counted)."""
        new = self.server_step(state, results, rnd, record)
        bad = first_non_finite({"params": new.params, "base": new.base, "opt_state": new.opt_state}, sep="/")
        if bad is None:
            return new
        if state.base:  # the step folded into the live model's base weights: undo
            set_base(self.model, state.base)
        for key in ("aggregator_info", "lora_info"):
            record.pop(key, None)
        record["skipped"] = f"the server step gave a value that is not finite ({bad}); the model is not stepped"
        # a DP release happened all the same
        return dataclasses.replace(
            state, skipped_rounds=list(state.skipped_rounds), epsilon=new.epsilon, dp_releases=new.dp_releases
        )

    def save_round(self, state: ServerState, record: dict, config: dict[str, Any]) -> None:
        """The round's checkpoint (atomic; rounds beyond ``keep_last`` pruned), then its line in
        ``metrics.jsonl``. A global model that is not finite is never saved (the round and the key
        are named)."""
        out = Path(self.fed.output_dir)
        check_finite_state(state, f"the round is not checkpointed (the last checkpoint is {_latest(out)})")
        save_server_state(state, out / "checkpoints", config)
        prune_rounds(out / "checkpoints", self.fed.keep_last)
        for store in self._stores():
            store.prune(state.round)
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def initial_losses(self, state: ServerState) -> None:
        """F_k(theta_0): every client's loss at the initial global model (AdaFedAdam's fairness weights)."""
        losses = self._losses(state.params, "initial_loss", self.options.loss_batches)
        state.initial_losses.update({str(c): v for c, v in enumerate(losses)})

    def client_losses(self, state: ServerState) -> dict[str, Any]:
        """The fairness report: every client's loss at the current global model."""
        losses = self._losses(state.params, "fairness", self.fed.fairness_batches)
        return {"client_loss": {str(k): v for k, v in enumerate(losses)}, "fairness": fairness(losses)}

    def _losses(self, params: Mapping[str, Any], stream: str, batches: int) -> list[float]:
        seeds = [int_seed(self.fed.seed, stream, c) for c in range(len(self.data.batchers))]
        return population_losses(self.model, params, self.data.batchers, seeds, batches,
                                 vectorised=not self.sequential, budget_mb=self.fed.client_memory_mb)  # fmt: skip


def run_federated(
    fed: FederatedArguments,
    data: FederatedData,
    *,
    head: HeadConfig | None = None,
    recipe_options: Mapping[str, Any] | None = None,
    evaluate: Callable[[TrainableModel], dict[str, Any]] | None = None,
    evaluate_client: EvaluateClient | None = None,
    log: Callable[[dict], None] | None = None,
    stop_after: int | None = None,
) -> tuple[ServerState, TrainableModel]:
    """Run (or resume) the federation; return the final server state and the trained model.

    Args:
        fed, data: the federation and its clients' data (:func:`~asymvlm.federated.data.get_federated_data`).
        head: the text head's architecture (default :class:`~asymvlm.heads.HeadConfig`; its dim is the data's).
        recipe_options: options of ``fed.recipe`` (declared by the recipe; others are an error).
        evaluate: ``evaluate(model) -> metrics`` on held-out data, called every ``eval_every``
            rounds and after the last (the CLI passes :mod:`asymvlm.eval`'s; the rounds import no eval).
        evaluate_client: ``evaluate_client(client, encode) -> metrics`` on the client's own test
            split (``fed.client_test_fraction``), called on the same rounds for every client's
            global and personal model (:meth:`~asymvlm.federated.personal_run.PersonalRun.evaluate`).
        log: called with every round's record (also appended to ``metrics.jsonl``).
        stop_after: end after that many rounds of this call (tests simulate a crash).
    """
    run = Federation.build(fed, data, head, recipe_options)
    if data.heterogeneity is not None and not data.heterogeneity.get("g2_initial"):
        data.heterogeneity["g2_initial"] = run.initial_g2()  # the partition's G^2 at the initial model
    if fed.asynchronous != "none":  # FedBuff: server steps on buffered updates (federated.asynchronous)
        return run_async(run, head=head, evaluate=evaluate, log=log, stop_after=stop_after)
    out, dp = Path(fed.output_dir), run.recipe.dp is not None
    config = run.config(head)
    state = run.start(config, log)
    out.mkdir(parents=True, exist_ok=True)
    if log:
        log({"event": "communication per client and round", **run.comm})
        log({"event": "client execution", "vectorised": not run.sequential, "why_sequential": run.sequential})
    if "loss_initial" in run.recipe.needs and not state.initial_losses:
        run.initial_losses(state)
    malicious = attackers(fed)
    bar = tqdm(range(state.round, fed.rounds), initial=state.round, total=fed.rounds, desc="rounds",
               disable=not fed.progress)  # fmt: skip
    for done_here, rnd in enumerate(bar, 1):
        t0 = time.time()
        active, who = sample_clients(fed, rnd, poisson=dp)  # sample
        set_round(run.data.batchers, rnd)  # temporal skew: the clients' data of this round
        record: dict[str, Any] = {"round": rnd + 1, **who}
        results = run.train_clients(state, active, rnd)  # client update
        if fed.diagnostics:
            record["diagnostics"] = run.diagnostics(state, results, rnd)
        results = run.attack(results, malicious, rnd)
        accepted, record["rejected"] = run.validate(state, results)  # validate
        state = run.apply_updates(state, accepted, rnd, record)  # server step
        if fed.evaluates_at(rnd + 1, fed.rounds):
            if not dp:
                record.update(run.client_losses(state))
            if evaluate is not None:
                run.model.set_params(state.params)
                record.update(evaluate(run.model))
            if evaluate_client is not None and run.cluster is not None:
                record.update(run.cluster.evaluate(run, state, evaluate_client, rnd))
            elif evaluate_client is not None and run.personal is not None:
                record.update(run.personal.evaluate(run, state, evaluate_client, rnd))
        record["seconds"] = round(time.time() - t0, 3)
        if "skipped" in record:
            log_.warning("round %d made no server step: %s", rnd + 1, record["skipped"])
        run.save_round(state, record, config)  # checkpoint and log
        if log:
            log(record)
        bar.set_postfix(loss=f"{record.get('loss_after', {}).get('mean', float('nan')):.3f}")
        if stop_after is not None and done_here >= stop_after:
            break
    run.model.set_params(state.params)
    return state, run.model


def _check_resumable(checkpoint: Path, saved: dict[str, Any], config: dict[str, Any]) -> None:
    """A resumed run must be the same run: every config key outside RESUMABLE_CHANGES must match."""
    check_resume_config(saved, config, RESUMABLE_CHANGES, checkpoint, source=checkpoint / "server.json")


def _latest(out: Path) -> str:
    rounds = round_dirs(out / "checkpoints")
    return rounds[-1].name if rounds else "none"
