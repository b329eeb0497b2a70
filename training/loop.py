"""``train(cfg)``: the accelerate training loop for AsymVLM heads and text-tower LoRA adapters.

Accelerator -> seed -> data (:func:`asymvlm.training.data.get_dataloaders`, the seam) -> model ->
optimizer/scheduler -> ``accelerator.prepare`` -> loop:

* gradient accumulation (``accelerator.accumulate``) and mixed precision where supported (bf16 of a
  head: the MLP only, the loss in float32, :func:`_head_bf16`); the optimizer's fused kernel where
  torch has one (``optimizer_impl``); losses are read from the device only at a logged step;
* the contrastive loss sees the negatives of every process: each process embeds its slice of
  the global batch, the text distributions and image embeddings are gathered *with gradient*
  (:func:`asymvlm.trainable.all_gather_with_grad`) and every process computes the global loss. The gather's
  backward sums the identical gradients of all processes and DDP averages them, which gives
  exactly the single-process gradient of the same global batch;
* a progress bar on the main process, logs to ``train_log.jsonl`` and accelerate's trackers
  (TensorBoard when installed), periodic evaluation with :mod:`asymvlm.eval`;
* checkpoints (:mod:`asymvlm.training.checkpoint`: safetensors + JSON, nothing pickled) every
  ``save_every`` steps, written to a temporary folder and renamed (atomic), keeping the last
  ``keep_last``; ``resume=True`` continues from the latest one with bit-identical results on CPU
  (its config must match the run's); a new run refuses a used output_dir unless ``overwrite``;
* a non-finite loss stops the run with a message naming the step, and the last good checkpoint
  stays; a failed checkpoint write (disk full, permissions) leaves the previous one intact;
* at the end ``save_pretrained`` of the AsymVLM (head, temperature, encoder reference and, for
  LoRA, the adapter in peft's format) to ``<output_dir>/model``, with its model card
  (``README.md``: the training data, the config and the last logged loss and evaluation metrics).

``init_from`` may be a folder or a Hugging Face Hub id (``user/repo[@revision]``,
:func:`asymvlm.hub.resolve_artefact`); a run resolves and loads it once (:func:`load_start`): its head,
temperature, adapter and the fingerprint its lineage records come from that one load. With progress
bars off, ``asymvlm-train`` prints one summary line per logged step (``train(cfg, log=...)``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from asymvlm.config import FROM_DATA, RunArguments
from asymvlm.errors import ArtefactError, CheckpointWriteError, ConfigError, TrainingDiverged
from asymvlm.heads import TextHead
from asymvlm.losses import AsymVLMLoss, parameter_groups
from asymvlm.runs import check_output_dir, check_resume_config, claim_output_dir
from asymvlm.trainable import TrainableModel
from asymvlm.training import data as data_mod
from asymvlm.training.checkpoint import STATE_NAME, load_training_state, read_trainer_state, save_training_state
from asymvlm.training.config import TrainConfig, optimizer_kernel
from asymvlm.training.evaluation import evaluator

__all__ = ["train", "latest_checkpoint", "load_start", "Start", "TrainingDiverged", "CheckpointWriteError"]

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d{8})$")
CHECKPOINT_TMP_RE = re.compile(r"^\.checkpoint-(\d{8})\.tmp$")


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder (``checkpoints/checkpoint-<step>`` with its state file)."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if CHECKPOINT_RE.match(p.name) and (p / STATE_NAME).is_file()]
    return max(done, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1))) if done else None


def _lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    t = cfg.train

    warmup = t.warmup

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if t.scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, t.max_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


@dataclasses.dataclass(frozen=True)
class Start:
    """What a run starts from, read once from ``init_from``: the saved model (head and temperature),
    its folder (the Hub snapshot for a Hub id; its ``text_adapter/`` starts a LoRA run) and the
    lineage the trained model records (merges check it)."""

    model: Any
    directory: Path
    lineage: dict[str, Any]


def load_start(init_from: str) -> Start | None:
    """Resolve and load ``init_from`` (a folder or a Hub id) once; None when it is empty."""
    if not init_from:
        return None
    from asymvlm.hub import resolve_artefact
    from asymvlm.io import tensor_fingerprint
    from asymvlm.model import AsymVLM

    directory = resolve_artefact(init_from)  # a folder, or a Hub id's snapshot
    model = AsymVLM.from_pretrained(directory, load_encoder=False)
    lineage = {"init_from": str(init_from), "init_from_fingerprint": tensor_fingerprint(model.head.state_dict())}
    return Start(model, directory, lineage)


def _build_head(cfg: TrainConfig, dim: int, start: Start | None) -> tuple[TextHead, float | None]:
    if start is not None:
        if start.model.dim != dim:
            raise ConfigError(
                f"init_from {cfg.train.init_from} has a head of dimension {start.model.dim}, the embeddings have {dim}"
            )
        return start.model.head, start.model.logit_scale
    head = TextHead(config=dataclasses.replace(cfg.head, dim=dim), validate=False)
    return head, None


def _lineage(start: Start | None) -> dict[str, Any]:
    """What the trained head starts from (recorded in the saved model; merges check it): the model
    and the fingerprint of its head weights, or ``{"init_from": None, "init": "scratch"}`` for a
    head initialised at random (no merge takes it as a fine-tune of a base)."""
    return {"init_from": None, "init": "scratch"} if start is None else dict(start.lineage)


def _card_info(cfg: TrainConfig, data: Any, log_path: Path) -> dict[str, Any]:
    """The model card's record of the run: its data, its config (without run control and local
    paths) and the last logged training numbers and evaluation metrics (``train_log.jsonl``)."""
    from asymvlm.hub import describe_data, eval_metrics, public_name
    from asymvlm.io import read_jsonl

    records = read_jsonl(log_path)
    last = next((r for r in reversed(records) if "loss" in r), {})
    logged = ("step", "loss", "temperature", "kappa_min", "kappa_median", "kappa_max")
    metrics = {k: last[k] for k in logged if k in last}
    evaluated = next((r for r in reversed(records) if any(k.startswith("eval/") for k in r)), None)
    evaluation = None
    if evaluated is not None:
        where = dict(getattr(data, "extra", {}).get("evaluation") or {})
        evaluation = {
            "dataset": where.get("dataset") or "held-out data",
            "split": where.get("split"),
            "step": evaluated.get("step"),
            "metrics": eval_metrics(evaluated),
        }
    groups = (cfg.head, cfg.train)  # the data are the card's own section
    recipe = {
        k: v
        for g in groups
        for k, v in dataclasses.asdict(g).items()
        if k not in RESUMABLE_CHANGES and k not in FROM_DATA
    }
    for key in ("mask_file", "init_from"):
        recipe[key] = public_name(recipe.get(key))
    described = dict(getattr(data, "extra", {}).get("data") or describe_data(cfg.data))
    if not cfg.data.cache_dir:  # generated from a dataset: how
        d = cfg.data
        described.update(dataset=d.dataset, encoder=d.encoder, pretrained=d.pretrained, data_seed=d.data_seed,
                         caption_styles=d.caption_styles)  # fmt: skip
    return {
        "data": described,
        "recipe": recipe,
        "metrics": metrics,
        "evaluation": evaluation,
    }


def _trackers(cfg: TrainConfig) -> str | None:
    if cfg.train.log_with == "none":
        return None
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        if cfg.train.log_with == "tensorboard":
            raise ImportError("log_with=tensorboard needs tensorboard: pip install tensorboard") from None
        return None
    return "tensorboard"


def _save_checkpoint(
    accelerator: Any, cfg: TrainConfig, step: int, extra: dict[str, Any], model: Any, optimizer: Any, scheduler: Any
) -> Path:
    """The training state (safetensors + JSON, :mod:`asymvlm.training.checkpoint`) into a temporary
    folder, renamed into place; keep the last K."""
    root = Path(cfg.train.output_dir) / "checkpoints"
    final = root / f"checkpoint-{step:08d}"
    tmp = root / f".checkpoint-{step:08d}.tmp"
    error: BaseException | None = None
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        save_training_state(
            tmp, accelerator.unwrap_model(model), optimizer, scheduler,
            rank=accelerator.process_index, main=accelerator.is_main_process,
        )  # fmt: skip
    except OSError as err:
        error = err
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        try:
            if error is not None:
                raise error
            from asymvlm.io import atomic_write_json

            atomic_write_json({"step": step, "config": cfg.to_dict(), **extra}, tmp / STATE_NAME)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            done = sorted(
                (p for p in root.iterdir() if CHECKPOINT_RE.match(p.name)),
                key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)),
            )
            for old in done[: max(0, len(done) - cfg.train.keep_last)]:
                shutil.rmtree(old, ignore_errors=True)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            prev = latest_checkpoint(cfg.train.output_dir)
            raise CheckpointWriteError(
                f"could not write the checkpoint of step {step} in {root}: {err}. The previous checkpoint "
                f"({prev if prev else 'none'}) is intact; free space or fix permissions and rerun with --resume"
            ) from err
    accelerator.wait_for_everyone()
    return final


# what a training run writes into output_dir, and what may change between a run and its --resume
RUN_OUTPUTS = ("checkpoints", "train_log.jsonl", "model", "asymvlm")
RESUMABLE_CHANGES = (*RunArguments.RESUMABLE, "log_every", "save_every", "log_with")


def _prepare_output_dir(cfg: TrainConfig, resume_state: dict[str, Any] | None, source: Path | None = None) -> None:
    """A new run needs a new or empty output_dir (``overwrite`` clears only what a run wrote, see
    :func:`asymvlm.runs.clear_run_outputs`); a resumed run must have the checkpoint's config, except the keys of
    RESUMABLE_CHANGES."""
    t = cfg.train
    out = Path(t.output_dir)
    if resume_state is not None:
        now = json.loads(json.dumps(cfg.to_dict(), default=str))
        check_resume_config(resume_state["config"], now, RESUMABLE_CHANGES, out, source=source)
    elif not t.resume:  # (--resume without a checkpoint starts from scratch where it is)
        claim_output_dir(out, RUN_OUTPUTS, overwrite=t.overwrite, ours=_ours)


def _ours(path: Path) -> bool:
    """What a training run writes besides the model: checkpoint folders (and one a kill left half
    written) and accelerate's TensorBoard event files."""
    return bool(CHECKPOINT_RE.match(path.name) or CHECKPOINT_TMP_RE.match(path.name)) or (
        path.is_file() and path.name.startswith("events.out.tfevents.")
    )


