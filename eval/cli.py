"""``asymvlm-eval``: evaluate saved AsymVLM models (and always the CLIP baseline) on a dataset.

Writes ``metrics.json`` and PNG plots to ``--output_dir`` and prints a summary table.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from asymvlm.cli import comma_choices
from asymvlm.errors import ArtefactError, ConfigError, EncoderMismatchError, InputError
from asymvlm.registry import dataclass_flags
from asymvlm.worlds import shapeworld as sw

__all__ = ["main", "build_parser", "parse_args", "EvalArguments"]

EPILOG = """examples:
  asymvlm-eval                                   # the toy CLIP baseline on held-out ShapeWorld
  asymvlm-eval --model runs/vmf/model --model runs/ps/model --images 1000 --output_dir eval-out
  asymvlm-eval --encoder hf:openai/clip-vit-base-patch32 --dataset imagefolder:/data/my-captions
  asymvlm-eval --model runs/vmf/model --dataset coco-karpathy:/data/dataset_coco.json:/data/coco:test
  asymvlm-eval --model runs/vmf/model --cache caches/test   # precomputed embeddings (write_cache)

A model is the folder that asymvlm-train / asymvlm-federate write to <output_dir>/model (or an
asymvlm-merge --output_dir).
"""

PROG = "asymvlm-eval"


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


def _cache_eval_data(args: EvalArguments, models: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """EvalData from a precomputed cache (the first ``--images`` images and their captions); the
    models must have been trained on the cache's encoder (fingerprints compared when recorded)."""
    from asymvlm.cache import EmbeddingCache
    from asymvlm.eval.benchmark import EvalData

    cache = EmbeddingCache.load(args.cache)
    info = dict(cache.manifest["encoder"])
    for name, model in models.items():
        fp = (model.encoder_source or {}).get("fingerprint")
        if fp and info.get("fingerprint") and fp != info["fingerprint"]:
            raise EncoderMismatchError(
                f"model {name!r} was trained on another encoder ({(model.encoder_source or {}).get('spec')}) than the "
                f"one that made the cache {args.cache} ({info.get('spec')})"
            )
    n = min(args.images, cache.image_embeddings.shape[0])
    keep = cache.text_image_index < n
    meta = {k: v[keep] for k, v in cache.caption_meta.items()}
    captions = [c for c, k in zip(cache.captions, keep.tolist()) if k] if cache.captions else None
    data = EvalData(
        image_embeddings=cache.image_embeddings[:n].float(),
        text_embeddings=cache.text_embeddings[keep].float(),
        text_image_index=cache.text_image_index[keep].clone(),
        levels=meta.get("level"),
        ambiguity=meta.get("ambiguity"),
        captions=captions,
    )
    if any(getattr(m, "adapts_text_tower", False) for m in models.values()):
        if captions is None:
            raise ArtefactError(f"{args.cache} has no captions.json: a model that adapts the text tower needs them")
    return data, info


def _device(value: str) -> str:
    """An argparse ``type``: ``auto`` or a torch device string."""
    if value != "auto":
        try:
            torch.device(value)
        except (RuntimeError, ValueError) as err:
            raise argparse.ArgumentTypeError(f"invalid device {value!r} (cpu, cuda, cuda:<i>, mps or auto)") from err
    return value


def _default_name(path: str) -> str:
    """``runs/vmf/model`` -> ``vmf`` (the folder training wrote), ``merged/ties`` -> ``ties``."""
    p = Path(path).resolve() if Path(path).name in ("", ".", "..") else Path(path)
    return p.parent.name if p.name == "model" and p.parent.name else p.name


