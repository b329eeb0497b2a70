"""``asymvlm-merge``: merge fine-tuned AsymVLM heads, checkpoints, task vectors or LoRA adapters.

Values come from a YAML recipe (``--config recipe.yaml``, keys = the long flags with underscores),
then command-line flags override them; unknown keys are an error. Inputs that do not fit
together (keys, shapes, bases, non-finite values, bad density) are a clear error and nothing is
written; outputs are written atomically with a ``merge.json`` report.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["main", "build_parser"]

EPILOG = """examples:
  asymvlm-merge --base runs/base/model --inputs runs/a/model runs/b/model --method ties --density 0.2 --out merged
  asymvlm-merge --base base/model --inputs a/model b/model --method task_arithmetic \\
      --lam-grid 0.2,0.4,0.6,0.8,1.0 --val caches/a-val caches/b-val --out merged
  asymvlm-merge --base base.safetensors --inputs ft1.safetensors ft2.safetensors --method dare_ties --p 0.9 --out m
  asymvlm-merge --inputs adapter1 adapter2 --method task_arithmetic --lora-output concat --out merged-adapter
  asymvlm-merge --inputs adapter1 adapter2 --method ties --lora-output svd --rank 8 --out merged-adapter
  asymvlm-merge --config recipe.yaml --lam 0.7

recipe.yaml:
  base: runs/base/model
  inputs: [runs/a/model, runs/b/model]
  method: ties
  density: 0.2
  lam: 1.0
  out: merged
