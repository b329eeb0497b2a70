"""asymvlm.special against mpmath (50 digits) and scipy.

Tolerances (the issue's contract): over d in [2, 4096] and kappa in [1e-6, 1e6],
float64: |log C_d error| <= 1e-9 * max(1, |log C_d|) and |A_d error| <= 1e-9 * A_d;
float32: finite everywhere and within 1e-5 by the same measures.
"""

import math
from fractions import Fraction

import mpmath as mp
import numpy as np
import pytest
import scipy.special
import torch

from asymvlm import special
from asymvlm.special import (
    _debye_fractions,
    _debye_polynomials,
    _fast_order,
    _log_debye_polynomials,
    bessel_iv_ratio,
    bessel_ratio,
    log_bessel_iv,
    log_sphere_area,
    vmf_log_density_ratio_at_mode,
    vmf_log_normalizer,
    vmf_log_normalizer_approx,
)

GRID_DIMS = [
    2,
    3,
    4,
    5,
    7,
    8,
    16,
    31,
    32,
    64,
    99,
    100,
    101,
    102,
    103,
    128,
    255,
    256,
    257,
    511,
    512,
    513,
    768,
    1024,
    1152,
    2047,
    2048,
    4095,
    4096,
]
GRID_KAPPAS = np.logspace(-6, 6, 49)


def mp_log_iv(v, x):
    with mp.workdps(50):
        return mp.log(mp.besseli(mp.mpf(v), mp.mpf(x), maxterms=10**6))


def mp_log_c(d, kappa):
    with mp.workdps(50):
        v = mp.mpf(d) / 2 - 1
        k = mp.mpf(kappa)
        return v * mp.log(k) - (v + 1) * mp.log(2 * mp.pi) - mp_log_iv(v, k)


def mp_ratio(d, kappa):
    with mp.workdps(50):
        v = mp.mpf(d) / 2 - 1
        return mp.exp(mp_log_iv(v + 1, kappa) - mp_log_iv(v, kappa))


@pytest.fixture(scope="module")
def grid_reference():
    ref = {}
    for d in GRID_DIMS:
        ref[d] = (
            np.array([float(mp_log_c(d, k)) for k in GRID_KAPPAS]),
            np.array([float(mp_ratio(d, k)) for k in GRID_KAPPAS]),
        )
    return ref


def _errors(d, dtype, grid_reference):
    kappa = torch.tensor(GRID_KAPPAS, dtype=dtype)
    log_c = vmf_log_normalizer(d, kappa).double().numpy()
    ratio = bessel_ratio(d, kappa).double().numpy()
    ref_c, ref_a = grid_reference[d]
    assert np.isfinite(log_c).all() and np.isfinite(ratio).all(), (d, dtype)
    err_c = np.abs(log_c - ref_c) / np.maximum(1.0, np.abs(ref_c))
    err_a = np.abs(ratio - ref_a) / ref_a
    return err_c.max(), err_a.max()


@pytest.mark.slow
def test_vmf_normalizer_and_ratio_grid_float64(grid_reference):
    worst_c = max(_errors(d, torch.float64, grid_reference)[0] for d in GRID_DIMS)
    worst_a = max(_errors(d, torch.float64, grid_reference)[1] for d in GRID_DIMS)
    assert worst_c <= 1e-9, worst_c
    assert worst_a <= 1e-9, worst_a


@pytest.mark.slow
def test_vmf_normalizer_and_ratio_grid_float32(grid_reference):
    for d in GRID_DIMS:
        err_c, err_a = _errors(d, torch.float32, grid_reference)
        assert err_c <= 1e-5 and err_a <= 1e-5, (d, err_c, err_a)
        assert vmf_log_normalizer(d, torch.tensor(GRID_KAPPAS, dtype=torch.float32)).dtype == torch.float32


