"""Federated rounds: sampling, local training, validation, aggregation, the server step, fairness
reports and a checkpoint of the full server state after every round.

Randomness: everything random in round t (which clients are sampled, drop out or straggle, which
are malicious, the clients' batch order and LoRA dropout) is derived from ``(seed, t, client)``,
so the round number *is* the sampler/RNG state: a run killed after round k and resumed replays
rounds k+1... exactly and ends with bit-identical parameters.

LoRA: with ``trainable`` in (lora, both) the adapter's factors travel as parameters. ``factors``
and ``frozen_a`` aggregate them with the recipe like any parameter (FedIT; FFA-LoRA keeps A
frozen, so averaging B is exact); ``stack``, ``residual`` and ``svd`` aggregate them with
:func:`asymvlm.federated.lora.aggregate_lora` and fold the exact remainder into the frozen text-tower
weights the server keeps (the recipe's server optimizer then applies to the head only).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from asymvlm.federated.client import ClientOptions, FederatedTask, client_loss, client_update, upload_bytes
from asymvlm.federated.core import (
    ClientUpdateError,
    ClippedMean,
    Params,
    apply_updates,
    check_delta,
    flatten_state,
    unflatten_state,
)
from asymvlm.federated.lora import aggregate_lora
from asymvlm.federated.recipes import _find_ghbm_state, ghbm_momentum, make_recipe
from torch import Tensor
from tqdm.auto import tqdm

from asymvlm.errors import MissingExtraError
from asymvlm.heads import HeadConfig

__all__ = [
    "FederatedArguments",
    "FederatedData",
    "ServerState",
    "run_federated",
    "get_federated_data",
    "load_server_state",
    "save_server_state",
    "save_federated_model",
    "MissingExtraError",
    "fairness",
]


@dataclass(frozen=True)
class FederatedArguments:
    """Everything about the federation (data come from :class:`asymvlm.training.config.DataArguments`)."""

    recipe: str = field(default="fedavg", metadata={"help": "Algorithm (see asymvlm.federated.recipes.RECIPES)."})
    rounds: int = field(default=20, metadata={"help": "Communication rounds."})
    num_clients: int = field(default=8, metadata={"help": "Simulated clients."})
    clients_per_round: int = field(default=0, metadata={"help": "Clients sampled per round (0: use client_fraction)."})
    client_fraction: float = field(default=1.0, metadata={"help": "Fraction of clients sampled per round."})
    min_clients: int = field(default=1, metadata={"help": "Fewest valid updates to make a server step."})
    dropout_prob: float = field(default=0.0, metadata={"help": "Probability that a sampled client drops out."})
    straggler_deadline: float = field(
        default=0.0,
        metadata={
            "help": "Deadline in local steps of a nominal client; client speeds ~ lognormal(0, 0.5); slower clients "
            "miss the round (0 = no deadline)."
        },
    )
    partition: str = field(default="iid", metadata={"help": "iid, dirichlet, quantity or domain."})
    partition_column: str = field(
        default="caption_style",
        metadata={
            "help": "Per-image column for dirichlet/domain (ShapeWorld: shape, colour, size, position, "
            "caption_style, visual_style)."
        },
    )
    partition_alpha: float = field(default=0.5, metadata={"help": "Dirichlet concentration (dirichlet, quantity)."})
    min_client_size: int = field(default=4, metadata={"help": "Fewest images per client."})
    local_steps: int = field(default=10, metadata={"help": "Local SGD steps per round."})
    local_lr: float = field(default=0.05, metadata={"help": "Client learning rate eta_l."})
    local_batch_size: int = field(default=256, metadata={"help": "Client batch (captions)."})
    local_momentum: float = field(default=0.0, metadata={"help": "Client SGD momentum."})
    server_lr: float = field(default=1.0, metadata={"help": "Server learning rate (recipe-specific default if <0)."})
    server_momentum: float = field(default=0.9, metadata={"help": "FedAvgM momentum."})
    beta1: float = field(default=0.9, metadata={"help": "FedAdam/FedYogi/AdaFedAdam beta1."})
    beta2: float = field(default=0.99, metadata={"help": "FedAdam/FedYogi/AdaFedAdam beta2."})
    tau: float = field(default=1e-3, metadata={"help": "Adaptive server optimizers' epsilon (tau)."})
    bias_correction: bool = field(default=False, metadata={"help": "Bias-correct FedAdam/FedYogi's moments."})
    proximal_mu: float = field(default=0.01, metadata={"help": "FedProx proximal coefficient."})
    q: float = field(default=0.2, metadata={"help": "q-FFL fairness exponent."})
    fairness_alpha: float = field(default=1.0, metadata={"help": "AdaFedAdam fairness exponent."})
    ghbm_beta: float = field(default=0.9, metadata={"help": "GHBM momentum."})
    ghbm_tau: int = field(default=4, metadata={"help": "GHBM history length (about 1 / participation)."})
    trim_beta: float = field(default=0.2, metadata={"help": "Trimmed mean: fraction cut from each end."})
    num_malicious: int = field(default=0, metadata={"help": "Krum: Byzantine clients tolerated."})
    krum_keep: int = field(default=1, metadata={"help": "Multi-Krum: clients averaged."})
    trainable: str = field(default="head", metadata={"help": "head, lora or both."})
    lora_mode: str = field(
        default="residual",
        metadata={
            "help": "LoRA aggregation: factors (FedIT), frozen_a (FFA-LoRA), stack (FLoRA), residual (FedEx-LoRA), svd."
        },
    )
    lora_r: int = field(default=4, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=8.0, metadata={"help": "LoRA alpha."})
    lora_targets: str = field(
        default="",
        metadata={
            "help": "Regex of text-tower Linear modules "
            "(default: open_clip mlp.c_fc/c_proj; HF q/k/v/out_proj, fc1/fc2)."
        },
    )
    mask_file: str = field(
        default="",
        metadata={
            "help": "Sparse fine-tuning masks (asymvlm.merging.talos.calibrate_mask / asymvlm-train names): clients update "
            "only masked entries and send only those values; the communication saving is logged."
        },
    )
    init_from: str = field(default="", metadata={"help": "A saved AsymVLM whose head and temperature start the run."})
    family: str = field(default="vmf", metadata={"help": "vmf or ps."})
    head_hidden: list[int] = field(default_factory=lambda: [1024, 1024, 1024], metadata={"help": "Head widths."})
    residual_head: bool = field(default=False, metadata={"help": "Residual head (starts at CLIP's directions)."})
    eval_every: int = field(default=5, metadata={"help": "Evaluate every N rounds (and after the last)."})
    fairness_batches: int = field(default=2, metadata={"help": "Batches per client for the fairness report."})
    attack: str = field(
        default="none",
        metadata={"help": "Simulated Byzantine clients: none, sign_flip or scale (robustness experiments)."},
    )
    malicious_fraction: float = field(default=0.0, metadata={"help": "Fraction of clients that attack."})
    attack_scale: float = field(default=10.0, metadata={"help": "Factor of the 'scale' attack."})
    dp_noise_multiplier: float = field(
        default=0.0,
        metadata={
            "help": "Differential privacy: Gaussian noise std = multiplier * dp_max_norm / clients on the clipped "
            "mean (0 = off; needs opacus for the accountant)."
        },
    )
    dp_max_norm: float = field(default=1.0, metadata={"help": "Per-client clipping norm for DP."})
    dp_delta: float = field(default=1e-5, metadata={"help": "Target delta of the (epsilon, delta) accountant."})
    seed: int = field(default=0, metadata={"help": "Seed of everything random."})
    fed_output_dir: str = field(default="runs/federated", metadata={"help": "Checkpoints, metrics.jsonl, model/."})
    fed_resume: bool = field(default=False, metadata={"help": "Resume from the latest round checkpoint."})
    keep_rounds: int = field(default=2, metadata={"help": "Round checkpoints kept."})
    progress: bool = field(default=True, metadata={"help": "Progress bar per round."})

    def __post_init__(self) -> None:
        from asymvlm.federated.partition import PARTITIONERS
        from asymvlm.federated.recipes import RECIPES

        if self.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}; choose one of {sorted(RECIPES)}")
        if self.partition not in PARTITIONERS:
            raise ValueError(f"unknown partition {self.partition!r}; choose one of {sorted(PARTITIONERS)}")
        for name, value, allowed in (
            ("trainable", self.trainable, ("head", "lora", "both")),
            ("lora_mode", self.lora_mode, ("factors", "frozen_a", "stack", "residual", "svd")),
            ("family", self.family, ("vmf", "ps")),
            ("attack", self.attack, ("none", "sign_flip", "scale")),
        ):
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not one of {allowed}")
        if self.rounds < 1 or self.num_clients < 1 or self.local_steps < 1 or self.min_clients < 1:
            raise ValueError("rounds, num_clients, local_steps and min_clients must be >= 1")
        if not 0 < self.client_fraction <= 1 or not 0 <= self.dropout_prob < 1 or not 0 <= self.malicious_fraction < 1:
            raise ValueError("need 0 < client_fraction <= 1, 0 <= dropout_prob < 1, 0 <= malicious_fraction < 1")


@dataclass
class FederatedData:
    """Per-client training data and evaluation data (the seam tests replace)."""

    batchers: list[Any]  # one IndexBatcher per client (its caption rows)
    num_examples: list[int]  # images per client
    dim: int
    encoder_source: dict[str, Any] | None
    encoder: Any = None
    eval_data: Any = None  # an asymvlm.eval.benchmark.EvalData (with the caption strings) or None
    summary: str = ""


@dataclass
class ServerState:
    """Everything the server needs to continue: written atomically after every round."""

    round: int
    params: Params
    opt_state: Any
    initial_losses: dict[str, float] = field(default_factory=dict)
    base: Params = field(default_factory=dict)  # the frozen text-tower weights (exact LoRA modes fold into them)
    epsilon: float | None = None


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
def get_federated_data(data_args: Any, fed: FederatedArguments) -> FederatedData:
    """Embedding cache (built once, like asymvlm-train) partitioned by image among the clients."""
    from asymvlm.federated.partition import partition_dataset, partition_summary

    from asymvlm.batching import IndexBatcher
    from asymvlm.data import cache_for_config
    from asymvlm.encoders import load_encoder

    encoder = None
    if fed.trainable != "head" or not data_args.cache_dir:
        encoder = load_encoder(data_args.encoder, data_args.pretrained or None)
    cache = cache_for_config(data_args, encoder)
    n_img = cache.image_embeddings.shape[0]
    columns: dict[str, Any] = {}
    if data_args.dataset == "shapeworld" and not data_args.cache_dir:
        from asymvlm import shapeworld as sw

        w = sw.generate_arrays(
            data_args.train_images,
            seed=data_args.data_seed,
            caption_styles=data_args.styles(),  # the columns of the cache cache_for_config built
            visual_styles=sw.VISUAL_STYLES,
        )
        for i, attr in enumerate(sw.ATTRIBUTES):
            columns[attr] = np.asarray(sw.ATTRIBUTES[attr])[w.objects[:, 0, i]]
        columns["caption_style"] = np.asarray(w.config.caption_styles)[w.caption_style]
        columns["visual_style"] = np.asarray(w.config.visual_styles)[w.visual_style]

    class _Rows:
        def __len__(self):
            return n_img

        def __getitem__(self, name):
            if name not in columns:
                raise ValueError(
                    f"partition column {name!r} is not available for this data; "
                    f"available: {sorted(columns)} (ShapeWorld built from --dataset shapeworld)"
                )
            return columns[name]

    parts = partition_dataset(
        _Rows(),
        fed.num_clients,
        fed.partition,
        column=fed.partition_column,
        alpha=fed.partition_alpha,
        seed=fed.seed,
        min_size=fed.min_client_size,
    )
    owner = cache.text_image_index
    images = cache.image_embeddings.float()
    if fed.trainable == "head":
        text_all: Any = cache.text_embeddings.float()
    else:
        if not cache.captions:
            raise ValueError("federating LoRA needs the caption strings in the cache")
        text_all = encoder.tokenize(cache.captions)
    batchers = []
    for k, img_rows in enumerate(parts):
        mask = torch.isin(owner, torch.from_numpy(img_rows))
        rows = torch.nonzero(mask).squeeze(1)
        text = {key: v[rows] for key, v in text_all.items()} if isinstance(text_all, dict) else text_all[rows]
        batchers.append(IndexBatcher(text, images, owner[rows], min(fed.local_batch_size, len(rows)), fed.seed + k))
    summary = partition_summary(parts, columns.get(fed.partition_column) if columns else None)
    eval_data = None
    if data_args.dataset == "shapeworld" and not data_args.cache_dir and data_args.eval_images:
        from asymvlm.eval.benchmark import shapeworld_eval_data

        from asymvlm import shapeworld as sw

        enc = encoder or load_encoder(data_args.encoder, data_args.pretrained or None)
        eval_data = shapeworld_eval_data(
            enc,
            n=data_args.eval_images,
            seed=data_args.data_seed + 10_000,
            caption_styles=sw.CAPTION_STYLES,
            visual_styles=sw.VISUAL_STYLES,
        )
        encoder = encoder if fed.trainable != "head" else None
    return FederatedData(
        batchers,
        [len(p) for p in parts],
        images.shape[1],
        dict(cache.manifest["encoder"]),
        encoder,
        eval_data,
        summary,
    )


# ----------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------
def save_server_state(state: ServerState, directory: Path, config: dict[str, Any]) -> Path:
    """Write ``round-<t>`` atomically: params, base weights and optimizer state as safetensors,
    the rest (round, optimizer skeleton, initial losses, config) as JSON."""
    from asymvlm.io import atomic_directory, atomic_save_safetensors, atomic_write_json

    target = directory / f"round-{state.round:06d}"
    opt_tensors, skeleton = flatten_state(state.opt_state)
    with atomic_directory(target) as tmp:
        atomic_save_safetensors(state.params, tmp / "params.safetensors")
        atomic_save_safetensors(
            {f"base/{k}": v for k, v in state.base.items()} | {f"opt{k}": v for k, v in opt_tensors.items()},
            tmp / "state.safetensors",
        )
        atomic_write_json(
            {
                "type": "asymvlm.federated_server",
                "format_version": 1,
                "round": state.round,
                "opt_state": skeleton,
                "initial_losses": state.initial_losses,
                "epsilon": state.epsilon,
                "config": config,
            },
            tmp / "server.json",
        )
    return target


def _round_dirs(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(
        (p for p in directory.iterdir() if p.name.startswith("round-") and p.name[6:].isdigit()),
        key=lambda p: int(p.name[6:]),
    )


def load_server_state(path: Path) -> ServerState:
    """Read a round checkpoint; corrupt or truncated files raise :class:`asymvlm.io.ArtefactError`."""
    from asymvlm.io import load_safetensors, read_tagged_json

    meta = read_tagged_json(
        path / "server.json",
        "asymvlm.federated_server",
        1,
        required=("round", "opt_state"),
        known=("initial_losses", "epsilon", "config"),
    )
    params = {k: v.clone() for k, v in load_safetensors(path / "params.safetensors", mmap=False).items()}
    rest = load_safetensors(path / "state.safetensors", mmap=False)
    base = {k[len("base/") :]: v.clone() for k, v in rest.items() if k.startswith("base/")}
    opt = {k[len("opt") :]: v for k, v in rest.items() if k.startswith("opt")}
    return ServerState(
        int(meta["round"]),
        params,
        unflatten_state(opt, meta["opt_state"]),
        dict(meta.get("initial_losses") or {}),
        base,
        meta.get("epsilon"),
    )


# ----------------------------------------------------------------------------------------------
# rounds
# ----------------------------------------------------------------------------------------------
def _recipe_options(fed: FederatedArguments) -> dict[str, Any]:
    opts = {
        k: getattr(fed, k)
        for k in (
            "server_momentum",
            "proximal_mu",
            "q",
            "ghbm_beta",
            "ghbm_tau",
            "trim_beta",
            "num_malicious",
            "krum_keep",
            "bias_correction",
        )
    }
    opts.update(beta1=fed.beta1, beta2=fed.beta2, tau=fed.tau, local_lr=fed.local_lr, fairness_alpha=fed.fairness_alpha)
    if fed.server_lr >= 0:
        opts["server_lr"] = fed.server_lr
    return opts


def _round_rng(seed: int, rnd: int) -> np.random.Generator:
    return np.random.default_rng([seed, rnd])


def _participants(fed: FederatedArguments, rnd: int) -> tuple[list[int], dict[str, list[int]]]:
    rng = _round_rng(fed.seed, rnd)
    m = fed.clients_per_round or max(1, int(round(fed.client_fraction * fed.num_clients)))
    sampled = sorted(rng.choice(fed.num_clients, size=min(m, fed.num_clients), replace=False).tolist())
    dropped = [c for c in sampled if rng.random() < fed.dropout_prob]
    speeds = {c: float(rng.lognormal(0.0, 0.5)) for c in sampled}
    late = []
    if fed.straggler_deadline > 0:
        late = [c for c in sampled if c not in dropped and fed.local_steps / speeds[c] > fed.straggler_deadline]
    active = [c for c in sampled if c not in dropped and c not in late]
    return active, {"sampled": sampled, "dropped": dropped, "stragglers": late}


def _malicious(fed: FederatedArguments) -> set[int]:
    if fed.attack == "none" or fed.malicious_fraction <= 0:
        return set()
    rng = np.random.default_rng([fed.seed, 999_983])
    count = int(round(fed.malicious_fraction * fed.num_clients))
    return set(rng.choice(fed.num_clients, size=count, replace=False).tolist())


def _lora_layer_keys(params: Mapping[str, Tensor]) -> dict[str, tuple[str, str]]:
    """{layer: (key of A, key of B)} for the LoRA factors among ``params``."""
    out: dict[str, dict[str, str]] = {}
    for k in params:
        for ab in ("A", "B"):
            marker = f".lora_{ab}."
            if marker in k:
                out.setdefault(k.split(marker)[0], {})[ab] = k
    return {layer: (d["A"], d["B"]) for layer, d in out.items()}


def _base_weight_name(layer: str) -> str:
    # "text.base_model.model.<module path>" -> the wrapped Linear's base weight inside the peft model
    return f"{layer}.base_layer.weight"


def fairness(values: list[float]) -> dict[str, float]:
    """Mean, std and mean of the worst 10% (at least one) of per-client values (losses: worst = highest)."""
    v = np.asarray(values, dtype=np.float64)
    worst = np.sort(v)[::-1][: max(1, int(math.ceil(0.1 * len(v))))]
    return {"mean": float(v.mean()), "std": float(v.std()), "worst10": float(worst.mean())}


def run_federated(
    fed: FederatedArguments,
    data: FederatedData,
    *,
    log: Callable[[dict], None] | None = None,
    stop_after: int | None = None,
) -> tuple[ServerState, Any]:
    """Run (or resume) the federation; return the final server state and the task (trained module).

    ``stop_after`` ends the run after that many rounds of this call (tests simulate a crash).
    """
    out = Path(fed.fed_output_dir)
    ckpt_dir = out / "checkpoints"
    out.mkdir(parents=True, exist_ok=True)
    recipe = make_recipe(fed.recipe, **_recipe_options(fed))
    head_cfg = HeadConfig(
        dim=data.dim, family=fed.family, hidden_dims=tuple(fed.head_hidden), residual=fed.residual_head
    )
    lora = None
    if fed.trainable != "head":
        from asymvlm.lora import DEFAULT_TARGETS

        targets = (
            fed.lora_targets
            or {"open_clip": r"transformer\.resblocks\.\d+\.mlp\.(c_fc|c_proj)", "hf": DEFAULT_TARGETS["hf"]}[
                data.encoder.backend
            ]
        )
        lora = {"r": fed.lora_r, "alpha": fed.lora_alpha, "dropout": 0.0, "target_modules": targets}
    task = FederatedTask(
        head_cfg,
        trainable=fed.trainable,
        encoder=data.encoder,
        lora=lora,
        freeze_lora_a=fed.lora_mode == "frozen_a",
        seed=fed.seed,
    )
    if fed.init_from:
        _init_task_from(task, fed.init_from)
    masks = None
    if fed.mask_file:
        from asymvlm.federated.client import mask_for_task

        from asymvlm.masks import load_masks

        masks = mask_for_task(task, load_masks(fed.mask_file))
    comm = upload_bytes({k: v for k, v in task.get_params().items() if k in set(task.trained_names())}, masks)
    if log:
        log({"event": "communication per client and round", **comm})
    options = ClientOptions(
        masks=masks,
        local_steps=fed.local_steps,
        local_lr=fed.local_lr,
        batch_size=fed.local_batch_size,
        momentum=fed.local_momentum,
        proximal_mu=recipe.proximal_mu,
        ghbm_beta=recipe.ghbm_beta,
    )
    exact_lora = fed.trainable != "head" and fed.lora_mode in ("stack", "residual", "svd")
    layer_keys = _lora_layer_keys(task.get_params()) if fed.trainable != "head" else {}
    lora_keys = {k for pair in layer_keys.values() for k in pair}

    rounds = _round_dirs(ckpt_dir)
    if fed.fed_resume and rounds:
        state = load_server_state(rounds[-1])
        if state.base:
            _set_base(task, state.base)
    else:
        if fed.fed_resume and log:
            log({"event": "no checkpoint to resume from; starting from scratch"})
        params = task.get_params()
        server_params = {k: v for k, v in params.items() if not (exact_lora and k in lora_keys)}
        state = ServerState(
            0, params, recipe.server.init(server_params), {}, _get_base(task, layer_keys) if exact_lora else {}
        )
    if "loss_initial" in recipe.needs and not state.initial_losses:
        # F_k(theta_0): every client's loss at the initial global model (AdaFedAdam's fairness weights)
        task.set_params(state.params)
        for c, b in enumerate(data.batchers):
            b.reseed(fed.seed * 1_000_003 + c)
            state.initial_losses[str(c)] = client_loss(task, b, options.loss_batches)[0]
    accountant = _accountant(fed, state)
    malicious = _malicious(fed)
    config = asdict(fed)
    bar = tqdm(
        range(state.round, fed.rounds), initial=state.round, total=fed.rounds, desc="rounds", disable=not fed.progress
    )
    done_here = 0
    for rnd in bar:
        t0 = time.time()
        active, who = _participants(fed, rnd)
        record: dict[str, Any] = {"round": rnd + 1, **{k: v for k, v in who.items()}}
        ghbm_state = _find_ghbm_state(state.opt_state)
        momentum = None
        if ghbm_state is not None:
            server_params = (
                {k: v for k, v in state.params.items() if k in ghbm_state["history"][0]}
                if ghbm_state["history"]
                else None
            )
            momentum = ghbm_momentum(ghbm_state["history"], server_params, recipe.ghbm_tau) if server_params else None
        results, rejected = [], []
        needs = recipe.needs
        for c in active:
            batcher = data.batchers[c]
            batcher.reseed(fed.seed * 1_000_003 + rnd * 7919 + c)
            res = client_update(
                task,
                state.params,
                batcher,
                options,
                client=c,
                num_examples=data.num_examples[c],
                seed=fed.seed * 1_000_003 + rnd * 7919 + c,
                ghbm_momentum=_full(momentum, state.params) if momentum else None,
                need_loss_before=bool(needs & {"loss_before", "loss_initial"}),
                need_grad_norm="grad_norm" in needs,
            )
            if c in malicious:
                factor = -1.0 if fed.attack == "sign_flip" else fed.attack_scale
                res.delta = {k: v * factor for k, v in res.delta.items()}
            try:
                check_delta(state.params, res.delta, c)
                results.append(res)
            except ClientUpdateError as err:
                rejected.append({"client": c, "reason": str(err)})
        record["rejected"] = rejected
        record["upload_bytes"] = {"per_client": comm["sent_bytes"], "dense": comm["dense_bytes"]}
        if len(results) < fed.min_clients:
            record["skipped"] = f"{len(results)} valid updates < min_clients={fed.min_clients}"
        else:
            state = _server_step(
                fed, recipe, state, results, layer_keys, lora_keys, exact_lora, task, accountant, record
            )
        state.round = rnd + 1
        record["client_loss_after"] = {str(r.client): r.loss_after for r in results}
        if results:
            record["loss_after"] = fairness([r.loss_after for r in results])
        evaluate_now = (fed.eval_every > 0 and (rnd + 1) % fed.eval_every == 0) or rnd + 1 == fed.rounds
        if evaluate_now:
            task.set_params(state.params)
            record.update(_evaluate(task, data, fed))
        record["seconds"] = round(time.time() - t0, 3)
        save_server_state(state, ckpt_dir, config)
        for old in _round_dirs(ckpt_dir)[: -fed.keep_rounds]:
            shutil.rmtree(old, ignore_errors=True)
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if log:
            log(record)
        bar.set_postfix(loss=f"{record.get('loss_after', {}).get('mean', float('nan')):.3f}")
        done_here += 1
        if stop_after is not None and done_here >= stop_after:
            break
    task.set_params(state.params)
    return state, task


def _init_task_from(task: FederatedTask, path: str) -> None:
    """Start from a saved AsymVLM's head and temperature (same head architecture)."""
    from asymvlm.model import AsymVLM

    start = AsymVLM.from_pretrained(path, load_encoder=False)
    if start.head.config != task.head.config:
        raise ValueError(
            f"init_from {path}: head {start.head.config} differs from the federated head {task.head.config}"
        )
    with torch.no_grad():
        task.head.load_state_dict(start.head.state_dict())
        task.loss_fn.logit_scale.fill_(start.logit_scale)


