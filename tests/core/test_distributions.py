"""Distributions on the sphere, from one table of examples.

Monte-Carlo checks use N samples and compare within 5 standard errors (a false failure has
probability < 1e-6 per check); fixed seeds make them reproducible.
"""

import math

import numpy as np
import pytest
import scipy.integrate
import scipy.special
import scipy.stats
import torch
from torch.distributions import kl_divergence

from asymvlm.distributions import HypersphericalUniform, PowerSpherical, VonMisesFisher, sphere
from asymvlm.special import bessel_ratio, log_sphere_area

FAMILIES = [VonMisesFisher, PowerSpherical]
EXAMPLES = [(cls, d, k) for cls in FAMILIES for d in (2, 3, 5, 64, 512) for k in (0.0, 1e-3, 1.0, 50.0, 1e3)]
IDS = [f"{c.__name__}-d{d}-k{k:g}" for c, d, k in EXAMPLES]


def unit(*shape, dtype=torch.float64):
    return torch.nn.functional.normalize(torch.randn(*shape, dtype=dtype), dim=-1)


def make(cls, d, kappa, batch=(), dtype=torch.float64):
    loc = unit(*batch, d, dtype=dtype)
    return cls(loc, torch.full(batch, kappa, dtype=dtype))


def within_se(samples: torch.Tensor, expected, n_se=5.0, floor=1e-12):
    mean = samples.mean(0)
    se = samples.std(0) / math.sqrt(samples.shape[0])
    return bool(((mean - expected).abs() <= n_se * se + floor).all()), mean, se


@pytest.mark.parametrize("cls,d,kappa", EXAMPLES, ids=IDS)
def test_shapes_support_and_expand(cls, d, kappa):
    q = make(cls, d, kappa, batch=(4,))
    assert q.batch_shape == (4,) and q.event_shape == (d,) and q.dim == d
    x = q.sample((3,))
    assert x.shape == (3, 4, d) and x.dtype == torch.float64
    assert bool(sphere.check(x).all())
    assert (x.norm(dim=-1) - 1).abs().max() < 1e-12
    assert q.log_prob(x).shape == (3, 4)
    assert q.entropy().shape == (4,) and q.mean.shape == (4, d) and q.variance.shape == (4, d)
    e = q.expand((2, 4))
    assert e.batch_shape == (2, 4) and e.sample().shape == (2, 4, d)
    torch.testing.assert_close(e.log_prob(x[:2]), q.log_prob(x[:2]))
    # E|x|^2 = 1: sum of per-coordinate variances plus |mean|^2
    torch.testing.assert_close((q.variance + q.mean**2).sum(-1), torch.ones(4, dtype=torch.float64))


SMALL = [(e, i) for e, i in zip(EXAMPLES, IDS) if e[1] <= 64]


@pytest.mark.parametrize("cls,d,kappa", [e for e, _ in SMALL], ids=[i for _, i in SMALL])
def test_density_integrates_to_one(cls, d, kappa):
    # p depends on t = mu^T x only: integral = int_{-1}^{1} p(t) |S^{d-2}| (1 - t^2)^{(d-3)/2} dt
    q = make(cls, d, kappa)
    mu = q.loc

    def f(t):
        tt = torch.tensor(t, dtype=torch.float64)
        perp = torch.zeros(d, dtype=torch.float64)
        perp[0] = 1.0
        perp = perp - (perp @ mu) * mu
        if perp.norm() < 1e-6:
            perp = torch.zeros(d, dtype=torch.float64)
            perp[1] = 1.0
            perp = perp - (perp @ mu) * mu
        perp = perp / perp.norm()
        x = tt * mu + math.sqrt(max(0.0, 1 - t * t)) * perp
        x = x / x.norm()
        logp = float(q.log_prob(x))
        log_area = log_sphere_area(d - 1) if d > 2 else math.log(2.0)  # S^0 = {-1, 1}
        return math.exp(logp + log_area + 0.5 * (d - 3) * math.log(max(1 - t * t, 1e-300)))

    points = [1 - 10.0 / max(kappa, 1e-9)] if kappa > 10 else None
    total, err = scipy.integrate.quad(f, -1, 1, points=points, limit=200, epsabs=1e-11, epsrel=1e-9)
    assert total == pytest.approx(1.0, abs=1e-7), (total, err)


