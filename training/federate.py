"""``asymvlm-federate``: simulate federated training of AsymVLM heads / text-tower LoRA adapters.

Clients are simulated in one process on partitions of an embedding cache (by default ShapeWorld
embedded by the toy CLIP). Writes ``metrics.jsonl`` (one JSON line per round: participants,
rejections, per-client losses and the fairness summary, evaluation), a checkpoint of the server
state after every round (``--resume`` continues) and the final AsymVLM in ``model/``.

This command lives in :mod:`asymvlm.training` because it composes the federation
(:mod:`asymvlm.federated`, which imports no evaluation code) with :mod:`asymvlm.eval`'s metrics,
handed to the rounds as an ``evaluate`` function.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

__all__ = ["main", "federate", "evaluator"]

EPILOG = """examples:
  asymvlm-federate --recipe fedadam --rounds 30 --num_clients 8 --partition dirichlet --partition_column shape
  asymvlm-federate --config fed.yaml --resume
  asymvlm-federate --recipe fedavg --trainable both --lora_mode residual --rounds 10
  asymvlm-federate --recipe krum --krum_num_malicious 2 --attack sign_flip --malicious_fraction 0.2
  asymvlm-federate --list-recipes
"""


def evaluator(eval_data: Any, encoder: Any = None):
    """``evaluate(model) -> metrics``: :func:`asymvlm.eval.benchmark.evaluate` of a
    :class:`~asymvlm.trainable.TrainableModel` on ``eval_data`` (captions re-embedded by its
    LoRA-adapted text tower when it has one), reduced to the logged progress metrics."""

    def evaluate(model: Any) -> dict[str, float]:
        from asymvlm.eval.benchmark import evaluate as run_eval
        from asymvlm.eval.benchmark import progress_metrics, with_text_tower
        from asymvlm.model import AsymVLM

        ed = eval_data
        if model.peft_model is not None and ed.captions:  # the LoRA-adapted tower embeds the captions
            ed = with_text_tower(ed, encoder if encoder is not None else model.encoder)
        was = model.head.training
        model.head.eval()
        asym = AsymVLM(model.head, logit_scale=float(model.loss_fn.logit_scale.detach()))
        report = run_eval(ed, {"model": asym}, include_clip=False)["model"]
        model.head.train(was)
        return progress_metrics(report)

    return evaluate


def federate(data_args: Any, head: Any, fed: Any, recipe_options: dict[str, Any], *, log=None):
    """The whole command: data, evaluation data, rounds, the saved model. Returns (state, model, path)."""
    from asymvlm.federated.checkpoint import save_federated_model
    from asymvlm.federated.data import get_federated_data
    from asymvlm.federated.rounds import run_federated

    data = get_federated_data(data_args, fed)
    print(data.summary)
    evaluate = None
    if data_args.dataset == "shapeworld" and not data_args.cache_dir and data_args.eval_images:
        from asymvlm import shapeworld as sw
        from asymvlm.encoders import load_encoder
        from asymvlm.eval.benchmark import shapeworld_eval_data

        enc = data.encoder or load_encoder(data_args.encoder, data_args.pretrained or None)
        eval_data = shapeworld_eval_data(
            enc,
            n=data_args.eval_images,
            seed=data_args.data_seed + 10_000,
            caption_styles=sw.CAPTION_STYLES,
            visual_styles=sw.VISUAL_STYLES,
        )
        evaluate = evaluator(eval_data, data.encoder)
    state, model = run_federated(fed, data, head=head, recipe_options=recipe_options, evaluate=evaluate, log=log)
    path = save_federated_model(model, state, data, Path(fed.output_dir) / "model")
    return state, model, path


def main(argv: list[str] | None = None) -> int:
    from asymvlm.config import ConfigError, DataArguments, HeadArguments, parse_dataclass_args
    from asymvlm.federated.config import FederatedArguments, RecipeArguments, recipe_options

    groups = (DataArguments, HeadArguments, FederatedArguments, RecipeArguments)
    argv = sys.argv[1:] if argv is None else argv
    if "--list-recipes" in argv or "--list_recipes" in argv:
        from asymvlm.federated.recipes import DP_RECIPES, RECIPES

        print(RECIPES.describe())
        print(f"\ndifferential privacy (--dp_noise_multiplier > 0) composes with: {', '.join(DP_RECIPES)}")
        return 0
    if any(a in ("-h", "--help") for a in argv):
        import argparse

        from transformers import HfArgumentParser

        p = HfArgumentParser(
            groups,
            prog="asymvlm-federate",
            description=__doc__.splitlines()[0],
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("--config", default=None, help="YAML file of config keys (flags override it).")
        p.add_argument("--list-recipes", action="store_true", help="List every recipe with its options.")
        p.print_help()
        return 0
    try:
        data_args, head, fed, rargs = parse_dataclass_args(groups, argv, "asymvlm-federate")
        state, _, path = federate(data_args, head, fed, recipe_options(rargs))
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"asymvlm-federate: error: {err}", file=sys.stderr)
        return 2
    print(f"asymvlm-federate: {state.round} rounds; saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
