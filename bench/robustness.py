"""Robustness of the aggregators to Byzantine clients: drift from the honest run and R@1.

Every aggregator (FedAvg's weighted mean, coordinate median, trimmed mean, Krum) against every
built-in attack (``asymvlm.federated.attacks``: sign flip, x10 scaling, Gaussian noise, ALIE,
caption shuffling) at 20% and 40% attackers, for a head on cached embeddings and for text-tower
LoRA + head (exact residual aggregation, robust rules in Delta-W space), with and without DP.
ShapeWorld embedded by the toy CLIP (``--quick``: a small synthetic world and a tiny random
open_clip, for the smoke test).

* drift = |theta_attacked - theta_honest| / |theta_honest - theta_0|: how far the attack moves the
  final model, relative to how far honest training moved it, for the same rule and seed (DP
  runs: relative to the honest run *without* DP, whose change the noise does not dominate); for
  LoRA also over the LoRA tensors alone (the factors and the folded base weights);
* R@1: consistent text -> image R@1 on a held-out split (the retrieved image satisfies the
  caption) of the final model (``--quick``: exact R@1).

The baseline of each row is FedAvg under the same attack in the same run; ratios are the
rule's advantage (smaller drift). DP (``dp_noise_multiplier`` 0.5, clip 1) composes only with the
mean; the robust rules refuse it (no DP analysis), which the table states. DP runs use the
insecure seeded noise stream so that the honest and attacked runs share their noise and the
drift isolates the attack.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Results  # noqa: E402

from asymvlm.config import ConfigError, DataArguments  # noqa: E402
from asymvlm.federated.config import FederatedArguments  # noqa: E402
from asymvlm.federated.data import get_federated_data  # noqa: E402
from asymvlm.federated.rounds import run_federated  # noqa: E402
from asymvlm.heads import HeadConfig  # noqa: E402

RULES = {
    "fedavg": ("fedavg", {}),
    "median": ("fedmedian", {}),
    "trimmed_mean": ("fedtrimmedavg", {"trim_beta": 0.2}),
    "krum": ("krum", {"krum_num_malicious": 2}),
}
ATTACKS = {"sign_flip": {}, "scale_x10": {"attack": "scale", "attack_scale": 10.0}, "gaussian": {"attack_scale": 3.0},
           "alie": {}, "caption_shuffle": {}}  # fmt: skip


def drift(attacked, honest, start, reference=None, keys=None) -> float:
    """|attacked - honest| / |reference - start| over ``keys`` (reference: the honest run itself, or
    for DP runs the honest run without DP, whose change is not dominated by the noise)."""
    reference = honest if reference is None else reference
    keys = list(honest) if keys is None else keys
    num = sum(float((attacked[k] - honest[k]).double().pow(2).sum()) for k in keys) ** 0.5
    den = sum(float((reference[k] - start[k]).double().pow(2).sum()) for k in keys) ** 0.5
    return num / den


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a synthetic world and a tiny random encoder (smoke test)")
    p.add_argument("--json", default=None, help="write the result rows to this JSON file")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--clients", type=int, default=10)
    args = p.parse_args(argv)
    results = Results("robustness", "Aggregators under Byzantine clients: drift from the honest run, and R@1")
    work = Path(tempfile.mkdtemp(prefix="asymvlm-robust-"))
    if args.quick:
        from asymvlm.cache import embed_dataset
        from asymvlm.encoders import load_encoder
        from asymvlm.worlds import shapeworld as sw

        enc = load_encoder("open_clip:asymvlm-tiny-vit", device="cpu")
        cache = embed_dataset(enc, sw.generate(200, seed=0), work / "cache", dtype="float32", progress=False)
        data_args = DataArguments(cache_dir=str(cache.path), encoder="open_clip:asymvlm-tiny-vit", pretrained="")
        eval_data, train_images, head = None, 200, HeadConfig(hidden_dims=[32])
        rounds, clients, fractions, kinds = 2, 5, (0.4,), ("head",)
    else:
        from asymvlm.encoders import load_encoder
        from asymvlm.eval.benchmark import shapeworld_eval_data
        from asymvlm.worlds import shapeworld as sw
        from asymvlm.worlds.toyclip import TOY_CLIP_SPEC, TOY_CLIP_TAG

        data_args = DataArguments(encoder=TOY_CLIP_SPEC, pretrained=TOY_CLIP_TAG, train_images=2000, eval_images=0)
        enc = load_encoder(TOY_CLIP_SPEC, pretrained=TOY_CLIP_TAG, device="cpu")
        eval_data = shapeworld_eval_data(enc, n=300, seed=777, caption_styles=sw.CAPTION_STYLES,
                                         visual_styles=sw.VISUAL_STYLES)  # fmt: skip
        train_images, head = 2000, HeadConfig(hidden_dims=[256, 256])
        rounds, clients, fractions, kinds = args.rounds, args.clients, (0.2, 0.4), ("head", "lora")
    from asymvlm.training.evaluation import evaluator

    def run(name, kind, rule, frac, attack, dp, **extra):
        recipe, opts = RULES[rule]
        attack_opts = dict(ATTACKS.get(attack, {}))
        fed = FederatedArguments(
            recipe=recipe, rounds=rounds, num_clients=clients, local_steps=2, local_batch_size=64, local_lr=0.5,
            local_momentum=0.9, trainable="head" if kind == "head" else "both", lora_mode="residual", lora_r=2,
            eval_every=0, progress=False, output_dir=str(work / name),
            attack=attack_opts.pop("attack", attack), malicious_fraction=frac, **attack_opts,
            dp_noise_multiplier=0.5 if dp else 0.0, dp_insecure_seed=7 if dp else None, **extra,
        )  # fmt: skip
        data = get_federated_data(data_args, fed)
        state, model = run_federated(fed, data, head=head, recipe_options=opts)
        params = {**state.params, **{f"base/{k}": v for k, v in state.base.items()}}  # LoRA: the folded base too
        quality = None
        if eval_data is not None:
            metrics = evaluator(eval_data, data.encoder)(model)
            quality = metrics.get("eval/consistent_t2i_R@1")
        return params, quality

    from asymvlm.federated.rounds import Federation

    RULES["krum"] = ("krum", {"krum_num_malicious": min(2, (clients - 3) // 2)})

    def initial(kind):
        """theta_0: the exchanged parameters (and frozen LoRA base weights) every run starts from."""
        from asymvlm.federated.client import get_base

        fed = FederatedArguments(num_clients=clients, trainable="head" if kind == "head" else "both",
                                 lora_mode="residual", lora_r=2, output_dir=str(work / "init"))  # fmt: skip
        run = Federation.build(fed, get_federated_data(data_args, fed), head)
        base = get_base(run.model, run.lora.layers) if run.lora is not None else {}
        return {**run.model.get_params(), **{f"base/{k}": v for k, v in base.items()}}

    t0 = time.time()
    print(f"{clients} clients, {rounds} rounds, {train_images} ShapeWorld images; drift | R@1")
    for kind in kinds:
        start = initial(kind)
        lora_keys = [k for k in start if "lora_" in k or k.startswith("base/")] if kind == "lora" else None
        plain_honest = {}
        for dp in (False, True):
            label = f"{kind}{' + DP' if dp else ''}"
            honest = {}
            for rule in RULES:
                try:
                    honest[rule] = run(f"{kind}-{dp}-{rule}-honest", kind, rule, 0.0, "none", dp)
                except ConfigError as err:
                    if not dp:
                        raise
                    honest[rule] = None
                    results.note(f"{label}: {rule} refuses DP ({str(err).split(':')[0]}).")
            if not dp:
                plain_honest = {rule: h[0] for rule, h in honest.items() if h is not None}
            for frac in fractions:
                for attack in ATTACKS:
                    row = {}
                    for rule in RULES:
                        if honest[rule] is None:
                            row[rule] = None
                            continue
                        params, quality = run(f"{kind}-{dp}-{rule}-{attack}-{frac}", kind, rule, frac, attack, dp)
                        ref = plain_honest.get(rule) if dp else None
                        d = drift(params, honest[rule][0], start, ref)
                        d_lora = drift(params, honest[rule][0], start, ref, lora_keys) if lora_keys else None
                        row[rule] = (d, quality, honest[rule][1], d_lora)
                    base = row["fedavg"][0]
                    line = []
                    for rule, val in row.items():
                        case = f"{label}, {int(frac * 100)}% {attack}: {rule}"
                        if val is None:
                            results.add(case, None, base, "drift", higher_is_better=False,
                                        better="smaller drift", worse="larger drift", note="refuses DP")  # fmt: skip
                            line.append(f"{rule} refused")
                            continue
                        d, q, q_honest, d_lora = val
                        results.add(case, d, base, "drift", higher_is_better=False, better="smaller drift",
                                    worse="larger drift", r1=q, honest_r1=q_honest, lora_drift=d_lora)  # fmt: skip
                        line.append(f"{rule} {d:.2f}" + (f" (LoRA {d_lora:.2f})" if d_lora is not None else "")
                                    + (f" | {q:.3f}" if q is not None else ""))  # fmt: skip
                    print(f"  {label:<10} {int(frac * 100)}% {attack:<15} " + "; ".join(line), flush=True)
    results.note(
        f"drift = |theta_attacked - theta_honest| / |theta_honest - theta_0| (same rule, seed and DP noise; DP rows "
        f"divide by the honest change without DP); LoRA rows: also over the LoRA factors and folded base alone; "
        f"R@1 = consistent text->image R@1 on 300 held-out images; {time.time() - t0:.0f} s."
    )
    results.write(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