@pytest.mark.parametrize("d", [3, 10, 64, 512])
@pytest.mark.parametrize("kappa", [1e-3, 1.0, 30.0, 500.0, 5e4])
def test_vmf_log_prob_matches_scipy_where_finite(d, kappa):
    mu = unit(d)
    q = VonMisesFisher(mu, torch.tensor(kappa, dtype=torch.float64))
    x = torch.cat([q.sample((20,)), unit(5, d)])
    with np.errstate(divide="ignore"):  # scipy's own underflow, the trap asymvlm.special avoids
        ref = scipy.stats.vonmises_fisher(mu.numpy(), kappa).logpdf(x.numpy())
    got = q.log_prob(x).numpy()
    finite = np.isfinite(ref)
    if not finite.any():
        pytest.skip("scipy is not finite here")
    np.testing.assert_allclose(got[finite], ref[finite], rtol=1e-9, atol=1e-9)


def test_power_spherical_log_prob_closed_form():
    # De Cao & Aziz 2020, eq. 4, evaluated with scipy's gammaln
    d, kappa = 7, 3.5
    q = PowerSpherical(unit(d), torch.tensor(kappa, dtype=torch.float64))
    x = unit(10, d)
    a, b = (d - 1) / 2 + kappa, (d - 1) / 2
    log_c = -((a + b) * math.log(2) + b * math.log(math.pi) + scipy.special.gammaln(a) - scipy.special.gammaln(a + b))
    ref = log_c + kappa * np.log1p((x @ q.loc).numpy())
    np.testing.assert_allclose(q.log_prob(x).numpy(), ref, rtol=1e-12)


@pytest.mark.parametrize("cls,d,kappa", EXAMPLES, ids=IDS)
def test_kl_to_uniform_nonnegative_and_matches_monte_carlo(cls, d, kappa):
    q = make(cls, d, kappa)
    u = HypersphericalUniform(d, dtype=torch.float64)
    kl = kl_divergence(q, u)
    assert kl.shape == () and float(kl) >= 0.0
    x = q.sample((20000,))
    ok, mean, se = within_se(q.log_prob(x) - u.log_prob(x), kl, floor=1e-9)
    assert ok, (float(kl), float(mean), float(se))
    if kappa == 0.0:
        assert float(kl) == 0.0


@pytest.mark.parametrize("cls,d,kappa", EXAMPLES, ids=IDS)
def test_entropy_and_mean_match_monte_carlo(cls, d, kappa):
    q = make(cls, d, kappa)
    x = q.sample((20000,))
    ok, mean, se = within_se(-q.log_prob(x), q.entropy(), floor=1e-9)
    assert ok, ("entropy", float(q.entropy()), float(mean), float(se))
    ok, mean, se = within_se(x, q.mean)
    assert ok, ("mean", (mean - q.mean).abs().max(), se.max())
    cos = x @ q.loc
    ok, *_ = within_se(cos, q._mean_cosine())
    assert ok
    ok, *_ = within_se(cos * cos, q._mean_cosine_sq())
    assert ok


def test_variance_matches_monte_carlo():
    for cls in FAMILIES:
        q = make(cls, 5, 4.0)
        x = q.sample((40000,))
        xc = (x - q.mean) ** 2
        ok, mean, se = within_se(xc, q.variance)
        assert ok, (cls.__name__, mean, q.variance, se)


@pytest.mark.parametrize("kappa", [0.0, 1e-8, 1.0, 100.0, 1e3, 1e5, 1e8])
def test_vmf_mean_resultant_length_d512(kappa):
    # sample mean resultant length = A_d(kappa) within MC error, in float64 at d = 512
    d = 512
    q = VonMisesFisher(unit(d), torch.tensor(kappa, dtype=torch.float64))
    cos = q.sample((20000,)) @ q.loc
    ok, mean, se = within_se(cos, bessel_ratio(d, torch.tensor(kappa, dtype=torch.float64)), floor=1e-14)
    assert ok, (float(mean), se)
    assert (cos.abs() <= 1).all()


