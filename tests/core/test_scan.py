"""The certified bf16 scan (asymvlm.scan) and ImageIndex's scan_dtype: exact ids against float64
references, the error bound against measured errors, the fallback, the corrected distribution."""

from __future__ import annotations

import pytest
import torch

from asymvlm.distributions import PowerSpherical, VonMisesFisher
from asymvlm.errors import ConfigError
from asymvlm.retrieval import ImageIndex
from asymvlm.scan import scan_error_factor, scan_topk, stored_max_norm


def _unit(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1).to(dtype)


def _exact_ids(q, x, k):
    """float64 top-k of the stored vectors (distinct scores in these tests)."""
    return (q.double() @ x.double().T).topk(k, dim=1).indices


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("k", "chunk", "block"), [(1, 4096, 1024), (10, 1000, 7), (50, 333, 64)])
def test_ids_are_the_float64_top_k(dtype, k, chunk, block):
    x = _unit(6000, 48, seed=1, dtype=dtype)
    q = _unit(40, 48, seed=2)
    scan = x if dtype == torch.bfloat16 else x.to(torch.bfloat16)
    idx, stats = scan_topk(q, x, scan, k, chunk, query_block=block)
    assert stats is None
    assert torch.equal(idx, _exact_ids(q, x, k))


def test_near_ties_inside_the_bf16_window_are_ranked_exactly():
    # 3,000 rows whose scores with the query differ by ~1e-5: far below bf16's resolution (~2e-3),
    # so the scan cannot tell them apart and the float64 re-scoring must
    d = 64
    q = _unit(1, d, seed=3)
    base = q[0].double()
    g = torch.Generator().manual_seed(4)
    noise = torch.randn(3000, d, generator=g, dtype=torch.float64)
    noise -= (noise @ base).unsqueeze(1) * base  # orthogonal to the query
    noise = torch.nn.functional.normalize(noise, dim=1)
    c = 0.9 + 1e-5 * torch.randperm(3000, generator=g).double()  # distinct cosines
    near = c.unsqueeze(1) * base + (1 - c**2).sqrt().unsqueeze(1) * noise
    far = _unit(20000, d, seed=5, dtype=torch.float64)
    x = torch.cat([far[:10000], near, far[10000:]]).float()
    idx, _ = scan_topk(q, x, x.bfloat16(), 25, 4096)
    assert torch.equal(idx, _exact_ids(q, x, 25))
    assert int(idx.min()) >= 10000 and int(idx.max()) < 13000


def test_error_factor_bounds_the_measured_scan_error():
    for dtype in (torch.float16, torch.float32):
        for d in (16, 512, 1024):
            x = _unit(4000, d, seed=d, dtype=dtype)
            q = _unit(64, d, seed=d + 1)
            approx = torch.mm(q.bfloat16(), x.bfloat16().T).double()
            exact = q.double() @ x.double().T
            bound = scan_error_factor(d, dtype) * float(stored_max_norm(x)) * q.double().norm(dim=1, keepdim=True)
            assert bool(((approx - exact).abs() <= bound).all())
            # and not absurdly loose: the worst error uses a sizeable part of it
            assert float(((approx - exact).abs() / bound).max()) > 0.01


def test_scan_error_factor_matches_its_formula():
    u, d = 2.0**-8, 384
    gamma = 2 * d * 2.0**-24 / (1 - 2 * d * 2.0**-24)
    assert scan_error_factor(d, torch.float32) == pytest.approx((1 + u) ** 3 * (1 + gamma) - 1, rel=1e-12)
    assert scan_error_factor(d, torch.bfloat16) == pytest.approx((1 + u) ** 2 * (1 + gamma) - 1, rel=1e-12)
    with pytest.raises(ValueError, match="only bfloat16"):
        scan_error_factor(d, torch.float32, torch.float16)


def test_near_duplicate_gallery_falls_back_to_the_exact_path():
    d = 32
    base = _unit(1, d, seed=6)
    x = torch.nn.functional.normalize(base + 1e-4 * _unit(5000, d, seed=7), dim=1).half()  # all in the window
    q = _unit(3, d, seed=8)
    called = []

    def fallback(rows):
        called.append(rows)
        return _exact_ids(q[rows], x, 5), None

    idx, _ = scan_topk(q, x, x.bfloat16(), 5, 1000, max_candidates=100, fallback=fallback)
    assert called and torch.equal(idx, _exact_ids(q, x, 5))


@pytest.mark.parametrize("family", [VonMisesFisher, PowerSpherical])
@pytest.mark.parametrize("storage", [torch.float16, torch.float32])
def test_index_scan_matches_the_float32_path(family, storage):
    x = _unit(20000, 64, seed=9, dtype=storage)
    loc = torch.nn.functional.normalize(x[:12].float() + 0.3 * _unit(12, 64, seed=10), dim=1)
    q = family(loc, torch.tensor([1.0, 5.0, 20.0, 50.0, 100.0, 200.0] * 2))
    a = ImageIndex(x, scan_dtype="float32", chunk_size=3000).search(q, k=7)
    b = ImageIndex(x, scan_dtype="bfloat16", chunk_size=3000, query_block=5).search(q, k=7)
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(b.scores, a.scores, rtol=0, atol=0)  # the hits are scored as before
    # the distribution: exact at the candidates, every other row's logit from the scan (bf16): the
    # tolerance is the measured deviation's order (bench/limits.py) with a margin, float32 path as reference
    torch.testing.assert_close(b.log_partition, a.log_partition, rtol=0, atol=5e-3)
    torch.testing.assert_close(b.entropy, a.entropy, rtol=0, atol=5e-3)
    torch.testing.assert_close(b.posterior, a.posterior, rtol=1e-2, atol=1e-4)