def _accelerator(cfg: TrainConfig, log_with: str | None) -> Any:
    """A fresh :class:`accelerate.Accelerator` for the run. accelerate keeps process-wide singletons
    (mixed precision, accumulation); train() may run several times in one process (a demo, federated
    clients), so each run starts them afresh. The process group (PartialState) is kept."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    t = cfg.train
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    # Several processes without a GPU (torchrun, or `accelerate launch --multi_gpu` on a CPU-only
    # machine): accelerate only chooses its multi-CPU (gloo) backend when asked for the CPU.
    cpu_distributed = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        mixed_precision="no" if _head_bf16(t) else t.mixed_precision,
        log_with=log_with,
        project_dir=str(Path(t.output_dir)),
        cpu=cpu_distributed,
    )


def _head_bf16(t: Any) -> bool:
    """bf16 for a head-only run: the head's MLP under autocast and the loss in float32
    (:func:`_autocast_mlp`), instead of accelerate's autocast of the whole forward, which put the
    (B, B) log-likelihoods and the InfoNCE in bf16 (measured, paper head, batch 1024: the loss at
    the start 18% off float32's; MLP only: within 0.2% at the same speed)."""
    return t.mixed_precision == "bf16" and t.trainable == "head"


@contextlib.contextmanager
def _autocast_mlp(head: TextHead, device: torch.device, enabled: bool):
    """While training (``head.training``), run ``head.mlp`` under bf16 autocast and hand ``eta`` on
    in float32; evaluation and the saved model run in float32."""
    mlp, forward = head.mlp, head.mlp.forward

    def autocast_forward(x: torch.Tensor) -> torch.Tensor:
        if not mlp.training:
            return forward(x)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return forward(x).float()

    if enabled:
        mlp.forward = autocast_forward  # an instance attribute: parameter names stay the same
    try:
        yield
    finally:
        vars(mlp).pop("forward", None)


def _resume_point(cfg: TrainConfig, accelerator: Any) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint a ``resume`` run continues from and its trainer state (checked before anything
    is used: a tampered file names itself), or ``(None, None)``; the output folder prepared on the
    main process (:func:`_prepare_output_dir`)."""
    t = cfg.train
    out = Path(t.output_dir)
    resume_from = latest_checkpoint(out) if t.resume else None
    resume_state = None
    if resume_from is not None:
        resume_state = read_trainer_state(resume_from, int(CHECKPOINT_RE.match(resume_from.name).group(1)))
    if accelerator.is_main_process:
        _prepare_output_dir(cfg, resume_state, None if resume_from is None else resume_from / STATE_NAME)
    if resume_state is not None and resume_state["step"] > t.max_steps:
        raise ArtefactError(
            f"{resume_from / STATE_NAME}: step {resume_state['step']} is beyond max_steps {t.max_steps}; the "
            "checkpoint was altered"
        )
    accelerator.wait_for_everyone()
    if t.resume and resume_from is None and accelerator.is_main_process:
        logger.info("no checkpoint in %s; starting from scratch", out / "checkpoints")
    return resume_from, resume_state


def _build_model(cfg: TrainConfig, data: Any, start_from: Start | None) -> tuple[TrainableModel, Any]:
    """The trainable model (head, temperature and, unless ``trainable=head``, the text tower's LoRA
    adapter, started from ``init_from``'s) and the masks of ``mask_file`` (validated against it), or None."""
    t = cfg.train
    head, start_scale = _build_head(cfg, data.dim, start_from)
    loss_fn = AsymVLMLoss(
        vmf_normalizer=t.vmf_normalizer,
        positive_mode=t.positive_mode,
        init_logit_scale=t.init_logit_scale if start_scale is None else start_scale,
        max_logit_scale=None if math.isinf(t.max_logit_scale) else t.max_logit_scale,
    )
    peft_model = None
    if t.trainable != "head":
        if data.encoder is None:
            raise ConfigError(f"trainable={t.trainable} needs the encoder (the data seam returned none)")
        from asymvlm.lora import add_text_lora

        peft_model = add_text_lora(data.encoder, **t.lora_config(data.encoder.backend))
        if start_from is not None and (start_from.directory / "text_adapter").is_dir():
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            adapter = load_file(start_from.directory / "text_adapter" / "adapter_model.safetensors")
            set_peft_model_state_dict(peft_model, adapter)
    if t.trainable == "lora":  # the adapter alone: the head and temperature keep their start
        head.requires_grad_(False)
        loss_fn.requires_grad_(False)
    model = TrainableModel(head, loss_fn, data.encoder, peft_model, trainable=t.trainable)
    mask_tensors = None
    if t.mask_file:
        from asymvlm.masks import SparseMasks, load_masks

        mask_tensors = load_masks(t.mask_file)
        SparseMasks(mask_tensors, model)  # validate names and shapes before any work
    return model, mask_tensors


def _optimizer(cfg: TrainConfig, model: TrainableModel) -> tuple[torch.optim.Optimizer, Any]:
    """The optimizer (SGD or AdamW over :func:`asymvlm.losses.parameter_groups`) and its learning-rate
    schedule; the scheduler is stepped once per optimizer step by us, and checkpointed by us (JSON),
    never registered with accelerate (which would pickle it)."""
    t = cfg.train
    groups = parameter_groups(model, t.weight_decay)
    kernel = optimizer_kernel(t.optimizer_impl, next(model.parameters()).device)
    if t.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, **kernel)
    else:
        optimizer = torch.optim.AdamW(groups, lr=t.lr, **kernel)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))


