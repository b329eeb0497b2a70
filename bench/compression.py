"""What compressed uploads cost in accuracy: the demo's non-IID federation with each upload encoder.

The demo's federated setting (``asymvlm-demo`` step 3: ShapeWorld v3 through the toy CLIP, 8 clients
with a Dirichlet(0.1) shape skew, the head with a learned mean, 16 rounds x 8 local steps, FedAdam at
the demo's chosen server lr 0.03 and tau 1e-3), run once per ``--compression`` spec and seed, side by
side with the uncompressed run of the same seed. Reported per encoder: bytes each client uploads per
round (and the ratio to float32), validation R@1 of the most specific captions and their mean log
p(correct image), mean and spread over the seeds, and the difference to the uncompressed run.

Run:  python bench/compression.py [--seeds 0,1,2] [--md PATH] [--json PATH]
      python bench/compression.py --quick      (the demo's --quick sizes, one seed, three encoders)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from _common import Results, format_ratio

SPECS = [
    ("none", {}),
    ("bf16", {}),
    ("int8", {}),
    ("topk", {"topk": {"fraction": 0.1}}),
    ("topk", {"topk": {"fraction": 0.01}}),
    ("topk", {"topk": {"fraction": 0.01, "error_feedback": False}}),
    ("topk+int8", {"topk": {"fraction": 0.01}}),
]
QUICK_SPECS = [SPECS[0], SPECS[2], SPECS[4]]


def label(spec: str, options: dict[str, Any]) -> str:
    opts = options.get("topk", {})
    if not opts:
        return spec
    extra = "" if opts.get("error_feedback", True) else ", no error feedback"
    return f"{spec} ({opts['fraction']:g}{extra})"


def run_one(data: Any, s: dict, val: Any, spec: str, options: dict, seed: int, out: Path) -> dict[str, Any]:
    from asymvlm.config import DataArguments
    from asymvlm.federated.config import FederatedArguments
    from asymvlm.federated.data import get_federated_data
    from asymvlm.federated.rounds import run_federated
    from asymvlm.heads import HeadConfig
    from asymvlm.training.demo_federated import FED_PARTITION, _specific_log_p, _specific_r1

    data_args = DataArguments(
        dataset=s["dataset"], encoder=data.spec[0], pretrained=data.spec[1], train_images=s["train_images"],
        data_seed=0, eval_images=0, caption_styles=s["caption_styles"],
    )  # fmt: skip
    fed = FederatedArguments(
        rounds=s["rounds"], local_steps=s["local_steps"], local_batch_size=s["local_batch"], local_lr=0.2,
        local_momentum=0.9, eval_every=0, seed=seed, progress=False, overwrite=True, num_clients=s["clients"],
        recipe="fedadam", compression=spec, compression_options=json.dumps(options) if options else "",
        output_dir=str(out / f"{spec}-{seed}-{abs(hash(json.dumps(options, sort_keys=True))) % 10**6}"),
        **FED_PARTITION,
    )  # fmt: skip
    logs: list[dict] = []
    t = time.time()
    _, model = run_federated(
        fed, get_federated_data(data_args, fed), head=HeadConfig(hidden_dims=tuple(s["fed_hidden"]),
        direction="learned"), recipe_options={"server_lr": 0.03, "server_tau": 1e-3}, log=logs.append,
    )  # fmt: skip
    comm = next(e for e in logs if e.get("event") == "communication per client and round")
    model.head.eval()
    return {
        "r1": _specific_r1(model.head, val), "log_p": _specific_log_p(model.head, val), "seconds": time.time() - t,
        "sent": comm["sent_bytes"], "dense": comm["dense_bytes"],
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--work_dir", default="/tmp/asymvlm-bench-compression")
    p.add_argument("--md", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from asymvlm.eval.benchmark import shapeworld_eval_data
    from asymvlm.training import demo as D
    from asymvlm.training.demo_steps import EVAL_SEEDS, build_caches

    demo_args = D.build_parser().parse_args(["--quick"] if args.quick else [])
    s = D._settings(demo_args)
    data = build_caches(s, 0)
    val = shapeworld_eval_data(data.encoder, n=s["val_images"], seed=EVAL_SEEDS["validation"], **data.world)
    seeds = [0] if args.quick else [int(x) for x in args.seeds.split(",")]
    specs = QUICK_SPECS if args.quick else SPECS
    runs: dict[str, list[dict]] = {}
    for spec, options in specs:
        name = label(spec, options)
        for seed in seeds:
            r = run_one(data, s, val, spec, options, seed, Path(args.work_dir))
            runs.setdefault(name, []).append(r)
            print(f"{name:<34} seed {seed}: R@1 {r['r1']:.3f} log p {r['log_p']:.3f} "
                  f"{r['sent']:,} B ({r['seconds']:.0f} s)", flush=True)  # fmt: skip
    results = Results("compression", "Compressed uploads: accuracy and bytes on the demo's non-IID federation")
    base = runs["none"]
    lines = ["| encoder | bytes / client / round | vs float32 | val R@1 (mean ± sd) | Δ R@1 vs none | "
             "val log p | Δ log p |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, rs in runs.items():
        r1 = [r["r1"] for r in rs]
        lp = [r["log_p"] for r in rs]
        d_r1 = [a["r1"] - b["r1"] for a, b in zip(rs, base)]
        d_lp = [a["log_p"] - b["log_p"] for a, b in zip(rs, base)]
        sd = statistics.stdev(r1) if len(r1) > 1 else 0.0
        lines.append(
            f"| {name} | {rs[0]['sent']:,} | {format_ratio(rs[0]['dense'] / rs[0]['sent'], 'smaller', 'larger')} | "
            f"{statistics.mean(r1):.3f} ± {sd:.3f} | {statistics.mean(d_r1):+.3f} | {statistics.mean(lp):.3f} | "
            f"{statistics.mean(d_lp):+.3f} |"
        )
        results.add(f"{name}: bytes per client and round vs float32", rs[0]["sent"], rs[0]["dense"], "B",
                    higher_is_better=False, better="smaller", worse="larger",
                    r1=r1, log_p=lp, seeds=seeds)  # fmt: skip
    text = "\n".join(lines)
    print(text)
    if args.md:
        Path(args.md).write_text(
            f"Command: `python bench/compression.py {' '.join(sys.argv[1:] if argv is None else argv)}`\n\n"
            f"Seeds {seeds}; Δ: the same seed's uncompressed run.\n\n{text}\n"
        )
    if args.json:
        results.write(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