def test_vmf_sampling_extremes_do_not_hang_and_stay_exact():
    for d in (2, 4096):
        for kappa in (0.0, 1e-12, 1e10):
            q = VonMisesFisher(unit(d), torch.tensor(kappa, dtype=torch.float64))
            x = q.sample((500,))
            assert torch.isfinite(x).all() and (x.norm(dim=-1) - 1).abs().max() < 1e-12
    # at kappa = 1e10, 1 - mu^T x ~ (d-1)/(2 kappa) resolved without cancellation
    d, kappa = 3, 1e10
    q = VonMisesFisher(unit(d), torch.tensor(kappa, dtype=torch.float64))
    assert float(1 - (q.sample((4000,)) @ q.loc).mean()) == pytest.approx((d - 1) / (2 * kappa), rel=0.1)


def test_power_spherical_rsample_gradients():
    # d/dkappa E[mu^T x] = (d-1)/(kappa+d-1)^2 ; d/dloc E[v^T x] = m(kappa) v  (projected)
    d, kappa = 6, 3.0
    k = torch.tensor(kappa, dtype=torch.float64, requires_grad=True)
    mu = unit(d)
    x = PowerSpherical(mu, k).rsample((200000,))
    (g,) = torch.autograd.grad((x @ mu).mean(), k)
    assert float(g) == pytest.approx((d - 1) / (kappa + d - 1) ** 2, rel=0.03)
    loc = mu.clone().requires_grad_(True)
    v = unit(d)
    x = PowerSpherical(loc, torch.tensor(kappa, dtype=torch.float64)).rsample((200000,))
    (g,) = torch.autograd.grad((x @ v).mean(), loc)
    # E[x] = m loc for *any* loc, so d E[v^T x] / d loc = m v
    torch.testing.assert_close(g, kappa / (kappa + d - 1) * v, atol=5e-3, rtol=0)
    assert not VonMisesFisher.has_rsample and PowerSpherical.has_rsample


@pytest.mark.parametrize("pair", ["vmf-vmf", "ps-vmf", "u-vmf", "u-ps"])
def test_kl_closed_forms_match_monte_carlo(pair):
    d = 16
    vmf = lambda k: VonMisesFisher(unit(d), torch.tensor(k, dtype=torch.float64))  # noqa: E731
    ps = lambda k: PowerSpherical(unit(d), torch.tensor(k, dtype=torch.float64))  # noqa: E731
    p, q = {
        "vmf-vmf": (vmf(20.0), vmf(5.0)),
        "ps-vmf": (ps(20.0), vmf(5.0)),
        "u-vmf": (HypersphericalUniform(d, dtype=torch.float64), vmf(5.0)),
        "u-ps": (HypersphericalUniform(d, dtype=torch.float64), ps(5.0)),
    }[pair]
    kl = kl_divergence(p, q)
    assert float(kl) >= 0
    x = p.sample((40000,))
    ok, mean, se = within_se(p.log_prob(x) - q.log_prob(x), kl)
    assert ok, (float(kl), float(mean), float(se))


@pytest.mark.parametrize("d", [2, 3, 512, 4096])
def test_power_spherical_kl_to_uniform_small_kappa_against_mpmath(d):
    # KL = G(k) - G(0) - k G'(k), G(k) = lgamma(2b + k) - lgamma(b + k) - k log 2, b = (d-1)/2
    import mpmath as mp

    kappas = [1e-8, 1e-3, 0.2, 3.0, 50.0, 1e4]
    got = kl_divergence(
        PowerSpherical(unit(len(kappas), d), torch.tensor(kappas, dtype=torch.float64)),
        HypersphericalUniform(d, dtype=torch.float64),
    )
    with mp.workdps(40):
        b = mp.mpf(d - 1) / 2
        for k, g in zip(kappas, got.tolist()):
            k = mp.mpf(k)
            ref = (
                mp.loggamma(2 * b + k)
                - mp.loggamma(2 * b)
                - mp.loggamma(b + k)
                + mp.loggamma(b)
                - k * (mp.digamma(2 * b + k) - mp.digamma(b + k))
            )
            assert g == pytest.approx(float(ref), rel=1e-12), (k, g, ref)


