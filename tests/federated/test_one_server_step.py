"""One server step for federation and merging: Flower's FedAdam through make_recipe, FedAvg == the
model soup through the same call, and every caller (rounds, merges, lambda search) goes through it."""

import numpy as np
import pytest
import torch

import asymvlm.federated.core.server as server_module
from asymvlm.federated.core import server_update
from asymvlm.federated.recipes import make_recipe
from asymvlm.merging.methods import merge_params


def models(k, seed, shapes=((3, 4), (4,)), dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [{f"p{i}": torch.randn(s, generator=g, dtype=dtype) for i, s in enumerate(shapes)} for _ in range(k)]


def test_flower_fedadam_is_reachable_and_reproduced_through_make_recipe():
    """Flower 1.42's FedAdam strategy (server/strategy/fedadam.py: weighted average of the client
    models, Adam on their difference to the current model, bias-corrected eta with round + 1) on a
    small problem, against make_recipe('fedadam', bias_correction=True, bias_correction_offset=1)."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy import FedAdam

    start = models(1, seed=0)[0]
    names = list(start)
    eta, b1, b2, tau = 0.05, 0.9, 0.99, 1e-3
    flower = FedAdam(
        initial_parameters=ndarrays_to_parameters([start[n].numpy() for n in names]),
        eta=eta, beta_1=b1, beta_2=b2, tau=tau, accept_failures=False,
    )  # fmt: skip
    recipe = make_recipe(
        "fedadam", server_lr=eta, server_beta1=b1, server_beta2=b2, server_tau=tau,
        bias_correction=True, bias_correction_offset=1,
    )  # fmt: skip
    ours, state = dict(start), recipe.server.init(start)
    ours_nd = [start[n].numpy() for n in names]
    for rnd in range(1, 6):
        # each client moves from the current global model by a round-dependent update
        local = [{n: torch.from_numpy(ours_nd[i]) + 0.1 * m[n] for i, n in enumerate(names)} for m in models(4, rnd)]
        counts = [10, 3, 7, 1]
        results = [
            (None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters([c[n].numpy() for n in names]), k, {}))
            for c, k in zip(local, counts)
        ]
        params, _ = flower.aggregate_fit(rnd, results, [])
        flower_new = parameters_to_ndarrays(params)
        deltas = [{n: c[n] - ours[n] for n in names} for c in local]
        ours, state, _ = server_update(recipe, deltas, counts, state, ours)
        for n, f in zip(names, flower_new):
            np.testing.assert_allclose(ours[n].numpy(), f, rtol=1e-12, atol=1e-14)
        ours_nd = flower_new
    # the default recipe (the paper's, no bias correction) is another algorithm: the comparison can fail
    plain = make_recipe("fedadam", server_lr=eta, server_beta1=b1, server_beta2=b2, server_tau=tau)
    deltas = [{n: 0.1 * m[n] for n in names} for m in models(4, 1)]
    p_new, _, _ = server_update(plain, deltas, [10, 3, 7, 1], plain.server.init(start), start)
    f_new, _, _ = server_update(recipe, deltas, [10, 3, 7, 1], recipe.server.init(start), start)
    assert not torch.allclose(p_new["p0"], f_new["p0"], rtol=1e-3)


def test_flower_fedavg_is_make_recipe_fedavg():
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy import FedAvg

    start = models(1, seed=1)[0]
    names = list(start)
    local = models(3, seed=2)
    counts = [5, 2, 9]
    results = [
        (None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters([c[n].numpy() for n in names]), k, {}))
        for c, k in zip(local, counts)
    ]
    params, _ = FedAvg(inplace=False).aggregate_fit(1, results, [])
    recipe = make_recipe("fedavg")
    deltas = [{n: c[n] - start[n] for n in names} for c in local]
    ours, _, _ = server_update(recipe, deltas, counts, recipe.server.init(start), start)
    for n, f in zip(names, parameters_to_ndarrays(params)):
        np.testing.assert_allclose(ours[n].numpy(), f, rtol=1e-12, atol=1e-14)


def test_a_fedavg_round_equals_the_model_soup_through_the_same_call(monkeypatch):
    calls = []
    real = server_module.server_update

    def spy(recipe, *args, **kwargs):
        calls.append(recipe.name)
        return real(recipe, *args, **kwargs)

    monkeypatch.setattr(server_module, "server_update", spy)
    import asymvlm.federated.core as core
    import asymvlm.merging.methods as methods

    monkeypatch.setattr(core, "server_update", spy)
    monkeypatch.setattr(methods, "server_update", spy)
    base = models(1, seed=3, dtype=torch.float32)[0]
    taus = models(4, seed=4, dtype=torch.float32)
    fedavg = make_recipe("fedavg", weighting="uniform", server_lr=1.0)
    fed_new, _, _ = spy(fedavg, taus, [1, 50, 3, 8], fedavg.server.init(base), base)
    soup = merge_params(base, taus, "mean")
    assert calls == ["fedavg", "mean"]
    for k in base:
        assert torch.equal(fed_new[k], soup[k]), k  # bit-identical: one implementation
    # ...and weighted FedAvg is the weighted soup
    fedavg_w = make_recipe("fedavg")
    a, _, _ = server_update(fedavg_w, taus, [1, 50, 3, 8], fedavg_w.server.init(base), base)
    b = merge_params(base, taus, "mean", weights=[1, 50, 3, 8])
    assert all(torch.equal(a[k], b[k]) for k in base)


def test_streamed_merge_and_lambda_search_use_the_server_step(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    import asymvlm.merging.api as api
    import asymvlm.merging.methods as methods
    from asymvlm.merging.methods import merge_files

    calls = []
    real = server_update

    def spy(recipe, *args, **kwargs):
        calls.append((recipe.name, recipe.options["lam"], kwargs.get("lazy", False)))
        return real(recipe, *args, **kwargs)

    monkeypatch.setattr(methods, "server_update", spy)
    import asymvlm.federated.core as core

    monkeypatch.setattr(core, "server_update", spy)
    base = models(1, seed=5, dtype=torch.float32)[0]
    taus = models(3, seed=6, dtype=torch.float32)
    save_file(base, tmp_path / "base.safetensors")
    for i, t in enumerate(taus):
        save_file(t, tmp_path / f"t{i}.safetensors")
    out = merge_files(tmp_path / "base.safetensors", [tmp_path / f"t{i}.safetensors" for i in range(3)],
                      tmp_path / "m.safetensors", "ties", lam=0.7, density=0.5)  # fmt: skip
    assert calls[-1] == ("ties", 0.7, True)
    mem = merge_params(base, taus, "ties", lam=0.7, density=0.5)
    got = load_file(out)
    assert all(torch.equal(got[k], mem[k]) for k in base)  # streamed == in memory, bit for bit
    calls.clear()
    res = api.lambda_search(base, taus, [0.25, 0.5], lambda p: -float(p["p1"].abs().sum()), method="task_arithmetic")
    assert [c[:2] for c in calls] == [("task_arithmetic", 0.25), ("task_arithmetic", 0.5)]
    assert res.best_lam in (0.25, 0.5)


@pytest.mark.parametrize("name", ["fedavg", "fedadam", "fedyogi", "fedavgm", "krum", "fedmedian"])
def test_the_server_step_is_deterministic_and_keeps_untouched_keys(name):
    params = {**models(1, seed=7)[0], "frozen": torch.ones(2, dtype=torch.float64)}
    deltas = [{k: v for k, v in d.items()} for d in models(4, seed=8)]
    recipe = make_recipe(name)
    state = recipe.server.init({k: v for k, v in params.items()})
    a, _, _ = server_update(recipe, deltas, [1, 2, 3, 4], state, params)
    b, _, _ = server_update(recipe, deltas, [1, 2, 3, 4], state, params)
    assert all(torch.equal(a[k], b[k]) for k in params)
    assert torch.equal(a["frozen"], params["frozen"]) and a["frozen"] is not params["frozen"]


def test_merge_scoring_uses_evals_rank_based_recall():
    # two identical images: the caption of image 0 ties with image 1. argmax (first index wins)
    # called it a hit; the one R@1 (asymvlm.eval.retrieval) counts the tie against the positive
    from asymvlm.eval.retrieval import t2i_recall_at_1
    from asymvlm.heads import TextHead
    from asymvlm.losses import log_likelihood
    from asymvlm.merging.api import recall_at_1

    g = torch.Generator().manual_seed(9)
    img = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1)
    img = torch.cat([img[:1], img])  # rows 0 and 1 are the same image
    head = TextHead(dim=8, hidden_dims=(16,), residual=True)  # retrieves like cosine at the start
    text, idx = img[[0, 2, 3, 4]], torch.tensor([0, 2, 3, 4])
    with torch.no_grad():
        ll = log_likelihood(head(text), img)
    assert float((ll.argmax(1) == idx).float().mean()) == 1.0
    assert recall_at_1(head, text, img, idx) == t2i_recall_at_1(ll, idx) == 0.75


def test_flower_fedadam_is_reachable_from_yaml_and_flags(tmp_path):
    from asymvlm.config import DataArguments, parse_dataclass_args
    from asymvlm.federated.config import FederatedArguments, RecipeArguments, recipe_options
    from asymvlm.heads import HeadConfig

    groups = (DataArguments, HeadConfig, FederatedArguments, RecipeArguments)
    y = tmp_path / "fed.yaml"
    y.write_text("recipe: fedadam\nserver_tau: 0.001\nbias_correction: true\nbias_correction_offset: 1\n")
    for argv in (
        ["--config", str(y)],
        ["--recipe", "fedadam", "--server_tau", "1e-3", "--bias_correction", "true", "--bias-correction-offset", "1"],
    ):
        *_, fed, rargs = parse_dataclass_args(groups, argv, "asymvlm-federate")
        recipe = make_recipe(fed.recipe, **recipe_options(rargs))
        assert recipe.options["bias_correction"] is True and recipe.options["bias_correction_offset"] == 1
        assert recipe.options["server_tau"] == 1e-3 and recipe.options["server_lr"] == 0.1  # FedAdam's own lr
    # an option the chosen recipe does not declare is an error, not silently dropped
    *_, fed, rargs = parse_dataclass_args(groups, ["--recipe", "fedavg", "--qffl_q", "0.5"], "asymvlm-federate")
    from asymvlm.config import ConfigError

    with pytest.raises(ConfigError, match="unknown option 'qffl_q' for recipe 'fedavg'; valid options: server_lr"):
        make_recipe(fed.recipe, **recipe_options(rargs))
