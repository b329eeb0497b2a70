"""The server's state after every round, saved atomically (safetensors + JSON, never pickle).

A round checkpoint ``checkpoints/round-<t>/`` holds ``params.safetensors`` (the exchanged model),
``state.safetensors`` (the frozen LoRA base weights of the exact modes and the server optimizer's
tensors) and ``server.json`` (round, the optimizer state's skeleton, the initial losses, the DP
release count and epsilon, the run's config). A run killed after round k and resumed replays
rounds k+1... exactly (every random stream is derived from the seed and the round).

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> d = Path(tempfile.mkdtemp())
    >>> path = save_server_state(ServerState(3, {"w": torch.ones(2)}, {"count": 3}), d, {"recipe": "fedavg"})
    >>> load_server_state(path).round, [p.name for p in round_dirs(d)]
    (3, ['round-000003'])
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asymvlm.federated.core import Params, flatten_state, unflatten_state

__all__ = [
    "ServerState",
    "save_server_state",
    "load_server_state",
    "round_dirs",
    "prune_rounds",
    "save_federated_model",
    "federated_card",
    "SERVER_TYPE",
]

SERVER_TYPE = "asymvlm.federated_server"


@dataclass
class ServerState:
    """Everything the server needs to continue."""

    round: int
    params: Params
    opt_state: Any
    initial_losses: dict[str, float] = field(default_factory=dict)
    base: Params = field(default_factory=dict)  # the frozen text-tower weights (exact LoRA modes fold into them)
    epsilon: float | None = None
    dp_releases: int = 0  # rounds whose aggregate was released under DP (the accountant's step count)


def save_server_state(state: ServerState, directory: Path, config: dict[str, Any]) -> Path:
    """Write ``round-<t>`` atomically: params, base weights and optimizer state as safetensors,
    the rest (round, optimizer skeleton, initial losses, DP accounting, config) as JSON."""
    from asymvlm.io import atomic_directory, atomic_save_safetensors, atomic_write_json

    target = Path(directory) / f"round-{state.round:06d}"
    opt_tensors, skeleton = flatten_state(state.opt_state)
    with atomic_directory(target) as tmp:
        atomic_save_safetensors(state.params, tmp / "params.safetensors")
        atomic_save_safetensors(
            {f"base/{k}": v for k, v in state.base.items()} | {f"opt{k}": v for k, v in opt_tensors.items()},
            tmp / "state.safetensors",
        )
        atomic_write_json(
            {
                "type": SERVER_TYPE,
                "format_version": 2,
                "round": state.round,
                "opt_state": skeleton,
                "initial_losses": state.initial_losses,
                "epsilon": state.epsilon,
                "dp_releases": state.dp_releases,
                "config": config,
            },
            tmp / "server.json",
        )
    return target


def round_dirs(directory: Path) -> list[Path]:
    """The complete round checkpoints in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(
        (p for p in directory.iterdir() if p.name.startswith("round-") and p.name[6:].isdigit()),
        key=lambda p: int(p.name[6:]),
    )


