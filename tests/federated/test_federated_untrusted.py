"""Issue 26, the federated simulator: nothing it reads is trusted and nothing it reports overstates.

- DP: every round is released and accounted, also one whose Poisson sample is empty (epsilon is
  opacus's over *all* rounds); a seeded (insecure) run says INSECURE next to its epsilon.
- A tampered round checkpoint (NaN, negative second moments, wrong shapes, extra keys, a round out
  of range, wrong types) is one :class:`ArtefactError` naming the file and the field, before any
  training or saving.
- Bad option values are a :class:`ConfigError` naming the option; a round in which every update is
  rejected is reported as making no step, and a run that never stepped saves nothing and fails.
- A non-finite global model is never saved: the round and the key are named.
"""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from asymvlm.config import DataArguments
from asymvlm.errors import ArtefactError, ConfigError, TrainingDiverged
from asymvlm.federated.config import FederatedArguments
from asymvlm.federated.data import get_federated_data
from asymvlm.federated.rounds import run_federated, sample_clients
from asymvlm.heads import HeadConfig

HEAD = HeadConfig(hidden_dims=[8])


@pytest.fixture(scope="module")
def cache(tmp_path_factory, synthetic_cache):
    return synthetic_cache(tmp_path_factory.mktemp("untrusted") / "c", 60)


def fed_args(out, **kw):
    base = dict(
        rounds=2, num_clients=3, local_steps=1, local_batch_size=16, output_dir=str(out), progress=False, eval_every=0
    )
    return FederatedArguments(**{**base, **kw})


def run(cache, out, options=None, **kw):
    fed = fed_args(out, **kw)
    return run_federated(fed, get_federated_data(DataArguments(cache_dir=str(cache)), fed), head=HEAD,
                         recipe_options=options or {})  # fmt: skip


def records(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------
# defect 3: DP accounts every round
# ----------------------------------------------------------------------------------------------
DP = dict(dp_noise_multiplier=1.1, dp_max_norm=0.5, dp_delta=1e-5)


def test_dp_releases_and_accounts_every_round_also_the_empty_ones(cache, tmp_path):
    from opacus.accountants import RDPAccountant

    kw = dict(rounds=8, num_clients=4, clients_per_round=2, seed=6, dp_insecure_seed=3, **DP)
    fed = fed_args(tmp_path / "dp", **kw)
    empty = [r for r in range(8) if not sample_clients(fed, r, poisson=True)[1]["sampled"]]
    assert len(empty) == 2  # Poisson sampling picked nobody in two of the eight rounds
    state, _ = run(cache, tmp_path / "dp", **kw)
    acc = RDPAccountant()
    for _ in range(8):
        acc.step(noise_multiplier=1.1, sample_rate=0.5)
    assert state.dp_releases == 8
    assert state.epsilon == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)  # the 8-step epsilon, not 6
    recs = records(tmp_path / "dp")
    assert all("skipped" not in r and "dp_epsilon" in r for r in recs)
    for rnd in empty:  # a noise-only release: nobody's update, the model still moves by the noise
        assert recs[rnd]["dp"]["participants"] == 0 and "noise only" in recs[rnd]["dp_release"]
    assert all(torch.isfinite(v).all() for v in state.params.values())


def test_min_clients_cannot_skip_rounds_under_dp(tmp_path):
    with pytest.raises(ConfigError, match="min_clients"):
        fed_args(tmp_path, num_clients=4, min_clients=2, **DP)


