"""Accuracy and speed of asymvlm.special.

1. Accuracy: worst errors of vmf_log_normalizer and bessel_ratio against mpmath (50 digits)
   over d in [2, 4096] x kappa in [1e-6, 1e6] (the grid of tests/core/test_special.py), float64
   and float32.
2. Speed: forward + backward of the exact log-normaliser at d = 512 next to the approximate
   one (Scott et al. 2021, the reference code's) and scipy's ive-based log-normaliser (forward
   only, float64 numpy; it is -inf/NaN where ive underflows), same process, same inputs.
3. The fast path (one python d >= 102) at d in {256, 512, 1024}: forward and forward + backward of
   ours next to the approximation at N = 65,536 and 2^20 float32 kappas ~ U(0, 1000), the two
   methods called in alternation, best of the rounds for each; rows give time ratios.
4. 1M random (d, kappa) pairs (d uniform over DIMS below, kappa log-uniform in [1e-6, 1e6], seed 0),
   one call per method with a tensor of dimensions: time (best of 3, no warm-up: each call takes
   seconds) of the forward and forward + backward (w.r.t. kappa) of ours in float64 and float32,
   the approximation (Scott et al. 2021) and scipy's ive (forward: log C_d; "forward + backward":
   log C_d and A_d = ive(d/2, k) / ive(d/2 - 1, k), the derivative being -A_d). Errors:
   ours vs scipy where scipy is finite (and the fraction where it is not), and every method
   against mpmath on a random subsample. The approximation omits an additive constant per d: its
   values are aligned at kappa = 0 (exact(d, 0) - approx(d, 0) added, once per distinct d) before
   comparing; its kappa-derivative, what training uses, needs no alignment.

Errors of log C_d are relative to max(1, |reference|); errors of A_d (minus the derivative) are
relative to the reference.

Run:  python bench/special.py [--quick] [--pairs 1000000] [--mp-pairs 2000] [--json PATH]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _common import Results, best_seconds, timed

from asymvlm.special import bessel_ratio, vmf_log_normalizer, vmf_log_normalizer_approx

DIMS = [
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


def _mp_reference(dims, kappas):
    """mpmath (50 digits) log C_d and A_d for paired (d, kappa) arrays."""
    import mpmath as mp

    mp.mp.dps = 50

    def log_iv(v, k):
        return mp.log(mp.besseli(v, k, maxterms=10**6))

    ref_c, ref_a = [], []
    for d, k in zip(dims, kappas):
        v, k = mp.mpf(int(d)) / 2 - 1, mp.mpf(float(k))
        lv = log_iv(v, k)
        ref_c.append(float(v * mp.log(k) - (v + 1) * mp.log(2 * mp.pi) - lv))
        ref_a.append(float(mp.exp(log_iv(v + 1, k) - lv)))
    return np.array(ref_c), np.array(ref_a)


def rel_err_c(c, ref):
    """|c - ref| / max(1, |ref|), the error measure of log C_d."""
    return np.abs(c - ref) / np.maximum(1, np.abs(ref))


def accuracy(dims, kappas, results: Results):
    rows = []
    for d in dims:
        ref_c, ref_a = _mp_reference([d] * len(kappas), kappas)
        for dtype in (torch.float64, torch.float32):
            kt = torch.tensor(kappas, dtype=dtype)
            c = vmf_log_normalizer(d, kt).double().numpy()
            a = bessel_ratio(d, kt).double().numpy()
            err_c = rel_err_c(c, ref_c)
            err_a = np.abs(a - ref_a) / ref_a
            rows.append((d, dtype, err_c.max(), kappas[err_c.argmax()], err_a.max(), kappas[err_a.argmax()]))
    for dtype in (torch.float64, torch.float32):
        sub = [r for r in rows if r[1] == dtype]
        wc = max(sub, key=lambda r: r[2])
        wa = max(sub, key=lambda r: r[4])
        print(
            f"{str(dtype):>14}: log C_d worst {wc[2]:.2e} (d={wc[0]}, kappa={wc[3]:.3g});"
            f"  A_d worst {wa[4]:.2e} (d={wa[0]}, kappa={wa[5]:.3g})"
        )
        name = str(dtype).replace("torch.", "")
        grid = f"{len(dims)} d x {len(kappas)} kappa grid"
        results.add(
            f"grid accuracy, log C_d max rel error vs mpmath, ours {name}",
            wc[2],
            None,
            "",
            higher_is_better=False,
            worst_at=f"d={wc[0]}, kappa={wc[3]:.3g}",
            inputs=grid,
        )
        results.add(
            f"grid accuracy, A_d max rel error vs mpmath, ours {name}",
            wa[4],
            None,
            "",
            higher_is_better=False,
            worst_at=f"d={wa[0]}, kappa={wa[5]:.3g}",
            inputs=grid,
        )


def speed(n, results: Results, d=512, repeat=20):
    from scipy.special import ive

    kappa = torch.rand(n) * 1000
    k_np = kappa.double().numpy()

    def exact():
        k = kappa.clone().requires_grad_(True)
        vmf_log_normalizer(d, k).sum().backward()

    def approx():
        k = kappa.clone().requires_grad_(True)
        vmf_log_normalizer_approx(d, k).sum().backward()

    def scipy_fwd():
        with np.errstate(divide="ignore"):
            v = d / 2 - 1
            return v * np.log(k_np) - (v + 1) * np.log(2 * np.pi) - (np.log(ive(v, k_np)) + k_np)

    with np.errstate(divide="ignore"):
        finite = np.isfinite(scipy_fwd()).mean()
    t_exact, t_approx, t_scipy = (best_seconds(f, repeat) for f in (exact, approx, scipy_fwd))
    print(
        f"N={n:>7}, d={d}: exact fwd+bwd {t_exact * 1e3:8.2f} ms | approx fwd+bwd {t_approx * 1e3:7.2f} ms "
        f"(exact/approx {t_exact / t_approx:5.1f}x) | scipy ive fwd {t_scipy * 1e3:7.2f} ms "
        f"(exact/scipy {t_exact / t_scipy:5.1f}x; scipy finite on {finite:.0%} of inputs)"
    )
    inputs = f"N={n}, d={d}, float32 kappa ~ U(0, 1000)"
    results.add(
        f"d={d}, N={n}: ours fwd+bwd vs approx (Scott 2021) fwd+bwd",
        t_exact * 1e3,
        t_approx * 1e3,
        "ms",
        higher_is_better=False,
        inputs=inputs,
    )
    results.add(
        f"d={d}, N={n}: ours fwd+bwd vs scipy ive fwd (float64)",
        t_exact * 1e3,
        t_scipy * 1e3,
        "ms",
        higher_is_better=False,
        inputs=inputs + f"; scipy finite on {finite:.1%}",
    )


def interleaved_best(fns: dict, rounds: int) -> dict:
    """Best seconds of each ``fns[name]()``, called in alternation (one untimed call each first), so
    that load from other processes falls on every method alike."""
    best = dict.fromkeys(fns, float("inf"))
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def speed_by_dim(results: Results, dims=(256, 512, 1024), sizes=(65536, 1 << 20), rounds: int = 10):
    """Ours (the fast path) vs approx, forward and forward + backward, float32, per d and N."""
    print(f"  {'d':>5} {'N':>8} {'pass':<8}{'ours':>11}{'approx':>11}{'ours/approx':>13}")
    for n in sizes:
        kappa = torch.rand(n, generator=torch.Generator().manual_seed(0)) * 1000
        for d in dims:
            fns = {}
            for name, fn in (("ours", vmf_log_normalizer), ("approx", vmf_log_normalizer_approx)):
                fns[name, "fwd"] = lambda fn=fn, d=d, k=kappa: fn(d, k)
                fns[name, "fwd+bwd"] = lambda fn=fn, d=d, k=kappa: fn(d, k.clone().requires_grad_()).sum().backward()
            best = interleaved_best(fns, rounds if n <= 65536 else max(3, rounds // 3))
            for pass_name in ("fwd", "fwd+bwd"):
                t_o, t_a = best["ours", pass_name], best["approx", pass_name]
                print(f"  {d:>5} {n:>8} {pass_name:<8}{t_o * 1e3:>8.2f} ms{t_a * 1e3:>8.2f} ms{t_o / t_a:>12.2f}x")
                results.add(
                    f"d={d}, N={n} float32 {pass_name}: ours vs approx (Scott 2021)",
                    t_o * 1e3,
                    t_a * 1e3,
                    "ms",
                    higher_is_better=False,
                    inputs=f"N={n}, d={d}, float32 kappa ~ U(0, 1000), alternating calls",
                )


# --------------------------------------------------------------------------------------------
# 1M random (d, kappa) pairs
# --------------------------------------------------------------------------------------------
def random_pairs(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """d uniform over DIMS, kappa log-uniform in [1e-6, 1e6]."""
    rng = np.random.default_rng(seed)
    return rng.choice(np.array(DIMS), n), 10.0 ** rng.uniform(-6, 6, n)


def approx_offset(dims: torch.Tensor) -> torch.Tensor:
    """exact(d, 0) - approx(d, 0) per element, computed once per distinct d (float64)."""
    uniq, inverse = torch.unique(dims, return_inverse=True)
    zero = torch.zeros_like(uniq, dtype=torch.float64)
    off = vmf_log_normalizer(uniq, zero) - vmf_log_normalizer_approx(uniq.double(), zero)
    return off[inverse]


def scipy_log_c(d: np.ndarray, k: np.ndarray, with_ratio: bool = False):
    """log C_d = v log k - (v+1) log 2 pi - (log ive(v, k) + k), v = d/2 - 1 (and A_d if asked)."""
    from scipy.special import ive

    v = d / 2 - 1
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iv = ive(v, k)
        log_c = v * np.log(k) - (v + 1) * np.log(2 * np.pi) - (np.log(iv) + k)
        if not with_ratio:
            return log_c
        return log_c, ive(v + 1, k) / iv


def million(n: int, mp_pairs: int, repeat: int, results: Results) -> None:
    print(
        f"== {n:,} random (d, kappa) pairs: d uniform over {len(DIMS)} dims in [2, 4096], "
        f"kappa log-uniform in [1e-6, 1e6] (best of {repeat}, CPU, {torch.get_num_threads()} threads) =="
    )
    d_np, k_np = random_pairs(n)
    d64 = torch.from_numpy(d_np.astype(np.float64))
    k64 = torch.from_numpy(k_np)
    inputs = f"{n:,} pairs"
    tag = "1M pairs" if n == 1_000_000 else f"{n:,} pairs"

    # ---- timing: ours (float64, float32), approx (float64, float32), scipy (float64 numpy)
    def ours(dtype, backward):
        k = k64.to(dtype)

        def fn():
            kk = k.clone().requires_grad_(backward)
            out = vmf_log_normalizer(d64, kk)
            if backward:
                out.sum().backward()
                return out.detach(), kk.grad
            return out, None

        return fn

    def approx(dtype, backward):
        k, d = k64.to(dtype), d64.to(dtype)

        def fn():
            kk = k.clone().requires_grad_(backward)
            out = vmf_log_normalizer_approx(d, kk)
            if backward:
                out.sum().backward()
                return out.detach(), kk.grad
            return out, None

        return fn

    def scipy(backward):
        return lambda: scipy_log_c(d_np, k_np, with_ratio=backward)

    methods = {
        "ours float64": lambda b: ours(torch.float64, b),
        "ours float32": lambda b: ours(torch.float32, b),
        "approx float64": lambda b: approx(torch.float64, b),
        "approx float32": lambda b: approx(torch.float32, b),
        "scipy ive float64": scipy,
    }
    times, mems, outs = {}, {}, {}
    for name, make in methods.items():
        for backward in (False, True):
            t, out, mem = timed(make(backward), repeat, warmup=False)
            times[name, backward], mems[name, backward] = t, mem
            if backward:
                outs[name] = out
    print(f"  {'method':<20}{'forward':>12}{'peak RSS':>11}{'fwd + bwd':>14}{'peak RSS':>11}")
    for name in methods:
        print(
            f"  {name:<20}{times[name, False]:>10.3f} s{mems[name, False]:>7.0f} MiB"
            f"{times[name, True]:>12.3f} s{mems[name, True]:>7.0f} MiB"
        )
    print("  (scipy 'fwd + bwd' = log C_d and A_d = ive(d/2, k) / ive(d/2-1, k): the value and the derivative -A_d)")
    for pass_name, backward in (("fwd", False), ("fwd+bwd", True)):
        for ours_name, base_name in (
            ("ours float64", "approx float64"),
            ("ours float32", "approx float32"),
            ("ours float64", "scipy ive float64"),
        ):
            t_o, t_b = times[ours_name, backward], times[base_name, backward]
            print(
                f"  {pass_name:<8} {ours_name} / {base_name}: {t_o / t_b:6.2f}x the time "
                f"({'ours faster' if t_o < t_b else 'ours slower'})"
            )
            base_label = base_name.replace("approx", "approx (Scott 2021)")
            if base_name.startswith("scipy") and backward:
                base_label += " value + ive ratio"
            results.add(
                f"{tag} {pass_name}: {ours_name} vs {base_label}",
                t_o,
                t_b,
                "s",
                higher_is_better=False,
                ours_peak_mib=mems[ours_name, backward],
                baseline_peak_mib=mems[base_name, backward],
                inputs=inputs,
            )

    # ---- values and derivatives of every method
    d_t = torch.from_numpy(d_np)
    off = approx_offset(d_t).numpy()
    values, ratios = {}, {}  # log C_d and A_d (= minus the kappa-derivative) as float64 numpy
    for name in ("ours float64", "ours float32", "approx float64", "approx float32"):
        val, grad = outs[name]
        values[name] = val.double().numpy() + (off if name.startswith("approx") else 0.0)
        ratios[name] = -grad.double().numpy()
    values["scipy ive float64"], ratios["scipy ive float64"] = outs["scipy ive float64"]
    # float32 methods see kappa rounded to float32; log C_d is ill-conditioned where it crosses 0
    # (d log C / d kappa = -A_d ~ -1 there), so they are compared with references at that rounded
    # kappa: the error of the function, not of rounding its input.
    k32 = k64.float().double()
    ref32_val, ref32_grad = vmf_log_normalizer(d64, k32), bessel_ratio(d64, k32)
    exact = {64: (values["ours float64"], ratios["ours float64"]), 32: (ref32_val.numpy(), ref32_grad.numpy())}

    def bits(name):
        return 32 if "float32" in name else 64

    sc_finite = np.isfinite(values["scipy ive float64"])
    frac_nonfinite = 1 - sc_finite.mean()
    ours_nonfinite = 1 - np.isfinite(values["ours float64"]).mean()
    ref = values["ours float64"]
    err = rel_err_c(ref[sc_finite], values["scipy ive float64"][sc_finite])
    worst = np.flatnonzero(sc_finite)[err.argmax()]
    print(
        f"  scipy log C_d is non-finite on {frac_nonfinite:.2%} of the pairs (ours: {ours_nonfinite:.2%}); "
        f"where finite, max rel |ours float64 - scipy| = {err.max():.2e} (d={d_np[worst]}, kappa={k_np[worst]:.3g})"
    )
    results.add(
        f"{tag}: fraction of non-finite log C_d, ours float64 vs scipy ive",
        ours_nonfinite,
        frac_nonfinite,
        "",
        higher_is_better=False,
        ratio=None,
        inputs=inputs,
    )
    results.add(
        f"{tag}: max rel difference of log C_d, ours float64 vs scipy ive (where scipy is finite)",
        err.max(),
        None,
        "",
        higher_is_better=False,
        worst_at=f"d={d_np[worst]}, kappa={k_np[worst]:.3g}",
        inputs=f"{sc_finite.sum():,} pairs",
    )
    results.note(
        f"scipy's ive-based log C_d is non-finite (ive under/overflow) on {frac_nonfinite:.1%} of the "
        f"{n:,} (d, kappa) pairs; ours on {ours_nonfinite:.1%}."
    )

    def errors(name, sel, ref_c, ref_a):
        """Max errors over ``sel`` where the method is finite: (rel log C_d, rel A_d, abs A_d, #non-finite)."""
        c, a = values[name][sel], ratios[name][sel]
        ok_c, ok_a = np.isfinite(c), np.isfinite(a) & (ref_a > 0)
        e_c = rel_err_c(c[ok_c], ref_c[ok_c]).max() if ok_c.any() else float("nan")
        abs_a = np.abs(a[ok_a] - ref_a[ok_a])
        e_a = (abs_a / ref_a[ok_a]).max() if ok_a.any() else float("nan")
        return e_c, e_a, abs_a.max() if ok_a.any() else float("nan"), int((~ok_c).sum())

    header = f"{'max rel err log C_d':>22}{'max rel err A_d':>18}{'max abs err A_d':>18}"
    groups = [("all d", d_np > 0)] + [
        (f"d in {lo}..{hi}", (d_np >= lo) & (d_np <= hi)) for lo, hi in ((2, 8), (16, 128), (255, 513), (768, 1152))
    ]
    groups.append(("d in 2047..4096", d_np >= 2047))
    print(f"  against ours float64 (same rounded kappa) on all pairs:\n  {'method':<20}{'dims':<17}{header}")
    for name in ("ours float32", "approx float64", "approx float32"):
        for label, sel in groups if name.startswith("approx") else groups[:1]:
            ref_c, ref_a = (x[sel] for x in exact[bits(name)])
            e_c, e_a, e_abs, _ = errors(name, sel, ref_c, ref_a)
            print(f"  {name:<20}{label:<17}{e_c:>22.2e}{e_a:>18.2e}{e_abs:>18.2e}")
            if name == "approx float64" and label in ("all d", "d in 768..1152", "d in 255..513"):
                results.note(
                    f"approx (Scott 2021) float64 against ours float64 on the {label} pairs: max rel error "
                    f"of log C_d {e_c:.2e} (aligned at kappa = 0), of A_d {e_a:.2e} (max abs {e_abs:.2e})."
                )

    # ---- against mpmath on a random subsample (references at the float64 and float32-rounded kappa)
    rng = np.random.default_rng(1)
    idx = rng.choice(n, size=min(mp_pairs, n), replace=False)
    t = time.perf_counter()
    mp_ref = {64: _mp_reference(d_np[idx], k_np[idx]), 32: _mp_reference(d_np[idx], k32.numpy()[idx])}
    print(
        f"  against mpmath (50 digits) on {len(idx)} random pairs of the {n:,} "
        f"(references in {time.perf_counter() - t:.1f} s):"
    )
    print(f"  {'method':<20}{header}{'non-finite':>14}")
    err_c, err_a, err_abs = {}, {}, {}
    for name in methods:
        err_c[name], err_a[name], err_abs[name], bad = errors(name, idx, *mp_ref[bits(name)])
        print(f"  {name:<20}{err_c[name]:>22.2e}{err_a[name]:>18.2e}{err_abs[name]:>18.2e}{bad:>8} / {len(idx)}")
    print(
        "  (scipy's errors are over the pairs where it is finite; approx values aligned at kappa = 0 per d; "
        "float32 methods against the reference at their float32 kappa)"
    )
    mp_inputs = f"{len(idx)} of the {n:,} pairs"
    for ours_name, base_name in (
        ("ours float64", "approx float64"),
        ("ours float32", "approx float32"),
        ("ours float64", "scipy ive float64"),
    ):
        label = base_name.replace("approx", "approx (Scott 2021)")
        extra = " (where finite)" if base_name.startswith("scipy") else ""
        for what, errs in (
            ("log C_d max rel error", err_c),
            ("A_d max rel error", err_a),
            ("A_d max abs error", err_abs),
        ):
            aligned = " aligned at kappa=0" if "approx" in base_name and what.startswith("log") else ""
            results.add(
                f"{tag} vs mpmath: {what}, {ours_name} vs {label}{aligned}{extra}",
                errs[ours_name],
                errs[base_name],
                "",
                higher_is_better=False,
                better="smaller error",
                worse="larger error",
                inputs=mp_inputs,
            )
    results.note("A_d = I_{d/2}(kappa) / I_{d/2-1}(kappa) = -d/dkappa log C_d, the gradient that training uses.")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="examples:\n  python bench/special.py\n  python bench/special.py --quick --json /tmp/special.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="a few dimensions, 100k pairs, 200 mpmath pairs")
    parser.add_argument("--pairs", type=int, default=None, help="random (d, kappa) pairs (default 1M; quick 100k)")
    parser.add_argument("--mp-pairs", type=int, default=None, help="of those, checked against mpmath (2000; 200)")
    parser.add_argument("--json", default=None, help="write the result rows to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = Results("special", "Special functions: vMF log-normaliser accuracy and speed")
    print("== accuracy against mpmath (50 digits) ==")
    dims = [2, 512, 4096] if args.quick else DIMS
    accuracy(dims, np.logspace(-6, 6, 13 if args.quick else 49), results)
    print("== speed (best of 20, CPU) ==")
    for n in (2048, 65536):
        speed(n, results)
    threads = torch.get_num_threads()
    print(f"== fast path (python d >= 102) vs approx, float32, by d (best of alternating calls, {threads} threads) ==")
    speed_by_dim(results, rounds=4 if args.quick else 10)
    pairs = args.pairs or (100_000 if args.quick else 1_000_000)
    mp_pairs = args.mp_pairs or (200 if args.quick else 2000)
    million(pairs, mp_pairs, repeat=2 if args.quick else 3, results=results)
    results.note(
        "ratio = ours' advantage: baseline time / our time (or baseline error / our error); "
        "'slower' rows are where the baseline wins."
    )
    results.write(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
