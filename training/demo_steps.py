"""The steps of ``asymvlm-demo`` (:mod:`asymvlm.training.demo` runs them in order): the embedding
caches, the central heads, the merging experts and their merges, and the evaluation. The federated
grid is :mod:`asymvlm.training.demo_federated`'s, the report :mod:`asymvlm.training.demo_report`'s.

Every step draws its random numbers in the order the demo has always drawn them: a step's outputs
are a function of the settings (``asymvlm-demo``'s flags) and the seed.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DemoData",
    "say",
    "demo_encoder",
    "training_cache",
    "train_head",
    "domain_caches",
    "MERGE_BASE_STYLES",
    "MERGE_DOMAINS",
    "DOMAIN_TEST_LEVELS",
    "QUICK_TOY_STEPS",
    "EVAL_SEEDS",
    "lap",
    "build_caches",
    "train_central",
    "merge_experts",
    "evaluate_models",
]

# Merging, per world: the caption styles of the base head's training split, and the domains (one
# expert each). v3's toy CLIP is pretrained on plain captions only (PRETRAINING_STYLES), so a
# template prefix and another word order are styles neither the encoder nor the base has seen. v3's
# third style, synonyms (words whose token embeddings were never trained), is not a merging domain:
# a head cannot learn what untrained tokens mean (its expert gains 3 points at 80 steps) and
# merging it in drags the other styles below the base (bench/merge_domains.py measures both).
MERGE_BASE_STYLES = {2: ("plain", "photo", "reordered"), 3: ("plain",)}
MERGE_DOMAINS = {2: ("plain", "photo", "synonyms", "reordered"), 3: ("photo", "reordered")}
DOMAIN_TEST_LEVELS = (4, 5)  # the domains' validation and test captions: position and relation (v3)
QUICK_TOY_STEPS = 250  # the --quick toy CLIP recipe (its own cache key)
# the fixed seeds of the held-out splits (the same for every --seed: a figure's spread over --seed is
# the spread of the training data and runs on one test set)
EVAL_SEEDS = {"test": 12345, "validation": 777, "calibration": 778, "unfamiliar_texts": 12346}


def say(msg: str) -> None:
    """Print a line of the demo's progress at once (the demo's output is its log)."""
    print(msg, flush=True)


@contextlib.contextmanager
def lap(timings: dict[str, float], name: str) -> Iterator[None]:
    """Time a step into ``timings[name]`` (seconds, one decimal) and say how long it took."""
    t = time.time()
    yield
    timings[name] = round(time.time() - t, 1)
    say(f"      done in {timings[name]:.0f} s")


def demo_encoder(toy_steps: int | None, world: int = 3) -> tuple[Any, tuple[str, str]]:
    """The toy CLIP of ``world`` (the ``--quick`` recipe when ``toy_steps`` is set; built on first
    use) and its ``(encoder spec, pretrained tag)``."""
    from asymvlm.encoders import load_encoder
    from asymvlm.worlds.toyclip import TOY_CLIP_SPECS, TOY_CLIP_TAG, ToyCLIPRecipe, ensure_toy_clip

    if toy_steps is None:
        spec = TOY_CLIP_SPECS[world]
        return load_encoder(spec, pretrained=TOY_CLIP_TAG, device="cpu"), (spec, TOY_CLIP_TAG)
    directory = ensure_toy_clip(ToyCLIPRecipe(steps=toy_steps, world_version=world))
    spec = f"open_clip:local-dir:{directory}"
    return load_encoder(spec, device="cpu"), (spec, "")


def training_cache(encoder: Any, spec: tuple[str, str], s: dict, seed: int, caption_styles: str) -> Any:
    """The embedding cache of the demo's training split in ``caption_styles`` (built on first use)."""
    from asymvlm.config import DataArguments
    from asymvlm.worlds.data import cache_for_config

    data = DataArguments(
        dataset=s["dataset"], encoder=spec[0], pretrained=spec[1], train_images=s["train_images"],
        data_seed=seed, caption_styles=caption_styles,
    )  # fmt: skip
    return cache_for_config(data, encoder)