def test_insecure_dp_says_insecure_next_to_epsilon(cache, tmp_path, capsys):
    from asymvlm.training.federate import main

    out = tmp_path / "o"
    argv = ["--cache_dir", str(cache), "--rounds", "2", "--num_clients", "3", "--local_steps", "1",
            "--local_batch_size", "16", "--hidden_dims", "8", "--progress", "false", "--eval_every", "0",
            "--dp_noise_multiplier", "1.0", "--output_dir", str(out)]  # fmt: skip
    assert main([*argv, "--dp_insecure_seed", "5"]) == 0
    summary = capsys.readouterr().out
    assert "epsilon" in summary and "INSECURE" in summary.split("epsilon", 1)[1]
    lines = (out / "model" / "README.md").read_text().splitlines()
    at = [i for i, line in enumerate(lines) if line.startswith("| dp_epsilon |")]
    assert at and "INSECURE" in lines[at[0] + 1]  # the recipe table: the row right after epsilon's
    assert main([*argv, "--output_dir", str(tmp_path / "secure")]) == 0
    secure = capsys.readouterr().out
    assert "epsilon" in secure and "INSECURE" not in secure
    assert "INSECURE" not in (tmp_path / "secure" / "model" / "README.md").read_text()


# ----------------------------------------------------------------------------------------------
# defect 6: tampered round checkpoints
# ----------------------------------------------------------------------------------------------
LATEST = "checkpoints/round-000002"
W0, B0 = "head.mlp.0.weight", "head.mlp.0.bias"


def _edit_tensors(name):
    def edit(fn):
        def mutate(run_dir):
            path = run_dir / LATEST / name
            tensors = {k: v.clone() for k, v in load_file(path).items()}
            fn(tensors)
            save_file(tensors, path)

        return mutate

    return edit


def _edit_json(fn):
    def mutate(run_dir):
        path = run_dir / LATEST / "server.json"
        doc = json.loads(path.read_text())
        fn(doc)
        path.write_text(json.dumps(doc))

    return mutate


def _set(d, key, value):
    d[key] = value


def _adam(doc):
    return doc["opt_state"]["__list__"][0]["__dict__"]