@dataclasses.dataclass(frozen=True)
class _Run:
    """What the steps of one run share: the accelerator and the prepared model, optimizer,
    scheduler and masks (None without ``mask_file``), the data and the trackers (None: none)."""

    cfg: TrainConfig
    accelerator: Any
    model: Any
    optimizer: Any
    scheduler: Any
    masks: Any
    data: Any
    log_with: str | None

    @property
    def unwrapped(self) -> TrainableModel:
        return self.accelerator.unwrap_model(self.model)


def _optimizer_step(run: _Run, step: int) -> list[torch.Tensor]:
    """One optimizer step: its micro-batches (gradient accumulation) and their losses; a non-finite
    loss raises :class:`TrainingDiverged` naming the step."""
    t, accelerator, model = run.cfg.train, run.accelerator, run.model
    rank, world = accelerator.process_index, accelerator.num_processes
    model.train()
    losses = []  # detached device tensors: read (host sync) only where a step is logged or saved
    for micro in range(t.gradient_accumulation_steps):
        batch = run.data.batches.batch(step * t.gradient_accumulation_steps + micro, rank, world)
        with accelerator.accumulate(model):
            with accelerator.autocast():
                loss = model(batch["text"], batch["images"], batch["ids"], batch.get("positives"))
            if not bool(torch.isfinite(loss.detach())):
                prev = latest_checkpoint(t.output_dir)
                raise TrainingDiverged(
                    f"the loss is {loss.item()} at step {step + 1} (micro-step {micro}); stopped without saving. "
                    f"The last good checkpoint is {prev if prev else 'none (no checkpoint yet)'}; lower the "
                    f"learning rate or resume from it with --resume"
                )
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                if t.clip_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), t.clip_grad_norm)
                if run.masks is not None:
                    run.masks.before_step()
            run.optimizer.step()
            if accelerator.sync_gradients and run.masks is not None:
                run.masks.after_step()
            run.optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return losses


