"""Retrieval with uncertainty: exact, chunked search in both directions (zero-shot classification
with abstention is :mod:`asymvlm.zeroshot`).

Text -> image (:class:`ImageIndex`). For a text distribution ``q_t`` (vMF or Power Spherical,
``kappa > 0``) the log-likelihood ``log q_t(x)`` is increasing in ``mu_t^T x``, so the top-k
images are the top-k by cosine with ``mu_t``; their log-likelihoods are computed exactly and the
query's uncertainty ``1/kappa_t`` is returned with them.

Image -> text (:class:`TextIndex`). For an image ``x`` the texts are ranked by ``log q_t(x)``,
where the concentration and the normaliser change the ranking. For vMF this is an inner product
in d+1 dimensions, ``[kappa_t mu_t, log C(kappa_t)] . [x, 1]``, so any exact maximum-inner-
product engine serves it; for Power Spherical, ``kappa log(1 + c)`` is concave in ``c``, so a
tangent line gives a linear upper bound for candidate generation followed by exact re-ranking.

Both directions stream the gallery in chunks (``chunk_size`` rows at a time) and keep a running
top-k, so memory is bounded by ``queries x chunk_size`` scores whatever the gallery size. An
optional FAISS backend (``pip install 'asymvlm[faiss]'``) returns the same top-k. The chunked top-k,
the streaming statistics of the retrieval distribution and the results are :mod:`asymvlm.topk`'s.

Example:
    >>> import torch
    >>> from asymvlm.distributions import VonMisesFisher
    >>> gallery = torch.nn.functional.normalize(torch.randn(1000, 16), dim=-1)
    >>> index = ImageIndex(gallery)
    >>> q = VonMisesFisher(gallery[:2], torch.tensor([50.0, 5.0]))
    >>> res = index.search(q, k=3)
    >>> res.indices[:, 0].tolist(), [round(u, 4) for u in res.uncertainty.tolist()]
    ([0, 1], [0.02, 0.2])
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from asymvlm.distributions import SphericalDistribution
from asymvlm.errors import ConfigError, InputError
from asymvlm.heads import FAMILY_REGISTRY, check_embeddings, family_class, family_of
from asymvlm.io import (
    ArtefactError,
    atomic_save_safetensors,
    atomic_write_json,
    inside_folder,
    load_safetensors,
    read_tagged_json,
)
from asymvlm.io_read import check_index_meta
from asymvlm.scan import SCAN_DTYPES, bf16_copy, int8_copy, scan_topk
from asymvlm.topk import (
    OnlineSoftmax,
    SearchResult,
    blocked_topk,
    check_ids,
    check_k,
    faiss_module,
    ids_for,
    topk_chunked,
)

__all__ = [
    "SearchResult",
    "OnlineSoftmax",
    "ImageIndex",
    "TextIndex",
    "topk_chunked",
    "faiss_module",
]

INDEX_VERSION = 1


# ----------------------------------------------------------------------------------------------
# text -> image
# ----------------------------------------------------------------------------------------------
class ImageIndex:
    """A gallery of unit image embeddings searched by text queries.

    Args:
        embeddings: (N, d) unit vectors (float16/32; kept as given, e.g. memory-mapped).
        ids: optional gallery ids (any JSON-serialisable values), one per row.
        chunk_size: gallery rows scored at once.
        query_block: queries scored at once; peak memory is query_block x chunk_size floats.
        backend: ``"exact"`` (chunked torch matmul) or ``"faiss"`` (exact flat inner-product index).
        validate: check shape, finiteness and unit norm of every row (one pass over the gallery).
        encoder_fingerprint: the encoder that made the embeddings (saved with the index, checked
            against a model's encoder when searching with strings).
        faiss_index: with ``backend="faiss"``, a ready FAISS inner-product index over the same rows
            (e.g. read memory-mapped from disk); built from ``embeddings`` on first search otherwise.
        scan_dtype: how the exact backend reads the gallery on a CPU. ``"bfloat16"``: a bf16 copy
            (made once, on first search or :meth:`prepare`) is scanned with a certified error
            bound and the candidates are re-scored in float64 from the stored rows, so the ids are
            the exact top-k (:mod:`asymvlm.scan`); ``"int8"``: the same with a per-row int8 copy
            (half the bytes: one query at a time is faster, batches slower; CPU); ``"float32"``:
            every chunk converted to float32 and scored exactly in one pass. ``"auto"`` (default):
            bfloat16 on a CPU, float32 on other devices (measured: ``bench/limits.py``).
    """

    def __init__(
        self,
        embeddings: Tensor,
        ids: Sequence[Any] | None = None,
        *,
        chunk_size: int = 4096,
        query_block: int = 1024,
        backend: str = "exact",
        validate: bool = True,
        encoder_fingerprint: str | None = None,
        faiss_index: Any = None,
        scan_dtype: str = "auto",
    ):
        if not isinstance(embeddings, Tensor) or embeddings.dim() != 2:
            raise InputError(
                f"image embeddings must be a (N, d) tensor, got "
                f"{tuple(embeddings.shape) if isinstance(embeddings, Tensor) else type(embeddings)}"
            )
        if embeddings.shape[0] == 0:
            raise InputError("the image gallery is empty")
        if validate:
            step = max(chunk_size, 65536)
            for s in range(0, embeddings.shape[0], step):
                check_embeddings(
                    embeddings[s : s + step].float(), embeddings.shape[1], "image embeddings", unit=True, row_offset=s
                )
        if backend not in ("exact", "faiss"):
            raise ConfigError(f"backend must be 'exact' or 'faiss', got {backend!r}")
        if chunk_size < 1 or query_block < 1:
            raise ConfigError(f"chunk_size and query_block must be >= 1, got {chunk_size}, {query_block}")
        if scan_dtype not in SCAN_DTYPES:
            raise ConfigError(f"scan_dtype must be one of {list(SCAN_DTYPES)}, got {scan_dtype!r}")
        if scan_dtype == "auto":
            scan_dtype = "bfloat16" if embeddings.device.type == "cpu" else "float32"
        if scan_dtype == "int8" and (embeddings.device.type != "cpu" or not hasattr(torch, "_weight_int8pack_mm")):
            raise ConfigError("scan_dtype='int8' needs a CPU gallery and torch's _weight_int8pack_mm kernel")
        self.scan_dtype = scan_dtype
        self._scan: tuple[Tensor, float] | None = None
        self.embeddings = embeddings
        self.ids = check_ids(ids, embeddings.shape[0])
        self.chunk_size = chunk_size
        self.query_block = query_block
        self.backend = backend
        self.encoder_fingerprint = encoder_fingerprint
        if faiss_index is not None and (faiss_index.ntotal, faiss_index.d) != tuple(embeddings.shape):
            raise InputError(
                f"the FAISS index holds ({faiss_index.ntotal}, {faiss_index.d}) vectors, the embeddings "
                f"{tuple(embeddings.shape)}"
            )
        self._faiss_index = faiss_index

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    def _queries(self, queries: Any, model: Any) -> tuple[SphericalDistribution, Tensor | None]:
        """The queries' distributions, and their frozen text embeddings when the queries were texts."""
        emb = None
        if isinstance(queries, SphericalDistribution):
            q = queries
        else:
            if model is None:
                raise InputError(
                    "text queries given as strings or embeddings need model=AsymVLM(...) (or pass a distribution)"
                )
            if isinstance(queries, str):
                queries = [queries]
            if not isinstance(queries, Tensor) and len(queries) == 0:
                raise InputError("no queries given")
            if (
                not isinstance(queries, Tensor)
                and self.encoder_fingerprint
                and model.encoder is not None
                and model.encoder.fingerprint != self.encoder_fingerprint
            ):
                raise InputError(
                    "the index was built from another encoder's embeddings than the model's encoder "
                    f"({model.encoder.spec}); rebuild the index or search with embeddings"
                )
            with torch.no_grad():
                emb = model.text_embeddings(queries)
                q = model.encode_text(emb)
        if len(q.batch_shape) != 1 or q.batch_shape[0] == 0:
            raise InputError(f"need a non-empty batch of queries, got batch shape {tuple(q.batch_shape)}")
        if q.dim != self.dim:
            raise InputError(f"query dimension {q.dim} does not match the index dimension {self.dim}")
        return q, emb

    @torch.no_grad()
    def search(
        self,
        queries: SphericalDistribution | Tensor | Sequence[str],
        k: int = 10,
        *,
        model: Any = None,
        posterior: bool = True,
        calibrator: Any = None,
    ) -> SearchResult:
        """The k most likely images for each text query.

        Args:
            queries: a text distribution with batch shape (Q,), text embeddings (Q, d), or strings
                (the last two need ``model``, an :class:`~asymvlm.model.AsymVLM`).
            k: results per query (<= gallery size).
            model: the AsymVLM that maps texts to distributions.
            posterior: also compute the retrieval distribution ``p(i | t) ∝ q_t(x_i)`` over the whole
                gallery, in the same streamed pass as the top-k: each hit's probability, the entropy
                and the log normaliser (an elementwise exp per scored pair; with the FAISS backend a
                pass over the gallery of its own).
            calibrator: a :class:`~asymvlm.confidence.Calibrator` fitted on this gallery, used instead
                of the model's own (whose ``confidence`` adds each answer's parts and ``p_correct``:
                :mod:`asymvlm.confidence`).
        """
        q, emb = self._queries(queries, model)
        check_k(k, len(self))
        loc = q.loc.detach().float()
        kappa = q.concentration.detach().float()
        family = type(q)
        logits = None
        if posterior:  # log q_t(x) without its normaliser: kappa cos (vMF), kappa log(1 + cos) (PS)

            def logits(rows: slice, cos: Tensor) -> Tensor:
                return family._unnormalized_log_prob_(cos, kappa[rows].unsqueeze(1))

        stats = None
        if self.backend == "faiss":
            idx = self._faiss_search(loc, k)
            if posterior:  # FAISS returns no distribution: a pass of its own (a top-1 is its cheapest top-k)
                _, _, stats = blocked_topk(
                    loc, self._cosine_chunk, len(self), 1, self.chunk_size, self.query_block, logits
                )
        elif self.scan_dtype in ("bfloat16", "int8"):
            idx, stats = self._scan_search(loc, k, logits)
        else:
            _, idx, stats = blocked_topk(
                loc, self._cosine_chunk, len(self), k, self.chunk_size, self.query_block, logits
            )
        # the hits' cosines in float64 (Q x k x d: cheap): at kappa ~1e3 a float32 cosine moves the
        # logit kappa * cos by ~1e-4, which the posterior would inherit
        cos64 = (q.loc.detach().double().unsqueeze(1) * self.embeddings[idx.cpu()].to(loc.device, torch.float64)).sum(
            -1
        )
        cos = cos64.float()  # (Q, k)
        log_norm = q.log_normalizer.detach().float()
        scores = q._log_prob_from_cosine(cos, kappa.unsqueeze(1), log_norm.unsqueeze(1))
        # re-sort by the exact score (equal to the cosine order for kappa > 0)
        scores, order = scores.sort(dim=1, descending=True)
        idx = idx.gather(1, order)
        cos, cos64 = cos.gather(1, order), cos64.gather(1, order)
        result = SearchResult(idx, scores, ids_for(self.ids, idx), 1.0 / kappa, cos)
        if stats is not None:
            hit_logits = family._log_prob_from_cosine(cos64, kappa.double().unsqueeze(1), 0.0)
            result.posterior = torch.exp(hit_logits - stats.log_partition.unsqueeze(1)).float()
            result.entropy = stats.entropy.float()
            result.log_partition = stats.log_partition + log_norm.double()
            confidence = getattr(model, "confidence", None) if model is not None else None
            if confidence is not None:  # the parts of each answer's uncertainty, and P(right)
                result.confidence = confidence.assess(
                    kappa, result.entropy, result.posterior[:, 0], len(self), emb, calibrator=calibrator
                )
        return result

    def prepare(self) -> ImageIndex:
        """Make the bf16 scan copy now (else on first search): one pass over the gallery; a bf16
        gallery is scanned as it is. Returns the index."""
        if self.scan_dtype == "bfloat16" and self._scan is None:
            self._scan = bf16_copy(self.embeddings)
        elif self.scan_dtype == "int8" and self._scan is None:
            copy = int8_copy(self.embeddings)
            self._scan = (copy, copy.max_norm)
        return self

    def _scan_search(self, loc: Tensor, k: int, logits: Any) -> tuple[Tensor, Any]:
        scan, top = self.prepare()._scan
        # a (block, chunk) score tile of ~4M numbers: measured faster than 16M (the retrieval
        # distribution's passes over the tile stay in cache); one query reads 256k rows a GEMV
        chunk = min(1 << 18, max(1024, (1 << 22) // min(self.query_block, loc.shape[0])))

        def exact(rows: slice) -> tuple[Tensor, Any]:
            fn = None if logits is None else (lambda r, c: logits(slice(rows.start + r.start, rows.start + r.stop), c))
            _, i, st = blocked_topk(loc[rows], self._cosine_chunk, len(self), k, self.chunk_size, self.query_block, fn)
            return i, st

        kwargs = {"max_norm": top, "query_block": self.query_block, "logits": logits, "fallback": exact}
        return scan_topk(loc, self.embeddings, scan, k, chunk, **kwargs)

    def _cosine_chunk(self, xq: Tensor, s: int, e: int, out: Tensor) -> Tensor:
        return torch.mm(xq, self.embeddings[s:e].to(xq.device, torch.float32).T, out=out)

    def _faiss_search(self, loc: Tensor, k: int) -> Tensor:
        faiss = faiss_module()
        if self._faiss_index is None:
            index = faiss.IndexFlatIP(self.dim)
            for s in range(0, len(self), self.chunk_size):
                index.add(self.embeddings[s : s + self.chunk_size].float().contiguous().numpy())
            self._faiss_index = index
        _, i = self._faiss_index.search(loc.cpu().contiguous().numpy(), k)
        return torch.from_numpy(i).to(torch.int64).to(loc.device)

    # -- persistence ----------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write ``index.json`` + ``index.safetensors`` (atomically)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors({"embeddings": self.embeddings}, directory / "index.safetensors")
        atomic_write_json(
            {
                "type": "asymvlm.image_index",
                "format_version": INDEX_VERSION,
                "dim": self.dim,
                "size": len(self),
                "ids": self.ids,
                "encoder_fingerprint": self.encoder_fingerprint,
                "dtype": str(self.embeddings.dtype).removeprefix("torch."),
            },
            directory / "index.json",
        )
        return directory

    @classmethod
    def load(cls, directory: str | Path, *, mmap: bool = True, **kwargs) -> ImageIndex:
        """Load a saved index (memory-mapped by default).

        Every field of ``index.json`` is checked (``dim``, ``size``, ``ids``: null or one string or
        integer per row, ``encoder_fingerprint``: a string or null, ``dtype`` where recorded: the
        tensor's), and the tensor's shape and dtype against it; an :class:`ArtefactError` names the
        file and the field.
        """
        directory = Path(directory)
        meta_file = inside_folder(directory, "index.json")
        meta = read_tagged_json(
            meta_file,
            "asymvlm.image_index",
            INDEX_VERSION,
            required=("dim", "size", "ids", "encoder_fingerprint"),
            known=("dtype",),
        )
        check_index_meta(meta, meta_file, INDEX_VERSION)
        emb_file = inside_folder(directory, "index.safetensors")
        emb = load_safetensors(emb_file, ["embeddings"], mmap=mmap)["embeddings"]
        if tuple(emb.shape) != (meta["size"], meta["dim"]):
            raise ArtefactError(
                f"{emb_file}: embeddings {tuple(emb.shape)} but index.json says ({meta['size']}, {meta['dim']})"
            )
        if "dtype" in meta and str(emb.dtype).removeprefix("torch.") != meta["dtype"]:
            raise ArtefactError(f"{emb_file}: embeddings are {emb.dtype}, index.json's dtype says {meta['dtype']}")
        if kwargs.pop("validate", True):  # once, vectorised: a NaN or zero row would win every query
            from asymvlm.cache import validate_embeddings

            validate_embeddings(emb, emb_file, "image embeddings")
        return cls(emb, meta["ids"], encoder_fingerprint=meta["encoder_fingerprint"], validate=False, **kwargs)

    @classmethod
    def from_cache(cls, cache: Any, **kwargs) -> ImageIndex:
        """An index over an :class:`~asymvlm.cache.EmbeddingCache`'s images (rows as ids)."""
        kwargs.setdefault("validate", not getattr(cache, "validated", False))  # checked once, on load or here
        return cls(cache.image_embeddings, encoder_fingerprint=cache.encoder_fingerprint, **kwargs)


# ----------------------------------------------------------------------------------------------
# image -> text
# ----------------------------------------------------------------------------------------------
class TextIndex:
    """A gallery of text distributions searched by images (image -> text retrieval).

    Args:
        loc: (M, d) unit mean directions.
        concentration: (M,) concentrations.
        family: ``"vmf"`` or ``"ps"``.
        ids: optional ids, one per text (e.g. the caption strings).
        chunk_size, query_block, backend: as for :class:`ImageIndex`.
    """

    def __init__(
        self,
        loc: Tensor,
        concentration: Tensor,
        family: str,
        ids: Sequence[Any] | None = None,
        *,
        chunk_size: int = 4096,
        query_block: int = 1024,
        backend: str = "exact",
        encoder_fingerprint: str | None = None,
    ):
        FAMILY_REGISTRY.entry(family)  # ConfigError "unknown family ...; choose one of [...]"
        if backend not in ("exact", "faiss"):
            raise ConfigError(f"backend must be 'exact' or 'faiss', got {backend!r}")
        loc = loc.detach().float()
        concentration = concentration.detach().float()
        if loc.dim() != 2 or loc.shape[0] == 0:
            raise InputError(f"loc must be a non-empty (M, d) tensor, got {tuple(loc.shape)}")
        if concentration.shape != loc.shape[:1]:
            raise InputError(f"concentration must have shape ({loc.shape[0]},), got {tuple(concentration.shape)}")
        # validates unit loc, finite non-negative concentration
        family_class(family)(loc, concentration, validate_args=True)
        self.loc = loc
        self.concentration = concentration
        self.family = family
        self.ids = check_ids(ids, loc.shape[0])
        if chunk_size < 1 or query_block < 1:
            raise ConfigError(f"chunk_size and query_block must be >= 1, got {chunk_size}, {query_block}")
        self.chunk_size = chunk_size
        self.query_block = query_block
        self.backend = backend
        self.encoder_fingerprint = encoder_fingerprint
        self.log_normalizer = self._dist(0, len(self)).log_normalizer.float()
        self._faiss_index = None

    @classmethod
    def from_distribution(cls, q: SphericalDistribution, ids: Sequence[Any] | None = None, **kwargs) -> TextIndex:
        family = family_of(q)
        if family is None:
            raise TypeError(f"unsupported distribution {type(q).__name__}")
        if len(q.batch_shape) != 1:
            raise InputError(f"need a batch of texts (M,), got batch shape {tuple(q.batch_shape)}")
        return cls(q.loc, q.concentration, family, ids, **kwargs)

    @classmethod
    @torch.no_grad()
    def from_texts(
        cls,
        model: Any,
        texts: Sequence[str] | Tensor,
        ids: Sequence[Any] | None = None,
        batch_size: int = 4096,
        **kwargs,
    ) -> TextIndex:
        """Encode texts (strings or frozen text embeddings) with an AsymVLM into an index."""
        n = len(texts)
        if n == 0:
            raise InputError("no texts given")
        locs, kappas = [], []
        for s in range(0, n, batch_size):
            q = model.encode_text(texts[s : s + batch_size])
            locs.append(q.loc.cpu())
            kappas.append(q.concentration.cpu())
        if ids is None and not isinstance(texts, Tensor):
            ids = list(texts)
        fp = model.encoder.fingerprint if getattr(model, "encoder", None) is not None else None
        kwargs.setdefault("encoder_fingerprint", fp)
        return cls(torch.cat(locs), torch.cat(kappas), model.family, ids, **kwargs)

    def __len__(self) -> int:
        return self.loc.shape[0]

    @property
    def dim(self) -> int:
        return self.loc.shape[1]

    def _dist(self, s: int, e: int) -> SphericalDistribution:
        return family_class(self.family)(self.loc[s:e], self.concentration[s:e], validate_args=False)

    def _scores(self, x: Tensor, s: int, e: int, out: Tensor | None = None) -> Tensor:
        cos = torch.mm(x, self.loc[s:e].T, out=out)  # (Q, C)
        if self.family == "vmf":  # kappa * cos + log C, in place
            return cos.mul_(self.concentration[s:e]).add_(self.log_normalizer[s:e])
        return family_class(self.family)._log_prob_from_cosine(
            cos, self.concentration[s:e].unsqueeze(0), self.log_normalizer[s:e].unsqueeze(0)
        )

    @torch.no_grad()
    def search(
        self, images: Tensor | Sequence[Any], k: int = 10, *, model: Any = None, posterior: bool = True
    ) -> SearchResult:
        """The k texts under which each image is most likely.

        Args:
            images: unit image embeddings (Q, d), or images (needs ``model`` with an encoder).
            k: results per image.
            model: an AsymVLM with an encoder, for raw images.
            posterior: also compute the retrieval distribution over the texts,
                ``p(t | x) = q_t(x) / sum_u q_u(x)`` (a uniform prior over the index's texts), in the
                same streamed pass: each hit's probability, the entropy and the log normaliser.
        """
        if not isinstance(images, Tensor):
            if model is None:
                raise InputError("raw images need model=AsymVLM(...) with an encoder; or pass embeddings")
            if len(images) == 0:
                raise InputError("no images given")
            images = model.encode_image(images)
        if images.dim() != 2 or images.shape[0] == 0:
            raise InputError(f"image queries must be a non-empty (Q, d) tensor, got {tuple(images.shape)}")
        if images.shape[1] != self.dim:
            raise InputError(f"image dimension {images.shape[1]} does not match the index dimension {self.dim}")
        check_embeddings(images.float(), self.dim, "image queries", unit=True)
        check_k(k, len(self))
        x = images.float()
        logits = (lambda rows, sc: sc) if posterior else None  # the scores are log q_t(x) themselves
        stats = None
        if self.backend == "faiss":
            scores, idx = self._faiss_search(x, k)
            if posterior:  # as ImageIndex.search: a pass of its own
                _, _, stats = blocked_topk(x, self._scores, len(self), 1, self.chunk_size, self.query_block, logits)
        else:
            scores, idx, stats = blocked_topk(x, self._scores, len(self), k, self.chunk_size, self.query_block, logits)
        cos = (x.unsqueeze(1) * self.loc[idx]).sum(-1)  # (Q, k)
        result = SearchResult(idx, scores, ids_for(self.ids, idx), 1.0 / self.concentration[idx], cos)
        if stats is not None:
            result.posterior = torch.exp(scores.double() - stats.log_partition.unsqueeze(1)).float()
            result.entropy = stats.entropy.float()
            result.log_partition = stats.log_partition
        return result

    # -- FAISS: linear (upper-bound) scores in d + 1 dimensions, exact re-ranking ----------------
    def _linear_form(self) -> tuple[Tensor, Tensor]:
        """(slope (M,), offset (M,)) with ``slope * c + offset >= log q(x)`` for ``c = mu^T x``,
        equality for vMF. For PS, the tangent of the concave ``kappa log(1 + c)`` at
        ``c0 = E[mu^T x] = kappa / (kappa + d - 1)``."""
        kappa, log_norm = self.concentration, self.log_normalizer
        if self.family == "vmf":
            return kappa, log_norm
        c0 = kappa / (kappa + self.dim - 1)
        return kappa / (1 + c0), kappa * (torch.log1p(c0) - c0 / (1 + c0)) + log_norm

    def _faiss_search(self, x: Tensor, k: int) -> tuple[Tensor, Tensor]:
        faiss = faiss_module()
        slope, offset = self._linear_form()
        if self._faiss_index is None:
            vectors = torch.cat([self.loc * slope.unsqueeze(1), offset.unsqueeze(1)], dim=1)
            index = faiss.IndexFlatIP(self.dim + 1)
            index.add(vectors.contiguous().numpy())
            self._faiss_index = index
        xq = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1).contiguous().numpy()
        n = len(self)
        # candidates by the linear score, re-ranked exactly; vMF: the linear score is exact up to
        # float32 rounding, so a small margin suffices. PS: grow the candidate set until the k-th
        # exact score beats the best upper bound left out (then the result is provably exact).
        kc = min(n, 2 * k + 16)
        while True:
            ub, cand = self._faiss_index.search(xq, kc)
            cand = torch.from_numpy(cand).to(torch.int64)
            cos = (x.unsqueeze(1) * self.loc[cand]).sum(-1)  # (Q, kc)
            exact = family_class(self.family)._log_prob_from_cosine(
                cos, self.concentration[cand], self.log_normalizer[cand]
            )
            top, pos = exact.topk(k, dim=1)
            idx = cand.gather(1, pos)
            if kc == n or self.family == "vmf":
                return top, idx
            if bool((top[:, -1] >= torch.from_numpy(ub[:, -1]) + 1e-4).all()):
                return top, idx
            kc = min(n, 4 * kc)

    # -- persistence ----------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors({"loc": self.loc, "concentration": self.concentration}, directory / "index.safetensors")
        atomic_write_json(
            {
                "type": "asymvlm.text_index",
                "format_version": INDEX_VERSION,
                "dim": self.dim,
                "size": len(self),
                "family": self.family,
                "ids": self.ids,
                "encoder_fingerprint": self.encoder_fingerprint,
            },
            directory / "index.json",
        )
        return directory

    @classmethod
    def load(cls, directory: str | Path, **kwargs) -> TextIndex:
        directory = Path(directory)
        meta = read_tagged_json(
            directory / "index.json",
            "asymvlm.text_index",
            INDEX_VERSION,
            required=("dim", "size", "family"),
            known=("ids", "encoder_fingerprint"),
        )
        t = load_safetensors(directory / "index.safetensors", ["loc", "concentration"], mmap=False)
        if tuple(t["loc"].shape) != (meta["size"], meta["dim"]):
            raise ArtefactError(
                f"{directory}: loc {tuple(t['loc'].shape)} but index.json says ({meta['size']}, {meta['dim']})"
            )
        return cls(
            t["loc"],
            t["concentration"],
            meta["family"],
            meta.get("ids"),
            encoder_fingerprint=meta.get("encoder_fingerprint"),
            **kwargs,
        )