@dataclass(frozen=True)
class EvalArguments:
    """The options of ``asymvlm-eval``, one flag each (``--<field>``, also spelled with dashes):
    the type, choices and default from the field, ``metadata`` the help and what the annotation
    does not say (a repeatable flag, a metavar, a parser of its own)."""

    model: list[str] = field(
        default_factory=list,
        metadata={
            "help": "A saved AsymVLM, e.g. <output_dir>/model of asymvlm-train, or a Hugging Face Hub id "
            "(user/repo[@revision]) (repeatable); its encoder is loaded from its config.",
            "action": "append",
            "metavar": "DIR",
        },
    )
    name: list[str] = field(
        default_factory=list, metadata={"help": "Display names for --model, in order.", "action": "append"}
    )
    encoder: str | None = field(
        default=None,
        metadata={"help": "Encoder spec for the CLIP baseline when no --model is given (default: the toy CLIP)."},
    )
    pretrained: str | None = field(default=None, metadata={"help": "open_clip pretrained tag or file for --encoder."})
    dataset: str | None = field(
        default=None,
        metadata={
            "help": "shapeworld (world v3; shapeworld:2 for the earlier world), imagefolder:<root>, "
            "coco-karpathy:<json>:<root>[:split], coco2017:<json>:<dir>, flickr30k:<json>:<dir>[:split] "
            "(default: shapeworld)."
        },
    )
    cache: str | None = field(
        default=None,
        metadata={
            "help": "Evaluate on a precomputed embedding cache (asymvlm.cache.write_cache / embed_dataset) instead "
            "of --dataset: no encoder is loaded unless a model adapts the text tower. Its caption_meta.json, when "
            "present, gives per-level metrics and the ambiguity correlation.",
            "metavar": "DIR",
        },
    )
    images: int = field(
        default=1000, metadata={"help": "Held-out images (ShapeWorld), or at most this many (other data, --cache)."}
    )
    seed: int = field(default=12345, metadata={"help": "ShapeWorld split seed."})
    caption_styles: tuple[str, ...] = field(
        default=tuple(sw.CAPTION_STYLES),
        metadata={
            "help": f"ShapeWorld caption styles: all, or a comma list of {{{','.join(sw.CAPTION_STYLES)}}} "
            "(default: all).",
            "type": comma_choices(sw.CAPTION_STYLES),
            "metavar": "STYLES",
        },
    )
    visual_styles: tuple[str, ...] = field(
        default=tuple(sw.VISUAL_STYLES),
        metadata={
            "help": f"ShapeWorld visual styles: all, or a comma list of {{{','.join(sw.VISUAL_STYLES)}}} "
            "(default: all).",
            "type": comma_choices(sw.VISUAL_STYLES),
            "metavar": "STYLES",
        },
    )
    calibration: Literal["auto", "split", "model", "none"] = field(
        default="auto",
        metadata={
            "help": "Where p_correct's calibrator comes from: auto (ShapeWorld: a fresh calibration split of "
            "--images images, seed --calibration_seed, the test gallery's size; --cache: --calibration_cache when "
            "given; else the model's own), split (the calibration split or cache, required), model (the "
            "calibrator saved with the model) or none (the parts alone, uncalibrated)."
        },
    )
    calibration_cache: str | None = field(
        default=None,
        metadata={
            "help": "An embedding cache of a validation split to fit p_correct's calibrator on (same encoder).",
            "metavar": "DIR",
        },
    )
    calibration_seed: int = field(default=777, metadata={"help": "ShapeWorld calibration split seed."})
    ood_texts: str | None = field(
        default=None,
        metadata={
            "help": "A text file, one text per line, unlike the training texts: the OOD AUROC of each uncertainty "
            "part (embedded by the models' encoder).",
            "metavar": "FILE",
        },
    )
    ood_styles: tuple[str, ...] | None = field(
        default=None,
        metadata={
            "help": "ShapeWorld: caption styles the model never trained on (e.g. photo,synonyms), captions of 300 "
            "fresh images in them are the unfamiliar texts of the OOD AUROC.",
            "type": comma_choices(sw.CAPTION_STYLES),
            "metavar": "STYLES",
        },
    )
    bins: int = field(default=10, metadata={"help": "Uncertainty bins."})
    device: str = field(
        default="cpu", metadata={"help": "Torch device (cpu, cuda, cuda:1, ... or auto).", "type": _device}
    )
    output_dir: str = field(default="eval-out", metadata={"help": "Output directory for metrics.json and the plots."})


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``asymvlm-eval``: one flag per :class:`EvalArguments` field (spelled with
    underscores or dashes; no abbreviations)."""
    from asymvlm.cli import make_parser, summary

    parser = make_parser(PROG, summary(__doc__), EPILOG)
    for key, settings in dataclass_flags(EvalArguments).items():
        parser.add_argument(f"--{key}", dest=key, **settings)
    return parser


def parse_args(argv: list[str] | None = None) -> EvalArguments:
    """The :class:`EvalArguments` of a command line (a :class:`~asymvlm.errors.ConfigError` for a bad one)."""
    return EvalArguments(**vars(build_parser().parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    """``asymvlm-eval``; returns the exit status (2 for a user error, printed as one line)."""
    from asymvlm.cli import run

    return run(PROG, _main, argv)


def _main(argv: list[str]) -> int:
    args = parse_args(argv)
    if len(args.name) > len(args.model):
        raise ConfigError(f"{len(args.name)} --name for {len(args.model)} --model")

    from asymvlm.encoders import load_encoder
    from asymvlm.eval.benchmark import evaluate, shapeworld_eval_data, summary_table
    from asymvlm.eval.plots import plot_report
    from asymvlm.model import CONFIG_NAME, AsymVLM

    if args.cache is not None and args.dataset is not None:
        raise ConfigError("give --cache or --dataset, not both")
    if args.cache is not None and args.encoder is not None:
        raise ConfigError("--encoder is for --dataset; a cache records the encoder that made it")
    dataset = args.dataset or "shapeworld"
    version = sw.dataset_version(dataset)  # a ConfigError naming the versions
    start = time.time()
    models = {}
    names = list(args.name) + [_default_name(m) for m in args.model[len(args.name) :]]
    if len(set(names)) < len(names) or "clip" in names:
        raise ConfigError(f"the models need distinct display names other than 'clip' (got {names}); give --name")
    from asymvlm.hub import resolve_artefact

    for name, given in zip(names, args.model):
        path = resolve_artefact(given)  # a folder, or a Hub id's snapshot (user/repo[@revision])
        # a model that adapts the text tower (LoRA, folded federated updates) embeds the captions itself
        cfg = json.loads((Path(path) / CONFIG_NAME).read_text()) if (Path(path) / CONFIG_NAME).is_file() else {}
        adapts = bool(cfg.get("text_adapter") or cfg.get("text_base_delta"))
        models[name] = AsymVLM.from_pretrained(path, load_encoder=adapts, device=args.device)
    if args.cache is not None:
        data, encoder_info = _cache_eval_data(args, models)
        encoder = None
    elif models:
        sources = {json.dumps(m.encoder_source, sort_keys=True) for m in models.values()}
        if len(sources) > 1:
            raise InputError("the models were trained on different encoders; evaluate them separately")
        src = next(iter(models.values())).encoder_source
        if not src:
            raise ArtefactError("the model has no encoder recorded; cannot embed the dataset")
        encoder = load_encoder(src["spec"], src.get("pretrained"), device=args.device)
        if src.get("fingerprint") and encoder.fingerprint != src["fingerprint"]:
            raise EncoderMismatchError(f"encoder {src['spec']} has other weights than the model was trained with")
    else:
        from asymvlm.worlds.toyclip import TOY_CLIP_SPECS, TOY_CLIP_TAG

        spec = args.encoder or TOY_CLIP_SPECS[version or 2]
        pretrained = args.pretrained if args.encoder else TOY_CLIP_TAG
        encoder = load_encoder(spec, pretrained, device=args.device)

    level_ambiguity = None
    if args.cache is None and version is not None:
        data = shapeworld_eval_data(
            encoder,
            n=args.images,
            seed=args.seed,
            caption_styles=args.caption_styles,
            visual_styles=args.visual_styles,
            version=version,
        )
        level_ambiguity = sw.level_ambiguity(version)
    elif args.cache is None:
        from asymvlm.worlds.data import load_dataset_spec

        data = _local_eval_data(encoder, load_dataset_spec(dataset), args.images)

    report = evaluate(data, models, n_bins=args.bins)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    confidence = _confidence(args, models, data, encoder, version, out) if models else {}
    from asymvlm.io import atomic_write_json, json_safe

    atomic_write_json(
        json_safe(
            {
                "dataset": f"cache:{args.cache}" if args.cache is not None else dataset,
                "images": int(data.image_embeddings.shape[0]),
                "encoder": encoder.source if encoder is not None else encoder_info,
                "models": dict(zip(names, args.model)),
                "metrics": report,
                "confidence": {name: rep for name, (rep, _) in confidence.items()},
                "seconds": round(time.time() - start, 1),
            }
        ),
        out / "metrics.json",
    )
    plots = plot_report(report, out, level_ambiguity=level_ambiguity)
    plots += [p for _, paths in confidence.values() for p in paths]
    from asymvlm.eval.confidence import confidence_table
    from asymvlm.eval.uncertainty import LEGEND

    print(summary_table(report))
    print(LEGEND.rstrip())

    for name, (rep, _) in confidence.items():
        print(f"\n{name}: does it know when its answer is right?\n{confidence_table(rep)}")
    print(f"\nwrote {out / 'metrics.json'}" + "".join(f"\nwrote {p}" for p in plots))
    return 0


def _calibration_data(args: EvalArguments, data: Any, encoder: Any, version: int | None) -> Any:
    """The validation split p_correct's calibrator is fitted on, or None (see ``--calibration``)."""
    if args.calibration in ("model", "none"):
        return None
    if args.calibration_cache is not None:
        from asymvlm.cache import EmbeddingCache

        cache = EmbeddingCache.load(args.calibration_cache)
        from asymvlm.eval.benchmark import EvalData

        meta = cache.caption_meta
        return EvalData(
            image_embeddings=cache.image_embeddings.float(),
            text_embeddings=cache.text_embeddings.float(),
            text_image_index=cache.text_image_index.clone(),
            levels=meta.get("level"),
            captions=cache.captions,
        )
    if args.cache is None and version is not None and encoder is not None:
        from asymvlm.eval.benchmark import shapeworld_eval_data

        return shapeworld_eval_data(
            encoder,
            n=data.image_embeddings.shape[0],
            seed=args.calibration_seed,
            caption_styles=args.caption_styles,
            visual_styles=args.visual_styles,
            version=version,
        )
    if args.calibration == "split":
        raise ConfigError("--calibration split needs --calibration_cache (or a ShapeWorld dataset)")
    return None


