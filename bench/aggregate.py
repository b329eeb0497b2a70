"""One FedAvg and one FedAdam server step: asymvlm's core vs Flower's NumPy pattern, same inputs.

K = 32 clients send 10M-parameter deltas (10 layers of 1M float32, generated once). Timed side
by side in one process:

* Flower transcription: ``aggregate`` (every layer multiplied by the client's example count into
  new arrays, summed over clients, divided by the total) and FedAdam's update on NumPy lists
  (``delta = avg - w``, ``m``, ``v``, ``w + eta_norm m / (sqrt(v) + tau)``);
* asymvlm: :class:`asymvlm.federated.core.WeightedMean` (streams over clients, one accumulator per layer)
  and ``chain(scale_by_adam, scale)`` on torch tensors.

Both produce the same numbers (checked; for FedAdam's sign-like first step up to the entries whose
float32 average rounds differently near zero). Prints best-of-3 seconds, the speed-up and the peak extra
resident memory during the step (in models: 1 model = 40 MB here).

Run:  python bench/aggregate.py [--clients 32] [--params 10000000] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import math
from functools import reduce

import numpy as np
import torch
from _common import Results, timed

from asymvlm.federated.core import WeightedMean, apply_updates, chain, scale, scale_by_adam


def flower_aggregate(results: list[tuple[list[np.ndarray], int]]) -> list[np.ndarray]:
    """Flower's ``aggregate`` (weighted by num_examples), transcribed."""
    total = sum(n for _, n in results)
    weighted = [[layer * n for layer in weights] for weights, n in results]
    return [reduce(np.add, layers) / total for layers in zip(*weighted)]


class FlowerFedAdam:
    """Flower's FedAdam server update on top of the FedAvg average, transcribed."""

    def __init__(self, current: list[np.ndarray], eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-9):
        self.w, self.eta, self.b1, self.b2, self.tau = current, eta, beta_1, beta_2, tau
        self.m = self.v = None

    def step(self, results, server_round: int) -> list[np.ndarray]:
        avg = flower_aggregate(results)
        delta = [x - y for x, y in zip(avg, self.w)]
        self.m = [np.zeros_like(x) for x in delta] if self.m is None else self.m
        self.v = [np.zeros_like(x) for x in delta] if self.v is None else self.v
        self.m = [self.b1 * x + (1 - self.b1) * y for x, y in zip(self.m, delta)]
        self.v = [self.b2 * x + (1 - self.b2) * np.multiply(y, y) for x, y in zip(self.v, delta)]
        eta_norm = self.eta * math.sqrt(1 - self.b2 ** (server_round + 1)) / (1 - self.b1 ** (server_round + 1))
        return [x + eta_norm * y / (np.sqrt(z) + self.tau) for x, y, z in zip(self.w, self.m, self.v)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--params", type=int, default=10_000_000)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="8 clients x 1M parameters")
    parser.add_argument("--json", default=None, help="write the result rows to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.params = 8, 1_000_000
    results = Results("aggregate", "One FedAvg / FedAdam server step: asymvlm core vs Flower's NumPy pattern")
    k, per = args.clients, args.params // args.layers
    g = torch.Generator().manual_seed(0)
    names = [f"layer{i}" for i in range(args.layers)]
    params = {n: torch.randn(per, generator=g) for n in names}
    # client models (Flower receives models; our core receives deltas = model - global): same data
    models = [{n: params[n] + 0.01 * torch.randn(per, generator=g) for n in names} for _ in range(k)]
    deltas = [{n: m[n] - params[n] for n in names} for m in models]
    examples = [int(x) for x in torch.randint(10, 1000, (k,), generator=g)]
    flower_results = [([m[n].numpy() for n in names], e) for m, e in zip(models, examples)]
    w_np = [params[n].numpy() for n in names]
    model_mib = args.params * 4 / 2**20
    print(
        f"K={k} clients, {args.params / 1e6:.0f}M float32 parameters ({model_mib:.0f} MiB per model), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )

    # --- FedAvg
    t_fl, fl_avg, m_fl = timed(lambda: flower_aggregate(flower_results), args.repeat)
    mean = WeightedMean()
    t_us, us_step, m_us = timed(lambda: apply_updates(params, mean(deltas, examples).delta), args.repeat)
    np.testing.assert_allclose(us_step["layer0"].numpy(), fl_avg[0], rtol=1e-4, atol=1e-5)
    inputs = f"K={k}, {args.params / 1e6:g}M float32 params, best of {args.repeat}"

    def report(short: str, case: str, t_us: float, t_fl: float, m_us: float, m_fl: float) -> None:
        print(
            f"  {short:<7} Flower {t_fl:6.3f} s, peak +{m_fl / model_mib:5.1f} models | asymvlm {t_us:6.3f} s, "
            f"peak +{m_us / model_mib:5.1f} models | speed-up {t_fl / t_us:4.1f}x"
        )
        results.add(
            case, t_us, t_fl, "s", higher_is_better=False, ours_peak_models=m_us / model_mib,
            baseline_peak_models=m_fl / model_mib, inputs=inputs,
        )  # fmt: skip

    report("FedAvg", "FedAvg step: asymvlm WeightedMean vs Flower aggregate", t_us, t_fl, m_us, m_fl)

    # --- FedAdam (first server round)
    def flower_adam():
        return FlowerFedAdam(w_np).step(flower_results, server_round=1)

    tx = chain(scale_by_adam(0.9, 0.99, 1e-9, bias_correction=True, bias_correction_offset=1), scale(0.1))

    def ours_adam():
        state = tx.init(params)
        step, _ = tx.update(mean(deltas, examples).delta, state, params)
        return apply_updates(params, step)

    t_fl, fl_new, m_fl = timed(flower_adam, args.repeat)
    t_us, us_new, m_us = timed(ours_adam, args.repeat)
    # Adam's first step is ~ sign(delta) * const: entries where the float32 delta rounds near 0 may
    # differ between the two summation orders; everything else must agree
    off = ~np.isclose(us_new["layer0"].numpy(), fl_new[0], rtol=1e-3, atol=1e-4)
    assert off.mean() < 1e-3, off.mean()
    report(
        "FedAdam", "FedAdam step (first round): asymvlm chain(scale_by_adam, scale) vs Flower FedAdam",
        t_us, t_fl, m_us, m_fl,
    )  # fmt: skip
    results.note(f"Peak extra RSS during the step in models (1 model = {model_mib:.0f} MiB); outputs checked equal.")
    results.write(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
