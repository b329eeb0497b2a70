"""``asymvlm-serve``: retrieval with uncertainty over HTTP — a JSON API and a web page.

``asymvlm-serve --model DIR --index DIR`` serves a saved AsymVLM over a gallery built by
``asymvlm-index build`` (:mod:`asymvlm.serve`). ``asymvlm-serve --demo`` needs no arguments: it
serves the demo's vMF head (``make demo`` writes it; when it is missing it is trained here, as the
demo trains it) over a gallery of 1,000 held-out ShapeWorld scenes with their captions, and
withholds answers whose calibrated probability of being right (fitted on those captions) is below
0.5 (``--abstain`` overrides). This entry point
lives in the training package because ``--demo`` may train; the service itself is core.
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["main", "prepare_demo", "DEMO_ABSTAIN", "DEMO_GALLERY_IMAGES"]

DEMO_ABSTAIN = "p_correct:0.5"  # the demo's default: withhold answers more likely wrong than right
DEMO_GALLERY_IMAGES = 1000
DEMO_GALLERY_SEED = 12345  # the demo's held-out evaluation split


def prepare_demo(demo_dir: str | Path = "demo-out", *, quick: bool = False, progress: bool = True) -> tuple[Path, Path]:
    """``(model folder, gallery folder)`` of the demo: the demo's central vMF head (trained if
    missing) and a gallery of held-out ShapeWorld scenes (built if missing, made with another
    encoder, or made before galleries recorded which images each caption is true of: the demo's
    abstention is calibrated on that ground truth)."""
    from asymvlm import shapeworld as sw
    from asymvlm.errors import ArtefactError
    from asymvlm.model import AsymVLM
    from asymvlm.serve.gallery import TRUTH_LABEL, Gallery, build_gallery
    from asymvlm.toyclip import TOY_CLIP_SPECS
    from asymvlm.training.demo import central_model

    model_dir = central_model(demo_dir, "vmf", quick=quick)
    gallery_dir = Path(demo_dir) / "serve-gallery"
    model = AsymVLM.from_pretrained(model_dir)
    try:
        gallery = Gallery.open(gallery_dir)
        gallery.check_encoder(model)
        if gallery.caption_truth is not None:  # older demo galleries lack the truth p_correct is calibrated on
            return model_dir, gallery_dir
    except ArtefactError:  # missing, partial or made with another encoder: (re)built
        pass
    world = next((v for v, spec in TOY_CLIP_SPECS.items() if model.encoder.spec == spec), sw.WORLD_VERSION)
    config = dict(version=world, visual_styles=sw.VISUAL_STYLES, caption_styles=("plain",))
    data = sw.generate(DEMO_GALLERY_IMAGES, seed=DEMO_GALLERY_SEED, **config)
    truth = sw.caption_truth(sw.generate_arrays(DEMO_GALLERY_IMAGES, seed=DEMO_GALLERY_SEED, **config))
    build_gallery(
        model, data, gallery_dir, source=f"shapeworld:{world}", thumbnail_format="png", truth=truth,
        truth_label=TRUTH_LABEL, progress=progress,
    )  # fmt: skip
    return model_dir, gallery_dir


def main(argv: list[str] | None = None) -> int:
    """``asymvlm-serve``; returns the exit status (2 for a user error, printed as one line)."""
    from asymvlm.cli import run

    return run("asymvlm-serve", _main, argv)


def _main(argv: list[str]) -> int:
    from asymvlm.errors import ConfigError
    from asymvlm.serve.cli import build_serve_parser, serve

    parser = build_serve_parser()
    parser.description = __doc__.strip().splitlines()[0].replace("``", "")
    args: argparse.Namespace = parser.parse_args(argv)
    if args.quick and not args.demo:
        raise ConfigError("--quick goes with --demo (the demo's smoke version)")
    if args.demo:
        if args.model or args.index:
            raise ConfigError("--demo serves the demo's model and gallery; leave out --model and --index")
        args.model, args.index = (str(p) for p in prepare_demo(args.demo_dir, quick=args.quick))
        if args.abstain == parser.get_default("abstain"):
            args.abstain = DEMO_ABSTAIN
    return serve(args)