def train_head(cache: Path, out: Path, s: dict, family: str, seed: int, **extra: Any) -> Path:
    """One head trained with ``asymvlm-train``'s loop on ``cache`` (the demo's recipe; ``extra``
    overrides or adds config keys); returns its model folder."""
    from asymvlm.training.config import TrainConfig
    from asymvlm.training.loop import train

    cfg = TrainConfig.from_dict(
        dict(
            cache_dir=str(cache), family=family, hidden_dims=list(s["hidden"]),
            max_steps=extra.pop("steps", s["steps"]), batch_size=s["batch"], optimizer="adamw",
            lr=extra.pop("lr", 1e-3), weight_decay=1e-4, seed=seed, output_dir=str(out),
            save_every=0, eval_every=-1, log_with="none", progress=extra.pop("progress", True), overwrite=True,
            **extra,
        )
    )  # fmt: skip
    return Path(train(cfg))


def domain_caches(
    encoder: Any, n: int, seed: int, root: Path, world: int = 3, styles: tuple[str, ...] | None = None
) -> dict[str, dict[str, Path]]:
    """Per caption style: a training split (every caption level) and validation and test splits of
    the specific captions (v3: levels 4 and 5, where retrieval is not decided by ties)."""
    from asymvlm import embed_dataset
    from asymvlm.worlds import shapeworld as sw

    out: dict[str, dict[str, Path]] = {}
    for style in MERGE_DOMAINS[world] if styles is None else styles:
        d_i = sw.CAPTION_STYLES.index(style)  # the style's seed offset: the cache name holds the style
        out[style] = {}
        for s_i, split in enumerate(("train", "val", "test")):
            count = n * (4 if split == "train" else 1)
            levels = {"levels": DOMAIN_TEST_LEVELS} if split != "train" and world == 3 else {}
            data = sw.generate(
                count, seed=seed + 100 * d_i + 10 * s_i + 7, caption_styles=(style,), version=world, **levels
            )  # fmt: skip
            tag = "" if world == 2 else f"-v{world}" + ("-specific" if levels else "")
            path = root / f"demo-{style}-{split}-{count}-{seed}{tag}-{encoder.fingerprint[:12]}"
            out[style][split] = embed_dataset(encoder, data, path, batch_size=256, progress=True).path
    return out


def _r1(head: Any, cache_path: Path) -> float:
    """Exact t2i R@1 of ``head`` on an embedding cache."""
    from asymvlm.cache import EmbeddingCache
    from asymvlm.merging.api import recall_at_1

    c = EmbeddingCache.load(cache_path)
    return recall_at_1(head, c.text_embeddings, c.image_embeddings, c.text_image_index)


@dataclass(frozen=True)
class DemoData:
    """The embeddings the steps share (step 1, :func:`build_caches`).

    Attributes:
        encoder: the toy CLIP.
        spec: its ``(encoder spec, pretrained tag)``.
        train_cache: the heads' training split (the toy CLIP's pretraining caption styles).
        eval_data: the held-out test split (:func:`asymvlm.eval.benchmark.shapeworld_eval_data`).
        world: the keyword arguments of a held-out split of the heads' world (caption and visual
            styles, version).
        domains: the merging domains' training, validation and test caches (:data:`MERGE_DOMAINS`).
    """

    encoder: Any
    spec: tuple[str, str]
    train_cache: Path
    eval_data: Any
    world: dict[str, Any]
    domains: dict[str, dict[str, Path]]


