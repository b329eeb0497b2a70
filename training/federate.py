"""``asymvlm-federate``: simulate federated training of AsymVLM heads / text-tower LoRA adapters.

Clients are simulated in one process on partitions of an embedding cache (by default ShapeWorld
embedded by the toy CLIP). Writes ``metrics.jsonl`` (one JSON line per round: participants,
rejections, per-client losses and the fairness summary, evaluation), a checkpoint of the server
state after every round (``--resume`` continues) and the final AsymVLM in ``<output_dir>/model``.
With ``--heterogeneity_report true`` it also writes the partition's ``heterogeneity.json`` and
``heterogeneity.png`` there, with ``--diagnostics true`` ``diagnostics.png`` (G^2, client drift
and delta cosines per round), and with ``--client_test_fraction`` > 0 (every client's own test
split; ``--personalize METHOD`` for personal models) ``clients.json`` and ``clients.png``: the
last evaluation's per-client R@1 and uncertainty quality of the global and personal models.
Values come from a YAML file (``--config fed.yaml``), then flags
override them (spelled with underscores or dashes, never abbreviated); a user error is one line
on stderr and exit status 2.
With ``--progress false`` every round is one line on stderr (``round 3/20: loss 1.3206, 8 clients``).

This command lives in :mod:`asymvlm.training` because it composes the federation
(:mod:`asymvlm.federated`, which imports no evaluation code) with :mod:`asymvlm.eval`'s metrics,
handed to the rounds as an ``evaluate`` function.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from asymvlm.training.evaluation import evaluator

__all__ = [
    "main",
    "build_parser",
    "federate",
    "evaluator",
    "run_summary",
    "round_line",
    "write_heterogeneity",
    "write_diagnostics_plot",
    "write_client_eval",
]

EPILOG = """examples:
  asymvlm-federate --recipe fedadam --rounds 30 --num_clients 8 --partition dirichlet --partition_column shape \\
      --output_dir runs/fedadam
  asymvlm-federate --config fed.yaml --resume
  asymvlm-federate --recipe fedavg --trainable both --lora_mode residual --rounds 10 --output_dir runs/fedavg
  asymvlm-federate --recipe krum --krum_num_malicious 2 --attack sign_flip --malicious_fraction 0.2
  asymvlm-federate --partition embedding --partition_options '{"column": "image_embedding", "clusters": 8}' \\
      --heterogeneity_report true --output_dir runs/embedding
  asymvlm-federate --personalize ditto --personalize_options '{"lam": 0.5}' --client_test_fraction 0.2 \
      --partition concept_shift --output_dir runs/ditto
  asymvlm-federate --num_clients 10000 --clients_per_round 1000 --client_batch auto --compression topk+int8 \
      --compression_options '{"topk": {"fraction": 0.01}}' --output_dir runs/scale
  asymvlm-federate --asynchronous fedbuff --async_options '{"buffer_size": 10, "concurrency": 50}' \
      --num_clients 100 --output_dir runs/fedbuff
  asymvlm-federate --availability bernoulli --availability_options '{"p_min": 0.05, "p_max": 0.9}' \
      --participation_correction fedau --output_dir runs/fedau
  asymvlm-federate --list_recipes
  asymvlm-federate --list_personalizers
  asymvlm-federate --list_scale

