"""Per-client evaluation of a federation: every client's model on the client's own test split.

:func:`client_evaluator` turns the clients' test splits
(:class:`asymvlm.federated.data.ClientTests`, from ``--client_test_fraction``) into the
``evaluate_client(client, encode)`` function :func:`asymvlm.federated.rounds.run_federated`
calls for every client's global and personal model: the client's held-out captions are the
queries, the pooled held-out images of all clients the gallery (one gallery for everyone, so a
client's R@1 is comparable across clients and methods). Per client it reports

* ``R@1``: exact text-to-image hit at rank 1 (the caption's own image first; images ranked by
  ``loc . image``, the order of every vMF and Power Spherical log-likelihood for a fixed query, or
  by the model's own scores when ``encode`` returns a third item, ``scores(images) -> (T, I)``:
  FedEM's mixture);
* ``error_auroc``: AUROC of the uncertainty ``1 / concentration`` for detecting the misses;
* ``caption_R@1`` and ``caption_error_auroc``: the same where a query is also right about every
  gallery image that has an identical caption (a vague caption repeated across images: "a red
  shape" is true of each image it was written for), when the test split knows them;
* ``ambiguity_spearman``: Spearman of the uncertainty with the caption's true ambiguity, where
  the data know it (ShapeWorld).

:func:`plot_client_eval` draws a run's per-client figures (one panel per metric, one box per model).

Example:
    >>> import torch
    >>> from asymvlm.federated.data import ClientTests
    >>> img = torch.eye(3)
    >>> tests = ClientTests(img, [img[[0, 1]]], [torch.tensor([0, 1])], [None])
    >>> evaluate = client_evaluator(tests)
    >>> evaluate(0, lambda t: (t, torch.tensor([2.0, 1.0])))["R@1"]
    1.0
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from asymvlm.federated.personal_run import register_client_evaluator

__all__ = ["client_evaluator", "plot_client_eval", "CLIENT_METRICS"]

CLIENT_METRICS = ("R@1", "caption_R@1", "error_auroc", "ambiguity_spearman")


def client_evaluator(tests: Any):
    """``evaluate_client(client, encode) -> {metric: value}`` over ``tests`` (see the module docstring)."""
    from asymvlm.eval.retrieval import positive_ranks, positives_from_index
    from asymvlm.eval.uncertainty import ambiguity_spearman, error_auroc

    gallery = tests.images.float()

    def evaluate_client(client: int, encode) -> dict[str, float]:
        out = encode(tests.texts[client])
        loc, kappa = out[0], out[1]
        scores = out[2](gallery) if len(out) > 2 else loc.float() @ gallery.T  # a mixture ranks by its own scores
        exact = positives_from_index(tests.image_index[client], gallery.shape[0])
        hits = positive_ranks(scores, exact) == 0
        unc = 1.0 / kappa.double()
        out = {"R@1": float(hits.double().mean()), "error_auroc": error_auroc(unc, hits)}
        if getattr(tests, "positives", None) is not None:  # right when the top image has the same caption
            said = tests.positives[client] | exact
            caption_hits = positive_ranks(scores, said) == 0
            out["caption_R@1"] = float(caption_hits.double().mean())
            out["caption_error_auroc"] = error_auroc(unc, caption_hits)
        amb = tests.ambiguity[client]
        if amb is not None:
            varies = bool((amb != amb[0]).any()) and bool((unc != unc[0]).any())
            out["ambiguity_spearman"] = ambiguity_spearman(unc, amb) if varies else math.nan
        return out

    return evaluate_client


register_client_evaluator(client_evaluator)  # what a Flower node evaluates its own test split with


def plot_client_eval(client_metrics: Mapping[str, Mapping[str, Mapping[str, float]]], path: str | Path) -> Path:
    """``client_metrics`` (a round record's ``{model: {client: {metric: value}}}``) as one panel
    per metric with the per-client values of every model (a box and the points), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from asymvlm.io import atomic_write_bytes

    models = list(client_metrics)
    metrics = [m for m in CLIENT_METRICS if any(m in c for v in client_metrics.values() for c in v.values())]
    fig, axes = plt.subplots(1, max(1, len(metrics)), figsize=(4 * max(1, len(metrics)), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        data = [
            [c[metric] for c in client_metrics[m].values() if metric in c and math.isfinite(c[metric])] for m in models
        ]
        ax.boxplot(data, showfliers=False)
        ax.set_xticks(range(1, len(models) + 1), models)
        jitter = np.random.default_rng(0)  # the same picture every time
        for i, vals in enumerate(data, 1):
            ax.scatter(i + jitter.uniform(-0.1, 0.1, len(vals)), vals, s=8, alpha=0.6)
        ax.set_title(f"per-client {metric}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(buf.getvalue(), path)
