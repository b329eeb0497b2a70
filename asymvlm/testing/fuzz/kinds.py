"""The artefact kinds whose files are mutated: how each builds a small valid artefact and loads it
the way the package does (model folder, training and federated checkpoints, gallery, embedding
cache, task vector, merge output). Flower replies are :mod:`asymvlm.testing.fuzz.replies`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from .mutations import (
    NOT_MUTATED,
    apply_json,
    apply_safetensors,
    apply_symlink,
    json_mutations,
    read_tensors,
    safetensors_mutations,
)
from .outcomes import Mutation, first_difference, same

__all__ = [
    "write_tiny_cache",
    "Kind",
    "ModelKind",
    "TrainingCheckpointKind",
    "FederatedCheckpointKind",
    "GalleryKind",
    "CacheKind",
    "TaskVectorKind",
    "MergeOutputKind",
]


def _unit(n: int, d: int, g: Any) -> Any:
    import torch

    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)


def _fingerprint(seed: int) -> str:
    import hashlib

    return hashlib.sha256(f"asymvlm-fuzz-encoder-{seed}".encode()).hexdigest()


def write_tiny_cache(path: Path, n_images: int, seed: int, dim: int = 8, extras: bool = False) -> Path:
    """A small embedding cache (two captions per image; ``extras``: captions, encoder, caption_meta)."""
    import torch

    from asymvlm.cache import write_cache

    g = torch.Generator().manual_seed(seed)
    img = _unit(n_images, dim, g)
    idx = torch.arange(n_images).repeat_interleave(2)
    txt = torch.nn.functional.normalize(img[idx] + 0.3 * torch.randn(2 * n_images, dim, generator=g), dim=-1)
    kwargs: dict[str, Any] = {}
    if extras:
        kwargs = dict(
            captions=[f"caption {i} of image {int(j)}" for i, j in enumerate(idx)],
            encoder={"spec": "open_clip:fuzz-encoder", "pretrained": None, "fingerprint": _fingerprint(seed)},
            dataset_fingerprint=f"fuzz-data-{seed}",
            caption_meta={"level": [i % 3 for i in range(2 * n_images)],
                          "ambiguity": [1.0 + i % 2 for i in range(2 * n_images)]},
        )  # fmt: skip
    write_cache(path, img, txt, idx, **kwargs)
    return path


def _model_snapshot(directory: Path) -> dict[str, Any]:
    from asymvlm.model import AsymVLM

    m = AsymVLM.from_pretrained(directory, load_encoder=False)
    return {
        "head": m.head.config.to_dict(),
        "state": {k: v.detach().clone() for k, v in m.head.state_dict().items()},
        "logit_scale": m.logit_scale,
        "encoder": m.encoder_source,
        "lineage": m.lineage,
        "text_base_delta": {k: v.clone() for k, v in (m.text_base_delta or {}).items()},
        "adapts_text_tower": m.adapts_text_tower,
    }


def _tensor_file(path: Path) -> dict[str, Any]:
    return read_tensors(path)[0]


class Kind:
    """An artefact kind: how to build a valid one, which files to mutate, and how the package loads it."""

    name = ""
    description = ""
    files: tuple[str, ...] = ()  # mutable files (relative); subclasses may compute them
    folders: tuple[str, ...] = ()  # sub-folders that get symlink_outside too
    optional: frozenset[str] = frozenset()  # files an artefact may lack (no missing_file mutation)

    def support(self, directory: Path) -> None:
        """What every artefact of the kind shares (base checkpoints, caches); built once."""

    def build(self, dest: Path, seed: int, support: Path) -> None:
        raise NotImplementedError

    def load(self, art: Path, work: Path, support: Path, mutation: Mutation | None) -> Any:
        """Load ``art`` as the package does; returns a comparable snapshot (tensors, config)."""
        raise NotImplementedError

    def mutable_files(self, art: Path) -> list[str]:
        return [f for f in self.files if (art / f).is_file()]

    def mutations(self, art: Path, support: Path, baseline: Any) -> list[Mutation]:
        out: list[Mutation] = []
        files = self.mutable_files(art)
        for rel in files:
            opt = rel in self.optional
            if rel.endswith(".json"):
                out += json_mutations(self.name, rel, art, opt)
            elif rel.endswith(".safetensors"):
                out += safetensors_mutations(self.name, rel, art, opt)
        for rel in [*files, *self.folders]:
            if (art / rel).exists():
                out.append(Mutation(self.name, rel, "<entry>", "symlink_outside"))
        return out

    def apply(self, m: Mutation, art: Path, variant: Path) -> None:
        if m.op == "symlink_outside":
            apply_symlink(m, art, variant)
        elif m.file.endswith(".json"):
            apply_json(m, art, variant)
        elif m.file.endswith(".safetensors"):
            apply_safetensors(m, art, variant)

    def names(self, m: Mutation, message: str) -> bool:
        """Does an error message name what was mutated (the file's or folder's name)?"""
        return Path(m.file).name in message

    def judge(self, m: Mutation, result: Any, baseline: Any, work: Path) -> tuple[str, str]:
        """The outcome of a load that returned ``result``: equal or silent (kinds may refine it)."""
        if same(result, baseline):
            return "equal", ""
        return "silent", first_difference(baseline, result)


class ModelKind(Kind):
    name = "model"
    description = "model folder: asymvlm_config.json + head.safetensors (+ text_base_delta.safetensors)"
    files = ("asymvlm_config.json", "head.safetensors", "text_base_delta.safetensors")

    def build(self, dest: Path, seed: int, support: Path) -> None:
        import torch

        from asymvlm.heads import TextHead
        from asymvlm.model import AsymVLM

        with torch.random.fork_rng():
            torch.manual_seed(seed)
            head = TextHead(dim=8, hidden_dims=(8,), direction="learned")
            delta = {"transformer.proj.weight": torch.randn(4, 4)}
        source = {"spec": "open_clip:fuzz-encoder", "pretrained": None, "fingerprint": _fingerprint(seed), "dim": 8}
        lineage = {"init_from": "fuzz-base", "init_from_fingerprint": _fingerprint(100 + seed)}
        model = AsymVLM(head, logit_scale=1.5 + seed, encoder_source=source, text_base_delta=delta, lineage=lineage)
        model.save_pretrained(dest, card=False)

    def load(self, art, work, support, mutation):
        return _model_snapshot(art)


class TrainingCheckpointKind(Kind):
    name = "training_checkpoint"
    description = "training checkpoint (checkpoints/checkpoint-N/) resumed by asymvlm.training.train"
    CKPT = "checkpoints/checkpoint-00000002"
    folders = (CKPT,)

    def support(self, directory: Path) -> None:
        write_tiny_cache(directory / "cache", 16, seed=0, extras=True)

    def config(self, support: Path, out: Path, seed: int, **kw: Any) -> Any:
        from asymvlm.training.config import TrainConfig

        known = TrainConfig().to_dict()
        base = dict(
            cache_dir=str(support / "cache"), hidden_dims=[8], max_steps=4, batch_size=8, save_every=2, keep_last=2,
            output_dir=str(out), progress=False, log_with="none", optimizer="adamw", lr=1e-2, log_every=1,
            eval_every=-1, seed=seed, fit_confidence=False, **kw,
        )  # fmt: skip
        return TrainConfig.from_dict({k: v for k, v in base.items() if k in known})

    def build(self, dest: Path, seed: int, support: Path) -> None:
        from asymvlm.training.loop import train

        train(self.config(support, dest, seed))  # checkpoints 2 and 4; the artefact is the run killed after 2
        shutil.rmtree(dest / "checkpoints" / "checkpoint-00000004")
        shutil.rmtree(dest / "model")

    def mutable_files(self, art: Path) -> list[str]:
        ckpt = art / self.CKPT
        return sorted(str(p.relative_to(art)) for p in ckpt.iterdir() if p.is_file() and p.name not in NOT_MUTATED)

    def load(self, art, work, support, mutation):
        from asymvlm.training.loop import train

        return _model_snapshot(Path(train(self.config(support, art, 0, resume=True))))


class FederatedCheckpointKind(Kind):
    name = "federated_checkpoint"
    description = "federated round checkpoint (checkpoints/round-N/) resumed by run_federated (FedAdam)"
    ROUND = "checkpoints/round-000002"
    folders = (ROUND,)

    def support(self, directory: Path) -> None:
        write_tiny_cache(directory / "cache", 24, seed=1)

    def run(self, support: Path, out: Path, seed: int, **kw: Any) -> Any:
        from asymvlm.config import DataArguments
        from asymvlm.federated.config import FederatedArguments
        from asymvlm.federated.data import get_federated_data
        from asymvlm.federated.rounds import run_federated
        from asymvlm.heads import HeadConfig

        stop_after = kw.pop("stop_after", None)
        fed = FederatedArguments(
            rounds=3, num_clients=2, local_steps=2, local_batch_size=8, output_dir=str(out), progress=False,
            eval_every=0, local_lr=0.2, recipe="fedadam", seed=seed, **kw,
        )  # fmt: skip
        data = get_federated_data(DataArguments(cache_dir=str(support / "cache")), fed)
        head = HeadConfig(hidden_dims=[8], direction="learned")
        return run_federated(fed, data, head=head, recipe_options={}, stop_after=stop_after)

    def build(self, dest: Path, seed: int, support: Path) -> None:
        self.run(support, dest, seed, stop_after=2)

    def mutable_files(self, art: Path) -> list[str]:
        rnd = art / self.ROUND
        return sorted(str(p.relative_to(art)) for p in rnd.iterdir() if p.is_file() and p.name not in NOT_MUTATED)

    def load(self, art, work, support, mutation):
        state, _ = self.run(support, art, 0, resume=True)
        return {"round": state.round, "params": {k: v.detach().clone() for k, v in state.params.items()}}


class GalleryKind(Kind):
    name = "gallery"
    description = "gallery folder (gallery.json, images/ ImageIndex, thumbnails, captions) opened by Gallery.open"
    files = (
        "gallery.json", "images/index.json", "images/index.safetensors", "thumbnails.safetensors",
        "captions.json", "captions.safetensors",
    )  # fmt: skip
    folders = ("images",)

    def build(self, dest: Path, seed: int, support: Path) -> None:
        import torch

        from asymvlm.serve.indexing import write_gallery

        g = torch.Generator().manual_seed(seed)
        n, d = 6, 8
        write_gallery(
            dest,
            _unit(n, d, g).to(torch.float16),
            ids=[f"img-{seed}-{i}" for i in range(n)],
            thumbnails=[f"thumbnail {seed}-{i}".encode() for i in range(n)],
            thumbnail_format="png",
            thumbnail_size=32,
            captions=[f"caption {seed}-{c}" for c in range(4)],
            caption_embeddings=_unit(4, d, g),
            caption_owners=[[0], [1, 2], [3], [4, 5]],
            caption_truth=[[0, 1], [2], [3], [5]],
            truth_label="fuzz truth",
            encoder={"spec": "open_clip:fuzz-encoder", "pretrained": None, "fingerprint": _fingerprint(seed), "dim": d},
            source=f"fuzz:{seed}",
        )

    def load(self, art, work, support, mutation):
        from types import SimpleNamespace

        from asymvlm.serve.gallery import Gallery

        g = Gallery.open(art)
        model = SimpleNamespace(encoder=None, encoder_source={"fingerprint": _fingerprint(0)}, dim=8)
        g.check_encoder(model)  # what asymvlm-serve does before serving it
        return {
            "meta": g.meta,
            "embeddings": g.index.embeddings.clone(),
            "ids": g.index.ids,
            "index_fingerprint": g.index.encoder_fingerprint,
            "captions": g.captions,
            "caption_embeddings": None if g.caption_embeddings is None else g.caption_embeddings.clone(),
            "owners": g.caption_owners,
            "truth": g.caption_truth,
            "thumbnails": [g.thumbnail(i) for i in range(len(g))] if g.has_thumbnails else None,
        }


class CacheKind(Kind):
    name = "cache"
    description = "embedding cache (manifest.json, images/texts.safetensors, captions, caption_meta)"
    files = ("manifest.json", "images.safetensors", "texts.safetensors", "captions.json", "caption_meta.json")
    optional = frozenset({"captions.json", "caption_meta.json"})

    def build(self, dest: Path, seed: int, support: Path) -> None:
        write_tiny_cache(dest, 6, seed=seed, extras=True)

    def load(self, art, work, support, mutation):
        from asymvlm.cache import EmbeddingCache

        c = EmbeddingCache.load(art)
        return {
            "manifest": c.manifest,
            "images": c.image_embeddings.clone(),
            "texts": c.text_embeddings.clone(),
            "index": c.text_image_index.clone(),
            "captions": c.captions,
            "caption_meta": {k: v.clone() for k, v in c.caption_meta.items()},
            "dim": c.dim,
        }


def _checkpoint(path: Path, seed: int, scale: float = 1.0) -> Path:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"w": scale * torch.randn(4, 4, generator=g), "b": scale * torch.randn(4, generator=g)}, str(path))
    return path


class TaskVectorKind(Kind):
    name = "task_vector"
    description = "task vector (task_vector.safetensors + task_vector.json) merged by merging.merge"
    files = ("task_vector.json", "task_vector.safetensors")

    def support(self, directory: Path) -> None:
        from asymvlm.merging.task_vectors import task_vector_from_checkpoints

        base = _checkpoint(directory / "base.safetensors", 0)
        task_vector_from_checkpoints(base, _checkpoint(directory / "ft_b.safetensors", 2), directory / "tv_b")

    def build(self, dest: Path, seed: int, support: Path) -> None:
        from asymvlm.merging.task_vectors import task_vector_from_checkpoints

        ft = _checkpoint(support / f"ft_a{seed}.safetensors", 10 + seed)
        task_vector_from_checkpoints(support / "base.safetensors", ft, dest)

    def load(self, art, work, support, mutation):
        from asymvlm.merging.api import merge

        out = work / "merged"
        merge(support / "base.safetensors", [art, support / "tv_b"], out, "task_arithmetic", lam=0.5)
        return _tensor_file(out / "model.safetensors")


class MergeOutputKind(Kind):
    name = "merge_output"
    description = "merge output (model.safetensors + merge.json): read_report, then the folder as a merge input"
    files = ("merge.json", "model.safetensors")

    def support(self, directory: Path) -> None:
        from asymvlm.merging.task_vectors import task_vector_from_checkpoints

        base = _checkpoint(directory / "base.safetensors", 0)
        for name, seed in (("a", 3), ("b", 4)):
            task_vector_from_checkpoints(
                base, _checkpoint(directory / f"ft_{name}.safetensors", seed), directory / f"tv_{name}"
            )

    def build(self, dest: Path, seed: int, support: Path) -> None:
        from asymvlm.merging.api import merge

        merge(
            support / "base.safetensors",
            [support / "tv_a", support / "tv_b"],
            dest,
            "task_arithmetic",
            lam=0.5 + 0.25 * seed,
        )

    def load(self, art, work, support, mutation):
        from asymvlm.merging.api import merge, read_report

        read_report(art)  # read (a crash is a traceback) but not compared: merge.json records provenance
        out = work / "again"  # the merged checkpoint as an input of the next merge (a folder holding model.safetensors)
        merge(support / "base.safetensors", [art, support / "ft_b.safetensors"], out, "task_arithmetic", lam=0.5)
        return _tensor_file(out / "model.safetensors")