def test_clip_dimensions_spot_check_against_mpmath():
    # the fast subset of the grid, at the dimensions AsymVLM runs at
    for d in (512, 768, 1152):
        kappa = torch.tensor([1e-6, 0.5, 12.8, 100.0, 400.0, 5e3], dtype=torch.float64)
        got_c = vmf_log_normalizer(d, kappa)
        got_a = bessel_ratio(d, kappa)
        for k, c, a in zip(kappa.tolist(), got_c.tolist(), got_a.tolist()):
            ref_c, ref_a = float(mp_log_c(d, k)), float(mp_ratio(d, k))
            assert abs(c - ref_c) <= 1e-12 * max(1, abs(ref_c)), (d, k, c, ref_c)
            assert abs(a - ref_a) <= 1e-12 * ref_a, (d, k, a, ref_a)


def test_scipy_ive_underflows_where_we_do_not():
    # the numerical trap that motivates the module (DESIGN.md section 6)
    assert scipy.special.ive(255, 10.0) == 0.0
    ours = log_bessel_iv(255, torch.tensor(10.0, dtype=torch.float64))
    assert math.isfinite(float(ours))
    assert abs(float(ours) - float(mp_log_iv(255, 10.0))) < 1e-12 * abs(float(ours))


@pytest.mark.parametrize("order", [0.0, 0.3, 1.0, 1.7, 10.5, 49.2, 49.9, 50.0, 50.5, 123.4, 2000.0, 5000.0])
def test_log_bessel_iv_general_orders_against_mpmath(order):
    xs = [1e-300, 1e-20, 1e-6, 0.01, 0.5, 1.0, 2.0, 3.9, 7.0, 14.2, 30.0, 99.0, 1e3, 1e4, 1e5, 1e6, 1e10, 1e50]
    got = log_bessel_iv(order, torch.tensor(xs, dtype=torch.float64))
    got_r = bessel_iv_ratio(order, torch.tensor(xs, dtype=torch.float64))
    for x, g, gr in zip(xs, got.tolist(), got_r.tolist()):
        ref = float(mp_log_iv(order, x))
        assert abs(g - ref) <= 1e-13 * max(1.0, abs(ref)), (order, x, g, ref)
        if x > 1e-290:  # the ratio itself is subnormal below that
            with mp.workdps(50):
                ref_r = float(mp.exp(mp_log_iv(order + 1, x) - mp_log_iv(order, x)))
            assert abs(gr - ref_r) <= 1e-13 * ref_r, (order, x, gr, ref_r)


def test_log_bessel_iv_against_scipy_where_finite():
    orders = np.arange(0, 40, dtype=np.float64)[:, None]
    xs = np.array([0.01, 0.3, 1.0, 5.0, 20.0, 80.0, 300.0])[None, :]
    ref = np.log(scipy.special.ive(orders, xs)) + xs
    got = log_bessel_iv(torch.tensor(orders), torch.tensor(xs)).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)


def test_zero_and_infinity():
    x = torch.tensor([0.0, math.inf], dtype=torch.float64)
    assert log_bessel_iv(0, x).tolist() == [0.0, math.inf]
    assert log_bessel_iv(2.5, x).tolist() == [-math.inf, math.inf]
    assert bessel_iv_ratio(1.0, x).tolist() == [0.0, 1.0]
    for d in (2, 3, 512, 4096):
        # kappa -> 0 limit is exactly minus the log area of the sphere
        assert float(vmf_log_normalizer(d, torch.tensor(0.0, dtype=torch.float64))) == -log_sphere_area(d)
        assert float(vmf_log_density_ratio_at_mode(d, torch.tensor(0.0, dtype=torch.float64))) == 0.0
        assert float(bessel_ratio(d, torch.tensor(0.0, dtype=torch.float64))) == 0.0
        tiny = vmf_log_normalizer(d, torch.tensor(1e-300, dtype=torch.float64))
        assert float(tiny) == -log_sphere_area(d)


