"""The ServerApp: asymvlm's one server step as the strategy of Flower's deployment engine.

The SuperLink host runs :data:`server_app` (``asymvlm.federated.flower.server:server_app``): the
recipe's aggregator, server transform and its state (optimizer moments, GHBM momentum,
AdaFedAdam's initial losses, DP accounting), the exact LoRA modes, the per-round checkpoint
(asymvlm's format: ``output_dir/checkpoints``, ``metrics.jsonl``) and the final model
(``output_dir/model``). It never sees data: the clients report their sizes, the embedding width
and the encoder's fingerprint in a handshake, and every node must agree.

Randomness is asymvlm's (every stream a function of seed, stream name and round), so a Flower run
equals the in-process run to float rounding and a restarted ServerApp (``resume = true``)
continues bit-identically from its last checkpoint. ``secure-aggregation = true`` runs each round
through Flower's SecAgg+ (:func:`check_secure_aggregation`, :func:`secagg_error_bound`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from asymvlm.errors import ClientUpdateError, ConfigError
from asymvlm.federated.core.tree import first_non_finite
from asymvlm.federated.flower.config import (
    CLIENT_CONFIG,
    DELTA_KEY,
    EVALUATE,
    NODE_WAIT,
    QUERY,
    TRAIN,
    check_head_size,
    log,
    parse_run_config,
    server_options,
    to_arrays,
)
from asymvlm.federated.flower.replies import (
    Hello,
    group_train_reply,
    handshake_reply,
    loss_reply,
    own_test_reply,
    shorten,
    train_reply,
)

__all__ = [
    "server_app",
    "run_flower_server",
    "check_secure_aggregation",
    "secagg_error_bound",
    "FederationError",
]


class FederationError(ConfigError):
    """The federation cannot go on (nodes disagree, too few clients answered)."""


def _send(grid: Grid, kind: str, contents: Mapping[int, RecordDict], rnd: int, timeout: float) -> tuple[dict, dict]:
    """Send one message per node; (replies by node id, errors by node id). Missing replies are errors."""
    messages = [Message(content, node, kind, group_id=str(rnd)) for node, content in contents.items()]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    by_id = {m.metadata.message_id: node for m, node in zip(messages, contents)}
    ok, errors = {}, {}
    for reply in replies:
        node = by_id.get(reply.metadata.reply_to_message_id)
        if node is None:
            continue
        if reply.has_error():
            errors[node] = shorten(f"error reply (Flower code {reply.error.code}): {reply.error.reason}")
        else:
            ok[node] = reply
    for node in contents:
        if node not in ok and node not in errors:
            errors[node] = f"no reply within {timeout:g} s"
    return ok, errors


def _client_config(run: Any, state: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The round's client configuration (the recipe's ``client_config``, Flower's ``configure_fit``):
    its numbers and its tensors, keyed for the train message (:data:`CLIENT_CONFIG` prefix)."""
    from asymvlm.federated.client import pack_client_config, round_client_config

    numbers, tensors = pack_client_config(round_client_config(run.recipe, state.opt_state, state.params))
    return (
        {CLIENT_CONFIG + k: v for k, v in numbers.items()},
        {CLIENT_CONFIG + k: t for k, t in tensors.items()},
    )


def _plain_round(grid: Grid, run: Any, state: Any, active: list[int], where: dict[int, int], sizes: dict[int, int],
                 rnd: int, timeout: float) -> tuple[list, list[dict]]:  # fmt: skip
    """One training round's messages: every active client's own update (or the reason it has none)."""
    numbers, tensors = _client_config(run, state)
    cfg = ConfigRecord({DELTA_KEY: True, "asymvlm.round": rnd, "server-round": rnd + 1, **numbers})
    content = {"arrays": to_arrays(state.params), "config": cfg}
    if state.base:
        content["base"] = to_arrays(state.base)
    content.update({key: to_arrays(t) for key, t in tensors.items()})
    contents = {where[c]: RecordDict(content) for c in active}
    if run.cluster is not None:
        contents = {where[c]: _cluster_content(run, state, content, cfg, c) for c in active}
    ok, errors = _send(grid, TRAIN, contents, rnd + 1, timeout)
    node_to_pid = {where[c]: c for c in active}
    results, rejected = [], [{"client": node_to_pid[n], "reason": why} for n, why in sorted(errors.items())]
    for node in sorted(ok, key=lambda n: node_to_pid[n]):
        c = node_to_pid[node]
        try:
            if run.cluster is not None and "arrays-0" in ok[node].content.array_records:  # one update per model
                groups = len(state.extra["models"])
                results.extend(group_train_reply(ok[node], c, sizes[c], run.recipe.needs, groups))
                continue
            results.append(train_reply(ok[node], c, sizes[c], run.recipe.needs))
            if run.cluster is not None:
                results[-1].group = _cluster_of(run, state, ok[node], c)
        except ClientUpdateError as err:
            rejected.append({"client": c, "reason": shorten(err)})
    return results, rejected


