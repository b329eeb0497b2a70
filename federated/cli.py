"""``asymvlm-federate``: simulate federated training of AsymVLM heads / text-tower LoRA adapters.

Clients are simulated in one process on partitions of an embedding cache (by default ShapeWorld
embedded by the toy CLIP). Writes ``metrics.jsonl`` (one JSON line per round: participants,
rejections, per-client losses and the fairness summary, evaluation), a checkpoint of the server
state after every round (``--fed_resume`` continues) and the final AsymVLM in ``model/``.
"""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["main"]

EPILOG = """examples:
  asymvlm-federate --recipe fedadam --rounds 30 --num_clients 8 --partition dirichlet --partition_column shape
  asymvlm-federate --config fed.yaml --fed_resume
  asymvlm-federate --recipe fedavg --trainable both --lora_mode residual --rounds 10
  asymvlm-federate --recipe krum --num_malicious 2 --attack sign_flip --malicious_fraction 0.2
"""


def main(argv: list[str] | None = None) -> int:
    from asymvlm.federated.simulation import FederatedArguments

    from asymvlm.config import ConfigError, DataArguments, parse_dataclass_args

    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        import argparse

        from transformers import HfArgumentParser

        p = HfArgumentParser(
            (DataArguments, FederatedArguments),
            prog="asymvlm-federate",
            description=__doc__.splitlines()[0],
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("--config", default=None, help="YAML file of config keys (flags override it).")
        p.print_help()
        return 0
    try:
        data_args, fed = parse_dataclass_args((DataArguments, FederatedArguments), argv, "asymvlm-federate")
    except ConfigError as err:
        print(f"asymvlm-federate: error: {err}", file=sys.stderr)
        return 2
    from asymvlm.federated.simulation import get_federated_data, run_federated, save_federated_model

    try:
        data = get_federated_data(data_args, fed)
        print(data.summary)
        state, task = run_federated(fed, data)
    except (FileNotFoundError, ValueError) as err:
        print(f"asymvlm-federate: error: {err}", file=sys.stderr)
        return 1
    path = save_federated_model(task, state, data, Path(fed.fed_output_dir) / "model")
    print(f"asymvlm-federate: {state.round} rounds; saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