def _mean(losses: list[torch.Tensor]) -> float:
    """The mean of an optimizer step's micro-batch losses (one host sync)."""
    return sum(torch.stack(losses).float().tolist()) / len(losses)


def _step_record(run: _Run, done: int, losses: list[torch.Tensor], seconds: float) -> dict[str, Any]:
    """What step ``done`` logs (empty where it logs nothing): the training numbers every
    ``log_every`` steps and after the last, the evaluation (main process) where it evaluates."""
    t, accelerator, unwrapped = run.cfg.train, run.accelerator, run.unwrapped
    record: dict[str, Any] = {}
    if done % t.log_every == 0 or done == t.max_steps:
        scale = float(unwrapped.loss_fn.logit_scale.detach())
        record = {
            "step": done,
            "processes": accelerator.num_processes,
            "loss": _mean(losses),
            "lr": run.scheduler.get_last_lr()[0],
            "logit_scale": scale,
            "temperature": math.exp(-scale),
            "seconds": round(seconds, 2),
        }
        if unwrapped.last_concentration is not None:  # the last batch's, the signal SGD collapses
            record.update(zip(("kappa_min", "kappa_median", "kappa_max"), unwrapped.last_concentration.tolist()))
    evaluating = run.data.eval_data is not None and t.evaluates_at(done, t.max_steps)
    if evaluating and accelerator.is_main_process:
        record = {"step": done, **record, **evaluator(run.data.eval_data, run.data.encoder)(unwrapped)}
    return record