TAMPER = {
    "params NaN": (_edit_tensors("params.safetensors")(lambda t: t[W0].view(-1).__setitem__(0, float("nan"))),
                   "params.safetensors", W0),
    "params inf": (_edit_tensors("params.safetensors")(lambda t: t["loss_fn.logit_scale"].fill_(float("inf"))),
                   "params.safetensors", "loss_fn.logit_scale"),
    "params wrong shape": (_edit_tensors("params.safetensors")(lambda t: _set(t, B0, torch.zeros(9))),
                           "params.safetensors", B0),
    "params missing key": (_edit_tensors("params.safetensors")(lambda t: t.pop(B0)), "params.safetensors", B0),
    "params extra key": (_edit_tensors("params.safetensors")(lambda t: _set(t, "evil", torch.zeros(2))),
                         "params.safetensors", "evil"),
    "params int dtype": (_edit_tensors("params.safetensors")(lambda t: _set(t, B0, torch.zeros(8, dtype=torch.int64))),
                         "params.safetensors", B0),
    "adam v negative": (_edit_tensors("state.safetensors")(lambda t: t[f"opt/0/v/{W0}"].fill_(-1.0)),
                        "state.safetensors", f"/0/v/{W0}"),
    "adam m NaN": (_edit_tensors("state.safetensors")(lambda t: t[f"opt/0/m/{B0}"].fill_(float("nan"))),
                   "state.safetensors", f"/0/m/{B0}"),
    "adam m wrong shape": (_edit_tensors("state.safetensors")(lambda t: _set(t, f"opt/0/m/{W0}", torch.zeros(3, 3))),
                           "state.safetensors", f"/0/m/{W0}"),
    "unreferenced optimizer tensor": (_edit_tensors("state.safetensors")(lambda t: _set(t, "opt/0/m/evil",
                                                                                           torch.zeros(2))),
                                      "state.safetensors", "evil"),
    "extra base tensor": (_edit_tensors("state.safetensors")(lambda t: _set(t, "base/evil", torch.zeros(2))),
                          "state.safetensors", "base/evil"),
    "round 1000000": (_edit_json(lambda d: _set(d, "round", 1000000)), "server.json", "round"),
    "round null": (_edit_json(lambda d: _set(d, "round", None)), "server.json", "round"),
    "round string": (_edit_json(lambda d: _set(d, "round", "2")), "server.json", "round"),
    "round negative": (_edit_json(lambda d: _set(d, "round", -1)), "server.json", "round"),
    "round bool": (_edit_json(lambda d: _set(d, "round", True)), "server.json", "round"),
    "adam count negative": (_edit_json(lambda d: _set(_adam(d), "count", -5)), "server.json", "count"),
    "adam count null": (_edit_json(lambda d: _set(_adam(d), "count", None)), "server.json", "count"),
    "adam count beyond round": (_edit_json(lambda d: _set(_adam(d), "count", 99)), "server.json", "count"),
    "optimizer skeleton extra key": (_edit_json(lambda d: _set(_adam(d)["m"]["__dict__"], "evil",
                                                               {"__tensor__": f"/0/m/{B0}"})),
                                     "server.json", "evil"),
    "optimizer skeleton dangling tensor": (_edit_json(lambda d: _set(_adam(d)["m"]["__dict__"], B0,
                                                                     {"__tensor__": "/0/m/nowhere"})),
                                           "server.json", "nowhere"),
    "optimizer skeleton other structure": (_edit_json(lambda d: d["opt_state"]["__list__"].pop()),
                                           "server.json", "opt_state"),
    "optimizer skeleton not a node": (_edit_json(lambda d: _set(d, "opt_state", [1, 2])), "server.json", "opt_state"),
    "dp_releases negative": (_edit_json(lambda d: _set(d, "dp_releases", -1)), "server.json", "dp_releases"),
    "epsilon a string": (_edit_json(lambda d: _set(d, "epsilon", "small")), "server.json", "epsilon"),
    "initial_losses a list": (_edit_json(lambda d: _set(d, "initial_losses", [1.0])), "server.json",
                              "initial_losses"),
    "initial_losses NaN": (_edit_json(lambda d: _set(d, "initial_losses", {"0": "NaN"})), "server.json",
                           "initial_losses"),
    "config a list": (_edit_json(lambda d: _set(d, "config", [1])), "server.json", "config"),
}  # fmt: skip