def _cluster_content(run: Any, state: Any, content: dict, cfg: ConfigRecord, client: int) -> RecordDict:
    """Clustered / multi-task FL's train message for ``client``: what its method sends
    (:meth:`~asymvlm.federated.cluster_base.Clusterer.message`: its cluster model as ``arrays``, or
    every model as ``cluster-<j>``) and its own client terms (MOCHA's relationship term)."""
    from asymvlm.federated.client import pack_client_config

    clusterer = run.cluster.clusterer
    arrays, numbers = clusterer.message(state.extra, client)
    term_numbers, term_tensors = pack_client_config(clusterer.client_config(state.extra, client, {}) or {})
    out = dict(content)
    out.update({key: to_arrays(p) for key, p in arrays.items()})
    out.update({CLIENT_CONFIG + key: to_arrays(t) for key, t in term_tensors.items()})
    numbers = {**numbers, **{CLIENT_CONFIG + key: v for key, v in term_numbers.items()}}
    out["config"] = ConfigRecord({**dict(cfg), **numbers})
    return RecordDict(out)


def _cluster_of(run: Any, state: Any, reply: Message, client: int) -> int:
    """The cluster a reply updates: the one the client chose (IFCA: checked, and recorded as its
    membership) or the server's assignment (CFL)."""
    if not run.cluster.clusterer.client_chooses:
        j = int(state.extra["assign"].get(str(client), 0))
        state.extra["assign"][str(client)] = j  # as the simulator records it
        return j
    j = reply.content.metric_records["metrics"].get("cluster") if "metrics" in reply.content.metric_records else None
    if isinstance(j, bool) or not isinstance(j, int) or not 0 <= j < len(state.extra["models"]):
        raise ClientUpdateError(
            f"the reply's cluster must be an integer in [0, {len(state.extra['models'])}), got {j!r}"
        )
    state.extra["assign"][str(client)] = j
    return j


def check_secure_aggregation(recipe: Any, fed: Any) -> None:
    """SecAgg+ releases only the weighted sum of the updates: a :class:`ConfigError` naming why when
    ``recipe`` needs more (individual updates, per-client losses or norms, server-side clipping)."""
    from asymvlm.federated.client import CLIENT_TERMS
    from asymvlm.federated.core import WeightedMean

    # a client term with a tensor option (GHBM's momentum) needs asymvlm's own messages' ArrayRecords
    sent = [CLIENT_TERMS.entry(t) for t in sorted(recipe.client_terms)]
    tensor_terms = [e for e in sent if any(p.type is dict for p in e.params)]
    why = ""
    if type(recipe.aggregator) is not WeightedMean:
        why = f"its aggregator ({type(recipe.aggregator).__name__}) needs the individual updates"
    elif recipe.aggregator.weighting == "capped" and float(recipe.aggregator.cap or 0) != int(
        recipe.aggregator.cap or 0
    ):
        why = "SecAgg+ weights are whole numbers: give weighting_cap as one"
    elif recipe.needs:
        why = f"it needs each client's {', '.join(sorted(recipe.needs))}"
    elif tensor_terms:
        term = tensor_terms[0]
        why = f"its client term {term.name!r} ({term.help}) is sent in asymvlm's own messages, not in SecAgg+'s"
    elif recipe.dp is not None:
        why = "central DP clips each client's update on the server"
    elif fed.trainable != "head" and fed.lora_mode not in ("factors", "frozen_a"):
        why = f"the exact LoRA mode {fed.lora_mode!r} aggregates each client's factor products"
    if why:
        raise ConfigError(
            f"secure aggregation (SecAgg+) releases only the weighted sum of the updates; recipe "
            f"{recipe.name!r} cannot run under it: {why}"
        )


