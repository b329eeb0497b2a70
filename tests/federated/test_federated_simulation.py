"""Federated rounds: resume bit-identically, reject bad clients, robustness, DP, client-side terms, LoRA, CLI."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from asymvlm.config import DataArguments
from asymvlm.federated.checkpoint import load_server_state, save_federated_model
from asymvlm.federated.client import ClientOptions, build_client_model, client_update
from asymvlm.federated.config import FederatedArguments
from asymvlm.federated.data import get_federated_data
from asymvlm.federated.recipes import RECIPES
from asymvlm.federated.rounds import run_federated, sample_clients
from asymvlm.heads import HeadConfig
from asymvlm.io import ArtefactError


@pytest.fixture(scope="module")
def cache(tmp_path_factory, synthetic_cache):
    return synthetic_cache(tmp_path_factory.mktemp("fedcache") / "c", 120)


HEAD = HeadConfig(hidden_dims=[32], direction="learned")  # the paper's head: the mean moves with the updates
RECIPE_OPTIONS = {p.name for e in RECIPES.values() for p in e.params} - {"local_lr"}


def fed_args(out, **kw):
    base = dict(
        rounds=6,
        num_clients=5,
        local_steps=3,
        local_batch_size=16,
        output_dir=str(out),
        progress=False,
        eval_every=3,
        local_lr=0.2,
    )
    base.update({k: v for k, v in kw.items() if k not in RECIPE_OPTIONS})
    return FederatedArguments(**base)


def run(cache, out, **kw):
    fed = fed_args(out, **kw)
    options = {k: v for k, v in kw.items() if k in RECIPE_OPTIONS}
    data = get_federated_data(DataArguments(cache_dir=str(cache)), fed)
    return run_federated(fed, data, head=HEAD, recipe_options=options)


def records(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def same(a, b):
    assert a.keys() == b.keys()
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "recipe,extra",
    [
        ("fedadam", {"server_lr": 0.05}),
        ("ghbm", {"ghbm_tau": 2}),
        ("adafedadam", {"server_lr": 0.01}),
        ("fedavgm", {}),
        ("qffl", {}),
    ],
)
def test_killed_and_resumed_run_is_bit_identical(cache, tmp_path, recipe, extra):
    full, _ = run(cache, tmp_path / "full", recipe=recipe, client_fraction=0.6, dropout_prob=0.2, **extra)
    part, _ = run_federated(
        fed := fed_args(tmp_path / "part", recipe=recipe, client_fraction=0.6, dropout_prob=0.2),
        get_federated_data(DataArguments(cache_dir=str(cache)), fed),
        head=HEAD,
        recipe_options=extra,
        stop_after=4,
    )
    assert part.round == 4
    resumed, _ = run(
        cache, tmp_path / "part", recipe=recipe, client_fraction=0.6, dropout_prob=0.2, resume=True, **extra
    )
    assert resumed.round == 6 and same(full.params, resumed.params)
    assert [r["sampled"] for r in records(tmp_path / "full")] == [r["sampled"] for r in records(tmp_path / "part")]
    kept = sorted(p.name for p in (tmp_path / "part" / "checkpoints").iterdir())
    assert kept == ["round-000005", "round-000006"]


def test_corrupt_checkpoint_is_a_clear_error(cache, tmp_path):
    run(cache, tmp_path / "r", rounds=3)
    latest = tmp_path / "r" / "checkpoints" / "round-000003"
    data = (latest / "params.safetensors").read_bytes()
    (latest / "params.safetensors").write_bytes(data[:-7])
    with pytest.raises(ArtefactError, match="truncated"):
        load_server_state(latest)
    previous = load_server_state(tmp_path / "r" / "checkpoints" / "round-000002")  # the previous one is intact
    assert previous.round == 2
    (latest / "server.json").write_text("{")
    with pytest.raises(ArtefactError, match="corrupt JSON"):
        run(cache, tmp_path / "r", rounds=4, resume=True)


def test_non_finite_clients_are_rejected_and_the_round_continues(cache, tmp_path):
    fed = fed_args(tmp_path / "nan", rounds=2)
    data = get_federated_data(DataArguments(cache_dir=str(cache)), fed)
    real = data.batchers[2].batch

    def poisoned(i, rank=0, world=1):
        b = real(i)
        return {**b, "text": torch.full_like(b["text"], float("nan"))}

    data.batchers[2].batch = poisoned
    state, _ = run_federated(fed, data, head=HEAD)
    rec = records(tmp_path / "nan")
    assert [r["client"] for r in rec[0]["rejected"]] == [2] and "NaN" in rec[0]["rejected"][0]["reason"]
    assert "skipped" not in rec[0] and all(torch.isfinite(v).all() for v in state.params.values())


def test_sampling_dropouts_stragglers_and_min_clients(cache, tmp_path):
    fed = fed_args(tmp_path, num_clients=10, client_fraction=0.5, dropout_prob=0.3, straggler_deadline=4.0)
    a, who = sample_clients(fed, 3)
    b, who2 = sample_clients(fed, 3)
    assert a == b and who == who2 and len(who["sampled"]) == 5
    assert set(a) | set(who["dropped"]) | set(who["stragglers"]) == set(who["sampled"])
    from asymvlm.config import ConfigError

    with pytest.raises(ConfigError, match="min_clients=6 exceeds the 5 clients sampled per round"):
        fed_args(tmp_path / "few", num_clients=10, min_clients=6, clients_per_round=5)
    # a round with fewer valid updates than min_clients (a dropout here) is skipped, the run goes on
    run(cache, tmp_path / "few", rounds=3, num_clients=5, min_clients=5, dropout_prob=0.5)
    recs = records(tmp_path / "few")
    assert any("skipped" in r for r in recs) and all(
        ("skipped" in r) == (len(r["sampled"]) - len(r["dropped"]) < 5) for r in recs
    )
    with pytest.raises(ConfigError, match=r"krum_num_malicious=2 needs more than 6 clients per round, got 5"):
        run(cache, tmp_path / "krum", recipe="krum", krum_num_malicious=2)
    with pytest.raises(ConfigError, match="keep_last must be >= 1"):
        fed_args(tmp_path, keep_last=0)


def test_robust_rules_resist_byzantine_clients_where_the_mean_does_not(tmp_path, synthetic_cache):
    # 10 clients with 100 images each; 2 of them (20%) send -10x their update (sign flip + scale).
    # drift = |theta_attacked - theta_honest| / |theta_honest - theta_0|, same rule without attackers
    cache = synthetic_cache(tmp_path / "cache", 1000)

    def drift(recipe, **kw):
        common = dict(rounds=3, num_clients=10, local_steps=3, recipe=recipe, eval_every=0, local_lr=0.5, **kw)
        honest, _ = run(cache, tmp_path / f"{recipe}-honest", **common)
        attacked, _ = run(
            cache, tmp_path / f"{recipe}-attack", attack="scale", attack_scale=-10.0, malicious_fraction=0.2, **common
        )
        start, _ = run(cache, tmp_path / f"{recipe}-start", **{**common, "rounds": 1, "local_lr": 1e-12})
        num = sum(float((attacked.params[k] - honest.params[k]).norm() ** 2) for k in honest.params) ** 0.5
        den = sum(float((honest.params[k] - start.params[k]).norm() ** 2) for k in honest.params) ** 0.5
        return num / den

    mean = drift("fedavg")
    assert mean > 2.0  # 2 of 10 clients at -10x drag the plain mean far away
    for recipe, kw in (
        ("fedmedian", {}),
        ("fedtrimmedavg", {"trim_beta": 0.2}),
        ("krum", {"krum_num_malicious": 2, "krum_keep": 6}),
    ):
        assert drift(recipe, **kw) < 0.5, recipe


def test_differential_privacy_noise_and_accountant(cache, tmp_path):
    from opacus.accountants import RDPAccountant

    from asymvlm.config import ConfigError

    kw = dict(rounds=3, dp_noise_multiplier=1.1, dp_max_norm=0.5, dp_delta=1e-5, client_fraction=0.6)
    state, _ = run(cache, tmp_path / "dp", **kw)
    acc = RDPAccountant()
    for _ in range(3):
        acc.step(noise_multiplier=1.1, sample_rate=3 / 5)
    rec = records(tmp_path / "dp")
    assert rec[-1]["dp_epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)
    assert "client_loss_after" not in rec[-1] and "client_loss" not in rec[-1]  # no per-client values under DP
    assert rec[-1]["dp"]["noise_source"].startswith("os.urandom")
    again, _ = run(cache, tmp_path / "dp2", **kw)  # secure noise: not reproducible from the config
    assert not same(state.params, again.params)
    server = json.loads((tmp_path / "dp" / "checkpoints" / "round-000003" / "server.json").read_text())
    assert server["config"]["dp_insecure_seed"] is None and server["dp_releases"] == 3
    a, _ = run(cache, tmp_path / "t1", dp_insecure_seed=7, **kw)  # the explicit test mode repeats, marked so
    b, _ = run(cache, tmp_path / "t2", dp_insecure_seed=7, **kw)
    assert same(a.params, b.params) and "INSECURE" in records(tmp_path / "t1")[-1]["dp"]["noise_source"]
    with pytest.raises(ConfigError, match="differential privacy cannot be combined with 'krum'"):
        run(cache, tmp_path / "krum", recipe="krum", **kw)
    assert not (tmp_path / "krum" / "checkpoints").exists()


def test_dp_covers_the_lora_factors_and_base_in_the_exact_modes(tmp_path, tiny_open_clip_dir):
    from asymvlm.cache import embed_dataset
    from asymvlm.encoders import load_encoder
    from asymvlm.worlds import shapeworld as sw

    enc = load_encoder(str(tiny_open_clip_dir))
    cache = embed_dataset(enc, sw.generate(40, seed=0), tmp_path / "cache", dtype="float32", progress=False)
    da = DataArguments(cache_dir=str(cache.path), encoder=str(tiny_open_clip_dir), pretrained="")
    out = {}
    for name, noise, seed in (("n0", 0.0, None), ("n1", 1.0, 1), ("n2", 1.0, 2)):
        fed = fed_args(
            tmp_path / name, rounds=1, num_clients=3, trainable="both", lora_mode="residual", lora_r=2,
            local_batch_size=8, eval_every=0, dp_noise_multiplier=noise, dp_insecure_seed=seed, dp_max_norm=1.0,
        )  # fmt: skip
        out[name], _ = run_federated(fed, get_federated_data(da, fed), head=HEAD)
    for k in out["n0"].params:  # noise in every released tensor: head, A and B of every layer
        assert not torch.equal(out["n1"].params[k], out["n2"].params[k]), k
        assert not torch.equal(out["n0"].params[k], out["n1"].params[k]), k
    for layer in out["n0"].base:  # and in the folded base weights
        assert not torch.equal(out["n1"].base[layer], out["n2"].base[layer]), layer


def test_fedprox_and_ghbm_client_terms(cache):
    from asymvlm.batching import IndexBatcher
    from asymvlm.heads import HeadConfig

    g = torch.Generator().manual_seed(1)
    img = torch.nn.functional.normalize(torch.randn(40, 16, generator=g), dim=-1)
    batcher = IndexBatcher(img + 0.0, img, torch.arange(40), 8, 0)
    task = build_client_model(HeadConfig(dim=16, hidden_dims=(8,)), seed=0)
    start = task.get_params()

    def delta(**terms):
        batcher.reseed(0)
        options = ClientOptions(local_steps=3, local_lr=1e-4)
        return client_update(task, start, batcher, options, client_config=terms).delta

    plain = delta()
    prox = delta(proximal={"mu": 1e3})
    assert sum(float(v.norm()) for v in prox.values()) < sum(float(v.norm()) for v in plain.values())
    m = {k: 0.01 * torch.randn(v.shape, generator=g) for k, v in start.items()}
    batcher.reseed(0)
    heavy_ball = {"heavy_ball": {"beta": 0.5, "momentum": m}}
    with_m = client_update(
        task, start, batcher, ClientOptions(local_steps=3, local_lr=1e-4), client_config=heavy_ball
    ).delta
    for k in plain:  # over J steps the momentum term adds -beta * m_t
        torch.testing.assert_close(with_m[k] - plain[k], -0.5 * m[k], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("mode", ["factors", "frozen_a", "stack", "residual", "svd"])
def test_federated_lora_modes_train_and_save(mode, tmp_path, tiny_open_clip_dir):
    from asymvlm.cache import embed_dataset
    from asymvlm.encoders import load_encoder
    from asymvlm.model import AsymVLM
    from asymvlm.worlds import shapeworld as sw

    enc = load_encoder(str(tiny_open_clip_dir))
    cache = embed_dataset(enc, sw.generate(40, seed=0), tmp_path / "cache", dtype="float32", progress=False)
    da = DataArguments(cache_dir=str(cache.path), encoder=str(tiny_open_clip_dir), pretrained="")
    fed = fed_args(
        tmp_path / "run",
        rounds=2,
        num_clients=3,
        trainable="both",
        lora_mode=mode,
        lora_r=2,
        local_batch_size=8,
        eval_every=0,
    )
    data = get_federated_data(da, fed)
    state, task = run_federated(fed, data, head=HEAD)
    rec = records(tmp_path / "run")
    if mode in ("stack", "residual", "svd"):
        assert state.base and all(torch.isfinite(w).all() for w in state.base.values())
        assert "lora_info" in rec[-1]
    else:
        assert not state.base
    if mode == "frozen_a":  # FFA-LoRA: A never moves
        a_keys = [k for k in state.params if ".lora_A." in k]
        first = load_server_state(tmp_path / "run" / "checkpoints" / "round-000001").params
        assert a_keys and all(torch.equal(first[k], state.params[k]) for k in a_keys)
    model_dir = save_federated_model(task, state, data, tmp_path / "model")
    model = AsymVLM.from_pretrained(model_dir)
    emb = model.text_embeddings(["a red circle"])
    assert emb.shape == (1, 32) and torch.isfinite(emb).all()
    if mode in ("stack", "residual", "svd"):
        deltas = load_file(model_dir / "text_base_delta.safetensors")
        assert deltas and all("mlp" in k for k in deltas)


def test_federate_cli(cache, tmp_path, capsys):
    from asymvlm.training.federate import main

    y = tmp_path / "fed.yaml"
    y.write_text(
        f"cache_dir: {cache}\nrecipe: fedadam\nserver_lr: 0.05\nrounds: 2\nnum_clients: 4\nlocal_steps: 2\n"
        f"local_batch_size: 16\nhidden_dims: [16]\nprogress: false\noutput_dir: {tmp_path / 'o'}\n"
    )
    assert main(["--config", str(y)]) == 0
    assert (tmp_path / "o" / "model" / "head.safetensors").is_file()
    assert len(records(tmp_path / "o")) == 2
    assert main(["--config", str(y), "--recipe", "fedsgd"]) == 2
    assert "invalid choice: 'fedsgd'" in capsys.readouterr().err
    y.write_text("rounds: 2\nclients: 4\n")
    assert main(["--config", str(y)]) == 2
    assert "unknown config key(s) ['clients']" in capsys.readouterr().err


def test_federate_overwrite_keeps_the_users_files_inside_model(cache, tmp_path):
    """Issue 26: `asymvlm-federate --overwrite` removed a user's files inside model/; the model folder
    now records what asymvlm wrote (.asymvlm-files.json) and only that goes."""
    from asymvlm.io import owned_entries
    from asymvlm.training.federate import main

    out = tmp_path / "o"
    args = ["--cache_dir", str(cache), "--rounds", "1", "--num_clients", "4", "--local_steps", "1",
            "--local_batch_size", "16", "--hidden_dims", "16", "--progress", "false",
            "--output_dir", str(out)]  # fmt: skip
    assert main(args) == 0
    assert "head.safetensors" in (owned_entries(out / "model") or set())
    (out / "model" / "my-eval.txt").write_text("mine")
    assert main([*args, "--overwrite", "true"]) == 0
    assert (out / "model" / "my-eval.txt").read_text() == "mine"
    assert (out / "model" / "head.safetensors").is_file()


def test_a_used_output_dir_is_refused_overwritten_only_in_our_files_and_resumed_only_by_the_same_run(cache, tmp_path):
    from asymvlm.config import ConfigError

    out = tmp_path / "used"
    run(cache, out, rounds=2)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is not empty"):
        run(cache, out, rounds=2)
    with pytest.raises(ConfigError, match=r"differing keys: recipe \('fedavg' -> 'fedadam'\)"):
        run(cache, out, rounds=3, recipe="fedadam", resume=True)
    with pytest.raises(ConfigError, match="local_lr"):
        run(cache, out, rounds=3, local_lr=0.3, resume=True)
    resumed, _ = run(cache, out, rounds=3, resume=True)  # more rounds of the same run: fine
    assert resumed.round == 3
    (out / "checkpoints" / "round-000002" / "why.txt").write_text("and this")  # a user's file in a round (issue 26)
    fresh, _ = run(cache, out, rounds=1, recipe="fedadam", overwrite=True)
    assert fresh.round == 1 and (out / "notes.txt").read_text() == "mine"  # the user's file survives
    assert (out / "checkpoints" / "round-000002" / "why.txt").read_text() == "and this"
    kept = sorted(p.name for p in (out / "checkpoints" / "round-000002").iterdir())
    assert kept == [".asymvlm-files.json", "why.txt"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["round-000001", "round-000002"]
    assert len(records(out)) == 1
    with pytest.raises(ConfigError, match="exclude each other"):
        fed_args(out, resume=True, overwrite=True)