@pytest.fixture(scope="module")
def fedadam_run(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("fedadam") / "run"
    run(cache, out, recipe="fedadam", options={"server_lr": 0.05})
    return out


def _resume(cache, out):
    return run(cache, out, recipe="fedadam", options={"server_lr": 0.05}, rounds=3, resume=True)


def test_an_untouched_checkpoint_resumes(cache, fedadam_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(fedadam_run, out)
    state, _ = _resume(cache, out)
    assert state.round == 3 and all(torch.isfinite(v).all() for v in state.params.values())


@pytest.mark.parametrize("case", list(TAMPER))
def test_a_tampered_checkpoint_is_one_error_naming_file_and_field(cache, fedadam_run, tmp_path, case):
    mutate, filename, field = TAMPER[case]
    out = tmp_path / "run"
    shutil.copytree(fedadam_run, out)
    mutate(out)
    with pytest.raises(ArtefactError) as err:
        _resume(cache, out)
    message = str(err.value)
    assert filename in message and field in message and "\n" not in message, message
    assert not (out / "checkpoints" / "round-000003").exists() and not (out / "model").exists()


# ----------------------------------------------------------------------------------------------
# defect 9: option values; rounds with no step
# ----------------------------------------------------------------------------------------------
BAD_OPTIONS = [
    ("attack_scale", math.inf),
    ("attack_scale", -math.inf),
    ("local_lr", 1e30),
    ("local_lr", math.inf),
    ("local_lr", 0.0),
    ("eval_every", -3),
    ("local_momentum", -0.5),
    ("local_momentum", 1.0),
    ("local_momentum", math.inf),
    ("partition_alpha", 0.0),
    ("partition_alpha", math.inf),
    ("straggler_deadline", -1.0),
    ("straggler_deadline", math.inf),
    ("fairness_batches", 0),
    ("lora_r", 0),
    ("lora_alpha", math.inf),
    ("lora_alpha", 0.0),
    ("dp_delta", 0.0),
    ("dp_delta", 1.0),
    ("min_client_size", 0),
]


@pytest.mark.parametrize("name,value", BAD_OPTIONS)
def test_bad_option_values_are_config_errors_naming_the_option(tmp_path, name, value):
    with pytest.raises(ConfigError, match=name):
        fed_args(tmp_path, **{name: value})


def test_bad_option_on_the_command_line_is_one_line_and_status_2(tmp_path, capsys):
    from asymvlm.training.federate import main

    for flag, value in (("--attack_scale", "inf"), ("--local_lr", "1e30"), ("--eval_every", "-3")):
        assert main([flag, value, "--output_dir", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert flag[2:] in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def _reject_everyone(monkeypatch, rounds=None):
    from asymvlm.errors import ClientUpdateError
    from asymvlm.federated import rounds as mod

    real = mod.check_delta

    def check(params, delta, client):
        if rounds is None or mod_round["now"] in rounds:
            raise ClientUpdateError(f"client {client}: rejected by the test", client)
        return real(params, delta, client)

    real_stacked = mod.check_stacked

    def check_chunk(params, stacked, clients):  # the vectorised clients' validation, chunk by chunk
        if rounds is None or mod_round["now"] in rounds:
            return [f"client {c}: rejected by the test" for c in clients]
        return real_stacked(params, stacked, clients)

    mod_round = {"now": -1}
    real_train = mod.Federation.train_clients

    def train(self, state, active, rnd):
        mod_round["now"] = rnd
        return real_train(self, state, active, rnd)

    monkeypatch.setattr(mod, "check_delta", check)
    monkeypatch.setattr(mod, "check_stacked", check_chunk)
    monkeypatch.setattr(mod.Federation, "train_clients", train)


def test_a_round_with_every_update_rejected_says_it_made_no_step(cache, tmp_path, monkeypatch, capsys):
    from asymvlm.training.federate import main

    _reject_everyone(monkeypatch, rounds={1})
    out = tmp_path / "o"
    argv = ["--cache_dir", str(cache), "--rounds", "3", "--num_clients", "3", "--local_steps", "1",
            "--local_batch_size", "16", "--hidden_dims", "8", "--progress", "false", "--eval_every", "0",
            "--output_dir", str(out)]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    recs = records(out)
    assert recs[1]["skipped"] and not recs[1]["server_step"] and recs[0]["server_step"] and recs[2]["server_step"]
    assert "round 2" in captured.err and "no server step" in captured.err  # logged when it happens
    assert "1 of 3 rounds made no server step (round 2)" in captured.out  # and in the end summary
    server = json.loads((out / "checkpoints" / "round-000003" / "server.json").read_text())
    assert server["skipped_rounds"] == [2]


def test_a_run_in_which_no_round_stepped_saves_no_model_and_fails(cache, tmp_path, monkeypatch, capsys):
    from asymvlm.training.federate import main

    _reject_everyone(monkeypatch)
    out = tmp_path / "o"
    argv = ["--cache_dir", str(cache), "--rounds", "2", "--num_clients", "3", "--local_steps", "1",
            "--local_batch_size", "16", "--hidden_dims", "8", "--progress", "false", "--eval_every", "0",
            "--output_dir", str(out)]  # fmt: skip
    assert main(argv) == 2
    captured = capsys.readouterr()
    last = captured.err.strip().splitlines()[-1]
    assert "no round made a server step" in last and "nothing saved" in last and "saved" not in captured.out
    assert not (out / "model").exists()


# ----------------------------------------------------------------------------------------------
# a non-finite global model is never saved
# ----------------------------------------------------------------------------------------------
def test_a_non_finite_server_step_is_not_taken_and_named_by_round_and_key(cache, tmp_path, monkeypatch):
    from asymvlm.federated import rounds as mod

    real = mod.server_update

    def poisoned(recipe, deltas, weights, state, params, round_index=0, **kw):
        new, opt, info = real(recipe, deltas, weights, state, params, round_index=round_index, **kw)
        if round_index == 1:
            new = {**new, B0: new[B0].clone().fill_(float("inf"))}
        return new, opt, info

    monkeypatch.setattr(mod, "server_update", poisoned)
    state, _ = run(cache, tmp_path / "o", rounds=2)
    rec = records(tmp_path / "o")
    assert not rec[1]["server_step"] and B0 in rec[1]["skipped"] and "not finite" in rec[1]["skipped"]
    assert state.skipped_rounds == [2] and all(torch.isfinite(v).all() for v in state.params.values())
    first = load_file(tmp_path / "o" / "checkpoints" / "round-000001" / "params.safetensors")
    assert all(torch.equal(first[k], state.params[k]) for k in first)  # the state stayed as it was


def test_the_round_checkpoint_refuses_a_non_finite_model_naming_round_and_key(cache, tmp_path, monkeypatch):
    from asymvlm.federated import rounds as mod

    real = mod.Federation._step

    def step(self, state, results, rnd, record):  # a state that bypassed the step's own check
        new = real(self, state, results, rnd, record)
        if rnd == 1:
            new.params = {**new.params, B0: torch.full_like(new.params[B0], float("nan"))}
        return new

    monkeypatch.setattr(mod.Federation, "_step", step)
    with pytest.raises(TrainingDiverged) as err:
        run(cache, tmp_path / "o", rounds=3)
    message = str(err.value)
    assert "round 2" in message and B0 in message and "round-000001" in message
    assert sorted(p.name for p in (tmp_path / "o" / "checkpoints").iterdir()) == ["round-000001"]


def test_save_federated_model_refuses_a_non_finite_model(cache, tmp_path):
    from asymvlm.federated.checkpoint import save_federated_model

    fed = fed_args(tmp_path / "o", rounds=1)
    data = get_federated_data(DataArguments(cache_dir=str(cache)), fed)
    state, model = run_federated(fed, data, head=HEAD)
    state.params[W0] = state.params[W0].clone()
    state.params[W0][0, 0] = float("nan")
    with pytest.raises(TrainingDiverged, match=f"round 1.*{W0}"):
        save_federated_model(model, state, data, tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_an_exact_lora_run_resumes_through_the_checks(tmp_path, tiny_open_clip_dir):
    # the base weights and the server optimizer's state over them pass the live-model checks
    from asymvlm.cache import embed_dataset
    from asymvlm.encoders import load_encoder
    from asymvlm.worlds import shapeworld as sw

    enc = load_encoder(str(tiny_open_clip_dir))
    c = embed_dataset(enc, sw.generate(24, seed=0), tmp_path / "cache", dtype="float32", progress=False)
    da = DataArguments(cache_dir=str(c.path), encoder=str(tiny_open_clip_dir), pretrained="")
    kw = dict(recipe="fedadam", trainable="both", lora_mode="residual", lora_r=2, local_batch_size=8)

    def go(out, stop_after=None, **more):
        fed = fed_args(out, **{**kw, **more})
        data = get_federated_data(da, fed)
        return run_federated(fed, data, head=HEAD, recipe_options={"server_lr": 0.05}, stop_after=stop_after)

    full, _ = go(tmp_path / "full")
    go(tmp_path / "part", stop_after=1)
    resumed, _ = go(tmp_path / "part", resume=True)
    assert resumed.round == 2 and resumed.base
    assert all(torch.equal(full.params[k], resumed.params[k]) for k in full.params)
