"""Personalised federated learning (issue 28): each method against a transcription of its paper's
client update on a small head, and the run-level guarantees (personal tensors never uploaded,
persistent per-client state, bit-identical resume, per-client evaluation).

References: the transcriptions below are plain autograd + SGD loops written from the papers'
algorithms (FedRep Alg. 1, Ditto Alg. 1, pFedMe Alg. 1), independent of asymvlm's client code;
float32, compared at rtol 1e-5 / atol 1e-6 (the same arithmetic in a different order).
"""

import dataclasses
import json

import numpy as np
import pytest
import torch

from asymvlm.batching import IndexBatcher
from asymvlm.config import DataArguments
from asymvlm.errors import ConfigError
from asymvlm.federated.client import ClientOptions, build_client_model, client_update
from asymvlm.federated.config import FederatedArguments
from asymvlm.federated.data import get_federated_data, split_client_tests
from asymvlm.federated.personal import PERSONALIZERS, ClientJob, make_personalizer, resolve_parts, routed_encode
from asymvlm.federated.personal_run import client_summary
from asymvlm.federated.personal_store import ClientStates
from asymvlm.heads import HeadConfig

HEAD = HeadConfig(dim=8, hidden_dims=(16,), direction="learned")


def _setup(seed=0, n=32, steps=3, lr=0.1):
    model = build_client_model(HEAD, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.nn.functional.normalize(torch.randn(n, 8, generator=g), dim=-1)
    t = torch.nn.functional.normalize(x + 0.3 * torch.randn(n, 8, generator=g), dim=-1)
    batcher = IndexBatcher(t, x, torch.arange(n), batch_size=8, seed=3)
    opts = ClientOptions(local_steps=steps, local_lr=lr, batch_size=8)
    return model, batcher, opts


def _job(model, batcher, opts, params, **kw):
    return ClientJob(model, dict(params), batcher, opts, 0, 32, 7, reseed=lambda name: 100 + len(name), **kw)


def _close(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def _sgd(model, params, batcher, keys, steps, lr, seed, grad_extra=None):
    """Plain SGD on ``keys`` (the others fixed) from ``params``: the transcriptions' building block."""
    batcher.reseed(seed)
    torch.manual_seed(0)
    model.set_params(params)
    named = model.exchanged()
    ps = [named[k] for k in keys]
    for step in range(steps):
        loss = model.batch_loss(batcher.batch(step))
        grads = torch.autograd.grad(loss, ps, allow_unused=True)
        with torch.no_grad():
            for k, p, gr in zip(keys, ps, grads):
                gr = torch.zeros_like(p) if gr is None else gr
                if grad_extra is not None:
                    gr = gr + grad_extra(k, p)
                p.sub_(lr * gr)
    return model.get_params()


def test_parts_resolve_tokens_and_globs_and_reject_what_selects_nothing():
    names = ["head.mlp.0.weight", "head.mlp.0.bias", "head.mlp.2.weight", "head.mlp.2.bias", "loss_fn.logit_scale"]
    assert resolve_parts("@head_first", names) == ["head.mlp.0.bias", "head.mlp.0.weight"]
    last = ["head.mlp.2.bias", "head.mlp.2.weight", "loss_fn.logit_scale"]
    assert resolve_parts("@head_last, loss_fn.*", names) == last
    with pytest.raises(ConfigError, match="'head.mlp.9.\\*' selects no parameter"):
        resolve_parts("head.mlp.9.*", names)
    with pytest.raises(ConfigError, match="@lora_B"):
        resolve_parts("@lora_B", names)
    with pytest.raises(ConfigError, match="nothing would be shared"):
        make_personalizer("fedper", {"parts": "*"}).personal_keys(names)
    with pytest.raises(ConfigError, match="unknown option 'mu'"):
        make_personalizer("ditto", {"mu": 1.0})
    assert set(PERSONALIZERS) >= {"none", "local_ft", "fedper", "lg_fedavg", "fedsa_lora", "fedrep", "ditto", "pfedme"}


@pytest.mark.parametrize("method,layer", [("fedper", "head.mlp.2."), ("lg_fedavg", "head.mlp.0.")])
def test_partial_personalisation_trains_everything_uploads_the_shared_part_and_keeps_the_rest(method, layer):
    model, batcher, opts = _setup()
    w = model.get_params()
    mine0 = {k: v + 0.01 for k, v in w.items() if k.startswith(layer)}
    p = make_personalizer(method)
    batcher.reseed(7)
    res, mine = p.client_round(_job(model, batcher, opts, w), mine0)
    keys = sorted(mine0)
    assert sorted(mine) == keys and not set(res.delta) & set(keys)
    # transcription: SGD on all parameters from (global shared, own personal)
    ref = _sgd(model, {**w, **mine0}, batcher, model.trained_names(), opts.local_steps, opts.local_lr, seed=7)
    _close(mine, {k: ref[k] for k in keys})
    _close(res.delta, {k: ref[k] - w[k] for k in w if k not in keys})


def test_fedrep_trains_the_head_then_the_body():
    model, batcher, opts = _setup()
    w = model.get_params()
    p = make_personalizer("fedrep", {"head_steps": 4})
    batcher.reseed(7)
    res, mine = p.client_round(_job(model, batcher, opts, w), None)
    head = ["head.mlp.2.bias", "head.mlp.2.weight"]
    body = [k for k in model.trained_names() if k not in head]
    mid = _sgd(model, w, batcher, head, 4, opts.local_lr, seed=7)  # phase 1: the personal head, body frozen
    end = _sgd(model, mid, batcher, body, opts.local_steps, opts.local_lr, seed=100 + len("fedrep_body"))
    _close(mine, {k: mid[k] for k in head})
    _close(res.delta, {k: end[k] - w[k] for k in body})


def test_ditto_uploads_the_global_update_and_pulls_its_personal_model():
    model, batcher, opts = _setup()
    w = model.get_params()
    v0 = {k: x + 0.05 for k, x in w.items()}
    p = make_personalizer("ditto", {"lam": 0.5, "personal_steps": 5, "personal_lr": 0.2})
    batcher.reseed(7)
    res, v = p.client_round(_job(model, batcher, opts, w), v0)
    batcher.reseed(7)
    plain = client_update(model, w, batcher, opts, seed=7)  # the upload does not depend on the personal model
    _close(res.delta, plain.delta)
    ref = _sgd(
        model, v0, batcher, model.trained_names(), 5, 0.2, seed=100 + len("personal"),
        grad_extra=lambda k, x: 0.5 * (x - w[k]),
    )  # fmt: skip
    _close(v, ref)
    assert p.client_model(_job(model, batcher, opts, w), v) == v


def test_pfedme_matches_its_algorithm():
    model, batcher, opts = _setup(steps=2, lr=0.05)
    w = model.get_params()
    lam, k_inner, plr = 5.0, 3, 0.02
    p = make_personalizer("pfedme", {"lam": lam, "inner_steps": k_inner, "personal_lr": plr})
    batcher.reseed(7)
    res, theta = p.client_round(_job(model, batcher, opts, w), None)
    # transcription of Dinh et al. 2020, Algorithm 1 (one client, R = local_steps)
    batcher.reseed(7)
    model.set_params(w)
    names = model.trained_names()
    named = model.exchanged()
    th = [named[k] for k in names]
    local = [x.detach().clone() for x in th]
    for step in range(opts.local_steps):
        batch = batcher.batch(step)
        for _ in range(k_inner):
            grads = torch.autograd.grad(model.batch_loss(batch), th)
            with torch.no_grad():
                for x, gr, lw in zip(th, grads, local):
                    x -= plr * (gr + lam * (x - lw))
        with torch.no_grad():
            for x, lw in zip(th, local):
                lw -= opts.local_lr * lam * (lw - x)
    _close(theta, model.get_params())
    _close(res.delta, {k: lw - w[k] for k, lw in zip(names, local)})


def test_local_finetuning_personalises_only_at_evaluation():
    model, batcher, opts = _setup()
    w = model.get_params()
    p = make_personalizer("local_ft", {"steps": 6, "lr": 0.3})
    batcher.reseed(7)
    res, mine = p.client_round(_job(model, batcher, opts, w), None)
    assert mine is None
    got = p.client_model(_job(model, batcher, opts, w), None)
    ref = _sgd(model, w, batcher, model.trained_names(), 6, 0.3, seed=100 + len("finetune"))
    _close(got, ref)


def test_kappa_routing_picks_the_head_more_concentrated_than_usual():
    model, batcher, _ = _setup()
    w = model.get_params()
    # the personal head: the global one with the concentration's last layer scaled (a different head)
    v = {k: (x * 1.5 if k == "head.mlp.2.weight" else x) for k, x in w.items()}
    encode = routed_encode(model, w, v, batcher.text)
    text = batcher.text[:10]
    loc, kappa = encode(text)
    from asymvlm.federated.personal import encode_with

    (lg, kg), (lp, kp) = encode_with(model, w)(text), encode_with(model, v)(text)
    rg = torch.log(encode_with(model, w)(batcher.text)[1]).median()
    rp = torch.log(encode_with(model, v)(batcher.text)[1]).median()
    use_p = (torch.log(kp) - rp) >= (torch.log(kg) - rg)
    assert 0 < int(use_p.sum()) < 10  # both heads answer some queries here
    torch.testing.assert_close(kappa, torch.where(use_p, kp, kg))
    torch.testing.assert_close(loc, torch.where(use_p[:, None], lp, lg))
    same = routed_encode(model, w, w, batcher.text)(text)  # identical heads: ties go to the personal one
    torch.testing.assert_close(same[1], kg)


def test_client_state_store_is_atomic_per_round_and_rolls_back(tmp_path):
    store = ClientStates(tmp_path)
    for r in (1, 2, 3):
        store.save(0, r, {"w": torch.full((2,), float(r))})
    store.save(1, 2, {"w": torch.zeros(2)})
    assert store.load(0, upto=2)["w"].tolist() == [2.0, 2.0]
    assert sorted(p.name for p in store.rollback(2)) == ["round-000003.safetensors"]
    fresh = ClientStates(tmp_path)  # another process: read from disk
    assert fresh.load(0, upto=5)["w"].tolist() == [2.0, 2.0] and fresh.load(1, upto=1) is None
    fresh.prune(2)
    assert sorted(p.name for p in (tmp_path / "client-0").iterdir()) == ["round-000002.safetensors"]
    (tmp_path / "client-0" / "round-000002.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(Exception, match="client 0's personal state"):
        ClientStates(tmp_path).load(0, upto=2)


def test_client_summary_and_test_split():
    s = client_summary({str(k): {"R@1": v, "auroc": float("nan") if k == 0 else v} for k, v in enumerate(range(20))})
    assert s["R@1"]["mean"] == pytest.approx(9.5) and s["R@1"]["worst10"] == 0.5
    assert s["R@1"]["std"] == pytest.approx(np.std(np.arange(20)), abs=1e-12)
    assert s["auroc"]["min"] == 1.0  # the NaN client is left out
    parts = [np.arange(0, 10), np.arange(10, 13), np.arange(13, 30)]
    train, test = split_client_tests(parts, 0.3, seed=1)
    for p, a, b in zip(parts, train, test):
        assert sorted([*a, *b]) == p.tolist() and len(a) >= 1 and len(b) == min(len(p) - 1, max(1, round(0.3 * len(p))))
    with pytest.raises(ConfigError, match="needs at least 2"):
        split_client_tests([np.arange(1)], 0.5, seed=0)


# ------------------------------------------------------------------------------------------------
# runs: uploads, persistence, resume, per-client evaluation
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cache(tmp_path_factory, synthetic_cache):
    return synthetic_cache(tmp_path_factory.mktemp("personalcache") / "c", 60)


def _fed(out, **kw):
    base = dict(
        num_clients=4, local_batch_size=8, local_steps=2, rounds=3, progress=False, eval_every=1, output_dir=str(out),
        client_test_fraction=0.25, client_fraction=0.75,
    )  # fmt: skip
    return FederatedArguments(**{**base, **kw})


def _run(cache, fed, **kw):
    from asymvlm.federated.rounds import run_federated
    from asymvlm.training.client_eval import client_evaluator

    data = get_federated_data(DataArguments(cache_dir=str(cache)), fed)
    head = dataclasses.replace(HEAD, dim=data.dim)
    return run_federated(fed, data, head=head, evaluate_client=client_evaluator(data.tests), **kw)


@pytest.mark.parametrize("method", ["fedper", "lg_fedavg", "fedrep", "ditto", "pfedme", "kappa_route"])
def test_no_personal_tensor_is_ever_uploaded(method, cache, tmp_path, monkeypatch):
    from asymvlm.federated import rounds

    uploads = []
    real = rounds.Federation.validate

    def spy(self, state, results):
        uploads.extend({k: v.clone() for k, v in r.delta.items()} for r in results)
        return real(self, state, results)

    monkeypatch.setattr(rounds.Federation, "validate", spy)
    state, _ = _run(cache, _fed(tmp_path / method, personalize=method))
    store = ClientStates(tmp_path / method / "clients")
    keys = make_personalizer(method).personal_keys(list(state.params))
    assert uploads and all(not set(u) & set(keys) for u in uploads)
    if keys:  # the server never stepped a personal part: its copy is the initial one
        first = build_client_model(dataclasses.replace(HEAD, dim=16), seed=0).get_params()
        assert all(torch.equal(state.params[k], first[k]) for k in keys)
    assert store.clients()  # the states persisted on the clients' side
    personal = [store.load(c, upto=3) for c in store.clients()]
    for u in uploads:  # no upload carries a personal tensor's values
        for s in personal:
            for k, v in s.items():
                assert k not in u or not torch.equal(u[k], v - state.params[k])


def test_ditto_uploads_what_fedavg_uploads(cache, tmp_path):
    a, _ = _run(cache, _fed(tmp_path / "avg"))
    b, _ = _run(cache, _fed(tmp_path / "ditto", personalize="ditto"))
    assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)


@pytest.mark.parametrize("method", ["fedrep", "ditto"])
def test_a_crashed_personal_run_resumes_bit_identically(method, cache, tmp_path):
    full, _ = _run(cache, _fed(tmp_path / "full", personalize=method))
    _run(cache, _fed(tmp_path / "cut", personalize=method), stop_after=2)
    store = ClientStates(tmp_path / "cut" / "clients")
    # a crash after a client saved round 3's state but before the server's checkpoint of round 3
    c = store.clients()[0]
    store.save(c, 3, {k: v + 1 for k, v in store.load(c, upto=2).items()})
    resumed, _ = _run(cache, _fed(tmp_path / "cut", personalize=method, resume=True))
    assert all(torch.equal(full.params[k], resumed.params[k]) for k in full.params)
    a, b = ClientStates(tmp_path / "full" / "clients"), ClientStates(tmp_path / "cut" / "clients")
    assert a.clients() == b.clients()
    for c in a.clients():
        sa, sb = a.load(c, upto=3), b.load(c, upto=3)
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    ra = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert ra[-1]["client_metrics"] == rb[-1]["client_metrics"]


def test_per_client_evaluation_reports_every_client(cache, tmp_path):
    from asymvlm.training.client_eval import client_evaluator

    fed = _fed(tmp_path / "eval", personalize="ditto", rounds=1)
    state, model = _run(cache, fed)
    rec = [json.loads(x) for x in (tmp_path / "eval" / "metrics.jsonl").read_text().splitlines()][-1]
    assert sorted(rec["client_metrics"]) == ["global", "personal"]
    assert sorted(rec["client_metrics"]["global"], key=int) == ["0", "1", "2", "3"]
    # the reference: the global model's R@1 on client 2's split, by hand
    data = get_federated_data(DataArguments(cache_dir=str(cache)), fed)
    t = data.tests
    model.set_params(state.params)
    with torch.no_grad():
        q = model.head(t.texts[2])
    scores = q.loc @ t.images.T
    own = scores.gather(1, t.image_index[2][:, None])
    hits = (scores > own).sum(1) == 0
    assert rec["client_metrics"]["global"]["2"]["R@1"] == pytest.approx(float(hits.double().mean()), abs=1e-12)
    assert client_evaluator(t)(2, lambda x: (q.loc, q.concentration))["R@1"] == pytest.approx(
        float(hits.double().mean()), abs=1e-12
    )
    assert rec["client_eval"]["personal"]["R@1"]["mean"] == pytest.approx(
        np.mean([v["R@1"] for v in rec["client_metrics"]["personal"].values()]), abs=1e-12
    )


def test_personalisation_refuses_what_it_cannot_do(tmp_path):
    with pytest.raises(ConfigError, match="differential privacy"):
        _fed(tmp_path, personalize="ditto", dp_noise_multiplier=1.0)
    with pytest.raises(ConfigError, match="unknown option 'lamb'"):
        _fed(tmp_path, personalize="ditto", personalize_options='{"lamb": 1}')
    with pytest.raises(ConfigError, match="client_test_fraction must be in"):
        _fed(tmp_path, client_test_fraction=1.0)
    from asymvlm.federated.personal_run import PersonalRun

    model = build_client_model(HEAD, seed=0)
    from asymvlm.federated.recipes import make_recipe

    with pytest.raises(ConfigError, match="local_lr x lam = 3 must be < 2"):
        PersonalRun.build(_fed(tmp_path, personalize="pfedme", local_lr=0.2), model, make_recipe("fedavg"), None)
    fed = _fed(tmp_path, personalize="pfedme")
    with pytest.raises(ConfigError, match="client terms"):
        PersonalRun.build(fed, model, make_recipe("fedprox", proximal_mu=0.1), None)


def test_fedsa_lora_shares_a_and_keeps_b_on_the_clients(tmp_path, tiny_open_clip_dir, monkeypatch):
    from asymvlm.cache import embed_dataset
    from asymvlm.encoders import load_encoder
    from asymvlm.federated import rounds
    from asymvlm.federated.rounds import run_federated
    from asymvlm.worlds import shapeworld as sw

    enc = load_encoder(str(tiny_open_clip_dir))
    cache = embed_dataset(enc, sw.generate(40, seed=0), tmp_path / "cache", dtype="float32", progress=False)
    da = DataArguments(cache_dir=str(cache.path), encoder=str(tiny_open_clip_dir), pretrained="")
    uploads = []
    real = rounds.Federation.validate
    monkeypatch.setattr(
        rounds.Federation,
        "validate",
        lambda self, s, rs: (uploads.extend(sorted(r.delta) for r in rs), real(self, s, rs))[1],
    )
    fed = FederatedArguments(
        num_clients=3, rounds=2, local_steps=2, local_batch_size=8, progress=False, eval_every=0, trainable="lora",
        lora_mode="factors", lora_r=2, output_dir=str(tmp_path / "run"), personalize="fedsa_lora",
    )  # fmt: skip
    state, _ = run_federated(fed, get_federated_data(da, fed), head=HeadConfig(dim=32, hidden_dims=(16,)))
    b_keys = [k for k in state.params if ".lora_B." in k]
    assert (
        b_keys
        and uploads
        and all(not any(".lora_B." in k for k in u) and any(".lora_A." in k for k in u) for u in uploads)
    )
    store = ClientStates(tmp_path / "run" / "clients")
    own = [store.load(c, upto=2) for c in range(3)]
    assert all(sorted(o) == sorted(b_keys) for o in own)
    assert any(float(o[k].abs().max()) > 0 for o in own for k in b_keys)  # B trained on the clients
    assert all(float(state.params[k].abs().max()) == 0 for k in b_keys)  # the server's B is its zero init
    with pytest.raises(ConfigError, match="lora_mode factors"):
        from asymvlm.federated.personal_run import PersonalRun
        from asymvlm.federated.recipes import make_recipe

        bad = dataclasses.replace(fed, lora_mode="residual")
        model = build_client_model(HeadConfig(dim=32, hidden_dims=(16,)))
        model.get_params = lambda: {k: v for k, v in state.params.items()}
        PersonalRun.build(bad, model, make_recipe("fedavg"), None)


def test_the_command_writes_the_per_client_report_and_the_diagnostics_plot(cache, tmp_path, capsys):
    from PIL import Image

    from asymvlm.training.federate import main

    out = tmp_path / "cli"
    args = ["--cache_dir", str(cache), "--rounds", "2", "--num_clients", "4", "--local_steps", "1",
            "--local_batch_size", "8", "--hidden_dims", "16", "--progress", "false", "--output_dir", str(out),
            "--personalize", "fedper", "--client_test_fraction", "0.25", "--diagnostics", "true"]  # fmt: skip
    assert main(args) == 0
    written = json.loads((out / "clients.json").read_text())
    assert written["round"] == 2 and written["client_eval"]["personal"] == client_summary(
        written["client_metrics"]["personal"]
    )
    assert Image.open(out / "clients.png").format == Image.open(out / "diagnostics.png").format == "PNG"
    assert "personal client R@1 mean" in capsys.readouterr().err
    assert main(["--list_personalizers"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in ("fedrep", "pfedme", "kappa_route", "ifca", "cfl", "fedem", "mocha"))


def test_a_repeated_caption_is_right_about_every_image_it_was_written_for():
    from asymvlm.federated.data import _client_tests
    from asymvlm.training.client_eval import client_evaluator

    images = torch.eye(4)
    owner = torch.tensor([0, 0, 1, 1, 2, 3])  # caption rows -> images; two captions per image for 0 and 1
    text = torch.nn.functional.normalize(torch.rand(6, 4) + 0.1, dim=-1)
    captions = ["a red shape", "a big red square", "a red shape", "a small red circle", "x", "y"]
    tests = _client_tests([np.array([0, 1]), np.array([2, 3])], owner, images, text, None, captions)
    # client 0's captions: rows 0-3; "a red shape" (rows 0 and 2) was written for images 0 and 1
    assert tests.positives[0].tolist() == [[True, True, False, False], [True, False, False, False],
                                           [True, True, False, False], [False, True, False, False]]  # fmt: skip
    # a model that answers every query with image 1: right for "a red shape" (both rows) and row 3
    evaluate = client_evaluator(tests)
    always_one = lambda t: (images[[1] * len(t)], torch.ones(len(t)))  # noqa: E731
    got = evaluate(0, always_one)
    assert got["R@1"] == 0.5 and got["caption_R@1"] == 0.75


@pytest.mark.parametrize("setting", [{"personalize": "ditto"}, {"cluster": "ifca"}])
def test_lora_clients_personalise_and_cluster(setting, tmp_path, tiny_open_clip_dir):
    from asymvlm.cache import embed_dataset
    from asymvlm.encoders import load_encoder
    from asymvlm.federated.rounds import run_federated
    from asymvlm.worlds import shapeworld as sw

    enc = load_encoder(str(tiny_open_clip_dir))
    cache = embed_dataset(enc, sw.generate(40, seed=0), tmp_path / "cache", dtype="float32", progress=False)
    da = DataArguments(cache_dir=str(cache.path), encoder=str(tiny_open_clip_dir), pretrained="")
    fed = FederatedArguments(
        num_clients=3, rounds=2, local_steps=2, local_batch_size=8, progress=False, eval_every=0, trainable="both",
        lora_mode="factors", lora_r=2, output_dir=str(tmp_path / "run"), **setting,
    )  # fmt: skip
    state, _ = run_federated(fed, get_federated_data(da, fed), head=HeadConfig(dim=32, hidden_dims=(16,)))
    lora = [k for k in state.params if ".lora_B." in k]
    assert lora
    if "personalize" in setting:  # every client's personal model holds its own LoRA factors
        own = ClientStates(tmp_path / "run" / "clients").load(0, upto=2)
        assert set(lora) <= set(own) and any(not torch.equal(own[k], state.params[k]) for k in lora)
    else:  # each cluster model carries LoRA factors of its own
        models = state.extra["models"]
        assert len(models) == 2 and all(set(lora) <= set(m) for m in models)
