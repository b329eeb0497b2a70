"""``asymvlm-demo``: the whole package on the offline default, in one command (``make demo``).

On ShapeWorld (v3 by default, ``--world 2`` for the earlier world) with its toy CLIP (built on
first use, then loaded from the user cache):

1. cache the frozen embeddings of a training split (every visual style; the caption styles the toy
   CLIP was pretrained on: plain in v3, every style in v2);
2. train a vMF and a Power Spherical head centrally with the AsymVLM loss (frozen mean direction);
3. federated: K clients with a Dirichlet(0.1) shape skew train a head with a learned mean under
   FedAvg, FedAvgM, FedProx, GHBM, FedAdam, FedYogi and AdaFedAdam, each recipe's server
   hyperparameters chosen on a validation split (:data:`FED_GRID`; by R@1 of the most specific
   captions, ties broken by their likelihood), next to a centralised and an IID reference at the
   same budget;
4. merging: a learned-mean base head on plain captions (v3), one expert per caption style that
   neither the toy CLIP nor the base has seen (a template prefix, another word order; dense and
   TaLoS-masked), merged by task arithmetic, TIES, DARE-TIES and TaLoS, lambda chosen on the
   styles' validation splits by mean normalised R@1 (by the validation likelihood where R@1 is the
   same for every lambda);
5. evaluate everything with :mod:`eval` next to the CLIP baseline on held-out ShapeWorld, print the
   summary and federated tables, and write ``report.json``, ``metrics.json`` and PNG plots to
   ``--output_dir``.

``--quick`` is a smoke version (a small toy CLIP, small splits, few steps) for CI.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

__all__ = ["main", "central_model", "build_parser", "provenance", "EVAL_SEEDS"]

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


def _say(msg: str) -> None:
    print(msg, flush=True)


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    full = dict(
        toy_steps=None, train_images=8000, eval_images=1000, domain_images=400, steps=400, batch=512,
        rounds=16, local_steps=8, local_batch=128, expert_steps=80, hidden=[1024, 1024, 1024],
        fed_hidden=[256, 256], val_images=500,
    )  # fmt: skip
    quick = dict(
        toy_steps=QUICK_TOY_STEPS, train_images=1500, eval_images=300, domain_images=120, steps=60, batch=256,
        rounds=4, local_steps=4, local_batch=64, expert_steps=15, hidden=[256, 256],
        fed_hidden=[64], val_images=200,
    )  # fmt: skip
    s = quick if args.quick else full
    for k in ("train_images", "eval_images", "steps", "rounds"):
        v = getattr(args, k)
        if v is not None:
            s[k] = v
    s["clients"], s["world"], s["quick"] = args.clients, args.world, args.quick
    s["dataset"] = f"shapeworld:{args.world}"
    from asymvlm.toyclip import PRETRAINING_STYLES

    s["caption_styles"] = ",".join(PRETRAINING_STYLES[args.world])  # the heads' training captions
    return s


def _encoder(toy_steps: int | None, world: int = 3):
    from asymvlm.encoders import load_encoder
    from asymvlm.toyclip import TOY_CLIP_SPECS, TOY_CLIP_TAG, ToyCLIPRecipe, ensure_toy_clip

    if toy_steps is None:
        spec = TOY_CLIP_SPECS[world]
        return load_encoder(spec, pretrained=TOY_CLIP_TAG, device="cpu"), (spec, TOY_CLIP_TAG)
    directory = ensure_toy_clip(ToyCLIPRecipe(steps=toy_steps, world_version=world))
    spec = f"open_clip:local-dir:{directory}"
    return load_encoder(spec, device="cpu"), (spec, "")


# the fixed seeds of the held-out splits (the same for every --seed: a figure's spread over --seed is
# the spread of the training data and runs on one test set)
EVAL_SEEDS = {"test": 12345, "validation": 777, "calibration": 778, "unfamiliar_texts": 12346}
# the distributions whose versions the report records (importlib.metadata names)
PROVENANCE_PACKAGES = ("asymvlm", "torch", "numpy", "scipy", "open_clip_torch", "transformers", "safetensors", "flwr")
# CPU features that select torch's kernels (and so change float results): /proc/cpuinfo flags
CPU_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile")
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def _cpu_info() -> dict[str, Any]:
    """The CPU model and the :data:`CPU_FLAGS` it has (Linux's /proc/cpuinfo; None elsewhere)."""
    model, flags = None, None
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return {"cpu_model": None, "cpu_flags": None}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key == "flags" and flags is None:
            present = set(value.split())
            flags = [f for f in CPU_FLAGS if f in present]
        if model is not None and flags is not None:
            break
    return {"cpu_model": model, "cpu_flags": flags}


def _source_commit() -> str | None:
    """The git commit of the source tree the package runs from (an editable install), else None;
    read from ``.git`` without running git."""
    root = Path(__file__).resolve().parents[1] / ".git"
    try:
        head = (root / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head or None
        ref = head[5:]
        if (root / ref).is_file():
            return (root / ref).read_text().strip() or None
        for line in (root / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        return None
    return None


def provenance(encoder: Any, seed: int, toy_clip_dir: Path | None = None) -> dict[str, Any]:
    """What a figure of the demo depends on besides the code: package versions, the encoder's weights
    fingerprint (the toy CLIP is built on each machine and float training is not bit-reproducible
    across CPUs, so two machines can hold different toy CLIPs under the same name), the seeds,
    the machine (CPU model and the kernel-selecting flags, torch's threads and CPU capability) and
    the date. No paths and no host name (``report.json`` may be shared).

    Example:
        >>> from types import SimpleNamespace
        >>> p = provenance(SimpleNamespace(fingerprint="abc"), seed=0)
        >>> p["encoder"]["fingerprint"], p["seeds"]["run"], "torch" in p["packages"]
        ('abc', 0, True)
    """
    import datetime
    import importlib.metadata as md
    import json
    import os
    import platform

    import torch

    packages: dict[str, str | None] = {}
    for name in PROVENANCE_PACKAGES:
        try:
            packages[name] = md.version(name)
        except md.PackageNotFoundError:
            packages[name] = None  # not installed
    toy: dict[str, Any] | None = None
    if toy_clip_dir is not None:
        toy = {"directory": Path(toy_clip_dir).name}  # the recipe's cache key, never the path
        try:
            built = json.loads((Path(toy_clip_dir) / "recipe.json").read_text())
        except (OSError, ValueError):
            built = None
        if isinstance(built, dict):  # how and with what this machine's toy CLIP was built
            toy.update({k: built.get(k) for k in ("recipe", "build_seconds", "torch")})
    cpu_capability = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", lambda: None)()
    return {
        "packages": packages,
        "source_commit": _source_commit(),
        "encoder": {"fingerprint": getattr(encoder, "fingerprint", None), "toy_clip": toy},
        "seeds": {"run": seed, "data": seed, "merge_domains": seed + 1, **EVAL_SEEDS},
        "machine": {
            "platform": platform.platform(),
            "machine": platform.machine(),
            "python": platform.python_version(),
            **_cpu_info(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            "torch_cpu_capability": cpu_capability,
            "mkldnn": bool(torch.backends.mkldnn.is_available()),
            "thread_env": {k: os.environ[k] for k in THREAD_ENV if k in os.environ},
        },
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _toy_clip_dir(toy_steps: int | None, world: int) -> Path:
    from asymvlm.toyclip import ToyCLIPRecipe, toy_clip_dir

    steps = {} if toy_steps is None else {"steps": toy_steps}
    return toy_clip_dir(ToyCLIPRecipe(world_version=world, **steps))


def _train_head(cache: Path, out: Path, s: dict, family: str, seed: int, **extra) -> Path:
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


def central_model(
    output_dir: str | Path = "demo-out", family: str = "vmf", *, quick: bool = False, seed: int = 0
) -> Path:
    """The demo's central head of ``family`` (``<output_dir>/central-<family>/model``, what ``asymvlm-demo``
    writes): used as it is when there, else trained exactly as the demo trains it (the toy CLIP and
    the embedding cache are built on first use). ``asymvlm-serve --demo`` serves it."""
    out = Path(output_dir) / f"central-{family}"
    if (out / "model" / "asymvlm_config.json").is_file():
        return out / "model"
    from asymvlm.config import DataArguments
    from asymvlm.data import cache_for_config

    args = build_parser().parse_args(["--output_dir", str(output_dir), "--seed", str(seed), *(["--quick"] * quick)])
    s = _settings(args)
    encoder, spec = _encoder(s["toy_steps"], s["world"])
    cache = cache_for_config(
        DataArguments(
            dataset=s["dataset"], encoder=spec[0], pretrained=spec[1], train_images=s["train_images"],
            data_seed=seed, caption_styles=s["caption_styles"],
        ),
        encoder,
    )  # fmt: skip
    return _train_head(cache.path, out, s, family, seed)


def _domain_caches(
    encoder, n: int, seed: int, root: Path, world: int = 3, styles: tuple[str, ...] | None = None
) -> dict[str, dict[str, Path]]:
    """Per caption style: a training split (every caption level) and validation and test splits of
    the specific captions (v3: levels 4 and 5, where retrieval is not decided by ties)."""
    from asymvlm import embed_dataset
    from asymvlm import shapeworld as sw

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


def _r1(head, cache_path: Path) -> float:
    from asymvlm.cache import EmbeddingCache
    from asymvlm.merging.api import recall_at_1

    c = EmbeddingCache.load(cache_path)
    return recall_at_1(head, c.text_embeddings, c.image_embeddings, c.text_image_index)


# The federated table (issue 15): server hyperparameters tried per recipe, each run scored on a
# validation split and the best reported on the test split. The adaptive recipes use a 3 x 2 corner
# of Reddi et al. (2021, "Adaptive Federated Optimization", App. D)'s grid, server lr in
# {10^-2, 10^-1.5, 10^-1} and tau in {10^-3, 10^-2}: the region where FedAdam's best runs lie here.
_ADAPTIVE = [{"server_lr": lr, "server_tau": tau} for lr in (0.01, 0.03, 0.1) for tau in (1e-3, 1e-2)]
FED_GRID: dict[str, list[dict[str, Any]]] = {
    "fedavg": [{}],
    # server momentum beta at effective server lr 1 (lr / (1 - beta), Hsu et al. 2019): 16 rounds are
    # too few for beta 0.9 to reach its full step (measured: 0.053 at 16 rounds, 0.270 at 48)
    "fedavgm": [{"server_lr": 1 - b, "server_momentum": b} for b in (0.5, 0.9)],
    "fedprox": [{"proximal_mu": mu} for mu in (0.001, 0.01)],
    "ghbm": [{"ghbm_beta": b, "ghbm_tau": 1, "server_lr": lr} for b in (0.5, 0.9) for lr in (0.1, 0.3)],
    "fedadam": _ADAPTIVE,
    "fedyogi": _ADAPTIVE,
    "adafedadam": _ADAPTIVE,
}
QUICK_FED_GRID = {"fedavg": [{}], "fedadam": [{"server_lr": 0.03, "server_tau": 1e-3}]}
FED_PARTITION = dict(partition="dirichlet", partition_column="shape", partition_alpha=0.1)


def _grid_label(options: dict[str, Any]) -> str:
    return ", ".join(f"{k.removeprefix('server_')} {v:g}" for k, v in options.items()) or "server lr 1"


def _specific_r1(head, data) -> float:
    """Exact t2i R@1 of the most specific captions of an EvalData (the validation score)."""
    import torch

    from asymvlm.merging.api import recall_at_1

    levels = torch.as_tensor(data.levels)
    rows = levels == levels.max()
    return recall_at_1(head, data.text_embeddings[rows], data.image_embeddings, data.text_image_index[rows])


def _specific_log_p(head, data) -> float:
    """Mean log p(correct image | text) of the most specific captions of an EvalData under the head's
    retrieval distribution over its images (correct: the caption's image and every image with an
    identical caption): the validation tie-break, the likelihood ``asymvlm-merge --select_by
    likelihood`` selects by (:func:`asymvlm.merging.api.likelihood_metric`)."""
    import torch

    from asymvlm.merging.api import caption_positives, retrieval_log_prob

    levels = torch.as_tensor(data.levels)
    rows = levels == levels.max()
    index = torch.as_tensor(data.text_image_index)[rows]
    captions = None if data.captions is None else [c for c, r in zip(data.captions, rows.tolist()) if r]
    positives = caption_positives(index, data.image_embeddings.shape[0], captions)
    return float(retrieval_log_prob(head, data.text_embeddings[rows], data.image_embeddings, positives).mean())


def _choose(recipe: str, tried: list[dict[str, Any]]) -> int:
    """The grid point a recipe keeps: the best validation R@1, ties broken by the validation
    likelihood (``val_log_p``), then by grid order. A grid whose R@1 did not move at all
    (:func:`asymvlm.merging.api.is_flat`) is said in one line: the likelihood chose."""
    from asymvlm.merging.api import is_flat

    def key(i: int) -> tuple[float, float]:
        lp = tried[i]["val_log_p"]
        return tried[i]["val"], (lp if math.isfinite(lp) else float("-inf"))

    best = 0
    for i in range(1, len(tried)):
        if key(i) > key(best):  # strict: the first of equal points wins
            best = i
    if is_flat([t["val"] for t in tried]):
        _say(
            f"      warning: {recipe}: validation R@1 is the same ({tried[best]['val']:.3f}) for every grid point; "
            f"chosen by validation log-likelihood ({_grid_label(tried[best]['options'])})"
        )
    return best


def _federated_table(spec: tuple[str, str], s: dict, out: Path, seed: int, val) -> tuple[list[dict], dict]:
    """Every recipe of the grid on one non-IID federation, plus two references at the same budget.

    Clients train the head (learned mean direction: the part of the model where client drift can
    hurt retrieval) on cached embeddings; images are split by a Dirichlet(0.1) skew over the first
    object's shape (most clients see mostly one or two shapes). The references see the same number
    of examples with the same local optimizer: ``centralized`` is one client holding all the data
    (rounds x clients x local steps sequential steps), ``fedavg-iid`` FedAvg on an IID split.
    Returns the table rows and the chosen models (AsymVLM objects, by row name).
    """
    from asymvlm.config import DataArguments, HeadArguments
    from asymvlm.federated.config import FederatedArguments
    from asymvlm.federated.data import get_federated_data
    from asymvlm.federated.rounds import run_federated
    from asymvlm.merging.api import is_flat
    from asymvlm.model import AsymVLM

    data_args = DataArguments(
        dataset=s["dataset"], encoder=spec[0], pretrained=spec[1], train_images=s["train_images"], data_seed=seed,
        eval_images=0, caption_styles=s["caption_styles"],
    )  # fmt: skip
    head = HeadArguments(hidden_dims=list(s["fed_hidden"]), direction="learned")
    common = dict(
        rounds=s["rounds"], local_steps=s["local_steps"], local_batch_size=s["local_batch"], local_lr=0.2,
        local_momentum=0.9, trainable="head", eval_every=0, seed=seed, progress=False, overwrite=True,
    )  # fmt: skip
    k = s["clients"]
    setups = {
        "centralized": dict(num_clients=1, partition="iid", local_steps=s["local_steps"] * k),
        "fedavg-iid": dict(num_clients=k, partition="iid"),
        "non-iid": dict(num_clients=k, **FED_PARTITION),
    }
    datasets: dict[str, Any] = {}
    rows: list[dict] = []
    models: dict[str, Any] = {}

    def run(name: str, setup: str, recipe: str, options: dict[str, Any]) -> tuple[Any, float, float, float]:
        fed = FederatedArguments(
            **{**common, **setups[setup]}, recipe=recipe, output_dir=str(out / "federated" / name)
        )  # fmt: skip
        if setup not in datasets:
            datasets[setup] = get_federated_data(data_args, fed)
        t = time.time()
        _, model = run_federated(fed, datasets[setup], head=head, recipe_options=options)
        model.head.eval()
        asym = AsymVLM(model.head, logit_scale=float(model.loss_fn.logit_scale.detach()))
        score, log_p = _specific_r1(asym.head, val), _specific_log_p(asym.head, val)
        finite = [x if math.isfinite(x) else float("-inf") for x in (score, log_p)]
        return asym, finite[0], finite[1], time.time() - t

    grid = QUICK_FED_GRID if s["quick"] else FED_GRID
    for name, setup in (("centralized", "centralized"), ("fedavg-iid", "fedavg-iid")):
        asym, score, log_p, sec = run(name, setup, "fedavg", {})
        models[name] = asym
        point = dict(options={}, val=score, val_log_p=log_p)
        rows.append(dict(name=name, recipe="fedavg", setup=setup, chosen={}, grid=[point], val_flat=False))
        _say(f"      {name:<12} val R@1 {score:.3f} log p {log_p:.3f} ({sec:.0f} s)")
    for recipe, options_grid in grid.items():
        tried, runs = [], []
        for i, options in enumerate(options_grid):
            asym, score, log_p, sec = run(f"{recipe}-{i}", "non-iid", recipe, options)
            tried.append(dict(options=options, val=score, val_log_p=log_p))
            runs.append(asym)
            _say(f"      {recipe:<12} {_grid_label(options):<28} val R@1 {score:.3f} log p {log_p:.3f} ({sec:.0f} s)")
        best = _choose(recipe, tried)
        models[recipe] = runs[best]
        rows.append(dict(name=recipe, recipe=recipe, setup="non-iid", chosen=options_grid[best], grid=tried,
                         val_flat=is_flat([t["val"] for t in tried])))  # fmt: skip
    return rows, models


def federated_table(rows: list[dict], level: int) -> str:
    """The federated recipe table as text: chosen hyperparameters, validation and test scores."""
    lines = [
        f"{'federated':<12}{'server hyperparameters (chosen)':<34}{'grid':>5}{'val R@1':>9}{f'R@1 L{level}':>9}"
        f"{'amb. rho':>10}"
    ]
    for r in rows:
        label = _grid_label(r["chosen"]) if r["setup"] == "non-iid" else f"reference ({r['setup']})"
        lines.append(
            f"{r['name']:<12}{label:<34}{len(r['grid']):>5}{max(g['val'] for g in r['grid']):>9.3f}"
            f"{r['test_t2i_R@1_most_specific']:>9.3f}{r['test_uncertainty_ambiguity_spearman']:>10.3f}"
        )
    lines.append(
        f"val R@1 / R@1 L{level}: exact t2i R@1 of level-{level} captions on the validation / test images "
        "(chance 1/images); centralized: one client with all the data, the same examples and local optimizer."
    )
    return "\n".join(lines)


EPILOG = """examples:
  asymvlm-demo                                   # the full run (about 5 minutes with the toy CLIP built)
  asymvlm-demo --quick --output_dir demo-quick   # the smoke version (about a minute)
  asymvlm-demo --steps 800 --rounds 30 --clients 16 --output_dir demo-big
"""


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``asymvlm-demo`` (flags spelled with underscores or dashes; no abbreviations)."""
    from asymvlm.cli import make_parser, summary

    p = make_parser("asymvlm-demo", summary(__doc__), EPILOG)
    p.add_argument("--output_dir", default="demo-out", help="report.json, metrics.json, the plots and every run.")
    p.add_argument("--quick", action="store_true", help="A small smoke version (a smaller toy CLIP; < 2 minutes).")
    p.add_argument("--train_images", type=int, default=None, help="Training images (default 8000; --quick 1500).")
    p.add_argument("--eval_images", type=int, default=None, help="Held-out images (default 1000; --quick 300).")
    p.add_argument("--steps", type=int, default=None, help="Central training steps per head (default 400; --quick 60).")
    p.add_argument("--rounds", type=int, default=None, help="Federated rounds per recipe (default 16; --quick 4).")
    p.add_argument("--clients", type=int, default=8, help="Federated clients.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the data splits and the runs.")
    p.add_argument(
        "--world", type=int, default=3, choices=(2, 3),
        help="ShapeWorld version (3, the default: scenes of 1-3 objects with relations, its own toy CLIP; "
        "2: the earlier one-object world).",
    )  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> int:
    """``asymvlm-demo``; returns the exit status (2 for a user error, printed as one line)."""
    from asymvlm.cli import run

    return run("asymvlm-demo", _main, argv)


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from asymvlm.errors import ConfigError

    for name in ("train_images", "eval_images", "steps", "rounds"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name} must be >= 1, got {value}")
    if args.clients < 2:
        raise ConfigError(f"--clients must be >= 2 (a federation), got {args.clients}")
    if args.seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {args.seed}")
    start = time.time()
    s = _settings(args)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def lap(name: str, t: float) -> None:
        timings[name] = round(time.time() - t, 1)
        _say(f"      done in {timings[name]:.0f} s")

    import torch

    from asymvlm.model import AsymVLM
    from asymvlm.toyclip import cache_root

    torch.manual_seed(args.seed)
    _say("[1/6] toy CLIP (built and cached on first use) and the embedding caches")
    t = time.time()
    encoder, spec = _encoder(s["toy_steps"], s["world"])
    from asymvlm.config import DataArguments
    from asymvlm.data import cache_for_config

    train_cache = cache_for_config(
        DataArguments(
            dataset=s["dataset"],
            encoder=spec[0],
            pretrained=spec[1],
            train_images=s["train_images"],
            data_seed=args.seed,
            caption_styles=s["caption_styles"],
        ),  # fmt: skip
        encoder,
    )
    from asymvlm import shapeworld as sw
    from asymvlm.eval.benchmark import evaluate, shapeworld_eval_data, specific_table

    # heads are trained and evaluated on the captions the toy CLIP was pretrained on
    world = dict(
        caption_styles=tuple(s["caption_styles"].split(",")), visual_styles=sw.VISUAL_STYLES, version=s["world"]
    )
    eval_data = shapeworld_eval_data(encoder, n=s["eval_images"], seed=12345, **world)
    domains = _domain_caches(encoder, s["domain_images"], args.seed + 1, cache_root() / "caches", s["world"])
    lap("caches", t)

    _say(f"[2/6] central heads (vMF, PS): {s['steps']} steps, batch {s['batch']}")
    t = time.time()
    central = {f: _train_head(train_cache.path, out / f"central-{f}", s, f, args.seed) for f in ("vmf", "ps")}
    lap("central", t)

    _say(
        f"[3/6] federated: {s['clients']} clients (Dirichlet(0.1) shape skew), head with a learned mean, "
        f"{s['rounds']} rounds x {s['local_steps']} local steps; server hyperparameters chosen on validation"
    )
    t = time.time()
    val_data = shapeworld_eval_data(encoder, n=s["val_images"], seed=777, **world)
    fed_rows, fed_models = _federated_table(spec, s, out, args.seed, val_data)
    lap("federated", t)

    _say(
        f"[4/6] merging: a base head with a learned mean on {'/'.join(MERGE_BASE_STYLES[s['world']])} captions, "
        f"one expert per caption style the base never saw ({', '.join(MERGE_DOMAINS[s['world']])}), dense and "
        "TaLoS; merges"
    )
    t = time.time()
    from asymvlm.batching import IndexBatcher
    from asymvlm.cache import EmbeddingCache
    from asymvlm.merging.api import FlatCriterionError, merge
    from asymvlm.merging.talos import calibrate_mask, save_masks

    familiar = ",".join(MERGE_BASE_STYLES[s["world"]])
    doms = MERGE_DOMAINS[s["world"]]
    base_cache = cache_for_config(
        DataArguments(
            dataset=s["dataset"], encoder=spec[0], pretrained=spec[1], train_images=s["train_images"],
            data_seed=args.seed, caption_styles=familiar,
        ),
        encoder,
    )  # fmt: skip
    base = _train_head(base_cache.path, out / "merge-base", s, "vmf", args.seed, direction="learned")
    base_model = AsymVLM.from_pretrained(base, load_encoder=False)
    experts: dict[str, list[Path]] = {"dense": [], "talos": []}

    def expert(kind: str, d: str, **extra: Any) -> Path:
        return _train_head(
            domains[d]["train"], out / "experts" / f"{kind}-{d}", s, "vmf", args.seed,
            init_from=str(base), steps=s["expert_steps"], direction="learned", progress=False, **extra,
        )  # fmt: skip

    for d in doms:
        experts["dense"].append(expert("dense", d))
        c = EmbeddingCache.load(domains[d]["train"])
        batcher = IndexBatcher(
            c.text_embeddings.float(), c.image_embeddings.float(), c.text_image_index, 256, args.seed
        )
        masks = calibrate_mask(base_model, batcher, 0.9, 4, num_batches=4)  # leaves the model as it was
        mask_file = save_masks(masks, out / "experts" / f"talos-mask-{d}.safetensors", {"sparsity": 0.9, "rounds": 4})
        experts["talos"].append(expert("talos", d, mask_file=str(mask_file)))
        _say(f"      experts for {d}: dense and TaLoS (90% of the weights frozen)")

    def test_r1(model_dir: Path, styles: tuple[str, ...] = doms) -> dict[str, float]:
        """Exact R@1 of a saved head on the test split of each style."""
        head = AsymVLM.from_pretrained(model_dir, load_encoder=False).head
        return {d: _r1(head, domains[d]["test"]) for d in styles}

    base_r1 = test_r1(base)
    # each expert on its own style's test split, once per expert family
    expert_r1 = {fam: {d: test_r1(e, (d,))[d] for d, e in zip(doms, paths)} for fam, paths in experts.items()}
    grid = [0.25, 0.5, 0.75, 1.0]
    val = [domains[d]["val"] for d in doms]
    merged: dict[str, dict[str, Any]] = {}
    for name, family, method, opts in (
        ("task_arithmetic", "dense", "task_arithmetic", {}),
        ("ties", "dense", "ties", {"density": 0.2}),
        ("dare_ties", "dense", "dare_ties", {"p": 0.9, "seed": args.seed}),
        ("talos", "talos", "talos", {}),
    ):
        target = out / "merged" / name
        try:  # lambda by validation R@1 (the heads' mean is learned: R@1 moves with lambda)
            rep = merge(base, experts[family], target, method, lam_grid=grid, val=val, select_by="r1", **opts)
        except FlatCriterionError:  # R@1 the same for every lambda: the likelihood decides
            _say(f"      warning: {name}: validation R@1 is the same for every lambda; lambda chosen by likelihood")
            rep = merge(base, experts[family], target, method, lam_grid=grid, val=val, select_by="likelihood", **opts)
        r1, ex = test_r1(target), expert_r1[family]
        norm = {d: r1[d] / ex[d] if ex[d] > 0 else float("nan") for d in doms}
        merged[name] = {
            "lam": rep["lam"], "R@1": r1, "expert_R@1": ex, "base_R@1": base_r1, "normalized_R@1": norm,
            "mean_normalized_R@1": sum(norm.values()) / len(norm), "lambda_curve": rep["lambda_search"]["curve"],
            "lambda_selected_by": rep["lambda_search"]["criterion"],
        }  # fmt: skip
    lap("experts_and_merges", t)

    _say("[5/6] evaluation on held-out ShapeWorld (CLIP baseline, central, federated, merged)")
    t = time.time()
    models = {f: AsymVLM.from_pretrained(d, load_encoder=False) for f, d in central.items()}
    models.update({f"merged-{k}": AsymVLM.from_pretrained(out / "merged" / k, load_encoder=False) for k in merged})
    models.update({f"fed-{k}": m for k, m in fed_models.items()})
    metrics = evaluate(eval_data, models)
    # does each central head know when its answer is right: p_correct calibrated on a fresh split of
    # the test gallery's size, judged on the test split; captions in the styles the toy CLIP never saw
    # are the unfamiliar texts
    from asymvlm.eval.confidence import calibrate_on, confidence_report

    calib_data = shapeworld_eval_data(encoder, n=s["eval_images"], seed=778, **world)
    unseen = tuple(st for st in sw.CAPTION_STYLES if st not in world["caption_styles"])
    ood = shapeworld_eval_data(encoder, n=max(50, s["eval_images"] // 3), seed=12346,
                               **{**world, "caption_styles": unseen}).text_embeddings  # fmt: skip
    confidence = {}
    for f in central:
        m = models[f]
        conf = calibrate_on(m, calib_data, source=f"a fresh split of {s['eval_images']} scenes")
        confidence[f] = confidence_report(m, eval_data, confidence=conf, ood_texts=ood, keep_outcomes=True)
    lap("evaluation", t)

    _say("[6/6] report")
    from asymvlm.eval.plots import plot_federated, plot_report
    from asymvlm.io import atomic_write_json, json_safe

    top = int(eval_data.levels.max())
    report = {
        "uncertainty_ambiguity_spearman": {f: metrics[f]["uncertainty_ambiguity_spearman"] for f in ("vmf", "ps")},
        "r1_uncertainty_pearson": {f: metrics[f]["bin_pearson"] for f in ("vmf", "ps")},
        "r1_uncertainty_spearman": {f: metrics[f]["bin_spearman"] for f in ("vmf", "ps")},
        "t2i_r1": {m: metrics[m]["t2i_R@1"] for m in ("clip", "vmf", "ps")},
        "i2t_r1": {m: metrics[m]["i2t_R@1"] for m in ("clip", "vmf", "ps")},
        "consistent_t2i_r1": {m: metrics[m]["consistent_t2i_R@1"] for m in ("clip", "vmf", "ps")},
        # the most specific level: exact t2i and i2t (captions of that level only, identical texts as one)
        "t2i_r1_most_specific": {m: metrics[m][f"t2i_R@1_level{top}"] for m in ("clip", "vmf", "ps")},
        "i2t_r1_most_specific": {m: metrics[m][f"i2t_R@1_level{top}"] for m in ("clip", "vmf", "ps")},
        "world_version": s["world"],
        # the federated table: test metrics of each recipe's validation-chosen run (rows "centralized"
        # and "fedavg-iid" are the references at the same budget); t2i R@1 = all levels, as above
        "federated_t2i_r1": {r["name"]: metrics[f"fed-{r['name']}"]["t2i_R@1"] for r in fed_rows},
        "federated_t2i_r1_most_specific": {
            r["name"]: metrics[f"fed-{r['name']}"][f"t2i_R@1_level{top}"] for r in fed_rows
        },
        "federated_uncertainty_ambiguity_spearman": {
            r["name"]: metrics[f"fed-{r['name']}"]["uncertainty_ambiguity_spearman"] for r in fed_rows
        },
        "federated_table": [
            {
                **r,
                "test_t2i_R@1_most_specific": metrics[f"fed-{r['name']}"][f"t2i_R@1_level{top}"],
                "test_uncertainty_ambiguity_spearman": metrics[f"fed-{r['name']}"]["uncertainty_ambiguity_spearman"],
            }
            for r in fed_rows
        ],
        "merged_normalized_r1": {k: v["mean_normalized_R@1"] for k, v in merged.items()},
        "merged_uncertainty_ambiguity_spearman": {
            k: metrics[f"merged-{k}"]["uncertainty_ambiguity_spearman"] for k in merged
        },
        "merges": merged,
        "uncertainty_by_level": {f: metrics[f]["uncertainty_by_level"] for f in ("vmf", "ps")},
        # p_correct and the parts of each central head's uncertainty (asymvlm.eval.confidence)
        "confidence": {f: {k: v for k, v in r.items() if k != "outcomes"} for f, r in confidence.items()},
        "settings": {**s, "quick": args.quick, "seed": args.seed, "encoder": spec[0]},
        "provenance": provenance(encoder, args.seed, _toy_clip_dir(s["toy_steps"], s["world"])),
        "timings": timings,
        "seconds": round(time.time() - start, 1),
    }
    atomic_write_json(json_safe(report), out / "report.json")
    atomic_write_json(json_safe({"metrics": metrics}), out / "metrics.json")
    main_models = ["clip", *central, *(f"merged-{k}" for k in merged)]
    label = (
        "true ambiguity of the caption (probability that a scene satisfies it)"
        if s["world"] == 3
        else "true ambiguity of the caption (consistent attribute combinations)"
    )
    plots = plot_report(
        {k: metrics[k] for k in main_models}, out, level_ambiguity=sw.level_ambiguity(s["world"]), ambiguity_label=label
    )
    plots.append(plot_federated(report["federated_table"], out / "federated.png", top))
    from asymvlm.eval.plots import plot_reliability, plot_risk_coverage

    o = confidence["vmf"]["outcomes"]
    rows = o["levels"] == top
    plots.append(
        plot_risk_coverage(
            {k: (v[rows], o["correct"][rows]) for k, v in o["scores"].items()},
            out / "risk_coverage_specific.png",
            title=f"central vMF: level-{top} captions (most specific)",
        )
    )
    plots.append(
        plot_reliability(
            o["p_correct"].clamp(0, 1), o["correct"], out / "reliability.png", title="central vMF: p_correct"
        )
    )
    _say("")
    _say(specific_table(metrics, main_models, eval_data))
    _say("")
    _say(federated_table(report["federated_table"], top))
    _say("")
    by_level = "; ".join(
        f"{f}: " + ", ".join(f"{u:.4f}" for u in report["uncertainty_by_level"][f]) for f in ("vmf", "ps")
    )
    _say(f"mean uncertainty by caption level (vague -> exact): {by_level}")
    from asymvlm.eval.confidence import confidence_table

    _say("")
    _say("central vMF: does it know when its answer is right?")
    _say(confidence_table(confidence["vmf"]))
    _say(
        "merged (mean normalised R@1 over the caption styles): "
        + ", ".join(f"{k} {v['mean_normalized_R@1']:.3f} (lam {v['lam']})" for k, v in merged.items())
    )
    _say(f"wrote {out / 'report.json'}, {out / 'metrics.json'}" + "".join(f", {q.name}" for q in plots))
    _say(f"done in {report['seconds']:.0f} s")
    if not all(math.isfinite(v) for v in report["uncertainty_ambiguity_spearman"].values()):
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