def _ood_texts(args: EvalArguments, encoder: Any, version: int | None) -> Any:
    if args.ood_texts is not None and args.ood_styles is not None:
        raise ConfigError("give --ood_texts or --ood_styles, not both")
    if args.ood_texts is not None:
        if encoder is None:
            raise ConfigError("--ood_texts needs the models' encoder (not available with --cache)")
        texts = [line.strip() for line in Path(args.ood_texts).read_text(encoding="utf-8").splitlines() if line.strip()]
        if not texts:
            raise ConfigError(f"{args.ood_texts} holds no texts")
        with torch.no_grad():
            return encoder.encode_text(texts).float()
    if args.ood_styles is not None:
        if version is None or encoder is None:
            raise ConfigError("--ood_styles is for ShapeWorld (--dataset shapeworld)")
        from asymvlm.eval.benchmark import shapeworld_eval_data

        return shapeworld_eval_data(
            encoder, n=300, seed=args.seed + 1, caption_styles=args.ood_styles, version=version
        ).text_embeddings.float()
    return None


def _confidence(
    args: EvalArguments, models: dict[str, Any], data: Any, encoder: Any, version: int | None, out: Path
) -> dict[str, tuple[dict[str, Any], list[Path]]]:
    """Per model: its confidence report (:func:`asymvlm.eval.confidence.confidence_report`) and plots."""
    from asymvlm.confidence import ConfidenceModel
    from asymvlm.eval.confidence import calibrate_on, confidence_report
    from asymvlm.eval.plots import plot_reliability, plot_risk_coverage

    calib = _calibration_data(args, data, encoder, version)
    ood = _ood_texts(args, encoder, version)
    result = {}
    for name, model in models.items():
        if getattr(model, "adapts_text_tower", False):
            continue  # its texts go through its own tower: the frozen-embedding parts do not describe it
        own = model.confidence
        conf = None
        if args.calibration == "none":
            conf = ConfidenceModel(own.familiarity if own is not None else None)
        elif calib is not None:
            conf = calibrate_on(model, calib, source=f"a calibration split of {len(calib.text_embeddings)} captions")
        rep = confidence_report(model, data, confidence=conf, ood_texts=ood, keep_outcomes=True)
        if calib is not None and calib.zero_shot and data.zero_shot:
            from asymvlm.eval.confidence import zero_shot_confidence

            rep["zero_shot"] = zero_shot_confidence(model, data, calib)
        outcomes = rep.pop("outcomes")
        paths = []
        levels = outcomes["levels"]
        rows = levels == levels.max() if levels is not None else torch.ones_like(outcomes["correct"])
        curves = {k: (v[rows], outcomes["correct"][rows]) for k, v in outcomes["scores"].items()}
        where = "most specific captions" if levels is not None else "all captions"
        paths.append(plot_risk_coverage(curves, out / f"risk_coverage-{name}.png", title=f"{name}: {where}"))
        if outcomes["p_correct"] is not None:
            paths.append(
                plot_reliability(
                    outcomes["p_correct"].clamp(0, 1),
                    outcomes["correct"],
                    out / f"reliability-{name}.png",
                    title=f"{name}: p_correct, all captions",
                )
            )
        result[name] = (rep, paths)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
