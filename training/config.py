"""Training configuration: frozen dataclasses parsed by ``transformers.HfArgumentParser``.

Values come from a YAML file (``--config exp.yaml``), then command-line flags override them.
Every field has help text (``asymvlm-train --help``); field names are unique across the three
groups so a flat YAML file maps onto them. Unknown YAML keys are an error that names the key.

Example YAML::

    # exp.yaml
    mode: head
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

from asymvlm.config import ConfigError, DataArguments, HeadArguments, check_fields, config_fields, parse_dataclass_args

__all__ = [
    "DataArguments",
    "HeadArguments",
    "ModelArguments",
    "TrainArguments",
    "TrainConfig",
    "TRAIN_GROUPS",
    "parse_config",
]


@dataclass(frozen=True)
class ModelArguments:
    """What is trained: a head on cached embeddings, or a LoRA adapter on the text tower + head."""

    mode: Literal["head", "lora"] = field(
        default="head",
        metadata={
            "help": "'head': the text head on cached embeddings (fast path). 'lora': peft LoRA on the frozen text "
            "tower plus the head; image embeddings still come from the cache."
        },
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (mode=lora)."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; the update is scaled by alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: str = field(
        default="",
        metadata={
            "help": "Regex (full match) of text-tower modules to adapt; empty = the backend default "
            "(open_clip: every text block's attn, mlp.c_fc, mlp.c_proj; transformers: "
            "q/k/v/out_proj and mlp.fc1/fc2 of text_model.encoder.layers)."
        },
    )
    init_from: str = field(
        default="",
        metadata={
            "help": "A saved AsymVLM (a folder or a Hub id, user/repo[@revision]) whose head (and adapter) to start "
            "from."
        },
    )
    mask_file: str = field(
        default="",
        metadata={
            "help": "safetensors of boolean masks {parameter name: mask}: updates and weight decay are zero outside "
            "the mask (sparse fine-tuning, e.g. TaLoS). Parameters without a mask train normally."
        },
    )

    def __post_init__(self) -> None:
        check_fields(self)
        if self.lora_r < 1 or self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1:
            raise ConfigError("need lora_r >= 1, lora_alpha > 0 and 0 <= lora_dropout < 1")


@dataclass(frozen=True)
class TrainArguments:
    """How it is trained. Defaults: AdamW 1e-3 with a 5% linear warm-up and cosine decay, which trains
    on small collections without tuning; the AsymVLM paper's recipe is ``--optimizer sgd --lr 1e-2
    --warmup_ratio 0`` (measured on real text it leaves every concentration near 1 at d = 384)."""

    output_dir: str = field(
        default="runs/asymvlm",
        metadata={"help": "Run folder: checkpoints/, train_log.jsonl, and the final model in model/."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of initialisation and batch order."})
    max_steps: int = field(default=1000, metadata={"help": "Optimizer steps."})
    batch_size: int = field(
        default=2048,
        metadata={
            "help": "Global batch (captions per micro-step, summed over processes; the paper: 2048). Each process "
            "draws batch_size / num_processes; negatives come from all processes. Capped, with a warning, at the "
            "number of training captions (rounded down to a multiple of the process count)."
        },
    )
    gradient_accumulation_steps: int = field(
        default=1,
        metadata={"help": "Micro-steps per optimizer step (each micro-batch is its own contrastive problem)."},
    )
    optimizer: Literal["adamw", "sgd"] = field(
        default="adamw", metadata={"help": "'adamw' or 'sgd' (the paper's, with momentum)."}
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
        default="no", metadata={"help": "'no', 'fp16' or 'bf16' (accelerate)."}
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
    eval_every: int = field(default=0, metadata={"help": "Evaluate every N steps (0 = only at the end; -1 = never)."})
    save_every: int = field(default=500, metadata={"help": "Checkpoint every N steps (0 = only at the end)."})
    keep_last: int = field(default=2, metadata={"help": "Checkpoints to keep."})
    resume: bool = field(
        default=False, metadata={"help": "Resume from the latest checkpoint in output_dir (its config must match)."}
    )
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "Start afresh in a used output_dir: removes what a run writes there (checkpoints/, "
            "train_log.jsonl, model/), nothing else."
        },
    )
    log_every: int = field(default=10, metadata={"help": "Log every N steps."})
    log_with: Literal["auto", "tensorboard", "none"] = field(
        default="auto",
        metadata={
            "help": "accelerate tracker: 'auto' (tensorboard when installed), 'tensorboard' or 'none'. "
            "train_log.jsonl is always written."
        },
    )
    progress: bool = field(default=True, metadata={"help": "Progress bar on the main process."})
    fit_confidence: bool = field(
        default=True,
        metadata={
            "help": "Save with the model what it needs to say how likely its answers are right (asymvlm.confidence): "
            "a density of the training texts (unfamiliarity) and, when there is held-out evaluation data "
            "(eval_images / eval_fraction), a calibrator of P(right) fitted on it (mode=head only)."
        },
    )

    def __post_init__(self) -> None:
        check_fields(self)
        if self.resume and self.overwrite:
            raise ConfigError("resume and overwrite exclude each other: continue the run, or replace it")
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "keep_last", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive finite number, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.weight_decay < 0 or self.warmup_steps < 0 or self.save_every < 0 or self.clip_grad_norm < 0:
            raise ConfigError("weight_decay, warmup_steps, save_every and clip_grad_norm must be >= 0")

    @property
    def warmup(self) -> int:
        """Warm-up steps: ``warmup_steps`` if > 0, else ``round(warmup_ratio * max_steps)``."""
        return self.warmup_steps if self.warmup_steps > 0 else int(round(self.warmup_ratio * self.max_steps))


TRAIN_GROUPS = (DataArguments, HeadArguments, ModelArguments, TrainArguments)


@dataclass(frozen=True)
class TrainConfig:
    """The four argument groups together (a flat YAML file or flag list maps onto them)."""

    data: DataArguments = field(default_factory=DataArguments)
    head: HeadArguments = field(default_factory=HeadArguments)
    model: ModelArguments = field(default_factory=ModelArguments)
    train: TrainArguments = field(default_factory=TrainArguments)

    def to_dict(self) -> dict[str, Any]:
        """Flat {field: value} (the YAML layout)."""
        return {
            k: v for part in (self.data, self.head, self.model, self.train) for k, v in dataclasses.asdict(part).items()
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = config_fields(TRAIN_GROUPS)
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown}; see asymvlm-train --help")
        parts = {}
        for group, klass in zip(("data", "head", "model", "train"), TRAIN_GROUPS):
            names = {f.name for f in dataclasses.fields(klass)}
            parts[group] = klass(**{k: v for k, v in values.items() if k in names})
        return cls(**parts)

    def replace(self, **changes: Any) -> TrainConfig:
        return TrainConfig.from_dict({**self.to_dict(), **changes})


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Parse ``[--config exp.yaml] [--flag value ...]``: YAML values first, flags override them."""
    return TrainConfig(*parse_dataclass_args(TRAIN_GROUPS, argv, "asymvlm-train"))
