"""A federated algorithm defined outside the package, registered from here and run unchanged.

``fedprox_anneal`` is written in this file only (the template of docs/architecture/new-recipe.md):
FedAvg's weighted mean; a server transform whose first member, named ``"clock"``, counts the
server steps (the recipe's own server state, read by name with ``named_state``); a
``client_config`` hook that sends the clients FedProx's ``proximal`` term with an annealed
coefficient ``mu_t = mu / (1 + t)`` (t = server steps so far); and a feasibility check (at least
two clients per round) that the round code calls before any work. Nothing in asymvlm changes: the
simulator (``run_federated``), its checkpoints and ``--resume``, and asymvlm's Flower ServerApp and
ClientApps (over :class:`asymvlm.testing.LocalGrid`) run it as they run the built-in recipes.
"""

import dataclasses

import pytest
import torch

from asymvlm.config import DataArguments
from asymvlm.errors import ConfigError
from asymvlm.federated.checkpoint import load_server_state, round_dirs
from asymvlm.federated.client import CLIENT_TERMS, pack_client_config, unpack_client_config
from asymvlm.federated.config import FederatedArguments
from asymvlm.federated.core import Transform, WeightedMean, chain, named_state, scale, server_update
from asymvlm.federated.data import get_federated_data
from asymvlm.federated.recipes import RECIPES, make_recipe
from asymvlm.federated.rounds import run_federated
from asymvlm.heads import HeadConfig
from asymvlm.registry import Param, non_negative, positive

NAME = "fedprox_anneal"
HEAD = HeadConfig(hidden_dims=(16,), direction="learned")  # small; the mean moves with the updates
SENT: list[float] = []  # the mu every round's client_config sent (the test reads it back)


# ----------------------------------------------------------------------------------------------
# the recipe: everything of the algorithm in one place
# ----------------------------------------------------------------------------------------------
def clock() -> Transform:
    """Passes the delta through; its state counts the server steps taken."""

    def init(params):
        return {"steps": 0}

    def update(delta, state, params=None, **info):
        return dict(delta), {"steps": state["steps"] + 1}

    return Transform(init, update)


def fedprox_anneal(proximal_mu: float = 0.1, server_lr: float = 1.0) -> dict:
    server = chain(("clock", clock()), ("lr", scale(server_lr)))

    def client_config(state, params):
        mu = proximal_mu / (1 + named_state(server, state, "clock")["steps"])
        SENT.append(mu)
        return {"proximal": {"mu": mu}}

    def check_clients(clients_per_round: int) -> None:
        if clients_per_round < 2:
            raise ConfigError(f"recipe {NAME!r} needs at least 2 clients per round, got {clients_per_round}")

    return dict(
        aggregator=WeightedMean(),
        server=server,
        client_config=client_config,
        client_terms=frozenset({"proximal"}),
        check_clients=check_clients,
    )


@pytest.fixture
def plugin():
    """``fedprox_anneal`` registered for one test (and unregistered after, so the other tests see the
    built-in recipes only)."""
    RECIPES.register(
        NAME,
        help="weighted mean; clients add an annealed proximal term mu / (1 + t)",
        reference="https://arxiv.org/abs/1812.06127",
        params=(
            Param("proximal_mu", float, 0.1, "Proximal coefficient at round 1.", check=non_negative),
            Param("server_lr", float, 1.0, "Server learning rate.", check=positive),
        ),
    )(fedprox_anneal)
    SENT.clear()
    yield NAME
    RECIPES.unregister(NAME)
    SENT.clear()


# ----------------------------------------------------------------------------------------------
# the recipe by itself
# ----------------------------------------------------------------------------------------------
def test_the_plugin_is_a_registered_recipe_with_its_options_checked(plugin):
    r = make_recipe(plugin, proximal_mu=0.4)
    assert r.name == plugin and r.options == {"proximal_mu": 0.4, "server_lr": 1.0}
    with pytest.raises(ConfigError, match="unknown option 'proximal_m' for recipe 'fedprox_anneal'"):
        make_recipe(plugin, proximal_m=0.4)
    with pytest.raises(ConfigError, match="proximal_mu must be >= 0"):
        make_recipe(plugin, proximal_mu=-1.0)
    assert plugin in RECIPES.describe()
    assert make_recipe(plugin, dp=None).dp is None


def test_the_plugin_reads_its_own_server_state_by_name():
    """Its client configuration follows its named server state round by round."""
    r = dataclasses.replace(make_recipe("fedavg"), **fedprox_anneal(proximal_mu=0.4))
    params = {"w": torch.zeros(3)}
    state = r.server.init(params)
    for t in range(3):
        assert r.client_config(state, params) == {"proximal": {"mu": pytest.approx(0.4 / (1 + t))}}
        params, state, _ = server_update(r, [{"w": torch.ones(3)}], [1], state, params)
        assert named_state(r.server, state, "clock") == {"steps": t + 1}
    with pytest.raises(ConfigError, match="no member named 'history'; its members: \\['clock', 'lr'\\]"):
        named_state(r.server, state, "history")


