"""``asymvlm-demo``: the whole package on the offline default, in one command (``make demo``).

On ShapeWorld (v3 by default, ``--world 2`` for the earlier world) with its toy CLIP (built on
first use, then loaded from the user cache):

1. cache the frozen embeddings of a training split (every visual style; the caption styles the toy
   CLIP was pretrained on: plain in v3, every style in v2);
2. train a vMF and a Power Spherical head centrally with the AsymVLM loss (frozen mean direction);
3. federated: K clients with a Dirichlet(0.1) shape skew train a head with a learned mean under
   FedAvg, FedAvgM, FedProx, GHBM, FedAdam, FedYogi and AdaFedAdam, each recipe's server
   hyperparameters chosen on a validation split (:data:`~asymvlm.training.demo_federated.FED_GRID`;
   by R@1 of the most specific captions, ties broken by their likelihood), next to a centralised
   and an IID reference at the same budget;
4. merging: a learned-mean base head on plain captions (v3), one expert per caption style that
   neither the toy CLIP nor the base has seen (a template prefix, another word order; dense and
   TaLoS-masked), merged by task arithmetic, TIES, DARE-TIES and TaLoS, lambda chosen on the
   styles' validation splits by mean normalised R@1 (by the validation likelihood where R@1 is the
   same for every lambda);
5. evaluate everything with :mod:`eval` next to the CLIP baseline on held-out ShapeWorld, print the
   summary and federated tables, and write ``report.json``, ``metrics.json`` and PNG plots to
   ``--output_dir``.

``--quick`` is a smoke version (a small toy CLIP, small splits, few steps) for CI.

This module is the command (its parser, ``main`` and the order of the steps); the steps are
:mod:`asymvlm.training.demo_steps` (1, 2, 4, 5), :mod:`asymvlm.training.demo_federated` (3) and
:mod:`asymvlm.training.demo_report` (6).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

# federated_table and PROVENANCE_PACKAGES are not used here: tests reach them through this module
from asymvlm.training.demo_federated import (
    federated_table,  # noqa: F401
    run_federated_grid,
)
from asymvlm.training.demo_report import (
    PROVENANCE_PACKAGES,  # noqa: F401
    build_report,
    print_summary,
    provenance,
    write_report,
)
from asymvlm.training.demo_steps import (
    EVAL_SEEDS,
    MERGE_BASE_STYLES,
    MERGE_DOMAINS,
    QUICK_TOY_STEPS,
    build_caches,
    demo_encoder,
    evaluate_models,
    lap,
    merge_experts,
    say,
    train_central,
    train_head,
    training_cache,
)

__all__ = ["main", "central_model", "prepare_demo", "serve_demo", "build_parser", "provenance", "EVAL_SEEDS"]


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """The demo's sizes (the full run's, or ``--quick``'s) with the flags that override them, the
    federation, the world and the heads' training caption styles."""
    full = dict(
        toy_steps=None, train_images=8000, eval_images=1000, domain_images=400, steps=400, batch=512,
        rounds=16, local_steps=8, local_batch=128, expert_steps=80, hidden=[1024, 1024, 1024],
        fed_hidden=[256, 256], val_images=500,
    )  # fmt: skip
    quick = dict(
        toy_steps=QUICK_TOY_STEPS, train_images=1500, eval_images=300, domain_images=120, steps=60, batch=256,
        rounds=4, local_steps=4, local_batch=64, expert_steps=15, hidden=[256, 256],
        fed_hidden=[64], val_images=200,
    )  # fmt: skip
    s = quick if args.quick else full
    for k in ("train_images", "eval_images", "steps", "rounds"):
        v = getattr(args, k)
        if v is not None:
            s[k] = v
    s["clients"], s["world"], s["quick"] = args.clients, args.world, args.quick
    s["dataset"] = f"shapeworld:{args.world}"
    from asymvlm.worlds.toyclip import PRETRAINING_STYLES

    s["caption_styles"] = ",".join(PRETRAINING_STYLES[args.world])  # the heads' training captions
    return s


def central_model(
    output_dir: str | Path = "demo-out", family: str = "vmf", *, quick: bool = False, seed: int = 0
) -> Path:
    """The demo's central head of ``family`` (``<output_dir>/central-<family>/model``, what ``asymvlm-demo``
    writes): used as it is when there, else trained exactly as the demo trains it (the toy CLIP and
    the embedding cache are built on first use). ``asymvlm-serve --demo`` serves it."""
    out = Path(output_dir) / f"central-{family}"
    if (out / "model" / "asymvlm_config.json").is_file():
        return out / "model"
    args = build_parser().parse_args(["--output_dir", str(output_dir), "--seed", str(seed), *(["--quick"] * quick)])
    s = _settings(args)
    encoder, spec = demo_encoder(s["toy_steps"], s["world"])
    cache = training_cache(encoder, spec, s, seed, s["caption_styles"])
    return train_head(cache.path, out, s, family, seed)


def prepare_demo(demo_dir: str | Path = "demo-out", *, quick: bool = False, progress: bool = True) -> tuple[Path, Path]:
    """``(model folder, gallery folder)`` of the demo: the demo's central vMF head (trained if
    missing, as ``asymvlm-demo`` trains it) and its gallery (:func:`asymvlm.training.serve.demo_gallery`)."""
    from asymvlm.training.serve import demo_gallery

    model_dir = central_model(demo_dir, "vmf", quick=quick)
    return model_dir, demo_gallery(model_dir, demo_dir, progress=progress)