def prune_rounds(directory: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` round checkpoints."""
    for old in round_dirs(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_server_state(path: Path) -> ServerState:
    """Read a round checkpoint; corrupt or truncated files raise :class:`asymvlm.errors.ArtefactError`."""
    from asymvlm.io import load_safetensors, read_tagged_json

    meta = read_tagged_json(
        Path(path) / "server.json",
        SERVER_TYPE,
        2,
        required=("round", "opt_state"),
        known=("initial_losses", "epsilon", "dp_releases", "config"),
    )
    if int(meta["format_version"]) < 2:
        from asymvlm.errors import ArtefactError

        raise ArtefactError(
            f"{path} was written by an older asymvlm (format_version {meta['format_version']}, other parameter "
            "names); it cannot be resumed: start a new run in a new output_dir"
        )
    params = {k: v.clone() for k, v in load_safetensors(Path(path) / "params.safetensors", mmap=False).items()}
    rest = load_safetensors(Path(path) / "state.safetensors", mmap=False)
    base = {k[len("base/") :]: v.clone() for k, v in rest.items() if k.startswith("base/")}
    opt = {k[len("opt") :]: v for k, v in rest.items() if k.startswith("opt")}
    return ServerState(
        int(meta["round"]),
        params,
        unflatten_state(opt, meta["opt_state"]),
        dict(meta.get("initial_losses") or {}),
        base,
        meta.get("epsilon"),
        int(meta.get("dp_releases") or 0),
    )


def federated_card(
    fed: Any,
    state: ServerState,
    recipe_options: dict[str, Any] | None = None,
    *,
    data_args: Any = None,
    data: Any = None,
) -> dict[str, Any]:
    """The model card's record of a federation (:func:`asymvlm.hub.model_card`'s ``data``,
    ``recipe``, ``metrics``, ``evaluation``): the recipe and its options, the rounds run, the
    clients and their sizes, the DP epsilon spent, and the last round's losses, fairness and
    evaluation metrics (from ``metrics.jsonl`` in ``fed.output_dir``)."""
    from dataclasses import asdict

    from asymvlm.federated.config import RESUMABLE_CHANGES
    from asymvlm.hub import describe_data, eval_metrics, public_name
    from asymvlm.io import read_jsonl

    recipe = {k: v for k, v in asdict(fed).items() if k not in RESUMABLE_CHANGES}
    recipe.update(mask_file=public_name(fed.mask_file), init_from=public_name(fed.init_from))
    recipe.update(recipe_options=dict(recipe_options or {}), rounds=state.round, planned_rounds=fed.rounds)
    if state.epsilon is not None:
        recipe.update(dp_epsilon=state.epsilon, dp_delta=fed.dp_delta, dp_releases=state.dp_releases)
    info = dict(getattr(data, "data_info", None) or describe_data(data_args))
    if data is not None and getattr(data, "num_examples", None) is not None:
        info.update(clients=len(data.num_examples), client_images=list(data.num_examples))
    rounds = read_jsonl(Path(fed.output_dir) / "metrics.jsonl")
    last = next((r for r in reversed(rounds) if "round" in r), {})
    metrics: dict[str, Any] = {"round": last.get("round", state.round)}
    for key in ("loss_after", "fairness"):
        if isinstance(last.get(key), dict):
            metrics[key] = last[key]
    if state.epsilon is not None:
        metrics["dp_epsilon"] = state.epsilon
    evaluated = eval_metrics(last)
    evaluation = None
    if evaluated:
        name = getattr(data_args, "dataset", None) if data_args is not None else None
        evaluation = {"dataset": name or "held-out data", "split": "held-out", "metrics": evaluated}
    return {"data": info, "recipe": recipe, "metrics": metrics, "evaluation": evaluation}


def save_federated_model(
    model: Any,
    state: ServerState,
    data: Any,
    directory: Path,
    *,
    init_from: str | None = None,
    card: dict[str, Any] | None = None,
) -> Path:
    """Save the federated AsymVLM: head, temperature, the LoRA adapter (peft format) and, for the
    exact LoRA modes, the dense updates folded into the frozen text tower (relative to the
    encoder's original weights, reloaded from its source), with its model card (``README.md``;
    ``card``: :func:`federated_card`'s record)."""
    from asymvlm.federated.client import module_path
    from asymvlm.model import AsymVLM

    model.set_params(state.params)
    base_delta = None
    if state.base:
        from asymvlm.encoders import load_encoder

        src = data.encoder_source or {}
        original = load_encoder(src["spec"], src.get("pretrained")).model.state_dict()
        base_delta = {
            f"{module_path(layer)}.weight": w - original[f"{module_path(layer)}.weight"]
            for layer, w in state.base.items()
        }
    lineage = None
    if init_from:  # what the head started from (merges check that experts share their base)
        from asymvlm.io import tensor_fingerprint

        start = AsymVLM.from_pretrained(init_from, load_encoder=False)
        lineage = {"init_from": str(init_from), "init_from_fingerprint": tensor_fingerprint(start.head.state_dict())}
    model.head.eval()
    asym = AsymVLM(
        model.head,
        logit_scale=float(model.loss_fn.logit_scale.detach()),
        encoder_source=data.encoder_source,
        text_adapter=model.peft_model,
        text_base_delta=base_delta,
        lineage=lineage,
    )
    return asym.save_pretrained(directory, card={"kind": "federated", **(card or {})})
