"""``asymvlm-serve``: retrieval with uncertainty over HTTP — a JSON API and a web page.

``asymvlm-serve --model DIR --index DIR`` serves a saved AsymVLM over a gallery built by
``asymvlm-index build`` (:mod:`asymvlm.serve`). ``asymvlm-serve --demo`` serves the demo's vMF head
(``asymvlm-demo`` writes it) over a gallery of 1,000 held-out ShapeWorld scenes with their captions
(built here when missing: embeddings, no training), and withholds answers whose calibrated
probability of being right (fitted on those captions) is below 0.5 (``--abstain`` overrides).

``asymvlm-serve`` never trains: without the demo's model it refuses in one line naming the command
that makes it, ``asymvlm-demo --serve`` (which trains what is missing, then serves:
:func:`asymvlm.training.demo.serve_demo`). This entry point lives in the training package because
it knows where the demo writes its model; the service itself is :mod:`asymvlm.serve`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["main", "demo_model_dir", "demo_gallery", "DEMO_ABSTAIN", "DEMO_GALLERY_IMAGES"]

DEMO_ABSTAIN = "p_correct:0.5"  # the demo's default: withhold answers more likely wrong than right
DEMO_GALLERY_IMAGES = 1000
DEMO_GALLERY_SEED = 12345  # the demo's held-out evaluation split


def demo_model_dir(demo_dir: str | Path = "demo-out") -> Path:
    """The demo's central vMF head, as ``asymvlm-demo`` writes it
    (:func:`asymvlm.training.demo.central_model`), or an :class:`~asymvlm.errors.ArtefactError` naming
    the command that makes it: ``asymvlm-serve`` never trains."""
    from asymvlm.errors import ArtefactError

    model_dir = Path(demo_dir) / "central-vmf" / "model"  # central_model(demo_dir, "vmf")'s folder
    if not (model_dir / "asymvlm_config.json").is_file():
        raise ArtefactError(
            f"the demo's model is missing ({model_dir}): asymvlm-demo --serve --output_dir {demo_dir} trains it "
            "(add --quick for the smoke version) and then serves it"
        )
    return model_dir


def demo_gallery(model_dir: str | Path, demo_dir: str | Path = "demo-out", *, progress: bool = True) -> Path:
    """The demo's gallery of held-out ShapeWorld scenes for the model at ``model_dir``
    (``<demo_dir>/serve-gallery``): built if missing, made with another encoder, or made before
    galleries recorded which images each caption is true of (the demo's abstention is calibrated on
    that ground truth). Building a gallery embeds images; it trains nothing."""
    from asymvlm.errors import ArtefactError
    from asymvlm.model import AsymVLM
    from asymvlm.serve.gallery import TRUTH_LABEL, Gallery
    from asymvlm.serve.indexing import build_gallery
    from asymvlm.worlds import shapeworld as sw
    from asymvlm.worlds.toyclip import TOY_CLIP_SPECS

    model = AsymVLM.from_pretrained(model_dir)
    gallery_dir = Path(demo_dir) / "serve-gallery"
    try:
        gallery = Gallery.open(gallery_dir)
        gallery.check_encoder(model)
        if gallery.caption_truth is not None:  # older demo galleries lack the truth p_correct is calibrated on
            return gallery_dir
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
    return gallery_dir


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
    if args.demo:
        if args.model or args.index:
            raise ConfigError("--demo serves the demo's model and gallery; leave out --model and --index")
        model_dir = demo_model_dir(args.demo_dir)
        args.model, args.index = str(model_dir), str(demo_gallery(model_dir, args.demo_dir))
        if args.abstain == parser.get_default("abstain"):
            args.abstain = DEMO_ABSTAIN
    return serve(args)