def serve_demo(demo_dir: str | Path, serve_argv: list[str], *, quick: bool = False) -> int:
    """``asymvlm-demo --serve``: train what the demo server needs when it is missing
    (:func:`prepare_demo`), then serve it with ``asymvlm-serve``'s flags ``serve_argv`` (``--port``,
    ``--api_key_file``, ...); the default abstention is the demo's (:data:`asymvlm.training.serve.DEMO_ABSTAIN`)."""
    from asymvlm.errors import ConfigError
    from asymvlm.serve.cli import build_serve_parser, serve
    from asymvlm.training.serve import DEMO_ABSTAIN

    parser = build_serve_parser()
    args = parser.parse_args(serve_argv)
    if args.model or args.index or args.demo:
        raise ConfigError("asymvlm-demo --serve serves the demo's model and gallery (under --output_dir); "
                          "leave out --model, --index and --demo")  # fmt: skip
    args.model, args.index = (str(p) for p in prepare_demo(demo_dir, quick=quick))
    if args.abstain == parser.get_default("abstain"):
        args.abstain = DEMO_ABSTAIN
    return serve(args)


EPILOG = """examples:
  asymvlm-demo                                   # the full run (about 5 minutes with the toy CLIP built)
  asymvlm-demo --quick --output_dir demo-quick   # the smoke version (about a minute)
  asymvlm-demo --steps 800 --rounds 30 --clients 16 --output_dir demo-big
  asymvlm-demo --serve                           # the demo's model (trained if missing) over HTTP: http://127.0.0.1:8000/
"""


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``asymvlm-demo`` (flags spelled with underscores or dashes; no abbreviations)."""
    from asymvlm.cli import make_parser, summary

    p = make_parser("asymvlm-demo", summary(__doc__), EPILOG)
    p.add_argument("--output_dir", default="demo-out", help="report.json, metrics.json, the plots and every run.")
    p.add_argument("--quick", action="store_true", help="A small smoke version (a smaller toy CLIP; < 2 minutes).")
    p.add_argument("--train_images", type=int, default=None, help="Training images (default 8000; --quick 1500).")
    p.add_argument("--eval_images", type=int, default=None, help="Held-out images (default 1000; --quick 300).")
    p.add_argument("--steps", type=int, default=None, help="Central training steps per head (default 400; --quick 60).")
    p.add_argument("--rounds", type=int, default=None, help="Federated rounds per recipe (default 16; --quick 4).")
    p.add_argument("--clients", type=int, default=8, help="Federated clients.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the data splits and the runs.")
    p.add_argument(
        "--world", type=int, default=3, choices=(2, 3),
        help="ShapeWorld version (3, the default: scenes of 1-3 objects with relations, its own toy CLIP; "
        "2: the earlier one-object world).",
    )  # fmt: skip
    p.add_argument(
        "--serve", nargs=argparse.REMAINDER, default=None, metavar="SERVE_FLAGS",
        help="Instead of the whole demo: train the demo's central vMF head if --output_dir lacks it, build its "
        "ShapeWorld gallery, then serve them (asymvlm-serve --demo). Last on the line: what follows it are "
        "asymvlm-serve's flags (--port, --api_key_file, ...).",
    )  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> int:
    """``asymvlm-demo``; returns the exit status (2 for a user error, printed as one line)."""
    from asymvlm.cli import run

    return run("asymvlm-demo", _main, argv)


def _check_args(args: argparse.Namespace) -> None:
    from asymvlm.errors import ConfigError

    for name in ("train_images", "eval_images", "steps", "rounds"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name} must be >= 1, got {value}")
    if args.clients < 2:
        raise ConfigError(f"--clients must be >= 2 (a federation), got {args.clients}")
    if args.seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {args.seed}")


def _main(argv: list[str]) -> int:
    """The demo's steps in order (each says what it does and how long it took); 1 when a central
    head's uncertainty-ambiguity correlation is not finite."""
    args = build_parser().parse_args(argv)
    if args.serve is not None:  # train what the demo server needs when it is missing, then serve
        return serve_demo(args.output_dir, args.serve, quick=args.quick)
    _check_args(args)
    start = time.time()
    s = _settings(args)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    import torch

    torch.manual_seed(args.seed)
    say("[1/6] toy CLIP (built and cached on first use) and the embedding caches")
    with lap(timings, "caches"):
        data = build_caches(s, args.seed)
    say(f"[2/6] central heads (vMF, PS): {s['steps']} steps, batch {s['batch']}")
    with lap(timings, "central"):
        central = train_central(data, s, out, args.seed)
    say(
        f"[3/6] federated: {s['clients']} clients (Dirichlet(0.1) shape skew), head with a learned mean, "
        f"{s['rounds']} rounds x {s['local_steps']} local steps; server hyperparameters chosen on validation"
    )
    with lap(timings, "federated"):
        fed_rows, fed_models = run_federated_grid(data, s, out, args.seed)
    say(
        f"[4/6] merging: a base head with a learned mean on {'/'.join(MERGE_BASE_STYLES[s['world']])} captions, "
        f"one expert per caption style the base never saw ({', '.join(MERGE_DOMAINS[s['world']])}), dense and "
        "TaLoS; merges"
    )
    with lap(timings, "experts_and_merges"):
        merged = merge_experts(data, s, out, args.seed)
    say("[5/6] evaluation on held-out ShapeWorld (CLIP baseline, central, federated, merged)")
    with lap(timings, "evaluation"):
        metrics, confidence = evaluate_models(data, s, out, central, merged, fed_models)

    say("[6/6] report")
    report = build_report(data, metrics, confidence, fed_rows, merged, s, args.seed, timings, start)
    main_models = ["clip", *central, *(f"merged-{k}" for k in merged)]
    top = int(data.eval_data.levels.max())
    plots = write_report(report, metrics, confidence, main_models, top, out, s["world"])
    print_summary(report, metrics, confidence, main_models, data.eval_data, out, plots)
    if not all(math.isfinite(v) for v in report["uncertainty_ambiguity_spearman"].values()):
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