def save_federated_model(task: FederatedTask, state: ServerState, data: FederatedData, directory: Path) -> Path:
    """Save the federated AsymVLM: head, temperature, the LoRA adapter (peft format) and, for the
    exact LoRA modes, the dense deltas folded into the frozen text tower."""
    from asymvlm.model import AsymVLM

    task.set_params(state.params)
    base_delta = None
    if state.base:
        original = _original_base(task, data)
        base_delta = {}
        for layer, w in state.base.items():
            module_path = layer[len("text.base_model.model.") :]
            base_delta[f"{module_path}.weight"] = w - original[layer]
    task.head.eval()
    model = AsymVLM(
        task.head,
        logit_scale=float(task.loss_fn.logit_scale.detach()),
        encoder_source=data.encoder_source,
        text_adapter=task.peft_model,
        text_base_delta=base_delta,
    )
    return model.save_pretrained(directory)


def _original_base(task: FederatedTask, data: FederatedData) -> Params:
    """The untouched frozen weights of the adapted layers (reloaded from the encoder's source)."""
    from asymvlm.encoders import load_encoder

    src = data.encoder_source or {}
    fresh = load_encoder(src["spec"], src.get("pretrained")).model.state_dict()
    return {
        layer: fresh[f"{layer[len('text.base_model.model.') :]}.weight"]
        for layer in _lora_layer_keys(task.get_params())
    }


