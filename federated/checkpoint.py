"""The server's state after every round, saved atomically (safetensors + JSON, never pickle).

A round checkpoint ``checkpoints/round-<t>/`` holds ``params.safetensors`` (the exchanged model),
``state.safetensors`` (the frozen LoRA base weights of the exact modes and the server optimizer's
tensors) and ``server.json`` (round, the optimizer state's skeleton, the initial losses, the DP
release count and epsilon, the rounds that made no server step, the run's config). A run killed
after round k and resumed replays rounds k+1... exactly (every random stream is derived from the
seed and the round).

Nothing read back is trusted: :func:`load_server_state` checks every field of the three files
(types, ranges, finiteness, that the optimizer skeleton and its tensors match one to one, that the
round is the folder's) and :func:`check_server_state` checks the state against the live run (the
model's keys, shapes and dtypes, the optimizer state's structure against a fresh ``init``, second
moments >= 0, step counts <= the round). Every failure is one :class:`asymvlm.errors.ArtefactError`
naming the file and the field; nothing is trained or written before.

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> d = Path(tempfile.mkdtemp())
    >>> path = save_server_state(ServerState(3, {"w": torch.ones(2)}, {"count": 3}), d, {"recipe": "fedavg"})
    >>> load_server_state(path).round, [p.name for p in round_dirs(d)]
    (3, ['round-000003'])
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from asymvlm.cards import asymvlm_card_kind, register_card_kind
from asymvlm.errors import ArtefactError, ConfigError, TrainingDiverged
from asymvlm.federated.core import Params, flatten_state, unflatten_state
from asymvlm.io import is_json_number, non_finite_key

__all__ = [
    "ServerState",
    "save_server_state",
    "load_server_state",
    "check_server_state",
    "check_finite_state",
    "round_dirs",
    "prune_rounds",
    "save_federated_model",
    "federated_card",
    "SERVER_TYPE",
    "INSECURE_NOTE",
]

SERVER_TYPE = "asymvlm.federated_server"
# beside epsilon wherever a run with seeded (predictable) DP noise reports it: card, summary
INSECURE_NOTE = "INSECURE: seeded test noise (dp_insecure_seed); anyone with the seed removes it, epsilon does not hold"
# the card kind of a federated export (save_federated_model), registered in the core's card registry
register_card_kind(
    "federated",
    asymvlm_card_kind(
        "AsymVLM (federated)",
        "An AsymVLM model trained by federated learning (`asymvlm-federate`: clients train on their own data, "
        "the server combines their updates): ",
        ("federated-learning",),
    ),
)


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
    skipped_rounds: list[int] = field(default_factory=list)  # rounds (1-based) that made no server step
    config: dict[str, Any] | None = field(default=None, compare=False)  # the saved run config (when loaded)
    # a method's own server state (clustered FL's cluster models, their optimizer states and memberships:
    # asymvlm.federated.clustered), nested dicts/lists of tensors and JSON values; {} for none
    extra: dict[str, Any] = field(default_factory=dict)


def save_server_state(state: ServerState, directory: Path, config: dict[str, Any]) -> Path:
    """Write ``round-<t>`` atomically: params, base weights and optimizer state as safetensors,
    the rest (round, optimizer skeleton, initial losses, DP accounting, config) as JSON."""
    from asymvlm.io import atomic_directory, atomic_save_safetensors, atomic_write_json

    target = Path(directory) / f"round-{state.round:06d}"
    opt_tensors, skeleton = flatten_state(state.opt_state)
    extra_tensors, extra_skeleton = flatten_state(state.extra)
    with atomic_directory(target) as tmp:
        atomic_save_safetensors(state.params, tmp / "params.safetensors")
        atomic_save_safetensors(
            {f"base/{k}": v for k, v in state.base.items()}
            | {f"opt{k}": v for k, v in opt_tensors.items()}
            | {f"extra{k}": v for k, v in extra_tensors.items()},
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
                "skipped_rounds": list(state.skipped_rounds),
                "config": config,
                **({"extra": extra_skeleton} if state.extra else {}),
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
    """Read a round checkpoint, every field checked (module docstring); corrupt, truncated or
    tampered files raise :class:`asymvlm.errors.ArtefactError` naming the file and the field."""
    from asymvlm.io import load_safetensors, read_tagged_json

    path = Path(path)
    where = path / "server.json"
    for part in (path, where, path / "params.safetensors", path / "state.safetensors"):
        if part.is_symlink():  # save_server_state writes a folder of regular files: a link points elsewhere
            raise ArtefactError(f"{part} is a symbolic link: a round checkpoint holds only the files asymvlm wrote")
    meta = read_tagged_json(
        where,
        SERVER_TYPE,
        2,
        required=("round", "opt_state"),
        known=("initial_losses", "epsilon", "dp_releases", "skipped_rounds", "config", "extra"),
    )
    if int(meta["format_version"]) < 2:
        raise ArtefactError(
            f"{path} was written by an older asymvlm (format_version {meta['format_version']}, other parameter "
            "names); it cannot be resumed: start a new run in a new output_dir"
        )
    rnd = _count(meta["round"], where, "round")
    if path.name.startswith("round-") and path.name[6:].isdigit() and int(path.name[6:]) != rnd:
        raise ArtefactError(f"{where}: field 'round' is {rnd}, but the checkpoint folder is {path.name}")
    dp_releases = _count(meta.get("dp_releases", 0), where, "dp_releases", rnd)
    epsilon = meta.get("epsilon")
    if epsilon is not None and not (is_json_number(epsilon, finite=True) and epsilon >= 0):
        raise ArtefactError(f"{where}: field 'epsilon' must be null or a finite number >= 0, got {epsilon!r}")
    losses = meta.get("initial_losses") or {}
    if not isinstance(losses, dict) or not all(
        isinstance(k, str) and is_json_number(v, finite=True) for k, v in losses.items()
    ):
        raise ArtefactError(f"{where}: field 'initial_losses' must map client ids to finite numbers")
    skipped = meta.get("skipped_rounds") or []
    if not (
        isinstance(skipped, list)
        and all(isinstance(r, int) and not isinstance(r, bool) and 1 <= r <= rnd for r in skipped)
        and skipped == sorted(set(skipped))
    ):
        raise ArtefactError(f"{where}: field 'skipped_rounds' must be increasing round numbers in [1, {rnd}]")
    config = meta.get("config")
    if config is not None and not isinstance(config, dict):
        raise ArtefactError(f"{where}: field 'config' must be an object, got {type(config).__name__}")

    params_file = path / "params.safetensors"
    params = {k: v.clone() for k, v in load_safetensors(params_file, mmap=False).items()}
    _check_tensors(params, params_file, "")
    state_file = path / "state.safetensors"
    rest = load_safetensors(state_file, mmap=False)
    other = sorted(k for k in rest if not k.startswith(("base/", "opt/", "extra/")))
    if other:
        raise ArtefactError(f"{state_file}: unknown tensor(s) {other} (neither base/, opt/ nor extra/)")
    _check_tensors(rest, state_file, "")
    base = {k[len("base/") :]: v.clone() for k, v in rest.items() if k.startswith("base/")}
    opt = {k[len("opt") :]: v for k, v in rest.items() if k.startswith("opt/")}
    used: set[str] = set()
    _check_skeleton(meta["opt_state"], opt, "", where, state_file, used)
    unused = sorted(set(opt) - used)
    if unused:
        raise ArtefactError(f"{state_file}: optimizer tensor(s) {['opt' + k for k in unused]} not in {where.name}")
    extra_t = {k[len("extra") :]: v for k, v in rest.items() if k.startswith("extra/")}
    extra_skeleton = meta.get("extra", {"__dict__": {}})
    used = set()
    _check_skeleton(extra_skeleton, extra_t, "", where, state_file, used)
    if sorted(set(extra_t) - used):
        raise ArtefactError(
            f"{state_file}: tensor(s) {sorted('extra' + k for k in set(extra_t) - used)} not in {where.name}"
        )
    extra = unflatten_state(extra_t, extra_skeleton)
    if not isinstance(extra, dict):
        raise ArtefactError(f"{where}: field 'extra' must be an object")
    return ServerState(
        rnd,
        params,
        unflatten_state(opt, meta["opt_state"]),
        {k: float(v) for k, v in losses.items()},
        base,
        None if epsilon is None else float(epsilon),
        dp_releases,
        list(skipped),
        config,
        extra,
    )


def check_server_state(
    state: ServerState,
    path: Path,
    *,
    params: Mapping[str, torch.Tensor],
    base: Mapping[str, torch.Tensor],
    opt_init: Any,
    owned: Mapping[str, torch.Tensor],
    rounds: int,
) -> None:
    """Check a loaded state against the live run before it is used: the exchanged parameters and
    the frozen base weights have the live model's keys, shapes and dtypes; the optimizer state has
    the structure of a fresh ``opt_init`` (built from ``owned``, the parameters the server
    optimizer steps: tensors shaped like the parameters they follow, scalars of the same type; a
    history of models, GHBM's, holds models shaped like ``owned``), second moments ``v`` beside a
    first moment ``m`` are >= 0, step counts and history lengths are at most the round; the round
    is at most ``rounds`` (a :class:`ConfigError`: the checkpoint is fine, the run asks for fewer
    rounds)."""
    path = Path(path)
    _check_like(state.params, params, path / "params.safetensors", "")
    _check_like(state.base, base, path / "state.safetensors", "base/")
    _check_opt(state.opt_state, opt_init, "", path, state.round, owned)
    if state.round > rounds:
        raise ConfigError(
            f"cannot resume {path}: it is round {state.round}, beyond rounds={rounds}; pass rounds >= {state.round}"
        )


def check_finite_state(state: ServerState, where: str) -> None:
    """Raise :class:`asymvlm.errors.TrainingDiverged` naming the round and the first key when the
    global model (exchanged parameters or frozen base weights) holds NaN or inf: such a model is
    never saved."""
    for kind, tensors in (("parameter", state.params), ("base weight", state.base)):
        k = non_finite_key(tensors)
        if k is not None:
            raise TrainingDiverged(f"round {state.round}: the global model's {kind} {k!r} holds NaN or inf; {where}")


# -- the checks ---------------------------------------------------------------------------------
def _count(v: Any, where: Path, name: str, most: int | None = None) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0 or (most is not None and v > most):
        bound = f"an integer in [0, {most}]" if most is not None else "an integer >= 0"
        raise ArtefactError(f"{where}: field {name!r} must be {bound}, got {v!r}")
    return v


def _check_tensors(tensors: Mapping[str, torch.Tensor], file: Path, prefix: str) -> None:
    for k, v in tensors.items():
        if not v.is_floating_point():
            raise ArtefactError(f"{file}: tensor {prefix}{k!r} has dtype {v.dtype}, expected a floating dtype")
        if not bool(torch.isfinite(v).all()):
            raise ArtefactError(f"{file}: tensor {prefix}{k!r} holds NaN or inf")


def _check_skeleton(
    node: Any, tensors: Mapping[str, torch.Tensor], at: str, where: Path, file: Path, used: set[str]
) -> None:
    """The optimizer skeleton as :func:`flatten_state` writes it: plain values, or objects with one
    of ``__tensor__`` (naming its own path, present in ``file``), ``__dict__``, ``__list__``."""
    shown = at or "/"
    if node is None or isinstance(node, (bool, int, str)):
        return
    if isinstance(node, float):
        if not math.isfinite(node):
            raise ArtefactError(f"{where}: opt_state {shown} is {node!r}, not a finite number")
        return
    if not isinstance(node, dict):
        raise ArtefactError(f"{where}: opt_state {shown} is a JSON {type(node).__name__}, not a state node")
    if set(node) == {"__tensor__"}:
        ref = node["__tensor__"]
        if ref != at:
            raise ArtefactError(f"{where}: opt_state {shown} refers to tensor {ref!r}, not its own path")
        if ref not in tensors:
            raise ArtefactError(f"{where}: opt_state {shown} refers to tensor {ref!r}, missing from {file.name}")
        used.add(ref)
    elif set(node) == {"__dict__"} and isinstance(node["__dict__"], dict):
        for k, v in node["__dict__"].items():
            _check_skeleton(v, tensors, f"{at}/{k}", where, file, used)
    elif (
        set(node) <= {"__list__", "tuple"}
        and isinstance(node.get("__list__"), list)
        and (isinstance(node.get("tuple", False), bool))
    ):
        for i, v in enumerate(node["__list__"]):
            _check_skeleton(v, tensors, f"{at}/{i}", where, file, used)
    else:
        raise ArtefactError(f"{where}: opt_state {shown} is not a state node (keys {sorted(node)})")


def _check_like(loaded: Mapping[str, torch.Tensor], live: Mapping[str, Any], file: Path, prefix: str) -> None:
    missing, extra = sorted(set(live) - set(loaded)), sorted(set(loaded) - set(live))
    if missing or extra:
        parts = [f"missing {[prefix + k for k in missing]}" if missing else "",
                 f"unknown {[prefix + k for k in extra]}" if extra else ""]  # fmt: skip
        raise ArtefactError(f"{file}: tensors do not fit the model: {'; '.join(p for p in parts if p)}")
    for k, v in live.items():
        got = loaded[k]
        if tuple(got.shape) != tuple(v.shape) or got.dtype != v.dtype:
            raise ArtefactError(
                f"{file}: tensor {prefix}{k!r} is {got.dtype} {tuple(got.shape)}, the model's is {v.dtype} "
                f"{tuple(v.shape)}"
            )


def _check_opt(loaded: Any, ref: Any, at: str, path: Path, rnd: int, owned: Mapping[str, torch.Tensor]) -> None:
    """``loaded`` against a fresh ``init`` state ``ref`` (module docstring; ``at`` is the tensor path)."""
    where, file, shown = path / "server.json", path / "state.safetensors", at or "/"
    if isinstance(ref, torch.Tensor):
        if not isinstance(loaded, torch.Tensor):
            raise ArtefactError(f"{where}: opt_state {shown} must be a tensor, got {type(loaded).__name__}")
        if tuple(loaded.shape) != tuple(ref.shape) or loaded.dtype != ref.dtype:
            raise ArtefactError(
                f"{file}: optimizer tensor {shown} is {loaded.dtype} {tuple(loaded.shape)}, the model's is "
                f"{ref.dtype} {tuple(ref.shape)}"
            )
        return
    if isinstance(ref, dict):
        if not isinstance(loaded, dict):
            raise ArtefactError(f"{where}: opt_state {shown} must be an object, got {type(loaded).__name__}")
        missing, extra = sorted(set(ref) - set(loaded)), sorted(set(loaded) - set(ref))
        if missing or extra:
            raise ArtefactError(f"{where}: opt_state {shown} has keys missing {missing} / unknown {extra}")
        for k in ref:
            _check_opt(loaded[k], ref[k], f"{at}/{k}", path, rnd, owned)
        if "m" in ref and isinstance(ref.get("v"), dict):  # an adaptive second moment: v >= 0 by construction
            for k, v in loaded["v"].items():
                if bool((v < 0).any()):
                    raise ArtefactError(f"{file}: optimizer tensor {at}/v/{k} is negative (a second moment is >= 0)")
        if "count" in ref:  # server steps taken: at most one per round
            count = loaded["count"]
            if not (isinstance(count, int) and not isinstance(count, bool) and 0 <= count <= rnd):
                raise ArtefactError(f"{where}: opt_state {at}/count must be an integer in [0, {rnd}], got {count!r}")
        for name in ("c1", "c2"):  # AdaFedAdam's products of betas
            if name in ref and not (is_json_number(loaded[name]) and 0 < loaded[name] <= 1):
                raise ArtefactError(f"{where}: opt_state {at}/{name} must be in (0, 1], got {loaded[name]!r}")
        return
    if isinstance(ref, (list, tuple)):
        if not isinstance(loaded, type(ref)):
            raise ArtefactError(
                f"{where}: opt_state {shown} must be a {type(ref).__name__}, got {type(loaded).__name__}"
            )
        if ref == [] and isinstance(ref, list):  # a history of models (GHBM): one entry per past step at most
            if len(loaded) > rnd:
                raise ArtefactError(f"{where}: opt_state {shown} holds {len(loaded)} entries, more than round {rnd}")
            for i, entry in enumerate(loaded):
                _check_opt(entry, dict(owned), f"{at}/{i}", path, rnd, owned)
            return
        if len(loaded) != len(ref):
            raise ArtefactError(f"{where}: opt_state {shown} has {len(loaded)} entries, expected {len(ref)}")
        for i, (a, b) in enumerate(zip(loaded, ref)):
            _check_opt(a, b, f"{at}/{i}", path, rnd, owned)
        return
    if ref is None or isinstance(ref, (bool, str)):
        if type(loaded) is not type(ref):
            raise ArtefactError(f"{where}: opt_state {shown} must be {type(ref).__name__}, got {loaded!r}")
    elif is_json_number(ref) and not is_json_number(loaded, finite=True):
        raise ArtefactError(f"{where}: opt_state {shown} must be a finite number, got {loaded!r}")


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
    if state.skipped_rounds:
        recipe.update(rounds_without_step=list(state.skipped_rounds))
    insecure = getattr(fed, "dp_insecure_seed", None) is not None
    if state.epsilon is not None:
        recipe["dp_epsilon"] = state.epsilon
        if insecure:  # the card's next row after epsilon's
            recipe["dp_noise"] = INSECURE_NOTE
        recipe.update(dp_delta=fed.dp_delta, dp_releases=state.dp_releases)
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
        if insecure:
            metrics["dp_noise"] = INSECURE_NOTE
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
    ``card``: :func:`federated_card`'s record).

    Nothing is saved when the model holds NaN or inf (:class:`asymvlm.errors.TrainingDiverged`
    naming the round and the key) or when rounds ran and none made a server step (an
    :class:`asymvlm.errors.InputError`: the initial model is no result)."""
    from asymvlm.federated.client import module_path
    from asymvlm.model import AsymVLM

    check_finite_state(state, f"nothing saved to {directory}")
    if state.round > 0 and len(state.skipped_rounds) >= state.round:
        from asymvlm.errors import InputError

        raise InputError(
            f"no round made a server step (all {state.round} made none: every update rejected, too few, or a "
            f"non-finite step; see metrics.jsonl): nothing saved to {directory}"
        )
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
    lineage: dict[str, Any] = {"init_from": None, "init": "scratch"}  # a random head: no merge takes it as a fine-tune
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
    from asymvlm.hub import write_model_card
    from asymvlm.io import atomic_directory

    # atomic, with a record of what asymvlm wrote: a user's files in model/ are carried over and
    # --overwrite removes only asymvlm's
    with atomic_directory(directory) as tmp:
        asym.save_pretrained(tmp, card=False)
        write_model_card(tmp, asym.model_card(kind="federated", **(card or {})), replacing=directory)
    return Path(directory)