def test_a_client_configuration_travels_as_numbers_and_named_tensors():
    """What a transport such as Flower carries: scalars and {key: tensor} groups, back unchanged."""
    m = {"head.w": torch.arange(4.0)}
    config = {"proximal": {"mu": 0.05}, "heavy_ball": {"beta": 0.9, "momentum": m}}
    numbers, tensors = pack_client_config(config)
    assert numbers == {"proximal.mu": 0.05, "heavy_ball.beta": 0.9}
    assert list(tensors) == ["heavy_ball.momentum"] and tensors["heavy_ball.momentum"]["head.w"] is m["head.w"]
    back = unpack_client_config({**numbers, "server-round": 3}, tensors)
    assert back == {"proximal": {"mu": 0.05}, "heavy_ball": {"beta": 0.9, "momentum": m}}
    assert set(CLIENT_TERMS) >= {"proximal", "heavy_ball"}
    with pytest.raises(ConfigError, match="unknown option 'nu' for client term 'proximal'"):
        CLIENT_TERMS.build("proximal", nu=0.1)


# ----------------------------------------------------------------------------------------------
# the recipe in the simulator
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cache(tmp_path_factory, synthetic_cache):
    return synthetic_cache(tmp_path_factory.mktemp("plugincache") / "c", 60)


def _run(cache, out, recipe, options, *, rounds=3, stop=None, **kw):
    fed = FederatedArguments(
        recipe=recipe, rounds=rounds, num_clients=4, local_steps=3, local_batch_size=16, output_dir=str(out),
        progress=False, eval_every=0, local_lr=0.2, **kw,
    )  # fmt: skip
    data = get_federated_data(DataArguments(cache_dir=str(cache)), fed)
    return run_federated(fed, data, head=HEAD, recipe_options=options, stop_after=stop)


def test_the_plugin_runs_in_the_simulator_with_its_client_term_and_named_state(plugin, cache, tmp_path):
    state, _ = _run(cache, tmp_path / "plugin", plugin, {"proximal_mu": 0.5})
    assert state.round == 3
    assert SENT == pytest.approx([0.5, 0.25, 0.5 / 3])  # one client configuration per round, from the clock
    recipe = make_recipe(plugin)
    assert named_state(recipe.server, state.opt_state, "clock") == {"steps": 3}
    saved = load_server_state(round_dirs(tmp_path / "plugin" / "checkpoints")[-1])
    assert named_state(recipe.server, saved.opt_state, "clock") == {"steps": 3}  # checkpointed by name's position

    # round 1 sends mu itself: the plug-in's first round is FedProx's, bit for bit
    one, _ = _run(cache, tmp_path / "one", plugin, {"proximal_mu": 0.5}, rounds=1)
    fedprox, _ = _run(cache, tmp_path / "fedprox", "fedprox", {"proximal_mu": 0.5}, rounds=1)
    assert all(torch.equal(one.params[k], fedprox.params[k]) for k in fedprox.params)
    # and the proximal term is applied: without it (mu 0) the same run is FedAvg's, and differs
    free, _ = _run(cache, tmp_path / "free", plugin, {"proximal_mu": 0.0}, rounds=1)
    fedavg, _ = _run(cache, tmp_path / "fedavg", "fedavg", {}, rounds=1)
    assert all(torch.equal(free.params[k], fedavg.params[k]) for k in fedavg.params)
    assert not all(torch.equal(one.params[k], free.params[k]) for k in free.params)


def test_the_plugin_resumes_bit_identically_and_its_feasibility_check_runs_first(plugin, cache, tmp_path):
    full, _ = _run(cache, tmp_path / "full", plugin, {"proximal_mu": 0.5}, rounds=4)
    _run(cache, tmp_path / "part", plugin, {"proximal_mu": 0.5}, rounds=4, stop=2)
    resumed, _ = _run(cache, tmp_path / "part", plugin, {"proximal_mu": 0.5}, rounds=4, resume=True)
    assert resumed.round == 4 and all(torch.equal(full.params[k], resumed.params[k]) for k in full.params)
    assert named_state(make_recipe(plugin).server, resumed.opt_state, "clock") == {"steps": 4}

    with pytest.raises(ConfigError, match="needs at least 2 clients per round, got 1"):
        _run(cache, tmp_path / "one_client", plugin, {}, clients_per_round=1)
    assert not (tmp_path / "one_client").exists()  # refused before any work


def test_the_plugin_runs_over_flower_as_in_process(plugin, cache, tmp_path):
    """The same recipe over Flower (asymvlm's ServerApp and ClientApps on a LocalGrid): the server sends
    each round's client configuration in the train message, the clients apply it; bit-identical."""
    pytest.importorskip("flwr")
    from asymvlm.federated import flower as F
    from asymvlm.testing import LocalGrid

    ours, _ = _run(cache, tmp_path / "in", plugin, {"proximal_mu": 0.5}, client_batch="1")  # as every Flower node
    sent_in_process = list(SENT)
    SENT.clear()
    rc = dict(
        cache_dir=str(cache), rounds=3, num_clients=4, eval_every=0, output_dir=str(tmp_path / "fl"),
        hidden_dims="[16]", direction="learned", local_steps=3, local_batch_size=16, progress=False, local_lr=0.2,
        recipe=plugin, proximal_mu=0.5,
    )  # fmt: skip
    flower = F.run_flower_server(LocalGrid(F.client_app, rc, [{"partition-id": i} for i in range(4)]), rc)
    assert SENT == sent_in_process == pytest.approx([0.5, 0.25, 0.5 / 3])
    assert flower.round == 3 and all(torch.equal(ours.params[k], flower.params[k]) for k in ours.params)
    assert named_state(make_recipe(plugin).server, flower.opt_state, "clock") == {"steps": 3}