def test_kl_identical_is_zero_and_dims_must_match():
    q = make(VonMisesFisher, 8, 3.0)
    assert float(kl_divergence(q, q)) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="different spheres"):
        kl_divergence(q, HypersphericalUniform(9))


def test_uniform():
    u = HypersphericalUniform(3, batch_shape=(2,), dtype=torch.float64)
    x = u.sample((5,))
    assert x.shape == (5, 2, 3) and (x.norm(dim=-1) - 1).abs().max() < 1e-12
    torch.testing.assert_close(u.log_prob(x), torch.full((5, 2), -math.log(4 * math.pi), dtype=torch.float64))
    assert u.entropy().tolist() == pytest.approx([math.log(4 * math.pi)] * 2, rel=1e-15)
    assert u.expand((3, 2)).sample().shape == (3, 2, 3)
    ok, *_ = within_se(u.sample((20000,))[:, 0], u.mean[0])
    assert ok
    for bad in (1, 0, 2.5, True):
        with pytest.raises(ValueError, match="ambient dimension"):
            HypersphericalUniform(bad)
    with pytest.raises(ValueError, match="norm"):
        u.log_prob(torch.ones(3, dtype=torch.float64))


def test_kappa_zero_is_uniform():
    d = 10
    x = unit(7, d)
    for cls in FAMILIES:
        q = cls(unit(d), torch.tensor(0.0, dtype=torch.float64))
        torch.testing.assert_close(q.log_prob(x), torch.full((7,), -log_sphere_area(d), dtype=torch.float64))
        assert float(q.entropy()) == pytest.approx(log_sphere_area(d), rel=1e-14)
    # the antipode of a kappa = 0 Power Spherical is an ordinary point
    mu = unit(d)
    assert torch.isfinite(PowerSpherical(mu, torch.tensor(0.0, dtype=torch.float64)).log_prob(-mu))
    assert PowerSpherical(mu, torch.tensor(2.0, dtype=torch.float64)).log_prob(-mu) == -math.inf


def test_bad_arguments_are_rejected_with_clear_messages():
    d = 4
    loc = unit(3, d)
    with pytest.raises(ValueError, match=r"found norm 2 at batch index \(1,\)"):
        VonMisesFisher(torch.stack([loc[0], 2 * loc[1], loc[2]]), torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="concentration must be finite and >= 0; found -1"):
        PowerSpherical(loc, torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="concentration must be finite"):
        VonMisesFisher(loc, torch.tensor([1.0, float("nan"), 2.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="non-finite"):
        VonMisesFisher(torch.full((d,), float("nan"), dtype=torch.float64), 1.0)
    with pytest.raises(ValueError, match="trailing 1"):
        VonMisesFisher(loc, torch.ones(3, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="do not broadcast"):
        VonMisesFisher(loc, torch.ones(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="d >= 2"):
        VonMisesFisher(torch.ones(1, dtype=torch.float64), 1.0)
    q = VonMisesFisher(loc, torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 4\)"):
        q.log_prob(unit(3, 5))
    with pytest.raises(ValueError, match="found norm 3"):
        q.log_prob(3 * unit(3, d))
    # validation can be turned off, as in torch.distributions
    VonMisesFisher(2 * loc, torch.ones(3, dtype=torch.float64), validate_args=False)


def test_float32_parameters():
    d = 512
    q = VonMisesFisher(unit(6, d, dtype=torch.float32), torch.linspace(0, 1e4, 6))
    x = q.sample()
    assert x.dtype == torch.float32 and torch.isfinite(q.log_prob(x)).all()
    q64 = VonMisesFisher(q.loc.double(), q.concentration.double())
    torch.testing.assert_close(q.log_prob(x).double(), q64.log_prob(x.double()), rtol=1e-5, atol=1e-2)
    p = PowerSpherical(q.loc, q.concentration)
    assert torch.isfinite(p.entropy()).all() and p.rsample().dtype == torch.float32
