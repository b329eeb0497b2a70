"""Differential privacy is a wrapper in the one server step: it keeps each recipe's rule, refuses the
rules without a DP analysis, clips and noises every released tensor (LoRA factors and folded base
weights included) and reports opacus's epsilon."""

import math

import pytest
import scipy.stats
import torch

from asymvlm.federated.core import (
    DifferentialPrivacy,
    DPCompositionError,
    LoraLayers,
    WeightedMean,
    chain,
    scale,
    scale_by_adam,
    server_owned,
    server_update,
    trace,
)
from asymvlm.federated.core.dp import secure_gaussian
from asymvlm.federated.core.lora import dense_key, with_dense_updates
from asymvlm.federated.recipes import DP_RECIPES, RECIPES, make_recipe


def dp(noise=0.0, clip=1.0, q=1.0, n=4, seed=0):
    return DifferentialPrivacy(noise, clip, q, n, 1e-5, insecure_seed=seed)


def head_params(g, d=6):
    return {"head.w": torch.randn(d, d, generator=g, dtype=torch.float64), "head.b": torch.randn(d, generator=g)}


def deltas_for(params, g, k=4, size=1.0):
    return [{n: size * torch.randn(v.shape, generator=g, dtype=v.dtype) for n, v in params.items()} for _ in range(k)]


# ----------------------------------------------------------------------------------------------
# composition
# ----------------------------------------------------------------------------------------------
def test_dp_refuses_rules_without_a_dp_analysis_naming_the_valid_ones():
    assert set(DP_RECIPES) == {"fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad", "ghbm"}
    for name in ("krum", "fedmedian", "fedtrimmedavg", "qffl", "adafedadam"):
        with pytest.raises(DPCompositionError, match=rf"{name}.*DP composes with: fedavg, fedavgm"):
            make_recipe(name, dp=dp())
    for name in DP_RECIPES:
        assert make_recipe(name, dp=dp()).dp is not None


def test_dp_keeps_the_recipes_server_optimizer():
    # FedAdam and FedAvgM under DP: the DP aggregate (clipped sum / qN, no noise here) feeds the recipe's
    # own server transform; the old round loop replaced the whole recipe by a clipped mean
    g = torch.Generator().manual_seed(0)
    params = head_params(g)
    ds = deltas_for(params, g, k=3, size=0.3)
    mech = dp(clip=0.5, n=3)
    norms = [math.sqrt(sum(float(v.double().pow(2).sum()) for v in d.values())) for d in ds]
    clipped_mean = {k: sum(d[k] * min(1.0, 0.5 / nk) for d, nk in zip(ds, norms)) / 3 for k in params}
    for name, opts, tx in (
        ("fedadam", {"server_lr": 0.1, "server_tau": 1e-3}, chain(scale_by_adam(0.9, 0.99, 1e-3), scale(0.1))),
        ("fedavgm", {"server_momentum": 0.5}, chain(trace(0.5), scale(1.0))),
    ):
        recipe = make_recipe(name, dp=mech, **opts)
        state = recipe.server.init(params)
        ref_state = tx.init(params)
        p, ref = dict(params), dict(params)
        for rnd in range(3):
            p, state, _ = server_update(recipe, ds, [5, 1, 1], state, p, round_index=rnd)
            step, ref_state = tx.update(clipped_mean, ref_state, ref)
            ref = {k: ref[k] + step[k].to(ref[k].dtype) for k in ref}
        for k in params:
            torch.testing.assert_close(p[k], ref[k], rtol=1e-6, atol=1e-6)


def test_weights_are_uniform_under_dp_with_the_fixed_denominator():
    g = torch.Generator().manual_seed(1)
    params = head_params(g)
    ds = deltas_for(params, g, k=2, size=1e-3)  # far inside the clip
    recipe = make_recipe("fedavg", dp=dp(clip=10.0, q=0.5, n=8))
    new, _, info = server_update(recipe, ds, [1000, 1], recipe.server.init(params), params)
    for k in params:  # sum of the two deltas / (q N) = / 4, whatever their example counts
        torch.testing.assert_close(new[k] - params[k], (ds[0][k] + ds[1][k]) / 4, rtol=1e-4, atol=2e-7)
    assert info["dp"]["denominator"] == 4.0