def _train_steps(run: _Run, start_step: int, log: Callable[[dict[str, Any]], None] | None) -> None:
    """Steps ``start_step + 1 .. max_steps``: train, log (progress bar, ``train_log.jsonl``, ``log``,
    trackers) and checkpoint every ``save_every`` steps and after the last."""
    t, accelerator = run.cfg.train, run.accelerator
    log_path = Path(t.output_dir) / "train_log.jsonl"
    bar = tqdm(
        range(start_step, t.max_steps),
        initial=start_step,
        total=t.max_steps,
        desc="train",
        disable=not (t.progress and accelerator.is_local_main_process),
    )
    start = time.time()
    for step in bar:
        losses = _optimizer_step(run, step)
        run.scheduler.step()
        done = step + 1
        record = _step_record(run, done, losses, time.time() - start)
        if record and accelerator.is_main_process:
            bar.set_postfix(
                loss=f"{record.get('loss', float('nan')):.4f}", kappa=f"{record.get('kappa_median', float('nan')):.3g}"
            )
            if log is not None:
                log(record)
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if run.log_with:
                accelerator.log({k: v for k, v in record.items() if k != "step"}, step=done)
        if (t.save_every and done % t.save_every == 0) or done == t.max_steps:
            extra = {"loss": _mean(losses)}
            _save_checkpoint(accelerator, run.cfg, done, extra, run.model, run.optimizer, run.scheduler)