def secagg_error_bound(
    sizes: Iterable[int], clipping_range: float, quantization_range: int, max_weight: float
) -> float:
    """The most a coordinate of SecAgg+'s aggregate can differ from the exact weighted mean.

    Flower's SecAgg+ (client mod ``secaggplus_mod``) scales client k's update by its weight
    ``q_k = round(n_k / max_weight * R) / R``, clips to ``[-c, c]`` and rounds stochastically onto
    ``R`` levels (step ``2c / R``); the server divides the sum by ``D = sum q_k``. Stochastic rounding
    is off by less than one step per client (``n 2c / (R D)`` in all); the rounded weights move a
    weighted mean of values within ``[-c, c]`` by at most ``sum |q_k - n_k / max_weight| 2c / D'``
    with ``D' = D - n / (2R)`` (``n c / (R D')``); float32 adds ``c 2^-23``."""
    sizes = list(sizes)
    n, c, r = len(sizes), float(clipping_range), int(quantization_range)
    d = sum(round(k / max_weight * r) / r for k in sizes)
    d_low = d - n / (2 * r)
    return n * 2 * c / (r * d) + n * c / (r * d_low) + c * 2.0**-23


def _secagg_workflow(run_config: Mapping[str, Any], recipe: Any, fed: Any, sizes: dict[int, int], timeout: float):
    """Flower's SecAggPlusWorkflow from the run config, or None when ``secure-aggregation`` is off."""
    opts = server_options(run_config)
    if not opts["secure_aggregation"]:
        return None
    check_secure_aggregation(recipe, fed)
    from flwr.server.workflow import SecAggPlusWorkflow

    try:
        workflow = SecAggPlusWorkflow(
            num_shares=opts["secagg_num_shares"], reconstruction_threshold=opts["secagg_reconstruction_threshold"],
            max_weight=float(max(sizes.values())), clipping_range=float(opts["secagg_clipping_range"]),
            quantization_range=int(opts["secagg_quantization_range"]), timeout=timeout,
        )  # fmt: skip
    except (TypeError, ValueError) as err:
        raise ConfigError(f"secure aggregation: {err}") from err
    return workflow


