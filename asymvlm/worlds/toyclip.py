"""A toy CLIP pretrained on ShapeWorld by a deterministic recipe: the offline default encoder.

No pretrained CLIP/SigLIP weights can be downloaded offline, yet the whole pipeline needs a real
frozen dual encoder. ``asymvlm-toy-clip`` is an open_clip architecture (its JSON config ships in
``asymvlm/model_configs``: a ViT with 8x8 patches on 32x32 images, a 3-layer text transformer, a
word-level tokenizer over ShapeWorld's vocabulary, d = 256) trained contrastively on ShapeWorld
images of every caption and visual style.

It is built on first use (a few minutes on 2 CPU cores) and cached under the user cache directory
(``$ASYMVLM_CACHE``, else ``$XDG_CACHE_HOME/asymvlm``, else ``~/.cache/asymvlm``), in a folder
named by a hash of the recipe, as an ordinary open_clip local directory. It loads through the same
path as any open_clip checkpoint, its pretrained tag registered by the worlds' plug-in
(:mod:`asymvlm.worlds.plugin`)::

    load_encoder("open_clip:asymvlm-toy-clip", pretrained="shapeworld")

Re-create it with one command: ``python -m asymvlm.worlds.toyclip build [--force]``; check its
quality with ``python -m asymvlm.worlds.toyclip eval``.

Recipe (:class:`ToyCLIPRecipe`): AdamW, linear warm-up then cosine decay, batches of images with
one caption each (levels weighted towards the specific ones), symmetric InfoNCE with every
caption-consistent image of the batch as a positive (``positive_mode="exclude"``, so a vague
caption is never pushed away from the images it describes). Seeded and run single-process:
the same torch build and thread count give bit-identical weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from asymvlm.encoders import PACKAGE_MODEL_CONFIGS
from asymvlm.errors import ConfigError
from asymvlm.losses import symmetric_infonce
from asymvlm.worlds import shapeworld as sw

__all__ = [
    "TOY_CLIP_NAME",
    "TOY_CLIP_TAG",
    "TOY_CLIP_SPEC",
    "TOY_CLIP_V3_NAME",
    "TOY_CLIP_V3_SPEC",
    "TOY_CLIP_SPECS",
    "PRETRAINING_STYLES",
    "ToyCLIPRecipe",
    "cache_root",
    "toy_clip_dir",
    "ensure_toy_clip",
    "build_toy_clip",
    "build_tokenizer",
    "evaluate_retrieval_by_level",
    "main",
]

TOY_CLIP_NAME = "asymvlm-toy-clip"  # ShapeWorld v2: 32 px, 8 px patches, context 16
TOY_CLIP_V3_NAME = "asymvlm-toy-clip-v3"  # ShapeWorld v3: 48 px, 12 px patches, context 24
TOY_CLIP_TAG = "shapeworld"
TOY_CLIP_SPEC = f"open_clip:{TOY_CLIP_NAME}"
TOY_CLIP_V3_SPEC = f"open_clip:{TOY_CLIP_V3_NAME}"
MODEL_NAMES = {2: TOY_CLIP_NAME, 3: TOY_CLIP_V3_NAME}
TOY_CLIP_SPECS = {v: f"open_clip:{name}" for v, name in MODEL_NAMES.items()}  # the encoder of each world
# the caption styles each world's default toy CLIP is trained on (the demo trains and evaluates its
# heads on these; v3's other styles are the merging domains)
PRETRAINING_STYLES = {2: sw.CAPTION_STYLES, 3: ("plain",)}
LEVEL_WEIGHTS = {2: (0.05, 0.1, 0.15, 0.25, 0.45), 3: (0.04, 0.08, 0.12, 0.16, 0.25, 0.35)}
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]")
EOS = "[EOS]"  # the highest id: open_clip's default "argmax" text pooling then pools at EOS
MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's defaults, also used at inference
STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ToyCLIPRecipe:
    """Everything that determines the toy CLIP's weights (hashed into its cache folder name)."""

    steps: int | None = field(default=None, metadata={"help": "Optimisation steps (None: 2000 v2, 2600 v3)."})
    batch_size: int = field(default=128, metadata={"help": "Image-caption pairs per step."})
    lr: float = field(default=2e-3, metadata={"help": "Peak AdamW learning rate."})
    warmup: int = field(default=100, metadata={"help": "Linear warm-up steps."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (not on gains/biases)."})
    train_images: int = field(default=60000, metadata={"help": "Images generated for training."})
    level_weights: tuple[float, ...] | None = field(
        default=None, metadata={"help": "Sampling weight of each caption level (None: the world version's)."}
    )
    hard_fraction: float | None = field(
        default=None,
        metadata={
            "help": "Fraction of each batch drawn as groups of images that differ only in the target's position "
            "(None: 0.75 v2; 0 v3, where such groups measured worse: exact R@1 at level 5 0.146 at 0.25, 0.191 at 0)."
        },
    )
    caption_styles: tuple[str, ...] | None = field(
        default=None,
        metadata={
            "help": "Caption styles it is trained on (None: PRETRAINING_STYLES of the world, every style in v2 "
            "and plain in v3; the others are dialects the encoder never saw, as real jargon is for a real CLIP)."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of data generation and initialisation."})
    threads: int = field(default=2, metadata={"help": "torch threads while training (determinism)."})
    world_version: int = field(default=2, metadata={"help": "The ShapeWorld version it is trained on (2 or 3)."})

    def __post_init__(self) -> None:
        if self.world_version not in MODEL_NAMES:
            raise ConfigError(f"world_version must be one of {tuple(MODEL_NAMES)}, got {self.world_version!r}")
        if self.level_weights is None:
            object.__setattr__(self, "level_weights", LEVEL_WEIGHTS[self.world_version])
        if self.hard_fraction is None:
            object.__setattr__(self, "hard_fraction", 0.75 if self.world_version == 2 else 0.0)
        # v2: every style; v3: plain captions only, so that the other styles (a template prefix,
        # another word order, other words) are domains the encoder never saw, as real jargon is for a
        # real CLIP: with every style in pretraining, head experts had nothing to learn per style
        # (issue 15, bench/merge_domains.py)
        styles = PRETRAINING_STYLES[self.world_version] if self.caption_styles is None else self.caption_styles
        object.__setattr__(self, "caption_styles", tuple(styles))
        unknown = [c for c in self.caption_styles if c not in sw.CAPTION_STYLES]
        if unknown or not self.caption_styles:
            raise ConfigError(
                f"caption_styles must be a non-empty subset of {sw.CAPTION_STYLES}, got {unknown or '()'}"
            )
        if self.steps is None:  # v3: 2,600 steps fit the 4-minute build budget on 2 cores (224 s idle)
            object.__setattr__(self, "steps", 2000 if self.world_version == 2 else 2600)
        n_levels = len(sw.ShapeWorldConfig(version=self.world_version).levels)
        if len(self.level_weights) != n_levels:
            raise ConfigError(f"level_weights needs {n_levels} entries for world {self.world_version}")

    def fingerprint(self) -> str:
        recipe = asdict(self)
        if tuple(recipe["caption_styles"]) == tuple(sw.CAPTION_STYLES):  # payloads as before the field
            del recipe["caption_styles"]
        if self.world_version == 2:  # version-2 payloads as before the field existed: caches stay valid
            del recipe["world_version"]
        payload = json.dumps(
            {
                "recipe": recipe,
                "config": _model_config(self.world_version),
                "world": self.world_version,
                "tokenizer": sw.vocabulary(self.world_version),
                "format": 1,
            },
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def cache_root() -> Path:
    """Where asymvlm caches built artefacts.

    ``$ASYMVLM_CACHE`` if set, else ``$XDG_CACHE_HOME/asymvlm``, else ``~/.cache/asymvlm``.
    """
    if os.environ.get("ASYMVLM_CACHE"):
        return Path(os.environ["ASYMVLM_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "asymvlm"


def toy_clip_dir(recipe: ToyCLIPRecipe | None = None) -> Path:
    recipe = recipe or ToyCLIPRecipe()
    return cache_root() / "toy-clip" / recipe.fingerprint()


def _model_config(version: int = 2) -> dict[str, Any]:
    return json.loads((PACKAGE_MODEL_CONFIGS / f"{MODEL_NAMES[version]}.json").read_text())


def build_tokenizer(version: int = 2):
    """The word-level tokenizer over ShapeWorld's vocabulary (lower-cased, punctuation split,
    ``[BOS] ... [EOS]`` added, ``[EOS]`` the highest id)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = [*SPECIAL_TOKENS, *sw.vocabulary(version), EOS]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"[BOS] $A {EOS}", special_tokens=[("[BOS]", vocab["[BOS]"]), (EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token="[BOS]",
        eos_token=EOS,
        model_max_length=_model_config(version)["text_cfg"]["context_length"],
    )


def ensure_toy_clip(recipe: ToyCLIPRecipe | None = None, *, progress: bool = True) -> Path:
    """The toy CLIP's local directory, built first if it is not in the cache yet."""
    directory = toy_clip_dir(recipe)
    if (directory / "open_clip_config.json").is_file():
        return directory
    return build_toy_clip(directory, recipe, progress=progress)


def normalized_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> normalised float (N, 3, H, W), exactly open_clip's inference transform
    for images already at the model's size (Resize/CenterCrop are identities there). Shared by the
    toy CLIP and the emoji benchmark's CLIP (``bench/emoji/clip.py``)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


class _HardBatchSampler:
    """Batches where a fraction of the images come in groups of four that share shape, colour and
    size and differ in position: without them a random batch rarely needs the position to tell
    its images apart, and the position is learned last."""

    def __init__(self, objects: np.ndarray, batch_size: int, hard_fraction: float, rng: np.random.Generator):
        self.n, self.batch_size, self.rng = objects.shape[0], batch_size, rng
        target = objects[:, 0]
        key = (target[:, 0] * 100 + target[:, 1] * 10 + target[:, 2]).astype(np.int64)
        positions = int(target[:, 3].max()) + 1
        self.pools: list[list[np.ndarray]] = []
        for k in np.unique(key):
            per_position = [np.nonzero((key == k) & (target[:, 3] == p))[0] for p in range(positions)]
            if all(len(p) for p in per_position):
                self.pools.append(per_position)
        self.groups = int(batch_size * hard_fraction) // positions if self.pools else 0

    def __call__(self) -> np.ndarray:
        picked = []
        for g in self.rng.integers(0, len(self.pools), self.groups) if self.groups else []:
            picked.extend(int(self.rng.choice(p)) for p in self.pools[g])
        chosen = set(picked)
        while len(picked) < self.batch_size:
            i = int(self.rng.integers(0, self.n))
            if i not in chosen:
                chosen.add(i)
                picked.append(i)
        return np.asarray(picked[: self.batch_size])


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups of the trainable parameters: weight decay on matrices, none on gains, biases,
    embeddings and the temperature (shared by the toy CLIP and the emoji CLIP)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "embedding" in name or "logit_scale" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_toy_clip(
    directory: str | Path | None = None, recipe: ToyCLIPRecipe | None = None, *, progress: bool = True
) -> Path:
    """Train the toy CLIP with ``recipe`` and save it as an open_clip local directory (atomically)."""
    import open_clip

    from asymvlm.encoders import register_open_clip_configs, save_open_clip_dir
    from asymvlm.io import atomic_directory

    recipe = recipe or ToyCLIPRecipe()
    directory = Path(directory) if directory is not None else toy_clip_dir(recipe)
    register_open_clip_configs()
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    start = time.time()
    try:
        version = recipe.world_version
        torch.manual_seed(recipe.seed)
        model = open_clip.create_model(MODEL_NAMES[version])
        model.train()
        tokenizer = build_tokenizer(version)
        world = sw.generate_arrays(
            recipe.train_images,
            seed=recipe.seed,
            caption_styles=recipe.caption_styles,
            visual_styles=sw.VISUAL_STYLES,
            version=version,
        )
        pixels = normalized_pixels(world.images)
        # every caption string once, tokenised once
        flat = [c for row in world.captions for c in row]
        uniq, inverse = np.unique(np.array(flat, dtype=object), return_inverse=True)
        tokens = tokenizer(
            list(uniq),
            padding="max_length",
            truncation=True,
            max_length=_model_config(version)["text_cfg"]["context_length"],
            return_tensors="pt",
        )["input_ids"]
        caption_token_row = torch.from_numpy(inverse.reshape(len(world.captions), -1))
        specs = world.specs
        objects = world.objects
        opt = torch.optim.AdamW(decay_groups(model, recipe.weight_decay), lr=recipe.lr, betas=(0.9, 0.98), eps=1e-6)

        def lr_at(step: int) -> float:
            if step < recipe.warmup:
                return recipe.lr * (step + 1) / recipe.warmup
            t = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
            return 0.5 * recipe.lr * (1 + math.cos(math.pi * t))

        rng = np.random.default_rng(recipe.seed + 1)
        weights = np.asarray(recipe.level_weights, dtype=np.float64)
        weights = weights / weights.sum()
        sampler = _HardBatchSampler(objects, recipe.batch_size, recipe.hard_fraction, rng)
        bar = tqdm(range(recipe.steps), desc="build toy CLIP", disable=not progress)
        for step in bar:
            idx = sampler()
            level = rng.choice(len(weights), recipe.batch_size, p=weights)
            text = tokens[caption_token_row[idx, level]]
            positives = torch.from_numpy(sw.consistency_matrix(specs[idx, level], objects[idx]))
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            img = F.normalize(model.encode_image(pixels[idx]), dim=-1)
            txt = F.normalize(model.encode_text(text), dim=-1)
            logits = model.logit_scale.exp().clamp(max=100.0) * txt @ img.T
            loss = symmetric_infonce(logits, positives, positive_mode="exclude")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        model.eval()
    finally:
        torch.set_num_threads(threads)

    with atomic_directory(directory) as tmp:
        save_open_clip_dir(
            model, _model_config(recipe.world_version), tmp, preprocess_cfg={"mean": list(MEAN), "std": list(STD)}
        )
        build_tokenizer(recipe.world_version).save_pretrained(tmp)
        (tmp / "recipe.json").write_text(
            json.dumps(
                {
                    "recipe": asdict(recipe),
                    "fingerprint": recipe.fingerprint(),
                    "build_seconds": round(time.time() - start, 1),
                    "torch": torch.__version__,
                },
                indent=2,
            )
        )
    return directory


@torch.no_grad()
def evaluate_retrieval_by_level(encoder: Any, n: int = 1000, seed: int = 12345, **world: Any) -> dict[int, float]:
    """Fraction of captions whose top-1 retrieved image (among ``n`` held-out images) is consistent
    with the caption, per caption level (the toy CLIP's quality bar: >= 0.9 at level 3 and
    >= 0.6 at level 4)."""
    world.setdefault("caption_styles", sw.CAPTION_STYLES)
    world.setdefault("visual_styles", sw.VISUAL_STYLES)
    w = sw.generate_arrays(n, seed=seed, **world)
    from PIL import Image

    images = encoder.encode_image([Image.fromarray(im) for im in w.images])
    out = {}
    for j, level in enumerate(w.config.levels):
        text = encoder.encode_text([row[j] for row in w.captions])
        top1 = (text @ images.T).argmax(dim=1).numpy()
        consistent = sw.consistency_matrix(w.specs[:, j], w.objects)
        out[level] = float(consistent[np.arange(n), top1].mean())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m asymvlm.worlds.toyclip",
        description="Build or evaluate the ShapeWorld toy CLIP.",
        epilog="examples:\n  python -m asymvlm.worlds.toyclip build\n  python -m asymvlm.worlds.toyclip build --force\n"
        "  python -m asymvlm.worlds.toyclip eval --images 1000",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="train it (if not cached, or with --force) and print where it is")
    b.add_argument("--force", action="store_true")
    b.add_argument("--steps", type=int, default=None, help="override the recipe's steps (changes the cache key)")
    b.add_argument("--world", type=int, choices=(2, 3), default=3, help="ShapeWorld version (default: 3)")
    e = sub.add_parser("eval", help="top-1 consistent retrieval per caption level on held-out images")
    e.add_argument("--images", type=int, default=1000)
    e.add_argument("--world", type=int, choices=(2, 3), default=3, help="ShapeWorld version (default: 3)")
    args = parser.parse_args(argv)
    overrides = {"world_version": args.world}
    if getattr(args, "steps", None) is not None:
        overrides["steps"] = args.steps
    recipe = ToyCLIPRecipe(**overrides)
    if args.cmd == "build":
        start = time.time()
        path = build_toy_clip(toy_clip_dir(recipe), recipe) if args.force else ensure_toy_clip(recipe)
        print(f"toy CLIP at {path} ({time.time() - start:.1f} s)")
        return 0
    from asymvlm.encoders import load_encoder

    enc = load_encoder(TOY_CLIP_SPECS[args.world], pretrained=TOY_CLIP_TAG, device="cpu")
    scores = evaluate_retrieval_by_level(enc, n=args.images, version=args.world)
    level_names = sw.level_names(args.world)
    for level, value in scores.items():
        print(f"level {level} ({level_names[level]}): top-1 consistent {value:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
