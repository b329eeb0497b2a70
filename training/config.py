"""Training configuration: frozen dataclasses parsed by ``transformers.HfArgumentParser``.

Values come from a YAML file (``--config exp.yaml``), then command-line flags override them.
Every field has help text (``asymvlm-train --help``); field names are unique across the three
groups (:class:`~asymvlm.config.DataArguments`, the head's :class:`~asymvlm.heads.HeadConfig`,
:class:`TrainArguments`) so a flat YAML file maps onto them. Unknown YAML keys are an error that
names the key. :class:`TrainArguments` is a :class:`~asymvlm.config.LoraArguments` and a
:class:`~asymvlm.config.RunArguments`: what is trained and the run control are declared once for
``asymvlm-train`` and ``asymvlm-federate``.

Example YAML::

    # exp.yaml
    trainable: head
    family: vmf
    max_steps: 1000
    batch_size: 2048
    optimizer: adamw
    lr: 0.001
    output_dir: runs/vmf

Example:
    >>> cfg = parse_config(["--family", "ps", "--max_steps", "10"])
    >>> cfg.head.family, cfg.train.max_steps, cfg.train.optimizer
    ('ps', 10, 'adamw')
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from asymvlm.config import (
    FROM_DATA,
    ConfigError,
    DataArguments,
    LoraArguments,
    RunArguments,
    check_fields,
    config_fields,
    parse_dataclass_args,
)
from asymvlm.heads import HeadConfig

__all__ = [
    "DataArguments",
    "HeadConfig",
    "TrainArguments",
    "TrainConfig",
    "TRAIN_GROUPS",
    "parse_config",
    "optimizer_kernel",
]


@dataclass(frozen=True)
class TrainArguments(LoraArguments, RunArguments):
    """How it is trained (with what is trained, :class:`~asymvlm.config.LoraArguments`, and the run
    control, :class:`~asymvlm.config.RunArguments`: ``eval_every`` counts optimizer steps).
    Defaults: AdamW 1e-3 with a 5% linear warm-up and cosine decay, which trains on small collections
    without tuning; the AsymVLM paper's recipe is ``--optimizer sgd --lr 1e-2 --warmup_ratio 0``
    (measured on real text it leaves every concentration near 1 at d = 384). ``asymvlm-train`` trains
    the head (``trainable=head``), the text-tower LoRA adapter and the head (``both``), or the adapter
    alone (``lora``: the head keeps its start, from ``init_from`` or its seeded initialisation)."""

    max_steps: int = field(default=1000, metadata={"help": "Optimizer steps."})
    batch_size: int = field(
        default=2048,
        metadata={
            "help": "Global batch (captions per micro-step, summed over processes; the paper: 2048). Each process "
            "draws batch_size / num_processes; negatives come from all processes. Capped, with a warning, at the "
            "number of training captions (rounded down to a multiple of the process count). Speed: the loss's "
            "(B, B) element-wise work per sample grows with B; on 2 CPU cores the paper's head trains as fast "
            "per sample at 256 as at 1024 and about a quarter slower at 2048 (bench/train_throughput.py)."
        },
    )
    gradient_accumulation_steps: int = field(
        default=1,
        metadata={"help": "Micro-steps per optimizer step (each micro-batch is its own contrastive problem)."},
    )
    optimizer: Literal["adamw", "sgd"] = field(
        default="adamw", metadata={"help": "'adamw' or 'sgd' (the paper's, with momentum)."}
    )
    optimizer_impl: Literal["auto", "fused", "foreach", "for-loop"] = field(
        default="auto",
        metadata={
            "help": "The optimizer's kernel: 'auto' (fused where torch has one for the device, CPU and CUDA "
            "included, else foreach), 'fused', 'foreach' or 'for-loop' (torch's CPU default). Fused AdamW is ~4x "
            "faster than for-loop for the paper's head on CPU and differs from it in the last bits (SGD: identical)."
        },
    )
    lr: float = field(default=1e-3, metadata={"help": "Peak learning rate (the paper's SGD: 1e-2)."})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum."})
    weight_decay: float = field(default=5e-4, metadata={"help": "Weight decay (never on the temperature)."})
    scheduler: Literal["cosine", "constant"] = field(
        default="cosine", metadata={"help": "'cosine' (to 0) or 'constant', after warm-up."}
    )
    warmup_ratio: float = field(
        default=0.05, metadata={"help": "Linear warm-up over this fraction of max_steps (unless warmup_steps > 0)."}
    )
    warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up steps (> 0: overrides warmup_ratio)."})
    mixed_precision: Literal["no", "fp16", "bf16"] = field(
        default="no",
        metadata={
            "help": "'no', 'fp16' or 'bf16'. bf16 of trainable=head: the head's MLP under bf16 autocast, the loss "
            "in float32 (its loss curve within one percent of float32's); otherwise accelerate's autocast of the whole "
            "forward. On a CPU with AMX, bf16 trains the paper's head ~1.6x faster than float32 at batch 256-1024."
        },
    )
    compile: bool = field(
        default=False,
        metadata={
            "help": "torch.compile the model's forward (head + loss; the backward follows). The first steps pay the "
            "compilation (about 1.5 min cold on 2 CPU cores, seconds from the cache)."
        },
    )
    positive_mode: Literal["exclude", "sum", "diagonal"] = field(
        default="exclude",
        metadata={"help": "Captions of the same image in a batch: 'exclude' (not negatives), 'sum' or 'diagonal'."},
    )
    caption_positives: Literal["batch", "data", "none"] = field(
        default="batch",
        metadata={
            "help": "Identical captions of different images: 'batch' (an identical caption in the batch is not a "
            "negative: the reference code's masking), 'data' (nor any image with an identical caption anywhere), "
            "'none' (positives by image only)."
        },
    )
    vmf_normalizer: Literal["exact", "approx"] = field(
        default="exact", metadata={"help": "'exact' or 'approx' (Scott et al. 2021)."}
    )
    init_logit_scale: float = field(default=0.0, metadata={"help": "Initial log temperature (0 = scale 1)."})
    max_logit_scale: float = field(default=math.inf, metadata={"help": "Clamp of the log temperature (inf = none)."})
    clip_grad_norm: float = field(default=0.0, metadata={"help": "Clip the gradient norm (0 = off)."})
    save_every: int = field(default=500, metadata={"help": "Checkpoint every N steps (0 = only at the end)."})
    log_every: int = field(default=10, metadata={"help": "Log every N steps."})
    log_with: Literal["auto", "tensorboard", "none"] = field(
        default="auto",
        metadata={
            "help": "accelerate tracker: 'auto' (tensorboard when installed), 'tensorboard' or 'none'. "
            "train_log.jsonl is always written."
        },
    )
    fit_confidence: bool = field(
        default=True,
        metadata={
            "help": "Save with the model what it needs to say how likely its answers are right (asymvlm.confidence): "
            "a density of the training texts (unfamiliarity) and, when there is held-out evaluation data "
            "(eval_images / eval_fraction), a calibrator of P(right) fitted on it (trainable=head only)."
        },
    )

    def __post_init__(self) -> None:
        check_fields(self)
        self._check_lora()
        self._check_run()
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive finite number, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.compile and self.trainable != "head":
            raise ConfigError(f"compile is for trainable=head (measured there), got trainable={self.trainable}")
        if self.weight_decay < 0 or self.warmup_steps < 0 or self.save_every < 0 or self.clip_grad_norm < 0:
            raise ConfigError("weight_decay, warmup_steps, save_every and clip_grad_norm must be >= 0")

    @property
    def warmup(self) -> int:
        """Warm-up steps: ``warmup_steps`` if > 0, else ``round(warmup_ratio * max_steps)``."""
        return self.warmup_steps if self.warmup_steps > 0 else int(round(self.warmup_ratio * self.max_steps))


TRAIN_GROUPS = (DataArguments, HeadConfig, TrainArguments)


@dataclass(frozen=True)
class TrainConfig:
    """The three argument groups together (a flat YAML file or flag list maps onto them). The
    head's ``dim`` is the data's: the run builds ``dataclasses.replace(cfg.head, dim=data.dim)``."""

    data: DataArguments = field(default_factory=DataArguments)
    head: HeadConfig = field(default_factory=HeadConfig)
    train: TrainArguments = field(default_factory=TrainArguments)

    def to_dict(self) -> dict[str, Any]:
        """Flat {config key: value} (the YAML layout; no :data:`~asymvlm.config.FROM_DATA` field)."""
        return {
            k: v
            for part in (self.data, self.head, self.train)
            for k, v in dataclasses.asdict(part).items()
            if k not in FROM_DATA
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = config_fields(TRAIN_GROUPS)
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown}; see asymvlm-train --help")
        parts = {}
        for group, klass in zip(("data", "head", "train"), TRAIN_GROUPS):
            names = {f.name for f in dataclasses.fields(klass)} - FROM_DATA
            parts[group] = klass(**{k: v for k, v in values.items() if k in names})
        return cls(**parts)

    def replace(self, **changes: Any) -> TrainConfig:
        return TrainConfig.from_dict({**self.to_dict(), **changes})


def optimizer_kernel(impl: str, device: torch.device | str) -> dict[str, bool]:
    """The keyword arguments of torch's AdamW / SGD for ``optimizer_impl`` on ``device``: ``auto`` is
    fused where torch has a fused kernel for the device (CPU and CUDA among them), else foreach.
    Measured for the paper's head (3.1M parameters) on 2 CPU cores, AdamW step: for-loop (torch's
    CPU default) 9 ms, ~80 ms with other processes on the cores; foreach 6 ms; fused 2.5 ms. Fused
    AdamW differs from for-loop in the last bits; fused SGD and both foreach are bit-identical to it.

    Example:
        >>> optimizer_kernel("auto", "cpu"), optimizer_kernel("for-loop", "cpu")
        ({'fused': True}, {'foreach': False})
    """
    if impl == "auto":
        try:  # (torch's own list; CPU from torch 2.4)
            from torch.utils._foreach_utils import _get_fused_kernels_supported_devices as fused_devices
        except ImportError:
            fused_devices = lambda: ("cuda",)  # noqa: E731
        impl = "fused" if torch.device(device).type in fused_devices() else "foreach"
    if impl not in ("fused", "foreach", "for-loop"):
        raise ConfigError(f"optimizer_impl must be auto, fused, foreach or for-loop, got {impl!r}")
    return {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Parse ``[--config exp.yaml] [--flag value ...]``: YAML values first, flags override them."""
    return TrainConfig(*parse_dataclass_args(TRAIN_GROUPS, argv, "asymvlm-train"))