def _secure_round(grid: Grid, workflow: Any, run: Any, state: Any, active: list[int], where: dict[int, int],
                  sizes: list[int], rnd: int) -> tuple[list, list[dict], dict]:  # fmt: skip
    """One round through Flower's SecAgg+ workflow: the clients' masked, quantised updates are summed
    without the server seeing any one of them; returns the aggregate as the round's single update."""
    import flwr.compat.common.recorddict_compat as compat
    from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.strategy import Strategy
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
    from flwr.server.workflow.constant import Key as WorkflowKey

    from asymvlm.federated.client import ClientResult

    # SecAgg+ tolerates clients dropping out mid-protocol, not a sampled node that is already gone
    # (its neighbours are asked for key shares they never received): ping the sampled nodes first
    alive, _ = _send(grid, QUERY, {where[c]: RecordDict() for c in active}, rnd + 1, workflow.timeout or 3600.0)
    gone = [c for c in active if where[c] not in alive]
    sizes = [n for c, n in zip(active, sizes) if c not in gone]
    active = [c for c in active if c not in gone]
    # the recipe's weights (examples, uniform or capped), sent to each client as SecAgg+'s weight
    weights = [int(w) for w in run.recipe.aggregator.effective_weights([max(1, n) for n in sizes], len(sizes))]
    workflow.max_weight = float(max(weights, default=1))
    names = sorted(state.params)
    numbers, _ = _client_config(run, state)  # only numbers: check_secure_aggregation refused tensor terms
    config = {DELTA_KEY: True, "asymvlm.round": rnd, "server-round": rnd + 1,
              "asymvlm.secagg-clipping-range": float(workflow.clipping_range), **numbers}  # fmt: skip
    got: dict[str, Any] = {}

    class _Round(Strategy):  # the legacy strategy SecAgg+'s workflow drives: sample, then hand over the sum
        def initialize_parameters(self, client_manager):
            return None

        def configure_fit(self, server_round, parameters, client_manager):
            return [
                (GridClientProxy(where[c], grid, 0), FitIns(parameters, {**config, "asymvlm.secagg-weight": w}))
                for c, w in zip(active, weights)
            ]

        def aggregate_fit(self, server_round, results, failures):
            got["results"], got["failures"] = results, failures
            if results:
                got["sum"] = parameters_to_ndarrays(results[0][1].parameters)
            return None, {}

        def configure_evaluate(self, server_round, parameters, client_manager):
            return []

        def aggregate_evaluate(self, server_round, results, failures):
            return None, {}

        def evaluate(self, server_round, parameters):
            return None

    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            strategy=_Round())  # fmt: skip
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: rnd + 1})
    params = ndarrays_to_parameters([state.params[n].numpy() for n in names])
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(params, keep_input=True)
    if len(active) >= 2:  # else SecAgg+ cannot hide one update among others: nothing is aggregated
        workflow(grid, context)
    node_to_pid = {where[c]: c for c in active}
    answered = sorted(node_to_pid[p.node_id] for p, _ in got.get("results", []))
    rejected = [{"client": c, "reason": "no reply to the round's ping (not entered into SecAgg+)"} for c in gone]
    rejected += [{"client": c, "reason": "no masked update (dropped or failed during SecAgg+)"}
                 for c in active if c not in answered]  # fmt: skip
    info = {"clients": answered, "error_bound": None}
    if "sum" not in got:
        return [], rejected, {**info, "halted": "SecAgg+ halted (too few clients kept up; see the server log)"}
    dtype = {n: state.params[n].dtype for n in names}
    aggregate = {n: torch.from_numpy(a).to(dtype[n]).reshape(state.params[n].shape) for n, a in zip(names, got["sum"])}
    kept = [weights[active.index(c)] for c in answered]
    info["error_bound"] = secagg_error_bound(
        kept, workflow.clipping_range, workflow.quantization_range, workflow.max_weight
    )
    # one update standing for the answered clients (WeightedMean of one input is that input)
    return [ClientResult("secure-aggregate", aggregate, max(1, sum(kept)))], rejected, info


def _wait_for_nodes(grid: Grid, want: int, wait: float) -> None:
    """Wait up to ``wait`` seconds for ``want`` nodes to have joined (a run submitted right after its
    SuperNodes started must not miss one that is still connecting); then go on with those present."""
    if getattr(grid, "fixed_nodes", False):  # LocalGrid: every node is there from the start
        return
    end = time.monotonic() + wait
    have = len(list(grid.get_node_ids()))
    if have < want:
        log.info("waiting up to %.0f s for %d SuperNodes to join (%d so far)", wait, want, have)
    while have < want and time.monotonic() < end:
        time.sleep(1.0)
        have = len(list(grid.get_node_ids()))


