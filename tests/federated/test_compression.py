"""Compressed uploads (asymvlm.federated.compression): decode(encode(x)) against float64 references
and numpy transcriptions, the error-feedback invariant, batched == per client, bytes by hand, and
bad configs / inputs / payloads rejected with the key named. Tolerances are stated at each assert."""

import json
import math

import numpy as np
import pytest
import torch

from asymvlm.errors import ClientUpdateError, ConfigError, InputError
from asymvlm.federated.compression import COMPRESSORS, Payload, build_codec, compress_results

A_KEY = "peft_model.base_model.model.layer.q.lora_A.default.weight"
B_KEY = "peft_model.base_model.model.layer.q.lora_B.default.weight"
SHAPES = {"head.w": (7, 9), "head.b": (7,), "loss_fn.logit_scale": (), A_KEY: (4, 16), B_KEY: (12, 4)}


def make_delta(seed, shapes=None, dtype=torch.float32, zero=(A_KEY,)):
    """Random deltas with distinct magnitudes (no top-k ties); the frozen A deltas are zero."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in (shapes or SHAPES).items():
        n = math.prod(shape)
        mags = (torch.rand(n, generator=g, dtype=torch.float64) + 0.01) * (1 + torch.arange(n) * 1e-3)
        signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
        out[k] = (mags * signs).reshape(shape).to(dtype) * (0 if k in zero else 1)
    return out


def numel(d):
    return sum(v.numel() for v in d.values())


# ----------------------------------------------------------------------------------------------
# identity and casts
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["none", "", " none "])
def test_none_is_the_identity_at_4_bytes_a_value(spec):
    codec = build_codec(spec)
    delta = make_delta(0)
    payload, res = codec.encode(delta)
    assert codec.spec == "none" and not codec.stateful and res is None
    assert set(payload.tensors) == {f"{k}::values" for k in delta}
    assert all(t.dim() == 1 for t in payload.tensors.values())
    assert payload.nbytes == 4 * numel(delta) == codec.nbytes(delta)
    out = codec.decode(payload, delta)
    assert all(torch.equal(out[k], delta[k]) and out[k].shape == delta[k].shape for k in delta)


@pytest.mark.parametrize("spec,bound", [("fp16", 2.0**-11), ("bf16", 2.0**-8)])
def test_casts_bound_the_relative_error_and_cost_2_bytes(spec, bound):
    g = torch.Generator().manual_seed(1)
    n = 5000  # magnitudes 2^-10 .. 2^10: fp16's normal range (>= 2^-14)
    x = (2.0 ** (torch.rand(n, generator=g, dtype=torch.float64) * 20 - 10)) * torch.where(
        torch.rand(n, generator=g) < 0.5, -1.0, 1.0
    ).double()
    delta = {"w": x.float().reshape(50, 100)}
    codec = build_codec(spec)
    payload, _ = codec.encode(delta)
    assert payload.tensors["w::values"].dtype == (torch.float16 if spec == "fp16" else torch.bfloat16)
    assert payload.nbytes == 2 * n
    ref = delta["w"].double()
    out = codec.decode(payload, delta)["w"]
    assert out.dtype == torch.float32
    rel = ((out.double() - ref).abs() / ref.abs()).max().item()
    assert rel <= bound  # round to nearest: half an ulp of the target's significand, exact bound
    assert rel > bound / 8  # and the cast really happened


def test_fp16_overflow_names_the_key_and_bf16_carries_it():
    delta = {"head.w": torch.tensor([1.0, 7.0e4])}
    with pytest.raises(InputError, match="'head.w'.*fp16 range"):
        build_codec("fp16").encode(delta)
    payload, _ = build_codec("bf16").encode(delta)
    assert build_codec("bf16").decode(payload, delta)["head.w"][1].item() == pytest.approx(7.0e4, rel=2**-8)


# ----------------------------------------------------------------------------------------------
# int8 against a numpy transcription
# ----------------------------------------------------------------------------------------------
def int8_numpy(x32, block):
    """Blockwise absmax int8 written out in numpy float32: (q, scale per block)."""
    flat = x32.reshape(-1)
    n = flat.size
    nb = -(-n // block)
    padded = np.zeros(nb * block, np.float32)
    padded[:n] = flat
    blocks = padded.reshape(nb, block)
    scale = (np.abs(blocks).max(axis=1) / np.float32(127)).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1))
    q = np.clip(np.round(blocks / safe[:, None]), -127, 127).astype(np.int8)
    return q.reshape(-1)[:n], scale


@pytest.mark.parametrize("block", [1, 5, 16, 256])
def test_int8_matches_numpy_and_bounds_the_error_per_block(block):
    delta = make_delta(2, {"w": (13, 11), "s": ()})
    delta["w"][0, :7] = 0.0  # an all-zero block when block <= 7: scale 0, decoded 0
    codec = build_codec("int8", {"int8": {"block": block}})
    payload, res = codec.encode(delta)
    assert res is None
    for k, x in delta.items():
        q, scale = int8_numpy(x.numpy(), block)
        assert np.array_equal(payload.tensors[f"{k}::values"].numpy(), q)  # same float32 ops: exact
        assert np.array_equal(payload.tensors[f"{k}::scale"].numpy(), scale)
        out = codec.decode(payload, delta)[k].double().reshape(-1)
        err = (out - x.double().reshape(-1)).abs().numpy()
        per_entry = np.repeat(scale.astype(np.float64), block)[: x.numel()]
        assert np.all(err <= per_entry / 2 * (1 + 2**-20))  # |x - q s| <= s/2 up to float32 rounding of x/s, q*s
        assert np.all(err[per_entry == 0] == 0)
    n = 13 * 11
    assert payload.nbytes == (n + 4 * math.ceil(n / block)) + (1 + 4) == codec.nbytes(delta)


# ----------------------------------------------------------------------------------------------
# top-k
# ----------------------------------------------------------------------------------------------
def topk_numpy(x, k):
    return np.sort(np.argsort(-np.abs(x), kind="stable")[:k])


@pytest.mark.parametrize("fraction", [0.01, 0.07, 0.1, 0.5, 1.0])
def test_topk_keeps_the_numpy_top_k_exactly_and_zeroes_the_rest(fraction):
    delta = make_delta(3, {"a": (100,), "b": (7, 9), "c": ()})
    codec = build_codec("topk", {"topk": {"fraction": fraction, "error_feedback": False}})
    payload, res = codec.encode(delta)
    assert res is None and not codec.stateful
    out = codec.decode(payload, delta)
    expected_bytes = 0
    for k, x in delta.items():
        n = x.numel()
        kk = min(n, max(1, math.ceil(round(fraction * n, 9))))
        keep = topk_numpy(x.reshape(-1).double().numpy(), kk)
        flat = out[k].reshape(-1)
        mask = np.zeros(n, bool)
        mask[keep] = True
        assert torch.equal(flat[torch.from_numpy(mask)], x.reshape(-1)[torch.from_numpy(mask)])  # kept: exact
        assert bool((flat[torch.from_numpy(~mask)] == 0).all())  # dropped: zero
        if kk < n:
            idx = payload.tensors[f"{k}::index"]
            assert idx.dtype == torch.int32 and np.array_equal(idx.numpy(), keep)  # increasing positions
        else:
            assert f"{k}::index" not in payload.tensors  # k = n: dense, no positions
        expected_bytes += 4 * kk + (4 * kk if kk < n else 0)
    assert payload.nbytes == expected_bytes == codec.nbytes(delta)
    if fraction == 0.07:
        assert payload.tensors["a::values"].numel() == 7  # 0.07 * 100 keeps 7, not ceil(7.000000000000001)


def test_global_topk_selects_over_the_whole_update_in_sorted_key_order():
    delta = make_delta(4, {"z": (40,), "a": (5, 6), "m": ()})
    codec = build_codec("topk", {"topk": {"fraction": 0.1, "scope": "global"}})
    payload, res = codec.encode(delta)
    keys = sorted(delta)
    flat = np.concatenate([delta[k].reshape(-1).double().numpy() for k in keys])
    kk = math.ceil(0.1 * flat.size)
    keep = topk_numpy(flat, kk)
    assert set(payload.tensors) == {"@all::values", "@all::index"}
    assert np.array_equal(payload.tensors["@all::index"].numpy(), keep)
    assert payload.nbytes == 8 * kk == codec.nbytes(delta)
    out = codec.decode(payload, delta)
    got = np.concatenate([out[k].reshape(-1).double().numpy() for k in keys])
    ref = np.zeros_like(flat)
    ref[keep] = flat[keep]
    assert np.array_equal(got, ref)
    assert all(torch.equal(res[k], delta[k] - out[k]) for k in delta)  # what was not sent stays


# ----------------------------------------------------------------------------------------------
# error feedback
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec,options,dtype,tol",
    [
        ("topk", {"topk": {"fraction": 0.2}}, torch.float64, 1e-12),
        ("topk", {"topk": {"fraction": 0.05, "scope": "global"}}, torch.float64, 1e-12),
        ("topk+int8", {"topk": {"fraction": 0.3}, "int8": {"block": 8}}, torch.float32, 1e-5),
        ("topk+bf16", {"topk": {"fraction": 0.3}}, torch.float32, 1e-5),
    ],
)
def test_error_feedback_sent_plus_residual_is_the_sum_of_the_raw_deltas(spec, options, dtype, tol):
    codec = build_codec(spec, options)
    assert codec.stateful
    shapes = {"head.w": (7, 9), "head.b": (7,), "loss_fn.logit_scale": ()}
    residual, sent_sum, raw_sum = None, None, None
    for rnd in range(6):
        delta = make_delta(10 + rnd, shapes, dtype)
        payload, new = codec.encode(delta, residual)
        out = codec.decode(payload, delta)
        if residual is None:  # first round: the residual is what was not sent
            assert all(torch.equal(new[k], delta[k] - out[k]) for k in delta)
        residual = new
        sent_sum = {k: out[k].double() + (sent_sum[k] if sent_sum else 0) for k in delta}
        raw_sum = {k: delta[k].double() + (raw_sum[k] if raw_sum else 0) for k in delta}
    for k in shapes:
        gap = (sent_sum[k] + residual[k].double() - raw_sum[k]).abs().max().item()
        assert gap <= tol * (1 + raw_sum[k].abs().max().item())  # telescoping sum, up to float rounding


def test_no_error_feedback_means_no_state_and_a_residual_is_refused():
    codec = build_codec("topk", {"topk": {"error_feedback": False}})
    delta = make_delta(5, {"w": (10,)})
    assert codec.encode(delta)[1] is None
    with pytest.raises(InputError, match="keeps no residual"):
        codec.encode(delta, {"w": torch.zeros(10)})
    ef = build_codec("topk")
    with pytest.raises(InputError, match="residual key 'v'"):
        ef.encode(delta, {"v": torch.zeros(10)})
    with pytest.raises(InputError, match="residual key 'w'"):
        ef.encode(delta, {"w": torch.zeros(11)})


# ----------------------------------------------------------------------------------------------
# composition
# ----------------------------------------------------------------------------------------------
def test_topk_then_int8_quantises_the_kept_values_in_position_order():
    delta = make_delta(6, {"w": (20, 10)})
    block, fraction = 16, 0.15
    options = {"topk": {"fraction": fraction, "error_feedback": False}, "int8": {"block": block}}
    codec = build_codec("topk+int8", options)
    payload, _ = codec.encode(delta)
    x = delta["w"].reshape(-1).numpy()
    kk = math.ceil(fraction * x.size)
    keep = topk_numpy(x.astype(np.float64), kk)
    q, scale = int8_numpy(x[keep], block)  # the kept values, in increasing position, blockwise
    assert np.array_equal(payload.tensors["w::index"].numpy(), keep)
    assert np.array_equal(payload.tensors["w::values"].numpy(), q)
    assert np.array_equal(payload.tensors["w::scale"].numpy(), scale)
    out = codec.decode(payload, delta)["w"].reshape(-1).double().numpy()
    per_entry = np.repeat(scale.astype(np.float64), block)[:kk]
    assert np.all(np.abs(out[keep] - x[keep]) <= per_entry / 2 * (1 + 2**-20))  # int8 bound on kept
    dropped = np.ones(x.size, bool)
    dropped[keep] = False
    assert np.all(out[dropped] == 0)
    assert payload.nbytes == kk + 4 * math.ceil(kk / block) + 4 * kk == codec.nbytes(delta)


# ----------------------------------------------------------------------------------------------
# lora_b: only the trainable factor travels
# ----------------------------------------------------------------------------------------------
def test_lora_b_drops_exactly_the_frozen_a_keys_and_decodes_them_as_zeros():
    delta = make_delta(7)
    codec = build_codec("lora_b+bf16", frozen_keys=[A_KEY, "not.exchanged"])
    payload, _ = codec.encode(delta)
    assert payload.meta["dropped"] == [A_KEY]
    assert payload.meta["keys"] == sorted(k for k in delta if k != A_KEY)
    assert not any(name.startswith(A_KEY) for name in payload.tensors)
    assert payload.nbytes == 2 * (numel(delta) - 64) == codec.nbytes(delta)  # A (4x16) costs 0 bytes
    out = codec.decode(payload, delta)
    assert set(out) == set(delta) and torch.equal(out[A_KEY], torch.zeros(4, 16))
    plain = build_codec("lora_b", frozen_keys=[A_KEY])
    out = plain.decode(plain.encode(delta)[0], delta)
    assert all(torch.equal(out[k], delta[k]) for k in delta)  # lora_b alone: the rest as trained


def test_lora_b_refuses_a_moved_frozen_factor_and_needs_frozen_keys():
    delta = make_delta(8, zero=())
    with pytest.raises(InputError, match=f"frozen key '{A_KEY}' changed"):
        build_codec("lora_b", frozen_keys=[A_KEY]).encode(delta)
    with pytest.raises(ConfigError, match="needs frozen keys"):
        build_codec("lora_b+topk")
    assert build_codec("topk", frozen_keys=[A_KEY]).split(delta)[1] == []  # without lora_b nothing is dropped


# ----------------------------------------------------------------------------------------------
# the batched form equals the per-client form, row by row, exactly
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec,options",
    [
        ("none", {}),
        ("fp16", {}),
        ("bf16", {}),
        ("int8", {"int8": {"block": 16}}),
        ("topk", {"topk": {"fraction": 0.1}}),
        ("topk", {"topk": {"fraction": 0.1, "error_feedback": False}}),
        ("topk+int8", {"topk": {"fraction": 0.2}, "int8": {"block": 8}}),
        ("topk+bf16", {"topk": {"fraction": 0.05, "scope": "global"}}),
        ("lora_b+topk+int8", {"topk": {"fraction": 0.25}}),
    ],
)
@pytest.mark.parametrize("chunk", [1 << 20, 400])  # one chunk; chunks of 2 rows (183 values a row), the last 1
def test_roundtrip_stacked_equals_encode_decode_per_client(spec, options, chunk):
    codec = build_codec(spec, options, frozen_keys=[A_KEY])
    rows = [make_delta(20 + g) for g in range(5)]
    stacked = {k: torch.stack([r[k] for r in rows]) for k in SHAPES}
    residuals = None
    if codec.stateful:
        sent = codec.split(SHAPES)[0]
        residuals = [{k: v * 0.1 for k, v in make_delta(40 + g).items() if k in sent} for g in range(5)]
        res_stacked = {k: torch.stack([r[k] for r in residuals]) for k in sent}
    out, new, nbytes = codec.roundtrip_stacked(stacked, res_stacked if codec.stateful else None, chunk=chunk)
    assert (new is None) == (not codec.stateful)
    for g, delta in enumerate(rows):
        payload, res = codec.encode(delta, residuals[g] if residuals else None)
        dec = codec.decode(payload, delta)
        assert nbytes[g] == payload.nbytes == codec.nbytes(delta)
        assert all(torch.equal(out[k][g], dec[k]) for k in SHAPES)  # exactly, not approximately
        if codec.stateful:
            assert set(new) == set(res) and all(torch.equal(new[k][g], res[k]) for k in res)


def test_stacked_non_finite_names_key_and_row():
    stacked = {"w": torch.zeros(3, 4)}
    stacked["w"][2, 1] = float("nan")
    with pytest.raises(InputError, match=r"'w' is not finite \(row 2\)"):
        build_codec("int8").roundtrip_stacked(stacked)


# ----------------------------------------------------------------------------------------------
# bytes by hand
# ----------------------------------------------------------------------------------------------
def test_bytes_per_client_by_hand():
    # head.w 63 values, head.b 7, logit_scale 1, B 48; A (64) dropped. topk 0.25: k = 16, 2, 1, 12;
    # positions for all but logit_scale (k = n = 1); int8 block 4: ceil(k/4) scales each
    codec = build_codec("lora_b+topk+int8", {"topk": {"fraction": 0.25}, "int8": {"block": 4}}, frozen_keys=[A_KEY])
    ks = {"head.w": 16, "head.b": 2, "loss_fn.logit_scale": 1, B_KEY: 12}
    hand = sum(k + 4 * math.ceil(k / 4) + (4 * k if name != "loss_fn.logit_scale" else 0) for name, k in ks.items())
    assert hand == (16 + 16 + 64) + (2 + 4 + 8) + (1 + 4) + (12 + 12 + 48)
    assert codec.nbytes(make_delta(0)) == hand == codec.encode(make_delta(0))[0].nbytes


# ----------------------------------------------------------------------------------------------
# bad configs and inputs
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec,options,match",
    [
        ("zstd", {}, "unknown compressor 'zstd'"),
        ("topk", {"topk": {"frac": 0.1}}, "unknown option 'frac' for compressor 'topk'"),
        ("topk", {"topk": {"fraction": 0}}, r"fraction must be in \(0, 1\]"),
        ("topk", {"topk": {"fraction": 1.5}}, r"fraction must be in \(0, 1\]"),
        ("topk", {"topk": {"scope": "layer"}}, "scope='layer' is not one of"),
        ("int8", {"int8": {"block": 0}}, "block must be >= 1"),
        ("int8", {"topk": {"fraction": 0.1}}, "compression_options name 'topk', which is not in compression 'int8'"),
        ("int8", {"int8": 4}, r"compression_options\['int8'\] must be a mapping"),
        ("topk+topk", {}, "each at most once"),
        ("int8+topk", {}, "order lora_b, topk, code"),
        ("fp16+int8", {}, "each at most once"),
        ("none+int8", {}, "'none' cannot be combined"),
        ("topk+", {}, "empty encoder name"),
    ],
)
def test_bad_configs_are_config_errors_naming_the_culprit(spec, options, match):
    with pytest.raises(ConfigError, match=match):
        build_codec(spec, options, frozen_keys=[A_KEY])


@pytest.mark.parametrize("spec", ["none", "fp16", "int8", "topk", "topk+int8"])
def test_non_finite_delta_or_residual_names_the_key(spec):
    codec = build_codec(spec)
    delta = {"head.w": torch.ones(3), "head.b": torch.tensor([1.0, float("nan")])}
    with pytest.raises(InputError, match="delta key 'head.b' is not finite"):
        codec.encode(delta)
    if codec.stateful:
        with pytest.raises(InputError, match="residual key 'head.w' is not finite"):
            codec.encode({"head.w": torch.ones(3)}, {"head.w": torch.tensor([0.0, float("inf"), 0.0])})
    with pytest.raises(InputError, match="'bad::name'"):
        codec.encode({"bad::name": torch.ones(2)})
    with pytest.raises(InputError, match="'ids' is not a floating-point tensor"):
        codec.encode({"ids": torch.arange(3)})


# ----------------------------------------------------------------------------------------------
# the server checks every payload before decoding it
# ----------------------------------------------------------------------------------------------
def tampered(payload, **tensors):
    return Payload({**payload.tensors, **tensors}, dict(payload.meta), payload.nbytes)


def test_decode_rejects_payloads_that_do_not_fit_naming_client_and_tensor():
    codec = build_codec("topk+int8", {"topk": {"fraction": 0.25}, "int8": {"block": 4}})
    delta = {"w": torch.linspace(-1, 1, 16)}
    payload, _ = codec.encode(delta)
    idx = payload.tensors["w::index"]
    cases = [
        (tampered(payload, **{"w::index": torch.tensor([0, 1, 2, 16], dtype=torch.int32)}), "positions must increase"),
        (tampered(payload, **{"w::index": torch.tensor([0, 3, 3, 5], dtype=torch.int32)}), "positions must increase"),
        (tampered(payload, **{"w::index": idx.long()}), r"is \(4,\) torch.int64; expected \(4,\) torch.int32"),
        (tampered(payload, **{"w::scale": torch.tensor([float("nan")])}), "'w::scale' is not finite"),
        (tampered(payload, **{"w::extra": torch.zeros(1)}), "'w::extra' is unexpected"),
        (Payload({k: v for k, v in payload.tensors.items() if k != "w::scale"}, payload.meta, 0), "'w::scale' is mis"),
        (Payload(payload.tensors, {**payload.meta, "codec": [["int8", {"block": 4}]]}, 0), "payload encoded by"),
        (Payload(payload.tensors, {**payload.meta, "keys": ["v"]}, 0), "'v' is not a parameter of the server"),
        (Payload(payload.tensors, {**payload.meta, "dropped": ["w"]}, 0), "disjoint"),
    ]
    for bad, match in cases:
        with pytest.raises(ClientUpdateError, match="client 3: .*" + match) as info:
            codec.decode(bad, delta, client=3)
        assert info.value.client == 3
    frozen = build_codec("lora_b", frozen_keys=["a"])
    sneaky = Payload({}, {**frozen.encode({"w": torch.ones(2)})[0].meta, "keys": [], "dropped": ["w"]}, 0)
    with pytest.raises(ClientUpdateError, match="drops key 'w', which is not a frozen key"):
        frozen.decode(sneaky, {"w": torch.ones(2)})


def test_payload_meta_survives_json_and_decodes_to_the_servers_dtype():
    codec = build_codec("lora_b+topk+fp16", {"topk": {"fraction": 0.5}}, frozen_keys=[A_KEY])
    delta = make_delta(9)
    payload, _ = codec.encode(delta)
    meta = json.loads(json.dumps(payload.meta))
    out = codec.decode(Payload(payload.tensors, meta, payload.nbytes), delta)
    ref = codec.decode(payload, delta)
    assert all(torch.equal(out[k], ref[k]) and out[k].dtype == torch.float32 for k in delta)
    assert all("::" in name and t.dim() == 1 for name, t in payload.tensors.items())


# ----------------------------------------------------------------------------------------------
# the simulator's helper and the registry
# ----------------------------------------------------------------------------------------------
def test_compress_results_is_encode_then_decode_per_client():
    codec = build_codec("topk+int8", {"topk": {"fraction": 0.2}})
    deltas = [make_delta(30 + c, {"w": (6, 5)}) for c in range(3)]
    residuals = [None, {"w": torch.full((6, 5), 0.01)}, None]
    decoded, new, sizes = compress_results(codec, deltas, residuals, clients=[4, 5, 6])
    for d, r, dec, n, s in zip(deltas, residuals, decoded, new, sizes):
        payload, res = codec.encode(d, r)
        assert torch.equal(dec["w"], codec.decode(payload, d)["w"]) and torch.equal(n["w"], res["w"])
        assert s == payload.nbytes == 6 + 4 + 24  # k = 6: 6 int8 + 1 scale + 6 positions
    bad = [deltas[0], {"w": torch.full((6, 5), float("inf"))}]
    with pytest.raises(ClientUpdateError, match="client 8: delta key 'w' is not finite"):
        compress_results(codec, bad, clients=[7, 8])
    with pytest.raises(InputError, match="2 deltas, 1 residuals"):
        compress_results(codec, bad, [None])


def test_registry_lists_every_encoder_with_its_reference():
    assert set(COMPRESSORS) == {"none", "fp16", "bf16", "int8", "topk", "lora_b"}
    text = COMPRESSORS.describe()
    for url in ("2110.02861", "1809.07599", "1901.09847", "2403.12313"):
        assert url in text
    described = build_codec("topk+int8", {"int8": {"block": 64}}).describe()
    assert "block=64" in described and "fraction=0.01" in described and "stateful" in described
