"""``asymvlm-eval``: evaluate saved AsymVLM models (and always the CLIP baseline) on a dataset.

Writes ``metrics.json`` and PNG plots to ``--out`` and prints a summary table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["main"]

EPILOG = """examples:
  asymvlm-eval                                   # the toy CLIP baseline on held-out ShapeWorld
  asymvlm-eval --model runs/vmf --model runs/ps --images 1000 --out eval-out
  asymvlm-eval --encoder hf:openai/clip-vit-base-patch32 --dataset imagefolder:/data/my-captions
  asymvlm-eval --model runs/vmf --dataset coco-karpathy:/data/dataset_coco.json:/data/coco:test
"""


def _local_eval_data(encoder: Any, dataset: Any, max_images: int | None):
    from asymvlm.eval.benchmark import EvalData

    if max_images is not None:
        dataset = dataset.select(range(min(max_images, len(dataset))))
    images = encoder.encode_image([im.convert("RGB") for im in dataset["image"]], progress=True)
    captions, index = [], []
    for i, caps in enumerate(dataset["captions"]):
        captions.extend(caps)
        index.extend([i] * len(caps))
    return EvalData(
        image_embeddings=images,
        text_embeddings=encoder.encode_text(captions, progress=True),
        text_image_index=torch.tensor(index),
        captions=captions,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="asymvlm-eval",
        description=__doc__.splitlines()[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="DIR",
        help="a saved AsymVLM (repeatable); its encoder is loaded from its config",
    )
    parser.add_argument("--name", action="append", default=[], help="display names for --model, in order")
    parser.add_argument(
        "--encoder",
        default=None,
        help="encoder spec for the CLIP baseline when no --model is given (default: the toy CLIP)",
    )
    parser.add_argument("--pretrained", default=None, help="open_clip pretrained tag or file for --encoder")
    parser.add_argument(
        "--dataset",
        default="shapeworld",
        help="shapeworld (default), imagefolder:<root>, coco-karpathy:<json>:<root>[:split], "
        "coco2017:<json>:<dir>, flickr30k:<json>:<dir>[:split]",
    )
    parser.add_argument("--images", type=int, default=1000, help="held-out images (ShapeWorld) or at most this many")
    parser.add_argument("--seed", type=int, default=12345, help="ShapeWorld split seed")
    parser.add_argument("--caption-styles", default="all", help="ShapeWorld caption styles, comma list or 'all'")
    parser.add_argument("--visual-styles", default="all", help="ShapeWorld visual styles, comma list or 'all'")
    parser.add_argument("--bins", type=int, default=10, help="uncertainty bins")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="eval-out", help="output directory for metrics.json and plots")
    args = parser.parse_args(argv)

    from asymvlm import shapeworld as sw
    from asymvlm.encoders import load_encoder
    from asymvlm.eval.benchmark import evaluate, shapeworld_eval_data, summary_table
    from asymvlm.eval.plots import plot_report
    from asymvlm.model import CONFIG_NAME, AsymVLM

    start = time.time()
    models = {}
    names = list(args.name) + [Path(m).name for m in args.model[len(args.name) :]]
    for name, path in zip(names, args.model):
        # a model that adapts the text tower (LoRA, folded federated updates) embeds the captions itself
        cfg = json.loads((Path(path) / CONFIG_NAME).read_text()) if (Path(path) / CONFIG_NAME).is_file() else {}
        adapts = bool(cfg.get("text_adapter") or cfg.get("text_base_delta"))
        models[name] = AsymVLM.from_pretrained(path, load_encoder=adapts, device=args.device)
    if models:
        sources = {json.dumps(m.encoder_source, sort_keys=True) for m in models.values()}
        if len(sources) > 1:
            print("error: the models were trained on different encoders; evaluate them separately", file=sys.stderr)
            return 2
        src = next(iter(models.values())).encoder_source
        if not src:
            print("error: the model has no encoder recorded; cannot embed the dataset", file=sys.stderr)
            return 2
        encoder = load_encoder(src["spec"], src.get("pretrained"), device=args.device)
        if src.get("fingerprint") and encoder.fingerprint != src["fingerprint"]:
            print(f"error: encoder {src['spec']} has other weights than the model was trained with", file=sys.stderr)
            return 2
    else:
        from asymvlm.toyclip import TOY_CLIP_SPEC, TOY_CLIP_TAG

        spec = args.encoder or TOY_CLIP_SPEC
        pretrained = args.pretrained if args.encoder else TOY_CLIP_TAG
        encoder = load_encoder(spec, pretrained, device=args.device)

    level_ambiguity = None
    if args.dataset == "shapeworld":

        def styles(value: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
            return allowed if value == "all" else tuple(s.strip() for s in value.split(","))

        data = shapeworld_eval_data(
            encoder,
            n=args.images,
            seed=args.seed,
            caption_styles=styles(args.caption_styles, sw.CAPTION_STYLES),
            visual_styles=styles(args.visual_styles, sw.VISUAL_STYLES),
        )
        level_ambiguity = sw.level_ambiguity()
    else:
        from asymvlm.data import load_dataset_spec

        data = _local_eval_data(encoder, load_dataset_spec(args.dataset), args.images)

    report = evaluate(data, models, n_bins=args.bins)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from asymvlm.io import atomic_write_json, json_safe

    atomic_write_json(
        json_safe(
            {
                "dataset": args.dataset,
                "images": int(data.image_embeddings.shape[0]),
                "encoder": encoder.source,
                "models": dict(zip(names, args.model)),
                "metrics": report,
                "seconds": round(time.time() - start, 1),
            }
        ),
        out / "metrics.json",
    )
    plots = plot_report(report, out, level_ambiguity=level_ambiguity)
    print(summary_table(report))
    print(f"\nwrote {out / 'metrics.json'}" + "".join(f"\nwrote {p}" for p in plots))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