def _handshake(grid: Grid, fed: Any, timeout: float) -> tuple[dict[int, int], dict[int, Hello], list[dict]]:
    """Which node holds which partition, and what their data look like: (partition -> node, node ->
    its checked handshake, the nodes left out with the reason). A node whose handshake is malformed,
    that claims a partition another node claims too (which one holds it cannot be told), or whose
    data (width, encoder) differ from the majority's is left out of the run; nodes that disagree with
    no majority, or no usable node, is a :class:`FederationError`."""
    _wait_for_nodes(grid, fed.num_clients, min(timeout, NODE_WAIT))
    # a node's first message starts its first ClientApp process (imports, its data): at least NODE_WAIT
    ok, errors = _send(grid, QUERY, {n: RecordDict() for n in grid.get_node_ids()}, 0, max(timeout, NODE_WAIT))
    excluded = [{"node": n, "reason": shorten(f"handshake: {why}")} for n, why in sorted(errors.items())]
    hello: dict[int, Hello] = {}
    for node in sorted(ok):
        try:
            hello[node] = handshake_reply(ok[node], fed.num_clients)
        except ClientUpdateError as err:
            excluded.append({"node": node, "reason": shorten(f"handshake: {err}")})
    claims: dict[int, list[int]] = {}
    for node, h in hello.items():
        claims.setdefault(h.partition, []).append(node)
    for pid, holders in sorted(claims.items()):
        if len(holders) > 1:
            why = f"nodes {holders[0]} and {holders[1]} both hold partition-id {pid}"
            for node in holders:
                del hello[node]
                excluded.append({"node": node, "partition": pid, "reason": why})
    groups: dict[tuple, list[int]] = {}
    for node, h in hello.items():
        groups.setdefault(h.data_key(), []).append(node)
    if len(groups) > 1:
        best = max(groups, key=lambda k: len(groups[k]))
        if 2 * len(groups[best]) <= len(hello):
            raise FederationError(
                "nodes disagree on the data and no majority agrees: "
                + "; ".join(f"nodes {v}: {hello[v[0]].describe()}" for v in groups.values())
            )
        for key, holders in groups.items():
            for node in holders if key != best else []:
                excluded.append({"node": node, "partition": hello[node].partition,
                                 "reason": f"its data ({hello[node].describe()}) differ from the majority's "
                                           f"({hello[groups[best][0]].describe()})"})  # fmt: skip
                del hello[node]
    for x in excluded:
        log.error("node %s left out of the run: %s", x["node"], x["reason"])
    if not hello:
        why = "; ".join(f"node {x['node']}: {x['reason']}" for x in excluded)
        raise FederationError(f"no node answered the handshake with a usable reply ({why or 'no nodes'})")
    return {h.partition: node for node, h in hello.items()}, hello, excluded


def _initial_losses(grid: Grid, state: Any, where: dict[int, int], timeout: float, excluded: list[dict]) -> None:
    """Every client's loss at the initial model (AdaFedAdam's F_k(theta_0)) into ``state``; a client
    whose reply is missing or malformed is left out of the run (``where``, ``excluded``)."""
    theta0 = to_arrays(state.params)
    ok, errors = _send(grid, QUERY, {where[p]: RecordDict({"arrays": theta0}) for p in sorted(where)}, 0, timeout)
    for c in sorted(where):
        node = where[c]
        try:
            if node not in ok:
                raise ClientUpdateError(errors.get(node, "no reply"))
            state.initial_losses[str(c)] = loss_reply(ok[node], c, "loss", positive=True)
        except ClientUpdateError as err:
            excluded.append({"node": node, "partition": c, "reason": shorten(f"initial loss: {err}")})
            log.error("node %s (partition %d) left out of the run: initial loss: %s", node, c, shorten(err))
            del where[c]


def _fairness_report(
    grid: Grid, run: Any, state: Any, where: dict[int, int], rnd: int, timeout: float, record: dict
) -> None:
    """Every reachable client's loss at the new global model into the round's record and, with
    ``client_test_fraction``, its metrics on its own test split (``client_metrics``, ``client_eval``,
    as in-process); a missing or malformed reply is left out and named in ``eval_rejected``."""
    from asymvlm.federated.personal_run import client_summary
    from asymvlm.federated.sampling import fairness

    content: dict[str, Any] = {"arrays": to_arrays(state.params)}
    own_tests = run.fed.client_test_fraction > 0
    if own_tests:
        content["config"] = ConfigRecord({"asymvlm.client-eval": True, "asymvlm.round": rnd})
    if own_tests and run.cluster is not None:
        models = state.extra["models"]
        content.update({f"cluster-{j}": to_arrays(m) for j, m in enumerate(models)})
        contents = {
            where[p]: RecordDict({**content, "config": ConfigRecord({
                "asymvlm.client-eval": True, "asymvlm.round": rnd, "asymvlm.clusters": len(models),
                "asymvlm.cluster": int(state.extra["assign"].get(str(p), 0))})})
            for p in sorted(where)
        }  # fmt: skip
    else:
        contents = {where[p]: RecordDict(content) for p in sorted(where)}
    ok, errors = _send(grid, EVALUATE, contents, rnd + 1, timeout)
    losses, rejected, per = {}, [], {}
    for c in sorted(where):
        try:
            if where[c] not in ok:
                raise ClientUpdateError(errors.get(where[c], "no reply"))
            losses[c] = loss_reply(ok[where[c]], c, "eval_loss")
            if own_tests:
                for model, metrics in own_test_reply(ok[where[c]]).items():
                    per.setdefault(model, {})[str(c)] = metrics
        except ClientUpdateError as err:
            rejected.append({"client": c, "reason": shorten(err)})
    if losses:
        record["client_loss"] = {str(k): losses[k] for k in sorted(losses)}
        record["fairness"] = fairness([losses[k] for k in sorted(losses)])
    if per:
        record["client_metrics"] = per
        record["client_eval"] = {m: client_summary(v) for m, v in per.items()}
    if rejected:
        record["eval_rejected"] = rejected