# ----------------------------------------------------------------------------------------------
# every released tensor, in the exact LoRA modes too
# ----------------------------------------------------------------------------------------------
def lora_model(g, r=2, d_in=5, d_out=4, layers=2):
    params = {"head.w": torch.randn(3, 3, generator=g)}
    lay = {}
    for i in range(layers):
        a, b = f"peft_model.l{i}.lora_A.default.weight", f"peft_model.l{i}.lora_B.default.weight"
        params[a] = torch.randn(r, d_in, generator=g)
        params[b] = 0.1 * torch.randn(d_out, r, generator=g)
        lay[f"peft_model.l{i}"] = (a, b)
    base = {LoraLayers.base_key(layer): torch.randn(d_out, d_in, generator=g) for layer in lay}
    return params, base, lay


@pytest.mark.parametrize("mode", ["residual", "stack", "svd", "factors"])
def test_sensitivity_of_every_released_tensor_is_bounded_by_the_clip(mode):
    g = torch.Generator().manual_seed(2)
    params, base, lay = lora_model(g)
    lora = LoraLayers(mode, lay, 2.0, 2)
    full = {**params, **(base if lora.exact else {})}
    honest = deltas_for(params, g, k=3, size=0.5)
    outlier = deltas_for(params, g, k=1, size=100.0)[0]  # one client's data changed arbitrarily
    mech = dp(clip=0.7, q=1.0, n=4)

    def release(clients):
        msgs = [with_dense_updates(full, d, lora) for d in clients] if lora.exact else clients
        return mech.aggregate(msgs).delta  # the pre-noise aggregate of everything released (noise 0)

    a, b = release(honest), release([*honest, outlier])
    diff = math.sqrt(sum(float((a[k] - b[k]).double().pow(2).sum()) for k in a))
    assert diff <= 0.7 / mech.denominator * (1 + 1e-6)  # joint clip: every released tensor together
    released = set(a)
    assert set(params) <= released
    if lora.exact:  # the dense change of every adapted layer is part of the clipped release
        assert {dense_key(layer) for layer in lay} <= released


@pytest.mark.parametrize("mode", ["residual", "stack", "svd", "factors", "frozen_a"])
def test_noise_reaches_every_released_tensor(mode):
    g = torch.Generator().manual_seed(3)
    params, base, lay = lora_model(g)
    lora = LoraLayers(mode, lay, 2.0, 2)
    full = {**params, **(base if lora.exact else {})}
    ds = deltas_for(params, g, k=3, size=0.05)
    if mode == "frozen_a":
        for d in ds:
            for a, _ in lay.values():
                d[a] = torch.zeros_like(d[a])
    out = {}
    for noise, seed in ((0.0, 0), (1.0, 1), (1.0, 2)):
        recipe = make_recipe("fedavg", dp=dp(noise=noise, clip=1.0, n=3, seed=seed))
        out[(noise, seed)], _, _ = server_update(
            recipe, ds, None, recipe.server.init(server_owned(full, lora)), full, lora=lora
        )
    factors = lora.factor_keys - lora.frozen_keys
    released = {  # what each mode computes from the (noisy) aggregate
        "factors": factors, "frozen_a": factors, "residual": factors | set(base), "svd": factors, "stack": set(base),
    }[mode] | {"head.w"}  # fmt: skip
    for k in full:
        if k in released:
            assert not torch.equal(out[(0.0, 0)][k], out[(1.0, 1)][k]), k
            assert not torch.equal(out[(1.0, 1)][k], out[(1.0, 2)][k]), k
        else:  # FFA-LoRA's shared A, stack's re-initialised adapter, svd's untouched base: no client data in them
            assert torch.equal(out[(1.0, 1)][k], out[(1.0, 2)][k]), k


