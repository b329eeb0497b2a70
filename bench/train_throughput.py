"""Head-training throughput on cached embeddings (d = 512, batch 2048, the paper's head).

Three ways to run the same optimisation, in one process, on the same synthetic cache
(``--images`` unit image vectors, 5 captions each):

(a) asymvlm's loop: ``asymvlm.training.loop.train`` (accelerate, index-drawn batches, logging);
    samples/s measured over its steps from its own log;
(b) the reference pattern transcribed: a ``torch.utils.data.Dataset`` whose ``__getitem__``
    looks the caption's image up in a dict, batched by a shuffling ``DataLoader``;
(c) a pure compute loop on batches built before timing (the practical limit).

All three use the same head, loss and SGD step. Prints samples/s and the ratios (a)/(c) and
(a)/(b).

Then the loop (a) with the default optimizer (AdamW, fused kernel) at batches ``--batches`` in
float32 and bf16 autocast (``--precisions``), each against this machine's floor: the head's GEMM
FLOPs per sample (:func:`head_train_flops`) at the rate of one large GEMM in that dtype measured in
the same run (:func:`gemm_floor`). ``--compile`` adds the same rows with ``compile=True`` and the
compilation's seconds.

Run:  python bench/train_throughput.py [--steps 20] [--images 20000] [--quick] [--json PATH]
      python bench/train_throughput.py --batches 256,1024,2048 --precisions no,bf16 --compile
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from _common import Results, best_seconds

from asymvlm import AsymVLMLoss, TextHead, parameter_groups, positives_from_ids
from asymvlm.cache import write_cache
from asymvlm.heads import HeadConfig
from asymvlm.training.config import TrainConfig, optimizer_kernel
from asymvlm.training.loop import train


def head_train_flops(head_config: HeadConfig, batch: int) -> float:
    """GEMM FLOPs per training sample of a head (trainable=head) on cached embeddings at ``batch``.

    Each Linear ``a -> b`` costs ``2ab`` forward, ``2ab`` for its weight gradient and ``2ab`` for its
    input gradient, except the first layer, whose input (the frozen embedding) needs none. The
    logits ``loc @ images.T`` cost ``2 * batch * d`` per sample forward; with ``direction="learned"``
    the backward adds ``2 * batch * d`` (gradient to ``loc``; the images are frozen). With
    ``direction="frozen"`` (the default) ``loc`` is the input, so the logits GEMM has no backward,
    but the whole MLP still runs (the concentration is ``|eta|``). Element-wise work (bias, ReLU,
    softmax, the normaliser, the optimizer) is left out: it is the floor's missing part.

    Example:
        >>> head_train_flops(HeadConfig(dim=512), 256) / 1e6  # the paper's head, 512-1024x3-512
        18.087936
    """
    c = head_config
    widths = (c.dim, *c.hidden_dims, c.dim)
    mlp = sum(6 * a * b for a, b in zip(widths[:-1], widths[1:])) - 2 * widths[0] * widths[1]
    logits = 2 * batch * c.dim * (2 if c.direction == "learned" else 1)
    return float(mlp + logits)


def gemm_floor(dtype: torch.dtype = torch.float32, n: int = 4096, repeat: int = 3) -> float:
    """FLOP/s of one ``n x n x n`` ``torch.mm`` in ``dtype`` on the CPU (best of ``repeat`` after a
    warm-up): the rate no training step of GEMMs can beat on this machine.

    Example:
        >>> gemm_floor(torch.float32, n=64, repeat=1) > 0
        True
    """
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    return 2.0 * n**3 / best_seconds(lambda: torch.mm(a, b), repeat)


def make_cache(path: Path, images: int, d: int) -> None:
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(images, d, generator=g), dim=-1)
    idx = torch.arange(images).repeat_interleave(5)
    txt = torch.nn.functional.normalize(img[idx] + 0.5 * torch.randn(idx.numel(), d, generator=g), dim=-1)
    write_cache(path, img, txt, idx, dtype="float32")


def step_fn(d: int):
    torch.manual_seed(0)
    head, loss_fn = TextHead(dim=d, validate=False), AsymVLMLoss()
    kernel = optimizer_kernel("auto", "cpu")  # the loop's (fused SGD is bit-identical to for-loop)
    opt = torch.optim.SGD(parameter_groups([head, loss_fn], 5e-4), lr=1e-2, momentum=0.9, **kernel)

    def step(text, images, ids):
        loss = loss_fn(head(text), images, positives_from_ids(ids, ids))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


class ReferenceDataset(torch.utils.data.Dataset):
    """The reference code's pattern: one item per caption, the image found through a dict."""

    def __init__(self, text, images, owner):
        self.text = text
        self.owner = owner.tolist()
        self.image_of = {i: images[i] for i in range(images.shape[0])}

    def __len__(self):
        return self.text.shape[0]

    def __getitem__(self, i):
        o = self.owner[i]
        return self.text[i], self.image_of[o], o


