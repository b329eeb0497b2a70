"""``asymvlm-federate``: simulate federated training of AsymVLM heads / text-tower LoRA adapters.

Clients are simulated in one process on partitions of an embedding cache (by default ShapeWorld
embedded by the toy CLIP). Writes ``metrics.jsonl`` (one JSON line per round: participants,
rejections, per-client losses and the fairness summary, evaluation), a checkpoint of the server
state after every round (``--resume`` continues) and the final AsymVLM in ``<output_dir>/model``.
Values come from a YAML file (``--config fed.yaml``), then flags override them (spelled with
underscores or dashes, never abbreviated); a user error is one line on stderr and exit status 2.

This command lives in :mod:`asymvlm.training` because it composes the federation
(:mod:`asymvlm.federated`, which imports no evaluation code) with :mod:`asymvlm.eval`'s metrics,
handed to the rounds as an ``evaluate`` function.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from asymvlm.training.evaluation import evaluator

__all__ = ["main", "build_parser", "federate", "evaluator", "run_summary"]

EPILOG = """examples:
  asymvlm-federate --recipe fedadam --rounds 30 --num_clients 8 --partition dirichlet --partition_column shape \\
      --output_dir runs/fedadam
  asymvlm-federate --config fed.yaml --resume
  asymvlm-federate --recipe fedavg --trainable both --lora_mode residual --rounds 10 --output_dir runs/fedavg
  asymvlm-federate --recipe krum --krum_num_malicious 2 --attack sign_flip --malicious_fraction 0.2
  asymvlm-federate --list_recipes

The final model is saved to <output_dir>/model (asymvlm-eval --model runs/fedavg/model).
A round that makes no server step (every update rejected, too few, or a non-finite step) is logged and
counted in the end line; a run in which no round stepped saves no model and exits with status 2.
"""


def federate(data_args: Any, head: Any, fed: Any, recipe_options: dict[str, Any], *, log=None):
    """The whole command: data, evaluation data, rounds, the saved model. Returns (state, model, path)."""
    from asymvlm.federated.checkpoint import federated_card, save_federated_model
    from asymvlm.federated.data import get_federated_data
    from asymvlm.federated.rounds import federation_recipe, run_federated

    federation_recipe(fed, recipe_options)  # an unknown option or an impossible combination fails before the data load
    data = get_federated_data(data_args, fed)
    logging.getLogger(__name__).info("clients:\n%s", data.summary)
    evaluate = None
    from asymvlm import shapeworld as sw

    if sw.dataset_version(data_args.dataset) and not data_args.cache_dir and data_args.eval_images:
        from asymvlm.encoders import load_encoder
        from asymvlm.eval.benchmark import shapeworld_eval_data

        enc = data.encoder or load_encoder(data_args.encoder, data_args.pretrained or None)
        eval_data = shapeworld_eval_data(
            enc,
            n=data_args.eval_images,
            seed=data_args.data_seed + 10_000,
            caption_styles=sw.CAPTION_STYLES,
            visual_styles=sw.VISUAL_STYLES,
            version=sw.dataset_version(data_args.dataset),
        )
        evaluate = evaluator(eval_data, data.encoder)
    state, model = run_federated(fed, data, head=head, recipe_options=recipe_options, evaluate=evaluate, log=log)
    card = federated_card(fed, state, recipe_options, data_args=data_args, data=data)
    path = save_federated_model(
        model, state, data, Path(fed.output_dir) / "model", init_from=fed.init_from or None, card=card
    )
    return state, model, path


PROG = "asymvlm-federate"


def _groups() -> tuple[type, ...]:
    from asymvlm.config import DataArguments, HeadArguments
    from asymvlm.federated.config import FederatedArguments, RecipeArguments

    return (DataArguments, HeadArguments, FederatedArguments, RecipeArguments)


def build_parser():
    """The full parser of ``asymvlm-federate`` (for ``--help``; parsing goes through
    :func:`asymvlm.config.parse_dataclass_args`, which adds the YAML layer)."""
    from asymvlm.cli import dataclass_parser, summary

    p = dataclass_parser(_groups(), PROG, summary(__doc__), EPILOG)
    p.add_argument("--config", default=None, help="YAML file of config keys (flags override it).")
    p.add_argument(
        "--list_recipes", "--list-recipes", action="store_true", help="List every recipe with its options and exit."
    )
    return p


def _main(argv: list[str]) -> int:
    from asymvlm.cli import help_requested, is_main_process, parse_dataclass_args
    from asymvlm.federated.config import recipe_options

    if "--list-recipes" in argv or "--list_recipes" in argv:
        from asymvlm.federated.recipes import DP_RECIPES, RECIPES

        print(RECIPES.describe())
        print(f"\ndifferential privacy (--dp_noise_multiplier > 0) composes with: {', '.join(DP_RECIPES)}")
        return 0
    if help_requested(argv):
        build_parser().print_help()
        return 0
    data_args, head, fed, rargs = parse_dataclass_args(_groups(), argv, PROG)
    state, _, path = federate(data_args, head, fed, recipe_options(rargs))
    if is_main_process():
        print(f"{PROG}: {run_summary(fed, state)}; saved {path}")
    return 0


def run_summary(fed: Any, state: Any) -> str:
    """The end line's facts: rounds, the rounds that made no server step, and the DP epsilon spent
    (with INSECURE beside it for a seeded-noise run).

    Example:
        >>> from types import SimpleNamespace as NS
        >>> run_summary(NS(dp_delta=1e-5, dp_insecure_seed=None), NS(round=3, skipped_rounds=[2], epsilon=None))
        '3 rounds; 1 of 3 rounds made no server step (round 2)'
    """
    from asymvlm.federated.checkpoint import INSECURE_NOTE

    parts = [f"{state.round} rounds"]
    skipped = list(state.skipped_rounds)
    if skipped:
        which = f"round {skipped[0]}" if len(skipped) == 1 else f"rounds {', '.join(map(str, skipped))}"
        parts.append(f"{len(skipped)} of {state.round} rounds made no server step ({which})")
    if state.epsilon is not None:
        dp = f"DP epsilon {state.epsilon:.4g} at delta {fed.dp_delta:g}"
        parts.append(dp + (f" ({INSECURE_NOTE})" if fed.dp_insecure_seed is not None else ""))
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    """``asymvlm-federate``; returns the exit status (2 for a user error, printed as one line)."""
    from asymvlm.cli import run

    return run(PROG, _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