The final model is saved to <output_dir>/model (asymvlm-eval --model runs/fedavg/model).
A round that makes no server step (every update rejected, too few, or a non-finite step) is logged and
counted in the end line; a run in which no round stepped saves no model and exits with status 2.
"""


def federate(data_args: Any, head: Any, fed: Any, recipe_options: dict[str, Any], *, log=None):
    """The whole command: data, evaluation data, rounds, the saved model. Returns (state, model, path).

    ``head`` is the :class:`~asymvlm.heads.HeadConfig` (its ``dim`` is the data's); ``log`` is called
    with every record of ``metrics.jsonl``."""
    from asymvlm.federated.checkpoint import federated_card, save_federated_model
    from asymvlm.federated.config import RUN_OUTPUTS
    from asymvlm.federated.data import get_federated_data
    from asymvlm.federated.rounds import federation_recipe, run_federated
    from asymvlm.runs import check_output_dir, claim_output_dir

    federation_recipe(fed, recipe_options)  # an unknown option or an impossible combination fails before the data load
    check_output_dir(fed.output_dir)  # and an output folder the run cannot use
    if not fed.resume and not fed.overwrite:
        claim_output_dir(Path(fed.output_dir), RUN_OUTPUTS, overwrite=False)  # a used one, unless told
    data = get_federated_data(data_args, fed)
    logging.getLogger(__name__).info("clients:\n%s", data.summary)
    evaluate = None
    from asymvlm.worlds import shapeworld as sw

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
    evaluate_client = None
    if data.tests is not None:
        from asymvlm.training.client_eval import client_evaluator

        evaluate_client = client_evaluator(data.tests)
    state, model = run_federated(
        fed, data, head=head, recipe_options=recipe_options, evaluate=evaluate, evaluate_client=evaluate_client,
        log=log,
    )  # fmt: skip
    card = federated_card(fed, state, recipe_options, data_args=data_args, data=data)
    path = save_federated_model(
        model, state, data, Path(fed.output_dir) / "model", init_from=fed.init_from or None, card=card
    )
    if data.heterogeneity is not None:
        write_heterogeneity(data.heterogeneity, Path(fed.output_dir))
    if fed.diagnostics:
        write_diagnostics_plot(Path(fed.output_dir))
    if data.tests is not None:
        write_client_eval(Path(fed.output_dir))
    return state, model, path


def write_heterogeneity(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """``heterogeneity.json`` (the report, strict JSON) and ``heterogeneity.png`` (its plot) in ``out``."""
    from asymvlm.federated.heterogeneity import plot_heterogeneity
    from asymvlm.io import atomic_write_json, json_safe

    return atomic_write_json(json_safe(report), out / "heterogeneity.json"), plot_heterogeneity(
        report, out / "heterogeneity.png"
    )


def write_diagnostics_plot(out: Path) -> Path | None:
    """``diagnostics.png`` in ``out``: the drift diagnostics of its ``metrics.jsonl`` (None when no
    round logged them, e.g. a resume with nothing left to run)."""
    from asymvlm.federated.diagnostics import plot_diagnostics
    from asymvlm.io_read import read_jsonl

    records = read_jsonl(out / "metrics.jsonl")
    if not any(isinstance(r, dict) and "diagnostics" in r for r in records):
        return None
    return plot_diagnostics(records, out / "diagnostics.png")


def write_client_eval(out: Path) -> Path | None:
    """``clients.json`` (the last evaluated round's per-client metrics and their summaries) and
    ``clients.png`` in ``out``; None when no round evaluated the clients."""
    from asymvlm.io import atomic_write_json, json_safe
    from asymvlm.io_read import read_jsonl
    from asymvlm.training.client_eval import plot_client_eval

    records = [r for r in read_jsonl(out / "metrics.jsonl") if isinstance(r, dict) and "client_metrics" in r]
    if not records:
        return None
    last = records[-1]
    keep = {k: last[k] for k in ("round", "client_metrics", "client_eval")}
    atomic_write_json(json_safe(keep), out / "clients.json")
    return plot_client_eval(last["client_metrics"], out / "clients.png")


PROG = "asymvlm-federate"


def _groups() -> tuple[type, ...]:
    from asymvlm.config import DataArguments
    from asymvlm.federated.config import FederatedArguments, RecipeArguments
    from asymvlm.heads import HeadConfig

    return (DataArguments, HeadConfig, FederatedArguments, RecipeArguments)


def build_parser():
    """The full parser of ``asymvlm-federate`` (for ``--help``; parsing goes through
    :func:`asymvlm.config.parse_dataclass_args`, which adds the YAML layer)."""
    from asymvlm.cli import dataclass_parser, summary

    p = dataclass_parser(_groups(), PROG, summary(__doc__), EPILOG)
    p.add_argument("--config", default=None, help="YAML file of config keys (flags override it).")
    p.add_argument(
        "--list_recipes", "--list-recipes", action="store_true", help="List every recipe with its options and exit."
    )
    p.add_argument(
        "--list_personalizers",
        "--list-personalizers",
        action="store_true",
        help="List every personalisation and clustering method with its options and exit.",
    )
    p.add_argument(
        "--list_scale",
        "--list-scale",
        action="store_true",
        help="List the upload encoders, asynchronous modes, availability models and participation corrections.",
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
    if "--list-personalizers" in argv or "--list_personalizers" in argv:
        from asymvlm.federated.clustered import CLUSTERERS
        from asymvlm.federated.personal import PERSONALIZERS

        print(f"personalisation (--personalize):\n{PERSONALIZERS.describe()}")
        print(f"\nclustered FL (--cluster):\n{CLUSTERERS.describe()}")
        return 0
    if "--list-scale" in argv or "--list_scale" in argv:
        from asymvlm.federated.asynchronous import ASYNC_MODES
        from asymvlm.federated.compression import COMPRESSORS
        from asymvlm.federated.participation import AVAILABILITY, PARTICIPATION_CORRECTIONS

        print(f"upload encoders (--compression a+b):\n{COMPRESSORS.describe()}")
        print(f"\nasynchronous aggregation (--asynchronous):\n{ASYNC_MODES.describe()}")
        print(f"\nclient availability (--availability):\n{AVAILABILITY.describe()}")
        print(f"\nparticipation corrections (--participation_correction):\n{PARTICIPATION_CORRECTIONS.describe()}")
        return 0
    if help_requested(argv):
        build_parser().print_help()
        return 0
    data_args, head, fed, rargs = parse_dataclass_args(_groups(), argv, PROG)
    log = None if fed.progress else _print_round(fed.rounds)  # no progress bar: a line per round
    state, _, path = federate(data_args, head, fed, recipe_options(rargs), log=log)
    if is_main_process():
        print(f"{PROG}: {run_summary(fed, state)}; saved {path}")
    return 0


def round_line(record: dict[str, Any], rounds: int) -> str:
    """One round of ``metrics.jsonl`` as a line (what the progress bar shows, and more).

    A round without a server step is the rounds' own warning, not repeated here.

    Example:
        >>> round_line({"round": 3, "sampled": [0, 1], "rejected": [], "loss_after": {"mean": 1.25}}, 20)
        'round 3/20: loss 1.2500, 2 clients'
        >>> round_line({"round": 4, "sampled": [0], "rejected": [0]}, 20)
        'round 4/20: 1 clients, 1 rejected'
        >>> summary = {"personal": {"R@1": {"mean": 0.5, "worst10": 0.25}}}
        >>> round_line({"round": 5, "sampled": [0], "client_eval": summary}, 5)
        'round 5/5: 1 clients, personal client R@1 mean 0.5 worst10 0.25'
    """
    facts = []
    if "loss_after" in record:
        facts.append(f"loss {record['loss_after'].get('mean', float('nan')):.4f}")
    facts.append(f"{len(record.get('sampled', record.get('clients', [])))} clients")  # asynchronous: applied
    if record.get("rejected"):
        facts.append(f"{len(record['rejected'])} rejected")
    facts += [f"{k} {v:.4g}" for k, v in record.items() if k.startswith("eval/") and isinstance(v, (int, float))]
    for model, summary in record.get("client_eval", {}).items():  # every client on its own test split
        r1 = summary.get("R@1")
        if r1:
            facts.append(f"{model} client R@1 mean {r1['mean']:.4g} worst10 {r1['worst10']:.4g}")
    return f"round {record['round']}/{rounds}: " + ", ".join(facts)


def _print_round(rounds: int):
    logger = logging.getLogger("asymvlm.training")  # stderr as "asymvlm-federate: ..." (asymvlm.cli.run)

    def log(record: dict[str, Any]) -> None:
        if "round" in record:  # (not the run's event records)
            logger.info("%s", round_line(record, rounds))

    return log


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
