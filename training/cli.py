"""``asymvlm-train``: train an AsymVLM head (or a text-tower LoRA adapter + head).

Runs as is on a laptop CPU and unchanged under ``accelerate launch``. Values come from a YAML file
(``--config exp.yaml``, keys = the flags with underscores), then flags override them; flags are
spelled with underscores or dashes, never abbreviated. The model is written to
``<output_dir>/model`` (what ``asymvlm-eval --model`` and ``asymvlm-merge --inputs`` take). With
``--progress false`` every logged step is one line on stderr (``step 10/1000: loss ..., kappa ...``).
A user error is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

__all__ = ["main", "build_parser", "step_line"]

PROG = "asymvlm-train"

EPILOG = """examples:
  asymvlm-train --config exp.yaml
  asymvlm-train --family ps --max_steps 2000 --output_dir runs/ps
  asymvlm-train --cache_dir caches/coco --trainable both --lora_r 8 --output_dir runs/coco-lora
  asymvlm-train --config exp.yaml --resume
  asymvlm-train --init_from runs/ps/model --caption_styles photo --max_steps 100 --output_dir runs/photo
  accelerate launch --multi_gpu --num_processes 2 --no_python asymvlm-train --config exp.yaml --output_dir runs/ddp

The model is saved to <output_dir>/model (asymvlm-eval --model runs/ps/model). The accelerate
command also runs without GPUs (CPU processes, gloo backend); accelerate's CPU launcher needs MPI.
"""


def build_parser() -> argparse.ArgumentParser:
    """The full parser of ``asymvlm-train`` (for ``--help``; parsing goes through
    :func:`asymvlm.training.config.parse_config`, which adds the YAML layer)."""
    from asymvlm.cli import dataclass_parser, summary
    from asymvlm.training.config import TRAIN_GROUPS

    p = dataclass_parser(TRAIN_GROUPS, PROG, summary(__doc__), EPILOG)
    p.add_argument("--config", default=None, help="YAML file of config keys (flags override it).")
    return p


def _main(argv: list[str]) -> int:
    from asymvlm.cli import help_requested, is_main_process

    if help_requested(argv):
        build_parser().print_help()
        return 0
    from asymvlm.training.config import parse_config
    from asymvlm.training.loop import train

    cfg = parse_config(argv)
    path = train(cfg, log=None if cfg.train.progress else _print_step(cfg.train.max_steps))
    if is_main_process():
        print(f"{PROG}: saved {path}")
    return 0


def step_line(record: dict[str, Any], max_steps: int) -> str:
    """One logged step of ``train_log.jsonl`` as a line (what the progress bar shows).

    Example:
        >>> step_line({"step": 10, "loss": 2.5, "kappa_median": 14.2, "eval/t2i_R@1": 0.5}, 100)
        'step 10/100: loss 2.5000, kappa 14.2, eval/t2i_R@1 0.5'
    """
    facts = []
    if "loss" in record:
        facts.append(f"loss {record['loss']:.4f}")
    if "kappa_median" in record:
        facts.append(f"kappa {record['kappa_median']:.3g}")
    facts += [f"{k} {v:.4g}" for k, v in record.items() if k.startswith("eval/") and isinstance(v, (int, float))]
    return f"step {record['step']}/{max_steps}: " + ", ".join(facts)


def _print_step(max_steps: int):
    logger = logging.getLogger("asymvlm.training")  # stderr as "asymvlm-train: ..." (asymvlm.cli.run)
    return lambda record: logger.info("%s", step_line(record, max_steps))


def main(argv: list[str] | None = None) -> int:
    """``asymvlm-train``; returns the exit status (2 for a user error, printed as one line)."""
    from asymvlm.cli import run

    return run(PROG, _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