def test_distribution_exact_when_the_top_holds_the_mass():
    # kappa 2,000: every row outside the window weighs < exp(-2000 * 0.02) of the top, so the
    # corrected distribution is the float64 one: the candidates' logits are float64 (the float32
    # path's logits kappa * cos carry ~1e-4 of rounding at this kappa)
    x = _unit(8000, 32, seed=11)
    loc = torch.nn.functional.normalize(x[:4] * 0.999 + 0.001 * _unit(4, 32, seed=12), dim=1)
    kappa = torch.full((4,), 2000.0)
    res = ImageIndex(x, scan_dtype="bfloat16").search(VonMisesFisher(loc, kappa), k=3)
    logits = kappa.double().unsqueeze(1) * (loc.double() @ x.double().T)  # (Q, N) float64 reference
    log_z = torch.logsumexp(logits, dim=1)
    p = torch.softmax(logits, dim=1)
    log_norm = VonMisesFisher(loc, kappa).log_normalizer.double()  # the search adds its float32 normaliser
    torch.testing.assert_close(res.log_partition, log_z + log_norm, rtol=0, atol=1e-9)
    torch.testing.assert_close(res.entropy.double(), -(p * p.clamp_min(1e-300).log()).sum(1), rtol=0, atol=1e-6)
    torch.testing.assert_close(res.posterior.double(), p.gather(1, res.indices), rtol=1e-6, atol=1e-9)


def test_scan_dtype_is_checked_and_auto_picks_bf16_on_cpu():
    x = _unit(10, 8)
    with pytest.raises(ConfigError, match="scan_dtype must be one of"):
        ImageIndex(x, scan_dtype="float16")
    assert ImageIndex(x).scan_dtype == "bfloat16"
    index = ImageIndex(x.bfloat16()).prepare()
    assert index._scan[0] is index.embeddings  # a bf16 gallery is scanned as it is


def test_negative_thresholds_take_the_bf16_comparison():
    # every score negative: the int16 view of the bits no longer orders them, the plain comparison runs
    d = 32
    q = _unit(2, d, seed=13)
    x = _unit(5000, d, seed=14)
    x = torch.where((x @ q[0]).unsqueeze(1) > 0, -x, x)  # opposite hemisphere of query 0
    x = torch.cat([x, -q[1:2] * 0.0 + torch.nn.functional.normalize(-q[1:2] + 0.01, dim=1)])
    s = q.double() @ x.double().T
    assert float(s[0].max()) < 0
    idx, _ = scan_topk(q, x, x.bfloat16(), 12, 700)
    assert torch.equal(idx, _exact_ids(q, x, 12))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_int8_window_bounds_the_measured_error(dtype):
    from asymvlm.scan import int8_copy, int8_window

    for d in (16, 512):
        x = _unit(3000, d, seed=20 + d, dtype=dtype)
        q = _unit(32, d, seed=21 + d)
        c = int8_copy(x)
        assert c.values.dtype == torch.int8 and int(c.values.abs().max()) <= 127
        approx = torch._weight_int8pack_mm(q.bfloat16(), c.values, c.scales).double()
        err = (approx - q.double() @ x.double().T).abs()
        half_window = int8_window(q, c).double().unsqueeze(1) / 2
        assert bool((err <= half_window).all())
        assert float((err / half_window).max()) > 0.01  # sound, not vacuous


@pytest.mark.parametrize(("k", "chunk"), [(1, 4096), (10, 777)])
def test_int8_scan_ids_are_the_float64_top_k(k, chunk):
    from asymvlm.scan import int8_copy

    x = _unit(6000, 48, seed=22, dtype=torch.float16)
    q = _unit(9, 48, seed=23)
    idx, _ = scan_topk(q, x, int8_copy(x), k, chunk, query_block=4)
    assert torch.equal(idx, _exact_ids(q, x, k))


def test_index_int8_matches_the_float32_path():
    x = _unit(20000, 64, seed=24, dtype=torch.float16)
    loc = torch.nn.functional.normalize(x[:6].float() + 0.3 * _unit(6, 64, seed=25), dim=1)
    q = VonMisesFisher(loc, torch.tensor([1.0, 5.0, 20.0, 50.0, 100.0, 200.0]))
    a = ImageIndex(x, scan_dtype="float32").search(q, k=7)
    b = ImageIndex(x, scan_dtype="int8").search(q, k=7)
    assert torch.equal(a.indices, b.indices)
    # int8 scores are coarser than bf16's (each row within scale/2 per element): the rows outside the
    # candidate window move the distribution more; tolerance from the measured deviation with a margin
    torch.testing.assert_close(b.log_partition, a.log_partition, rtol=0, atol=2e-2)
    torch.testing.assert_close(b.entropy, a.entropy, rtol=0, atol=2e-2)