def run_loop(work: Path, run: str, steps: int, batch: int, **options) -> tuple[float, float]:
    """asymvlm's loop end to end on ``work/cache``: (samples/s over the steps after two warm-up
    steps, from its log's timestamps; seconds of the first step, compilation included)."""
    cfg = TrainConfig.from_dict(
        dict(
            cache_dir=str(work / "cache"),
            max_steps=steps + 2,
            batch_size=batch,
            save_every=0,
            output_dir=str(work / run),
            progress=False,
            log_with="none",
            log_every=1,
            eval_every=-1,
            fit_confidence=False,
            **options,
        )
    )
    train(cfg)
    log = [json.loads(line) for line in (work / run / "train_log.jsonl").read_text().splitlines()]
    return steps * batch / (log[-1]["seconds"] - log[1]["seconds"]), log[0]["seconds"]


def floor_rows(args, work: Path, results: Results) -> None:
    """The loop with AdamW (the default, fused kernel) per batch and precision (and compiled), each
    against the floor: the head's GEMM FLOPs at the rate of a large GEMM in that dtype."""
    head = HeadConfig(dim=args.dim)
    dtypes = {"no": torch.float32, "bf16": torch.bfloat16}
    cases = [(b, p, c) for b in args.batches for p in args.precisions for c in (False, True)[: 1 + args.compile]]
    size = 2048 if args.quick else 4096
    floors = {p: gemm_floor(dtypes[p], size) for p in args.precisions}
    speed: dict = {case: 0.0 for case in cases}
    first: dict = {case: 0.0 for case in cases}  # the slowest first step: compilation, once per process
    for k in range(args.repeat):  # interleaved, best of `repeat`: the machine's noise hits all alike
        for case in cases:
            b, p, c = case
            rate, seconds = run_loop(work, f"floor-{b}-{p}-{c}-{k}", args.steps, b, mixed_precision=p, compile=c)
            speed[case], first[case] = max(speed[case], rate), max(first[case], seconds)
    floors = {p: max(floors[p], gemm_floor(dtypes[p], size)) for p in args.precisions}  # the better of before/after
    for b, p, c in cases:
        flops = head_train_flops(head, b)
        floor = floors[p] / flops
        name = f"AdamW, batch {b}, {'float32' if p == 'no' else p}{', compiled' if c else ''}"
        print(
            f"  {name:<36} {speed[b, p, c]:>9.0f} samples/s   {speed[b, p, c] / floor:.2f}x of floor "
            f"({floor:.0f}/s = {floors[p] / 1e9:.0f} GFLOP/s / {flops / 1e6:.1f} MFLOP)   "
            f"first step {first[b, p, c]:.1f} s"
        )
        results.add(
            f"asymvlm training loop, paper head, {name} vs the GEMM floor",
            speed[b, p, c],
            floor,
            "samples/s",
            higher_is_better=True,
            inputs=f"d={args.dim}, {args.steps} steps, best of {args.repeat}",
            gemm_flops_per_s=floors[p],
            flops_per_sample=flops,
            first_step_s=first[b, p, c],
        )
    results.note(
        f"floor = the rate of one {size}^3 torch.mm in the row's dtype, measured in the same run, divided by the "
        "head's GEMM FLOPs per sample (bench/train_throughput.head_train_flops); the ratio: the fraction reached."
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="5 steps of batch 512 on 2000 images, best of 2")
    parser.add_argument("--json", default=None, help="write the result rows to this JSON file")
    parser.add_argument("--batches", default="256,1024,2048", help="batches of the floor rows (comma-separated)")
    parser.add_argument("--precisions", default="no,bf16", help="mixed_precision values of the floor rows")
    parser.add_argument("--compile", action="store_true", help="also the floor rows with compile=True")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.images, args.batch, args.repeat, args.batches = 5, 2000, 512, 2, "256"
    args.batches = [int(x) for x in args.batches.split(",")]
    args.precisions = args.precisions.split(",")
    n, b, d = args.steps, args.batch, args.dim
    work = Path(tempfile.mkdtemp())
    make_cache(work / "cache", args.images, d)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; d={d}, batch={b}, {n} steps, "
        f"head 512->1024x3->512"
    )

    from asymvlm.cache import EmbeddingCache

    cache = EmbeddingCache.load(work / "cache")
    text, images, owner = cache.text_embeddings.float(), cache.image_embeddings.float(), cache.text_image_index

    def run_ours(k: int) -> float:
        """(a) our loop, end to end, with the same SGD as (b) and (c)."""
        return run_loop(work, f"run{k}", n, b, optimizer="sgd", lr=1e-2, momentum=0.9)[0]

    def run_reference() -> float:
        """(b) Dataset + DataLoader."""
        step = step_fn(d)
        loader = torch.utils.data.DataLoader(
            ReferenceDataset(text, images, owner),
            batch_size=b,
            shuffle=True,
            drop_last=True,
            generator=torch.Generator().manual_seed(0),
        )
        it = iter(loader)
        step(*next(it))  # warm-up
        start = time.perf_counter()
        done = 0
        while done < n:
            try:
                batch = next(it)
            except StopIteration:
                it = iter(loader)
                continue
            step(*batch)
            done += 1
        return n * b / (time.perf_counter() - start)

    def run_limit() -> float:
        """(c) pure compute on pre-built batches."""
        step = step_fn(d)
        g = torch.Generator().manual_seed(1)
        batches = []
        for _ in range(n + 1):
            rows = torch.randint(0, text.shape[0], (b,), generator=g)
            batches.append((text[rows], images[owner[rows]], owner[rows]))
        step(*batches[0])
        start = time.perf_counter()
        for bt in batches[1:]:
            step(*bt)
        return n * b / (time.perf_counter() - start)

    # alternate the three, best of `repeat` each: the machine's noise hits them alike
    results = {"a": [], "b": [], "c": []}
    for k in range(args.repeat):
        results["a"].append(run_ours(k))
        results["b"].append(run_reference())
        results["c"].append(run_limit())
    ours, reference, limit = (max(results[x]) for x in "abc")

    print(
        f"  (a) asymvlm training loop        {ours:>9.0f} samples/s   {ours / limit:.2f}x of (c), "
        f"{ours / reference:.2f}x of (b)"
    )
    print(f"  (b) Dataset + DataLoader         {reference:>9.0f} samples/s   {reference / limit:.2f}x of (c)")
    print(f"  (c) pure compute, prebuilt       {limit:>9.0f} samples/s   1.00x")
    results = Results("train_throughput", "Head-training throughput on cached embeddings")
    inputs = f"d={d}, batch={b}, {n} steps, best of {args.repeat}"
    results.add(
        "asymvlm training loop vs (b) Dataset + DataLoader (reference pattern)",
        ours,
        reference,
        "samples/s",
        higher_is_better=True,
        inputs=inputs,
    )
    results.add(
        "asymvlm training loop vs (c) pure compute on prebuilt batches (the limit)",
        ours,
        limit,
        "samples/s",
        higher_is_better=True,
        inputs=inputs,
    )
    results.note("(c) is the practical limit, not a competitor: a ratio near 1 means the loop adds little overhead.")
    floor_rows(args, work, results)
    results.write(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
