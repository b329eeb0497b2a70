"""Whole runs with the issue-29 pieces: vectorised and streamed clients, compressed uploads with
error feedback, participation corrections; each against the sequential loop or a hand computation,
and each resumed bit-identically after a crash."""

import json
from pathlib import Path

import pytest
import torch

from asymvlm.config import DataArguments
from asymvlm.errors import ConfigError
from asymvlm.federated.compression import build_codec
from asymvlm.federated.config import FederatedArguments
from asymvlm.federated.data import get_federated_data
from asymvlm.federated.rounds import Federation, run_federated
from asymvlm.federated.uploads import RESIDUALS
from asymvlm.heads import HeadConfig

HEAD = HeadConfig(hidden_dims=[32], direction="learned")


@pytest.fixture(scope="module")
def cache(tmp_path_factory, synthetic_cache):
    return synthetic_cache(tmp_path_factory.mktemp("scalecache") / "c", 120)


def fed_args(out, **kw):
    base = dict(rounds=4, num_clients=6, local_steps=3, local_batch_size=16, output_dir=str(out), progress=False,
                eval_every=0, local_lr=0.2, local_momentum=0.9)  # fmt: skip
    return FederatedArguments(**{**base, **kw})


def run(cache, out, stop_after=None, **kw):
    fed = fed_args(out, **kw)
    data = get_federated_data(DataArguments(cache_dir=str(cache)), fed)
    logs = []
    state, _ = run_federated(fed, data, head=HEAD, log=logs.append, stop_after=stop_after)
    return state, logs


def records(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def close(a, b, tol):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a) <= tol


@pytest.mark.parametrize("recipe", ["fedavg", "fedadam", "fedprox"])
def test_vectorised_runs_equal_the_sequential_loop(cache, tmp_path, recipe):
    """float32: the batched GEMMs sum in another order, so the runs agree to rounding (4 rounds)."""
    vec, logs = run(cache, tmp_path / "v", recipe=recipe)
    seq, logs1 = run(cache, tmp_path / "s", recipe=recipe, client_batch="1")
    assert close(vec.params, seq.params, 1e-4)
    execution = [e for e in logs if e.get("event") == "client execution"][0]
    assert execution["vectorised"] and not [e for e in logs1 if e.get("event") == "client execution"][0]["vectorised"]
    v, s = records(tmp_path / "v"), records(tmp_path / "s")
    for a, b in zip(v, s):
        assert a["sampled"] == b["sampled"]
        assert a["loss_after"]["mean"] == pytest.approx(b["loss_after"]["mean"], abs=1e-4)


def test_streamed_rounds_equal_the_listed_ones_and_chunks_change_nothing(cache, tmp_path):
    """Streaming (FedAvg, no diagnostics) and chunks of 2 clients give the same model as the
    vectorised round that keeps every delta (diagnostics on): the same additions in the same order."""
    streamed, _ = run(cache, tmp_path / "a")
    chunks, _ = run(cache, tmp_path / "b", client_batch="2")
    listed, _ = run(cache, tmp_path / "c", diagnostics=True)
    assert close(streamed.params, listed.params, 0.0) and close(chunks.params, listed.params, 1e-6)
    a, c = records(tmp_path / "a")[0]["aggregator_info"], records(tmp_path / "c")[0]["aggregator_info"]
    assert a["streamed"] and "streamed" not in c and a["weights"] == c["weights"]


def test_client_batch_n_where_clients_cannot_be_vectorised_is_an_error(cache, tmp_path):
    fed = fed_args(tmp_path / "p", personalize="ditto", client_batch="4")
    data = get_federated_data(DataArguments(cache_dir=str(cache)), fed)
    with pytest.raises(ConfigError, match="client_batch=4: these clients cannot be vectorised: personalised"):
        Federation.build(fed, data, HEAD)


@pytest.mark.parametrize("client_batch", ["auto", "1"])
def test_compressed_uploads_with_error_feedback_resume_exactly(cache, tmp_path, client_batch):
    kw = dict(compression="topk+int8", compression_options='{"topk": {"fraction": 0.05}}', client_batch=client_batch,
              client_fraction=0.5)  # fmt: skip
    full, logs = run(cache, tmp_path / "full", **kw)
    comm = [e for e in logs if e.get("event") == "communication per client and round"][0]
    assert comm["codec"] == "topk+int8" and comm["sent_bytes"] < 0.12 * comm["dense_bytes"]
    params = {k: v for k, v in full.params.items()}
    codec = build_codec("topk+int8", {"topk": {"fraction": 0.05}})
    assert comm["sent_bytes"] == codec.nbytes(params)
    assert records(tmp_path / "full")[0]["upload_bytes"]["per_client"] == comm["sent_bytes"]
    residuals = Path(tmp_path / "full" / RESIDUALS)
    assert residuals.is_dir() and any(residuals.rglob("*.safetensors"))
    run(cache, tmp_path / "crash", stop_after=2, **kw)
    stray = tmp_path / "crash" / RESIDUALS / "client-0" / "round-000003.safetensors"
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"a residual of a round that crashed")
    resumed, _ = run(cache, tmp_path / "crash", resume=True, **kw)
    assert close(resumed.params, full.params, 0.0)
    # the residual changes the run: without error feedback the model differs
    no_ef, _ = run(cache, tmp_path / "noef", **{**kw, "compression_options": '{"topk": {"fraction": 0.05, '
                                                 '"error_feedback": false}}'})  # fmt: skip
    assert not close(no_ef.params, full.params, 1e-6)


def test_vectorised_compression_equals_the_sequential(cache, tmp_path):
    kw = dict(compression="bf16", client_fraction=0.5)
    a, _ = run(cache, tmp_path / "a", **kw)
    b, _ = run(cache, tmp_path / "b", client_batch="1", **kw)
    assert close(a.params, b.params, 1e-3)  # bf16 rounding of nearly equal deltas can differ by one ulp
    c, _ = run(cache, tmp_path / "c", client_fraction=0.5)
    assert not close(a.params, c.params, 0.0)  # the codec acted


def test_participation_correction_runs_and_resumes(cache, tmp_path):
    kw = dict(availability="bernoulli", availability_options='{"p_min": 0.2, "p_max": 0.9}',
              participation_correction="fedau", rounds=5)  # fmt: skip
    full, _ = run(cache, tmp_path / "full", **kw)
    recs = records(tmp_path / "full")
    assert all("omega" in r.get("aggregator_info", {}) for r in recs if r["server_step"])
    run(cache, tmp_path / "crash", stop_after=3, **kw)
    resumed, _ = run(cache, tmp_path / "crash", resume=True, **kw)
    assert close(resumed.params, full.params, 0.0)
    assert torch.equal(resumed.extra["participation"]["omega"], full.extra["participation"]["omega"])


@pytest.mark.parametrize(
    "key,value",
    [("compression", "int8"), ("asynchronous", "fedbuff"), ("availability", "bernoulli"),
     ("participation_correction", "fedau")],
)  # fmt: skip
def test_flower_refuses_what_only_the_simulator_runs(cache, key, value):
    pytest.importorskip("flwr")
    from asymvlm.federated.flower.config import parse_run_config

    with pytest.raises(ConfigError, match=f"{key}={value} is simulated by asymvlm-federate only"):
        parse_run_config({"cache-dir": str(cache), key.replace("_", "-"): value, "num-clients": 16})