def test_robust_rules_act_on_the_lora_factors_in_delta_w_space():
    # krum with 2 of 5 attackers at x10: the exact-mode LoRA factors follow Krum's choice, not the mean
    g = torch.Generator().manual_seed(4)
    params, base, lay = lora_model(g)
    lora = LoraLayers("residual", lay, 2.0, 2)
    full = {**params, **base}
    honest = deltas_for(params, g, k=3, size=0.01)
    attackers = [{k: 100 * v for k, v in honest[0].items()}, {k: -100 * v for k, v in honest[1].items()}]
    ds = honest + attackers
    krum = make_recipe("krum", krum_num_malicious=2)
    mean = make_recipe("fedavg")
    k_new, _, kinfo = server_update(krum, ds, None, krum.server.init(server_owned(full, lora)), full, lora=lora)
    m_new, _, _ = server_update(mean, ds, None, mean.server.init(server_owned(full, lora)), full, lora=lora)
    assert kinfo["aggregator"]["selected"][0] in (0, 1, 2)
    chosen = honest[kinfo["aggregator"]["selected"][0]]
    for a, b in lay.values():
        torch.testing.assert_close(k_new[a], params[a] + chosen[a])  # the selected client's factors
        assert (m_new[b] - params[b]).norm() > 5 * (k_new[b] - params[b]).norm()


def test_epsilon_is_opacus_accountant():
    from opacus.accountants import RDPAccountant

    mech = dp(noise=1.1, q=0.3, n=10)
    acc = RDPAccountant()
    for _ in range(7):
        acc.step(noise_multiplier=1.1, sample_rate=0.3)
    assert mech.epsilon(7) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)
    assert dp(noise=0.0).epsilon(7) is None  # clipping alone gives no guarantee and reports none


def test_secure_noise_is_gaussian_and_not_reproducible():
    a = secure_gaussian((20000,), torch.float64, 2.0)
    b = secure_gaussian((20000,), torch.float64, 2.0)
    assert not torch.equal(a, b)
    assert scipy.stats.kstest(a.numpy() / 2.0, "norm").pvalue > 1e-6
    mech = DifferentialPrivacy(1.0, 1.0, 1.0, 2)
    assert mech.secure and mech.describe()["noise_source"].startswith("os.urandom")
    assert "INSECURE" in dp(noise=1.0).describe()["noise_source"]


def test_bad_dp_values_are_config_errors():
    from asymvlm.config import ConfigError

    with pytest.raises(ConfigError, match="dp_noise_multiplier must be >= 0"):
        DifferentialPrivacy(-1.0, 1.0, 1.0, 2)
    with pytest.raises(ConfigError, match="dp_max_norm must be > 0"):
        DifferentialPrivacy(1.0, 0.0, 1.0, 2)
    from asymvlm.federated.config import FederatedArguments

    with pytest.raises(ConfigError, match="dp_noise_multiplier must be >= 0"):
        FederatedArguments(dp_noise_multiplier=-1.0)


def test_every_recipe_declares_its_options():
    for name, entry in RECIPES.items():
        assert entry.reference.startswith("https://"), name
        for p in entry.params:
            assert p.help and p.type is not None, (name, p.name)
        assert isinstance(make_recipe(name).aggregator, object)
    with pytest.raises(Exception, match="unknown option 'sever_lr' for recipe 'fedadam'; valid options: server_lr"):
        make_recipe("fedadam", sever_lr=1)
    assert isinstance(make_recipe("fedavg").aggregator, WeightedMean)


@pytest.mark.parametrize(
    "name,options,message",
    [
        ("fedadam", {"server_beta1": 1.5}, r"server_beta1 must be in \[0.0, 1.0\)"),
        ("fedyogi", {"server_tau": -1.0}, "server_tau must be > 0"),
        ("qffl", {"qffl_q": -1.0}, "qffl_q must be >= 0"),
        ("ghbm", {"ghbm_tau": 0}, "ghbm_tau must be >= 1"),
        ("krum", {"krum_keep": 0}, "krum_keep must be >= 1"),
        ("fedtrimmedavg", {"trim_beta": 0.5}, r"trim_beta must be in \[0.0, 0.5\)"),
        ("fedadam", {"server_lr": "fast"}, "server_lr must be a number"),
        ("krum", {"krum_num_malicious": 1.0}, "krum_num_malicious must be an integer"),
        ("fedavg", {"weighting": "votes"}, r"weighting='votes' is not one of"),
    ],
)
def test_recipe_option_values_are_checked(name, options, message):
    from asymvlm.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        make_recipe(name, **options)