def _step(run: Any, state: Any, accepted: list, rnd: int, record: dict) -> Any:
    """The server step on the round's accepted updates (:meth:`Federation.apply_updates`, which
    skips a step that would give a value that is not finite), not taken either when the recipe
    fails on them (a value no per-update check foresaw): the round is recorded as skipped with the
    reason, the state stays as it was, and the run goes on."""
    from asymvlm.federated.client import set_base

    params, opt_state, base = state.params, state.opt_state, dict(state.base)
    try:
        return run.apply_updates(state, accepted, rnd, record)
    except (ArithmeticError, ValueError) as err:
        state.params, state.opt_state, state.base = params, opt_state, base
        if base:  # the step may have folded its update into the live model's base weights
            set_base(run.model, base)
        for key in ("aggregator_info", "lora_info", "client_loss_after", "loss_after"):
            record.pop(key, None)
        record["skipped"] = f"the recipe failed on this round's updates ({type(err).__name__}: {shorten(err, 200)})"
        record["server_step"] = False
        state.skipped_rounds = sorted({*state.skipped_rounds, rnd + 1})
        state.round = rnd + 1
        return state


def run_flower_server(grid: Grid, run_config: Mapping[str, Any], *, timeout: float = 3600.0) -> Any:
    """The ServerApp's body: asymvlm's rounds over the grid's nodes; returns the final
    :class:`~asymvlm.federated.checkpoint.ServerState` (the model is saved in ``output_dir/model``).

    Every field of every reply is untrusted: a node whose handshake (or AdaFedAdam's initial loss) is
    malformed is left out of the run, a malformed training reply rejects that client for the round,
    a malformed loss report leaves that client out of the fairness report; each is recorded with the
    reason in ``metrics.jsonl`` (``excluded`` in the first round this ServerApp runs, ``rejected``,
    ``eval_rejected``) and logged, and the run goes on. A round whose server step would give a value
    that is not finite is skipped; a run in which no round stepped the model saves no model."""
    from asymvlm.encoders import load_encoder
    from asymvlm.federated.checkpoint import federated_card, save_federated_model
    from asymvlm.federated.data import FederatedData
    from asymvlm.federated.rounds import Federation, federation_recipe
    from asymvlm.federated.sampling import sample_clients
    from asymvlm.io import read_jsonl

    data_args, head, fed, ropts = parse_run_config(run_config)
    recipe = federation_recipe(fed, ropts)  # an unknown option fails before any message
    where, hello, excluded = _handshake(grid, fed, timeout)
    sizes = {p: hello[n].num_examples for p, n in where.items()}
    first = hello[min(hello)]
    dim, source = first.dim, dict(first.encoder)  # what every node's cache records: the model's encoder
    log.info("partitions on nodes: %s; data: %s", {p: where[p] for p in sorted(where)}, first.describe())
    if not source.get("fingerprint"):
        log.warning("the nodes' caches record no encoder fingerprint: the saved model cannot check its encoder")
    check_head_size(head, dim)
    encoder = None
    if fed.trainable != "head":
        encoder = load_encoder(data_args.encoder, data_args.pretrained or None)
        if source.get("fingerprint") and encoder.fingerprint != source["fingerprint"]:
            raise FederationError(
                f"the run config's encoder {encoder.spec!r} (fingerprint {encoder.fingerprint[:16]}...) is not the "
                f"one the nodes' caches were built with ({first.describe()})"
            )
    server_data = FederatedData(
        [None] * fed.num_clients, [sizes.get(c, 0) for c in range(fed.num_clients)], dim, source, encoder
    )
    run = Federation.build(fed, server_data, head, ropts)
    if run.cluster is not None and not run.cluster.clusterer.on_flower:
        raise FederationError(f"cluster {fed.cluster!r} runs in the simulator only (asymvlm-federate), not on Flower")
    out = Path(fed.output_dir)
    config = run.config(head)
    state = run.start(config, lambda r: log.info("%s", r))
    out.mkdir(parents=True, exist_ok=True)
    dp = recipe.dp is not None
    secagg = _secagg_workflow(run_config, recipe, fed, sizes, timeout)
    if "loss_initial" in recipe.needs:
        if not state.initial_losses:
            _initial_losses(grid, state, where, timeout, excluded)
        for c in [c for c in sorted(where) if str(c) not in state.initial_losses]:  # resumed: lost its loss
            excluded.append({"node": where.pop(c), "partition": c, "reason": "no initial loss recorded"})
        if not where:
            raise FederationError(f"initial losses: no usable answer ({recipe.name} needs each client's)")
    for rnd in range(state.round, fed.rounds):
        t0 = time.time()
        active, who = sample_clients(fed, rnd, poisson=dp)
        unreachable = [c for c in active if c not in where]
        active = [c for c in active if c in where]
        record: dict[str, Any] = {"round": rnd + 1, **who, "unreachable": unreachable}
        if excluded:  # once per ServerApp start: the nodes left out, with the reason
            record["excluded"], excluded = excluded, []
        if secagg is None:
            results, rejected = _plain_round(grid, run, state, active, where, sizes, rnd, timeout)
        else:
            results, rejected, record["secure_aggregation"] = _secure_round(
                grid, secagg, run, state, active, where, [sizes[c] for c in active], rnd
            )
        accepted, bad = run.validate(state, results)
        record["rejected"] = rejected + [{**r, "reason": shorten(r["reason"])} for r in bad]
        for r in record["rejected"]:
            log.error("round %d: update of client %s rejected: %s", rnd + 1, r["client"], r["reason"])
        state = _step(run, state, accepted, rnd, record)  # SecAgg+'s sum carries no client loss
        if "skipped" in record:
            log.error("round %d skipped: %s", rnd + 1, record["skipped"])
        if not dp and (fed.evaluates_at(rnd + 1, fed.rounds)):
            _fairness_report(grid, run, state, where, rnd, timeout, record)
        record["seconds"] = round(time.time() - t0, 3)
        run.save_round(state, record, config)
        loss = record.get("fairness", record.get("loss_after", {})).get("mean")
        log.info(
            "round %d/%d: %d updates, %d rejected%s%s (%.1f s)", rnd + 1, fed.rounds, len(accepted),
            len(record["rejected"]), "" if loss is None else f", mean client loss {loss:.4f}",
            ", skipped" if "skipped" in record else "", record["seconds"],
        )  # fmt: skip
    rounds = [r for r in read_jsonl(out / "metrics.jsonl") if isinstance(r, dict) and "round" in r]
    if not any("skipped" not in r for r in rounds):
        raise FederationError(
            f"no round stepped the model (all {len(rounds)} skipped; see {out / 'metrics.jsonl'}): nothing saved as "
            f"{out / 'model'}"
        )
    bad = first_non_finite(state.params)
    if bad is not None:  # a resumed checkpoint that was not finite: never saved as a model
        raise FederationError(f"the model is not finite ({bad}); nothing saved as {out / 'model'}")
    run.model.set_params(state.params)
    card = federated_card(fed, state, ropts, data_args=data_args, data=server_data)
    save_federated_model(run.model, state, server_data, out / "model", init_from=fed.init_from or None, card=card)
    log.info("model saved to %s (%d rounds)", out / "model", state.round)
    return state


server_app = ServerApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    try:
        run_flower_server(grid, context.run_config, timeout=server_options(context.run_config)["round_timeout"])
    except ConfigError as err:  # one line first in the run's log (``flwr log``); Flower marks the run failed
        log.error("%s: %s", type(err).__name__, err)
        raise
