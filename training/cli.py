"""``asymvlm-train``: train an AsymVLM head (or a text-tower LoRA adapter + head).

Runs as is on a laptop CPU and unchanged under ``accelerate launch``. Values come from a YAML file
(``--config exp.yaml``, keys = the flags with underscores), then flags override them; flags are
spelled with underscores or dashes, never abbreviated. The model is written to
``<output_dir>/model`` (what ``asymvlm-eval --model`` and ``asymvlm-merge --inputs`` take). A user
error is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse

__all__ = ["main", "build_parser"]

PROG = "asymvlm-train"

EPILOG = """examples:
  asymvlm-train --config exp.yaml
  asymvlm-train --family ps --max_steps 2000 --output_dir runs/ps
  asymvlm-train --cache_dir caches/coco --mode lora --lora_r 8 --output_dir runs/coco-lora
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

    path = train(parse_config(argv))
    if is_main_process():
        print(f"{PROG}: saved {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``asymvlm-train``; returns the exit status (2 for a user error, printed as one line)."""
    from asymvlm.cli import run

    return run(PROG, _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