def test_closed_forms_half_integer_orders():
    # d = 3: C_3(k) = k / (4 pi sinh k); A_3(k) = coth k - 1/k
    k = torch.tensor([1e-3, 0.7, 3.0, 40.0, 700.0], dtype=torch.float64)
    ref_c = torch.log(k) - math.log(4 * math.pi) - (k + torch.log1p(-torch.exp(-2 * k)) - math.log(2))
    ref_a = 1 / torch.tanh(k) - 1 / k
    torch.testing.assert_close(vmf_log_normalizer(3, k), ref_c, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(bessel_ratio(3, k), ref_a, rtol=1e-9, atol=0)


def test_sphere_area():
    assert math.isclose(log_sphere_area(2), math.log(2 * math.pi))
    assert math.isclose(log_sphere_area(3), math.log(4 * math.pi))
    assert math.isclose(log_sphere_area(4), math.log(2 * math.pi**2))
    t = log_sphere_area(torch.tensor([2, 3, 4]))
    torch.testing.assert_close(t, torch.tensor([log_sphere_area(d) for d in (2, 3, 4)], dtype=torch.float64))


def test_debye_polynomials_match_dlmf():
    # DLMF 10.41.10: u1 = (3t - 5t^3)/24, u2 = (81t^2 - 462t^4 + 385t^6)/1152
    u = _debye_polynomials(3)
    assert u[0] == (1.0,)
    np.testing.assert_allclose(u[1], [0, 3 / 24, 0, -5 / 24], rtol=1e-15)
    np.testing.assert_allclose(u[2], [0, 0, 81 / 1152, 0, -462 / 1152, 0, 385 / 1152], rtol=1e-15)
    # u3 = (30375 t^3 - 369603 t^5 + 765765 t^7 - 425425 t^9) / 414720
    expected = [Fraction(0)] * 10
    for p, c in ((3, 30375), (5, -369603), (7, 765765), (9, -425425)):
        expected[p] = Fraction(c, 414720)
    np.testing.assert_allclose(u[3], [float(c) for c in expected], rtol=1e-15)


def test_broadcasting_and_dtypes():
    order = torch.tensor([[0.0], [3.0], [300.0]], dtype=torch.float64)
    x = torch.tensor([0.5, 5.0, 50.0, 500.0], dtype=torch.float32)
    out = log_bessel_iv(order, x)
    assert out.shape == (3, 4) and out.dtype == torch.float32
    ref = log_bessel_iv(order, x.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)
    assert vmf_log_normalizer(512, torch.tensor([1.0, 2.0], dtype=torch.float16)).dtype == torch.float16
    dims = torch.tensor([3, 512])
    k = torch.tensor([2.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(
        vmf_log_normalizer(dims, k), torch.stack([vmf_log_normalizer(3, k[0]), vmf_log_normalizer(512, k[1])])
    )


def test_bad_arguments():
    with pytest.raises(ValueError, match="x must be >= 0"):
        log_bessel_iv(1.0, torch.tensor([1.0, -2.0]))
    with pytest.raises(ValueError, match="order must be finite and >= 0"):
        log_bessel_iv(-0.5, torch.tensor(1.0))
    with pytest.raises(ValueError, match="order must not require grad"):
        log_bessel_iv(torch.tensor(1.0, requires_grad=True), torch.tensor(1.0))
    with pytest.raises(ValueError, match="kappa must be >= 0"):
        vmf_log_normalizer(512, torch.tensor([-1.0]))
    with pytest.raises(ValueError, match="integer >= 2"):
        vmf_log_normalizer(1, torch.tensor(1.0))
    with pytest.raises(TypeError, match="ambient dimension"):
        bessel_ratio(3.5, torch.tensor(1.0))
    assert torch.isnan(log_bessel_iv(1.0, torch.tensor(float("nan"))))


@pytest.mark.parametrize("order", [0.0, 0.5, 7.0, 49.5, 255.0, 575.0])
def test_gradcheck_log_bessel_iv(order):
    x = torch.tensor([1e-3, 0.8, 6.0, 40.0, 300.0, 2000.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: log_bessel_iv(order, t), (x,))
    assert torch.autograd.gradgradcheck(lambda t: log_bessel_iv(order, t), (x,))
    assert torch.autograd.gradcheck(lambda t: bessel_iv_ratio(order, t), (x,))


@pytest.mark.parametrize("d", [2, 3, 64, 512, 1152])
def test_gradcheck_vmf_normalizer(d):
    k = torch.tensor([1e-4, 0.5, 10.0, 200.0, 3e3], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: vmf_log_normalizer(d, t), (k,))
    assert torch.autograd.gradgradcheck(lambda t: vmf_log_normalizer(d, t), (k,))
    assert torch.autograd.gradcheck(lambda t: bessel_ratio(d, t), (k,))
    # d/dkappa log C_d = -A_d
    (g,) = torch.autograd.grad(vmf_log_normalizer(d, k).sum(), k)
    torch.testing.assert_close(g, -bessel_ratio(d, k.detach()), rtol=1e-14, atol=0)


def test_gradient_at_zero():
    k = torch.tensor([0.0], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(vmf_log_normalizer(512, k).sum(), k)
    assert g.item() == 0.0
    (g,) = torch.autograd.grad(bessel_ratio(512, k).sum(), k)
    assert g.item() == pytest.approx(1 / 512)  # A_d(k) ~ k/d
    (g,) = torch.autograd.grad(log_bessel_iv(0, k).sum(), k)
    assert g.item() == 0.0


def test_broadcast_gradient_reduces_to_input_shape():
    k = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    out = log_bessel_iv(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), k)
    (g,) = torch.autograd.grad(out.sum(), k)
    ref = sum(float(bessel_iv_ratio(v, torch.tensor(2.0, dtype=torch.float64))) + v / 2 for v in (1.0, 2.0, 3.0))
    assert g.shape == (1,) and g.item() == pytest.approx(ref, rel=1e-13)


def test_approx_normalizer_value_off_but_slope_close():
    # Scott et al. (2021): good derivative, but the value lacks a constant
    d = 512
    k = torch.tensor([5.0, 50.0, 300.0, 2000.0], dtype=torch.float64, requires_grad=True)
    exact, approx = vmf_log_normalizer(d, k), vmf_log_normalizer_approx(d, k)
    assert (exact - approx).abs().min() > 100  # "off by hundreds of nats"
    (ge,) = torch.autograd.grad(exact.sum(), k)
    (ga,) = torch.autograd.grad(approx.sum(), k)
    torch.testing.assert_close(ga, ge, rtol=2e-3, atol=1e-6)


# --------------------------------------------------------------------------------------------
# The fast path: one python dim >= 102 (order v >= 50), the Debye expansion alone, no branch
# over kappa. Tolerances (measured worst in brackets):
#   float64: |log C_d error| <= 1e-13 max(1, |log C_d|) [2e-14: 2 ulp of log|S^{d-1}| where
#            log C_d crosses 0], A_d and -d/dkappa log C_d <= 1e-14 relative [4e-16],
#            log(C_d |S^{d-1}|) <= 1e-14 relative even where it is -1e-15 [6e-16];
#   float32, against mpmath at the float32-rounded kappa (the function's own error): one float32
#            ulp, 1.2e-7, for all three (the float64 value rounded, plus < 1e-9 truncation).
# --------------------------------------------------------------------------------------------
FAST_DIMS = [256, 384, 512, 768, 1024, 4096]
FAST_KAPPAS = np.logspace(-6, 6, 49)


def mp_all(d, kappa):
    """(log C_d, A_d, log(C_d |S^{d-1}|) = -log F_v) at 50 digits."""
    with mp.workdps(50):
        v, k = mp.mpf(d) / 2 - 1, mp.mpf(kappa)
        lv = mp_log_iv(v, k)
        log_c = v * mp.log(k) - (v + 1) * mp.log(2 * mp.pi) - lv
        at_mode = v * mp.log(k / 2) - mp.loggamma(v + 1) - lv
        return float(log_c), float(mp.exp(mp_log_iv(v + 1, k) - lv)), float(at_mode)


@pytest.fixture(scope="module")
def fast_reference():
    rounded = FAST_KAPPAS.astype(np.float32).astype(np.float64)
    return {
        (d, dtype): np.array([mp_all(d, k) for k in kappas]).T
        for d in FAST_DIMS
        for dtype, kappas in ((torch.float64, FAST_KAPPAS), (torch.float32, rounded))
    }


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("d", FAST_DIMS)
def test_fast_path_against_mpmath(d, dtype, fast_reference):
    tol_c, tol_a, tol_m = (1e-13, 1e-14, 1e-14) if dtype == torch.float64 else (1.2e-7, 1.2e-7, 1.2e-7)
    ref_c, ref_a, ref_m = fast_reference[d, dtype]
    k = torch.tensor(FAST_KAPPAS, dtype=dtype, requires_grad=True)
    log_c = vmf_log_normalizer(d, k)
    (grad,) = torch.autograd.grad(log_c.sum(), k)
    assert log_c.dtype == grad.dtype == dtype
    got = {
        "log C_d": (log_c.detach().double().numpy(), ref_c, np.maximum(1, np.abs(ref_c)), tol_c),
        "A_d": (bessel_ratio(d, k.detach()).double().numpy(), ref_a, ref_a, tol_a),
        "-grad": (-grad.double().numpy(), ref_a, ref_a, tol_a),
        "at mode": (vmf_log_density_ratio_at_mode(d, k.detach()).double().numpy(), ref_m, np.abs(ref_m), tol_m),
    }
    for name, (value, ref, scale, tol) in got.items():
        err = np.abs(value - ref) / scale
        assert err.max() <= tol, (name, d, dtype, err.max(), FAST_KAPPAS[err.argmax()])


def test_fast_path_is_taken_for_python_dims_from_102():
    assert _fast_order(512) == 255.0 and _fast_order(102) == 50.0
    assert _fast_order(101) is None and _fast_order(True) is None and _fast_order(torch.tensor(512)) is None


@pytest.mark.parametrize("d", [102, 103, 256, 512, 4096])
def test_fast_path_agrees_with_general_path(d):
    # the same functions through both paths (a tensor dim takes the general one): the general
    # path switches from the power series to Debye at kappa = 2 sqrt(v + 1); include both sides
    edge = 2 * math.sqrt(d / 2)
    k = torch.tensor([0.0, *np.logspace(-6, 6, 97), edge * (1 - 1e-12), edge, edge * (1 + 1e-12)], dtype=torch.float64)
    dims = torch.tensor(d)
    fast_c, general_c = vmf_log_normalizer(d, k), vmf_log_normalizer(dims, k)
    # both subtract log|S^{d-1}| (~ -150 ... -11000): an ulp of it where log C_d crosses 0
    assert ((fast_c - general_c).abs() <= 1e-13 * general_c.abs().clamp(min=1)).all()
    torch.testing.assert_close(bessel_ratio(d, k), bessel_ratio(dims, k), rtol=1e-14, atol=1e-300)
    fast_m, general_m = vmf_log_density_ratio_at_mode(d, k), vmf_log_density_ratio_at_mode(dims, k)
    torch.testing.assert_close(fast_m, general_m, rtol=1e-13, atol=0)
    # continuity across the general path's switch: a relative step of 1e-12 moves log C_d by ~A_d kappa 1e-12
    c = general_c[-3:]
    assert (c[1:] - c[:-1]).abs().max() <= 1e-11 * c.abs().max()


@pytest.mark.parametrize("kappa", [1e-3, 0.7, 9.9, 10.1, 10.4, 33.0, 500.0, 2e4])
def test_order_switch_is_continuous(kappa):
    # dims 98..101 take the general path (v < 50), 102..106 the fast one: all agree with mpmath
    dims = list(range(98, 107))
    k = torch.tensor(kappa, dtype=torch.float64)
    for d in dims:
        ref_c, ref_a, _ = mp_all(d, kappa)
        c, a = float(vmf_log_normalizer(d, k)), float(bessel_ratio(d, k))
        assert abs(c - ref_c) <= 1e-13 * max(1, abs(ref_c)), (d, kappa, c, ref_c)
        assert abs(a - ref_a) <= 1e-14 * ref_a, (d, kappa, a, ref_a)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fast_path_chunks_agree_with_one_pass(monkeypatch, dtype):
    k = torch.cat([torch.tensor([0.0, math.inf, 3.0]), torch.logspace(-6, 6, 42)]).to(dtype).reshape(5, 9).t()
    k[4, 3] = math.inf  # an infinity in a later chunk; the input is not contiguous
    ka = k.clone().requires_grad_(True)
    one_pass = (vmf_log_normalizer(512, ka), bessel_ratio(512, k), vmf_log_density_ratio_at_mode(512, k))
    (g_one,) = torch.autograd.grad(one_pass[0].sum(), ka)
    monkeypatch.setattr(special, "_FAST_CHUNK", 7)
    kb = k.clone().requires_grad_(True)
    chunked = (vmf_log_normalizer(512, kb), bessel_ratio(512, k), vmf_log_density_ratio_at_mode(512, k))
    (g_chunked,) = torch.autograd.grad(chunked[0].sum(), kb)
    rtol = 1e-14 if dtype == torch.float64 else 1.2e-7  # vector and scalar log1p may differ by an ulp
    for a, b in zip((*one_pass, g_one), (*chunked, g_chunked)):
        assert a.shape == b.shape == (9, 5) and a.dtype == b.dtype == dtype
        torch.testing.assert_close(a.detach(), b.detach(), rtol=rtol, atol=0)
    assert one_pass[0][4, 3] == -math.inf and chunked[1][4, 3] == 1.0 and g_chunked[4, 3] == -1.0


def test_fast_path_bad_kappa_and_nan():
    with pytest.raises(ValueError, match=r"kappa must be >= 0; found -1.0 at index \(1,\)"):
        vmf_log_normalizer(512, torch.tensor([float("nan"), -1.0]))
    with pytest.raises(ValueError, match="kappa must be >= 0"):
        bessel_ratio(768, -2.0)
    out = vmf_log_normalizer(512, torch.tensor([float("nan"), math.inf, 0.0]))
    assert torch.isnan(out[0]) and out[1] == -math.inf and float(out[2]) == pytest.approx(-log_sphere_area(512))


def test_log_debye_polynomials_exact():
    # log U = sum l_k e^k with U = sum u_k e^k: l_1 = u_1, l_2 = u_2 - u_1^2 / 2 (power series of log)
    logs, bounds = _log_debye_polynomials()
    u = _debye_fractions(2)
    u1_sq = [Fraction(0)] * 7
    for i, a in enumerate(u[1]):
        for j, b in enumerate(u[1]):
            u1_sq[i + j] += a * b
    assert list(logs[1]) == list(u[1])
    assert list(logs[2]) == [c - s / 2 for c, s in zip(list(u[2]) + [0] * 7, u1_sq)][: len(logs[2])]
    # at t = 1 the expansion is Stirling's series of log Gamma(v + 1): L(1) = -(1/(12 v) - 1/(360 v^3) + 1/(1260 v^5))
    assert [sum(logs[k]) for k in range(1, 6)] == [Fraction(-1, 12), 0, Fraction(1, 360), 0, Fraction(-1, 1260)]
    assert bounds[1] == pytest.approx(1 / 12) and all(b < 2 for b in bounds)
