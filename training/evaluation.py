"""Periodic evaluation of the model being trained (``asymvlm-train`` and ``asymvlm-federate``).

Example:
    >>> callable(evaluator(eval_data=None))
    True
"""

from __future__ import annotations

from typing import Any

__all__ = ["evaluator"]


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