def build_caches(s: dict, seed: int) -> DemoData:
    """Step 1: the toy CLIP (built and cached on first use), the training cache, the held-out test
    split and the merging domains' caches."""
    from asymvlm.eval.benchmark import shapeworld_eval_data
    from asymvlm.worlds import shapeworld as sw
    from asymvlm.worlds.toyclip import cache_root

    encoder, spec = demo_encoder(s["toy_steps"], s["world"])
    train_cache = training_cache(encoder, spec, s, seed, s["caption_styles"])
    # heads are trained and evaluated on the captions the toy CLIP was pretrained on
    world = dict(
        caption_styles=tuple(s["caption_styles"].split(",")), visual_styles=sw.VISUAL_STYLES, version=s["world"]
    )
    eval_data = shapeworld_eval_data(encoder, n=s["eval_images"], seed=EVAL_SEEDS["test"], **world)
    domains = domain_caches(encoder, s["domain_images"], seed + 1, cache_root() / "caches", s["world"])
    return DemoData(encoder, spec, train_cache.path, eval_data, world, domains)


def train_central(data: DemoData, s: dict, out: Path, seed: int) -> dict[str, Path]:
    """Step 2: a vMF and a Power Spherical head (frozen mean direction), ``{family: model folder}``."""
    return {f: train_head(data.train_cache, out / f"central-{f}", s, f, seed) for f in ("vmf", "ps")}


def _train_experts(data: DemoData, s: dict, out: Path, seed: int, base: Path) -> dict[str, list[Path]]:
    """One dense and one TaLoS-masked (90% of the weights frozen) expert per merging domain,
    fine-tuned from ``base``; ``{"dense": [...], "talos": [...]}`` in :data:`MERGE_DOMAINS` order."""
    from asymvlm.batching import IndexBatcher
    from asymvlm.cache import EmbeddingCache
    from asymvlm.merging.talos import calibrate_mask, save_masks
    from asymvlm.model import AsymVLM

    base_model = AsymVLM.from_pretrained(base, load_encoder=False)
    experts: dict[str, list[Path]] = {"dense": [], "talos": []}

    def expert(kind: str, d: str, **extra: Any) -> Path:
        return train_head(
            data.domains[d]["train"], out / "experts" / f"{kind}-{d}", s, "vmf", seed,
            init_from=str(base), steps=s["expert_steps"], direction="learned", progress=False, **extra,
        )  # fmt: skip

    for d in MERGE_DOMAINS[s["world"]]:
        experts["dense"].append(expert("dense", d))
        c = EmbeddingCache.load(data.domains[d]["train"])
        batcher = IndexBatcher(c.text_embeddings.float(), c.image_embeddings.float(), c.text_image_index, 256, seed)
        masks = calibrate_mask(base_model, batcher, 0.9, 4, num_batches=4)  # leaves the model as it was
        mask_file = save_masks(masks, out / "experts" / f"talos-mask-{d}.safetensors", {"sparsity": 0.9, "rounds": 4})
        experts["talos"].append(expert("talos", d, mask_file=str(mask_file)))
        say(f"      experts for {d}: dense and TaLoS (90% of the weights frozen)")
    return experts


