"""``asymvlm-train``: train an AsymVLM head (or a text-tower LoRA adapter + head).

Runs as is on a laptop CPU and unchanged under ``accelerate launch``.
"""

from __future__ import annotations

import sys

__all__ = ["main"]

EPILOG = """examples:
  asymvlm-train --config exp.yaml
  asymvlm-train --family ps --max_steps 2000 --output_dir runs/ps
  asymvlm-train --cache_dir caches/coco --mode lora --lora_r 8 --output_dir runs/coco-lora
  asymvlm-train --config exp.yaml --resume
  accelerate launch --num_processes 2 --cpu --no_python asymvlm-train --config exp.yaml
"""


def main(argv: list[str] | None = None) -> int:
    from asymvlm.config import ConfigError
    from asymvlm.training.config import parse_config

    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        from transformers import HfArgumentParser

        from asymvlm.training.config import TRAIN_GROUPS

        p = HfArgumentParser(
            TRAIN_GROUPS,
            prog="asymvlm-train",
            description=__doc__.splitlines()[0],
            epilog=EPILOG,
        )
        p.add_argument("--config", default=None, help="YAML file of config keys (flags override it).")
        p.formatter_class = __import__("argparse").RawDescriptionHelpFormatter
        p.print_help()
        return 0
    try:
        cfg = parse_config(argv)
    except ConfigError as err:
        print(f"asymvlm-train: error: {err}", file=sys.stderr)
        return 2
    from asymvlm.training.loop import CheckpointWriteError, TrainingDiverged, train

    try:
        path = train(cfg)
    except (TrainingDiverged, CheckpointWriteError, FileNotFoundError, ValueError) as err:
        print(f"asymvlm-train: error: {err}", file=sys.stderr)
        return 1
    print(f"asymvlm-train: saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