"""

# YAML key -> (flag, argparse kwargs); the merge options passed to the method are OPTION_KEYS
SPEC: dict[str, tuple[str, dict[str, Any]]] = {
    "base": ("--base", {"help": "What the inputs were fine-tuned from: a saved AsymVLM or a .safetensors checkpoint."}),
    "inputs": ("--inputs", {"nargs": "+", "help": "AsymVLMs, checkpoints, task-vector dirs or peft adapters."}),
    "out": ("--out", {"help": "Output directory (written atomically)."}),
    "method": ("--method", {"help": "Merge method (see --list-methods); default ties."}),
    "lam": ("--lam", {"type": float, "help": "Scaling lambda of the merged task vector (default 1.0)."}),
    "weights": ("--weights", {"nargs": "+", "type": float, "help": "Per-input weights."}),
    "density": ("--density", {"type": float, "help": "TIES: fraction of entries kept per task, in (0, 1] (0.2)."}),
    "scope": ("--scope", {"choices": ("global", "per_tensor"), "help": "TIES top-k scope (global: the paper's)."}),
    "sign": ("--sign", {"choices": ("total", "frequency"), "help": "TIES sign election."}),
    "sign_weighted": (
        "--sign-weighted",
        {"action": "store_const", "const": True, "help": "Elect on weighted vectors."},
    ),
    "normalize": ("--normalize", {"choices": ("count", "weight"), "help": "TIES disjoint mean: by count or weight."}),
    "zero_sign": ("--zero-sign", {"choices": ("majority", "positive", "none"), "help": "TIES: resolve a zero sum."}),
    "p": ("--p", {"type": float, "help": "DARE drop probability in [0, 1) (0.9)."}),
    "seed": ("--seed", {"type": int, "help": "DARE seed."}),
    "lora_output": (
        "--lora-output",
        {"choices": ("dense", "concat", "svd"), "help": "LoRA inputs: dense (folded into --base), concat, svd."},
    ),
    "rank": ("--rank", {"type": int, "help": "LoRA svd output rank (default: the largest input rank)."}),
    "lam_grid": ("--lam-grid", {"help": "Comma-separated lambdas to search on --val (AsymVLM inputs)."}),
    "val": ("--val", {"nargs": "+", "help": "Validation embedding caches, one per input (normalised R@1)."}),
}
OPTION_KEYS = ("density", "scope", "sign", "sign_weighted", "normalize", "zero_sign", "p", "seed")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="asymvlm-merge",
        description=__doc__.splitlines()[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default=None, help="YAML recipe (keys as the flags, with underscores).")
    for key, (flag, kw) in SPEC.items():
        p.add_argument(flag, dest=key, default=None, **kw)
    p.add_argument("--no-progress", action="store_true", help="No progress bar.")
    p.add_argument("--list-methods", action="store_true", help="List the merge methods with their papers.")
    return p


def _config(argv: list[str]) -> dict[str, Any]:
    from asymvlm.config import load_yaml

    args = build_parser().parse_args(argv)
    cfg: dict[str, Any] = {}
    if args.config:  # ConfigError (a ValueError) names unknown keys
        cfg.update(load_yaml(args.config, prog="asymvlm-merge", known=SPEC))
    cfg.update({k: v for k, v in vars(args).items() if k in SPEC and v is not None})
    cfg["_progress"] = not args.no_progress
    cfg["_list"] = args.list_methods
    grid = cfg.get("lam_grid")
    if isinstance(grid, str):
        try:
            cfg["lam_grid"] = [float(x) for x in grid.split(",") if x.strip()]
        except ValueError as err:
            raise ValueError(f"--lam-grid must be comma-separated numbers, got {grid!r}") from err
    for key in ("inputs", "val"):
        if isinstance(cfg.get(key), str):
            cfg[key] = [cfg[key]]
    return cfg


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = _config(argv)
    except ValueError as err:
        print(f"asymvlm-merge: error: {err}", file=sys.stderr)
        return 2
    if cfg["_list"]:
        from asymvlm.merging.methods import METHODS

        print(METHODS.describe())
        return 0
    missing = [k for k in ("inputs", "out") if not cfg.get(k)]
    if missing:
        print(f"asymvlm-merge: error: missing {', '.join('--' + m for m in missing)}", file=sys.stderr)
        return 2
    from asymvlm.merging.api import merge
    from asymvlm.merging.task_vectors import MergeInputError

    method = cfg.get("method", "ties")
    options = {k: cfg[k] for k in OPTION_KEYS if k in cfg}

    def log(entry: dict[str, Any]) -> None:
        extra = ""
        if "normalised_R@1" in entry:
            extra = " normalised R@1 " + ", ".join(f"{x:.3f}" for x in entry["normalised_R@1"])
        print(f"  lam={entry['lam']:<6g} score={entry['score']:.4f}{extra}")

    try:
        report = merge(
            cfg.get("base"),
            cfg["inputs"],
            cfg["out"],
            method,
            lam=float(cfg.get("lam", 1.0)),
            weights=cfg.get("weights"),
            lora_output=cfg.get("lora_output", "concat"),
            rank=cfg.get("rank"),
            lam_grid=cfg.get("lam_grid"),
            val=cfg.get("val"),
            progress=cfg["_progress"],
            log=log,
            **options,
        )
    except (MergeInputError, ValueError, FileNotFoundError) as err:
        print(f"asymvlm-merge: error: {err}", file=sys.stderr)
        return 1
    opts = ", ".join(f"{k}={v}" for k, v in options.items())
    what = f"{len(report['inputs'])} {report['kind']} input(s)"
    onto = f" onto {report['base']}" if report.get("base") else ""
    size = f"; {report['keys']} tensors, {report['parameters']:,} parameters" if "keys" in report else ""
    print(
        f"asymvlm-merge: merged {what}{onto} with {method}({opts}) lam={report.get('lam', cfg.get('lam', 1.0))}{size}"
    )
    if "lambda_search" in report:
        print(f"  best lam {report['lambda_search']['best_lam']} (score {report['lambda_search']['best_score']:.4f})")
    if "truncation_error" in report:
        te = report["truncation_error"]
        print(f"  rank-{report['rank']} SVD truncation error: overall {te['overall']:.3e}, worst layer {te['max']:.3e}")
    elif report.get("output") == "concat":
        print(f"  exact concatenated LoRA of rank {report['rank']}")
    print(f"  -> {cfg['out']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