def merge_experts(data: DemoData, s: dict, out: Path, seed: int) -> dict[str, dict[str, Any]]:
    """Step 4: a base head with a learned mean on :data:`MERGE_BASE_STYLES`, its experts, and their
    merges by task arithmetic, TIES, DARE-TIES and TaLoS (lambda by validation R@1; by the likelihood
    where R@1 is the same for every lambda). Returns ``{merge name: its lambda, test R@1 per style,
    the experts' and the base's, normalised R@1, the lambda curve}``."""
    from asymvlm.merging.api import FlatCriterionError, merge
    from asymvlm.model import AsymVLM

    doms = MERGE_DOMAINS[s["world"]]
    base_cache = training_cache(data.encoder, data.spec, s, seed, ",".join(MERGE_BASE_STYLES[s["world"]]))
    base = train_head(base_cache.path, out / "merge-base", s, "vmf", seed, direction="learned")
    experts = _train_experts(data, s, out, seed, base)

    def test_r1(model_dir: Path, styles: tuple[str, ...] = doms) -> dict[str, float]:
        """Exact R@1 of a saved head on the test split of each style."""
        head = AsymVLM.from_pretrained(model_dir, load_encoder=False).head
        return {d: _r1(head, data.domains[d]["test"]) for d in styles}

    base_r1 = test_r1(base)
    # each expert on its own style's test split, once per expert family
    expert_r1 = {fam: {d: test_r1(e, (d,))[d] for d, e in zip(doms, paths)} for fam, paths in experts.items()}
    grid = [0.25, 0.5, 0.75, 1.0]
    val = [data.domains[d]["val"] for d in doms]
    merged: dict[str, dict[str, Any]] = {}
    for name, family, method, opts in (
        ("task_arithmetic", "dense", "task_arithmetic", {}),
        ("ties", "dense", "ties", {"density": 0.2}),
        ("dare_ties", "dense", "dare_ties", {"p": 0.9, "seed": seed}),
        ("talos", "talos", "talos", {}),
    ):
        target = out / "merged" / name
        try:  # lambda by validation R@1 (the heads' mean is learned: R@1 moves with lambda)
            rep = merge(base, experts[family], target, method, lam_grid=grid, val=val, select_by="r1", **opts)
        except FlatCriterionError:  # R@1 the same for every lambda: the likelihood decides
            say(f"      warning: {name}: validation R@1 is the same for every lambda; lambda chosen by likelihood")
            rep = merge(base, experts[family], target, method, lam_grid=grid, val=val, select_by="likelihood", **opts)
        r1, ex = test_r1(target), expert_r1[family]
        norm = {d: r1[d] / ex[d] if ex[d] > 0 else float("nan") for d in doms}
        merged[name] = {
            "lam": rep["lam"], "R@1": r1, "expert_R@1": ex, "base_R@1": base_r1, "normalized_R@1": norm,
            "mean_normalized_R@1": sum(norm.values()) / len(norm), "lambda_curve": rep["lambda_search"]["curve"],
            "lambda_selected_by": rep["lambda_search"]["criterion"],
        }  # fmt: skip
    return merged


def evaluate_models(
    data: DemoData, s: dict, out: Path, central: dict[str, Path], merged: dict[str, Any], fed_models: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Step 5: every model (central, merged, federated) next to the CLIP baseline on the held-out
    split (:func:`asymvlm.eval.benchmark.evaluate`), and whether each central head knows when its
    answer is right: ``p_correct`` calibrated on a fresh split of the test gallery's size, judged on
    the test split, the captions in the styles the toy CLIP never saw as the unfamiliar texts.
    Returns ``(metrics, {family: confidence report})``."""
    from asymvlm.eval.benchmark import evaluate, shapeworld_eval_data
    from asymvlm.eval.confidence import calibrate_on, confidence_report
    from asymvlm.model import AsymVLM
    from asymvlm.worlds import shapeworld as sw

    models = {f: AsymVLM.from_pretrained(d, load_encoder=False) for f, d in central.items()}
    models.update({f"merged-{k}": AsymVLM.from_pretrained(out / "merged" / k, load_encoder=False) for k in merged})
    models.update({f"fed-{k}": m for k, m in fed_models.items()})
    metrics = evaluate(data.eval_data, models)
    world = data.world
    calib_data = shapeworld_eval_data(data.encoder, n=s["eval_images"], seed=EVAL_SEEDS["calibration"], **world)
    unseen = tuple(st for st in sw.CAPTION_STYLES if st not in world["caption_styles"])
    ood = shapeworld_eval_data(data.encoder, n=max(50, s["eval_images"] // 3), seed=EVAL_SEEDS["unfamiliar_texts"],
                               **{**world, "caption_styles": unseen}).text_embeddings  # fmt: skip
    confidence = {}
    for f in central:
        m = models[f]
        conf = calibrate_on(m, calib_data, source=f"a fresh split of {s['eval_images']} scenes")
        confidence[f] = confidence_report(m, data.eval_data, confidence=conf, ood_texts=ood, keep_outcomes=True)
    return metrics, confidence