def _save_model(run: _Run, start_from: Start | None, model_dir: Path) -> None:
    """The trained AsymVLM (with its confidence where it has one) and its model card, written
    atomically to ``model_dir`` with a record of what asymvlm wrote: a user's files in model/ are
    carried over and --overwrite removes only asymvlm's."""
    from asymvlm.hub import write_model_card
    from asymvlm.io import atomic_directory
    from asymvlm.model import AsymVLM

    t, data, unwrapped = run.cfg.train, run.data, run.unwrapped
    final = AsymVLM(
        unwrapped.head.eval(),
        logit_scale=float(unwrapped.loss_fn.logit_scale.detach()),
        encoder_source=data.encoder_source,
        text_adapter=unwrapped.peft_model,
        lineage=_lineage(start_from),
    )
    if t.fit_confidence and t.trainable == "head" and data.train_texts is not None:
        # the familiarity density of the training texts, and P(right) calibrated on the held-out
        # split; a LoRA model's texts go through its adapted tower, which the frozen-embedding
        # density does not describe, so it saves none
        from asymvlm.eval.confidence import fit_model_confidence

        final.confidence = fit_model_confidence(final, data.train_texts.float().cpu(), data.eval_data, seed=t.seed)
    card = final.model_card(**_card_info(run.cfg, data, Path(t.output_dir) / "train_log.jsonl"))
    with atomic_directory(model_dir) as tmp:
        final.save_pretrained(tmp, card=False)
        write_model_card(tmp, card, replacing=model_dir)


def train(
    cfg: TrainConfig,
    *,
    data_fn: Callable[[TrainConfig, Any], Any] | None = None,
    log: Callable[[dict[str, Any]], None] | None = None,
) -> Path:
    """Train per ``cfg``; return the folder of the saved model (``<output_dir>/model``).

    Args:
        cfg: the run's configuration.
        data_fn: the data seam, ``data_fn(cfg, accelerator) -> TrainData`` (default
            :func:`asymvlm.training.data.get_dataloaders`).
        log: called on the main process with every logged record (also appended to
            ``train_log.jsonl``); ``asymvlm-train`` prints a line per record when progress bars are off.
    """
    from accelerate.utils import set_seed

    t = cfg.train
    out = Path(t.output_dir)
    check_output_dir(out)  # a folder the run cannot use is refused before any work
    log_with = _trackers(cfg)
    accelerator = _accelerator(cfg, log_with)
    set_seed(t.seed)
    resume_from, resume_state = _resume_point(cfg, accelerator)

    start_from = load_start(t.init_from)  # resolved and loaded once, before the data
    data = (data_fn or data_mod.get_dataloaders)(cfg, accelerator)
    if accelerator.is_main_process:  # only now: a run that fails on its config or data writes nothing
        out.mkdir(parents=True, exist_ok=True)
    model, mask_tensors = _build_model(cfg, data, start_from)
    if t.compile:  # in place: the parameter names (checkpoints, masks) stay the module's
        model.compile()
    optimizer, scheduler = _optimizer(cfg, model)
    model, optimizer = accelerator.prepare(model, optimizer)
    masks = None
    if mask_tensors is not None:
        from asymvlm.masks import SparseMasks

        masks = SparseMasks(mask_tensors, accelerator.unwrap_model(model))
    run = _Run(cfg, accelerator, model, optimizer, scheduler, masks, data, log_with)

    start_step = 0
    if resume_from is not None:
        start_step = resume_state["step"]
        load_training_state(
            resume_from, run.unwrapped, optimizer, scheduler, rank=accelerator.process_index, step=start_step
        )
        if accelerator.is_main_process:
            logger.info("resumed from %s (step %d)", resume_from, start_step)
    if log_with:
        accelerator.init_trackers("asymvlm", config={k: str(v) for k, v in cfg.to_dict().items()})
    with _autocast_mlp(run.unwrapped.head, accelerator.device, _head_bf16(t)):
        _train_steps(run, start_step, log)

    accelerator.wait_for_everyone()
    model_dir = out / "model"
    if accelerator.is_main_process:
        _save_model(run, start_from, model_dir)
    if log_with:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    return model_dir