def _full(partial: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> Params:
    return {k: partial[k] if k in partial else torch.zeros_like(v) for k, v in params.items()}


def _get_base(task: FederatedTask, layer_keys: Mapping[str, tuple[str, str]]) -> Params:
    named = dict(task.module.named_parameters())
    return {layer: named[_base_weight_name(layer)].detach().clone() for layer in layer_keys}


@torch.no_grad()
def _set_base(task: FederatedTask, base: Mapping[str, Tensor]) -> None:
    named = dict(task.module.named_parameters())
    for layer, w in base.items():
        named[_base_weight_name(layer)].copy_(w)


def _accountant(fed: FederatedArguments, state: ServerState):
    if fed.dp_noise_multiplier <= 0:
        return None
    try:
        from opacus.accountants import RDPAccountant
    except ImportError as err:
        raise MissingExtraError("differential privacy accounting needs opacus: pip install 'asymvlm[dp]'") from err
    acc = RDPAccountant()
    m = fed.clients_per_round or max(1, int(round(fed.client_fraction * fed.num_clients)))
    for _ in range(state.round):  # replay the rounds already done (resume)
        acc.step(noise_multiplier=fed.dp_noise_multiplier, sample_rate=m / fed.num_clients)
    return acc


def _server_step(
    fed, recipe, state: ServerState, results, layer_keys, lora_keys, exact_lora, task, accountant, record
) -> ServerState:
    deltas = [r.delta for r in results]
    weights = [max(1, r.num_examples) for r in results]
    info_in: dict[str, Any] = {}
    if "loss_before" in recipe.needs or "loss_initial" in recipe.needs:
        info_in["loss_before"] = [r.loss_before for r in results]
    if "grad_norm" in recipe.needs:
        info_in["grad_norm"] = [r.grad_norm for r in results]
    if "loss_initial" in recipe.needs:
        info_in["loss_initial"] = [state.initial_losses[str(r.client)] for r in results]
    server_deltas = [{k: v for k, v in d.items() if not (exact_lora and k in lora_keys)} for d in deltas]
    server_params = {k: v for k, v in state.params.items() if not (exact_lora and k in lora_keys)}
    if accountant is not None:
        agg = ClippedMean(fed.dp_max_norm, weighting="uniform")(server_deltas)
        gen = torch.Generator().manual_seed(fed.seed * 31 + state.round)
        std = fed.dp_noise_multiplier * fed.dp_max_norm / len(server_deltas)
        agg.delta = {k: v + std * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in agg.delta.items()}
        m = fed.clients_per_round or max(1, int(round(fed.client_fraction * fed.num_clients)))
        accountant.step(noise_multiplier=fed.dp_noise_multiplier, sample_rate=m / fed.num_clients)
        state.epsilon = float(accountant.get_epsilon(fed.dp_delta))
        record["dp_epsilon"] = state.epsilon
    else:
        agg = recipe.aggregator(server_deltas, weights, **info_in)
    step, opt_state = recipe.server.update(agg.delta, state.opt_state, server_params, **agg.info)
    new_server = apply_updates(server_params, step)
    params = dict(state.params)
    params.update(new_server)
    base = dict(state.base)
    if exact_lora:
        layers = {
            layer: ([state.params[a] + d[a] for d in deltas], [state.params[b] + d[b] for d in deltas])
            for layer, (a, b) in layer_keys.items()
        }
        lo = aggregate_lora(
            layers,
            weights,
            mode=fed.lora_mode,
            scaling=fed.lora_alpha / fed.lora_r,
            rank=fed.lora_r,
            seed=fed.seed + state.round,
        )
        for layer, (a, b) in layer_keys.items():
            params[a], params[b] = lo.adapters[layer]
            base[layer] = base[layer] + lo.base_delta[layer]
        _set_base(task, base)
        record["lora_info"] = lo.info
    record["aggregator_info"] = {
        k: v
        for k, v in agg.info.items()
        if isinstance(v, (int, float, list)) and not (isinstance(v, list) and len(v) > 64)
    }
    return ServerState(state.round, params, opt_state, state.initial_losses, base, state.epsilon)


def _evaluate(task: FederatedTask, data: FederatedData, fed: FederatedArguments) -> dict[str, Any]:
    out: dict[str, Any] = {}
    losses = []
    for k, b in enumerate(data.batchers):
        b.reseed(fed.seed * 7 + k)
        losses.append(client_loss(task, b, fed.fairness_batches)[0])
    out["client_loss"] = {str(k): v for k, v in enumerate(losses)}
    out["fairness"] = fairness(losses)
    if data.eval_data is not None:
        from asymvlm.eval.benchmark import evaluate, progress_metrics, with_text_tower

        from asymvlm.model import AsymVLM

        ed = data.eval_data
        if task.peft_model is not None and ed.captions:  # the LoRA-adapted tower embeds the captions
            ed = with_text_tower(ed, data.encoder)
        task.head.eval()
        model = AsymVLM(task.head, logit_scale=float(task.loss_fn.logit_scale.detach()))
        rep = evaluate(ed, {"m": model}, include_clip=False)["m"]
        task.head.train()
        out.update(progress_metrics(rep))
    return out
