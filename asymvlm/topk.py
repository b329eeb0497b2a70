"""Exact top-k search in chunks, the retrieval distribution's statistics in the same pass, and the
search results: what both directions of :mod:`asymvlm.retrieval` are built on.

:func:`topk_chunked` scores a gallery ``chunk_size`` columns at a time and keeps a running top-k,
so memory is bounded by ``queries x chunk_size`` scores whatever the gallery size;
:func:`blocked_topk` runs it over blocks of queries with one reused score buffer. With a map from
scores to the retrieval distribution's logits, :class:`OnlineSoftmax` accumulates that distribution's
normaliser and entropy on the way (no second pass). :class:`SearchResult` holds the top-k and is the
one serialisation of search results (:meth:`SearchResult.to_dict`, shared with ``asymvlm-serve``).
:mod:`asymvlm.retrieval` exports :class:`SearchResult`, :class:`OnlineSoftmax`, :func:`topk_chunked`
and :func:`faiss_module`.

Example:
    >>> import torch
    >>> scores = torch.tensor([[0.1, 0.9, 0.3, 0.7, 0.5]])
    >>> values, indices = topk_chunked(lambda s, e: scores[:, s:e], n=5, k=2, chunk_size=2)
    >>> indices.tolist(), values.tolist()
    ([[1, 3]], [[0.8999999761581421, 0.699999988079071]])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from asymvlm.errors import ConfigError, InputError

__all__ = [
    "SearchResult",
    "OnlineSoftmax",
    "topk_chunked",
    "blocked_topk",
    "check_k",
    "check_ids",
    "ids_for",
    "faiss_module",
]


@dataclass
class SearchResult:
    """Top-k results: row ``q`` holds the k best gallery entries for query ``q``, best first.

    Attributes:
        indices: (Q, k) int64 gallery rows.
        scores: (Q, k) log-likelihoods ``log q_t(x)``.
        ids: (Q, k) nested list of gallery ids (the rows themselves when the index has no ids).
        uncertainty: (Q,) ``1/kappa`` of each text query (text -> image), or (Q, k) of each
            retrieved text (image -> text).
        cosine: (Q, k) cosine ``mu_t^T x`` of each pair (None where not computed).
        posterior: (Q, k) each hit's probability under the query's retrieval distribution over the
            whole searched collection, ``p(i | t) = q_t(x_i) / sum_j q_t(x_j)`` (text -> image), or
            ``p(t | x) = q_t(x) / sum_u q_u(x)`` (image -> text); None when not computed.
        entropy: (Q,) the entropy (nats) of that distribution: ``log N`` when it is uniform over N
            entries, 0 when one entry takes all the mass; ``exp(entropy)`` is the effective number of
            competing entries. None when not computed.
        log_partition: (Q,) ``log sum_j q(x_j)`` over the collection (float64), or None.
        confidence: per-query parts of the answer's uncertainty and its probability of being right
            (:class:`asymvlm.confidence.AnswerConfidence`), or None.
    """

    indices: Tensor
    scores: Tensor
    ids: list[list[Any]]
    uncertainty: Tensor
    cosine: Tensor | None = None
    posterior: Tensor | None = None
    entropy: Tensor | None = None
    log_partition: Tensor | None = None
    confidence: Any = None

    def to_dict(self) -> dict[str, Any]:
        """Plain Python (JSON-ready): ``{"queries": [{"hits": [{"id", "row", "score", "cosine",
        "probability"}, ...]}]}``, best first, with the query's ``uncertainty`` (text -> image) or each
        hit's (image -> text), the retrieval distribution's ``entropy`` and, where computed, the
        answer's ``confidence`` (:meth:`asymvlm.confidence.AnswerConfidence.to_dict`). Non-finite
        numbers become None. The one serialisation of search results, shared with ``asymvlm-serve``.

        Example:
            >>> import torch
            >>> from asymvlm.distributions import VonMisesFisher
            >>> from asymvlm.retrieval import ImageIndex
            >>> index = ImageIndex(torch.eye(3), ids=["a", "b", "c"])
            >>> res = index.search(VonMisesFisher(torch.eye(3)[1:2], torch.tensor([2.0])), k=1)
            >>> hit = res.to_dict()["queries"][0]
            >>> hit["hits"][0]["id"], hit["hits"][0]["cosine"], hit["uncertainty"]
            ('b', 1.0, 0.5)
        """
        per_query = self.uncertainty.dim() == 1
        cols = {"score": self.scores.tolist()}
        if self.cosine is not None:
            cols["cosine"] = self.cosine.tolist()
        if self.posterior is not None:
            cols["probability"] = self.posterior.tolist()
        if not per_query:
            cols["uncertainty"] = self.uncertainty.tolist()
        queries = []
        for q, (rows, ids) in enumerate(zip(self.indices.tolist(), self.ids)):
            hits = [
                {"id": ids[j], "row": rows[j], **{c: _finite(v[q][j]) for c, v in cols.items()}}
                for j in range(len(rows))
            ]
            entry: dict[str, Any] = {"hits": hits}
            if per_query:
                entry["uncertainty"] = _finite(float(self.uncertainty[q]))
            if self.entropy is not None:
                entry["entropy"] = _finite(float(self.entropy[q]))
            if self.confidence is not None:
                entry["confidence"] = self.confidence.to_dict(q)
            queries.append(entry)
        return {"queries": queries}


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


class OnlineSoftmax:
    """Running log-sum-exp and entropy of ``p_j ∝ exp(l_j)`` over column chunks, one row per query.

    Per row it keeps ``m`` (the largest logit so far), ``s = sum exp(l - m)`` and
    ``t = sum exp(l - m) (l - m)`` in float64; a larger maximum rescales both sums. Then
    ``log Z = m + log s`` and the entropy ``H = -sum p log p = log s - t / s``. This is the online
    softmax normaliser (Milakov & Gimelshein 2018, https://arxiv.org/abs/1805.02867) carried one
    moment further, so the retrieval distribution's entropy costs no second pass over the gallery.

    Example:
        >>> import torch
        >>> acc = OnlineSoftmax(1)
        >>> logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
        >>> acc.update(logits[:, :2]); acc.update(logits[:, 2:])
        >>> p = torch.softmax(logits.double(), 1)
        >>> bool(torch.allclose(acc.entropy, -(p * p.log()).sum(1)))
        True
    """

    def __init__(self, rows: int, device: torch.device | str = "cpu"):
        self.m = torch.full((rows,), -math.inf, dtype=torch.float64, device=device)
        self.s = torch.zeros(rows, dtype=torch.float64, device=device)
        self.t = torch.zeros(rows, dtype=torch.float64, device=device)

    def update(self, logits: Tensor, *, scratch: bool = False) -> None:
        """Add a chunk of columns, ``logits`` (rows, C) (float32 or float64). With ``scratch`` the
        chunk may be overwritten (no copy: the search's own score buffer)."""
        if logits.shape[1] == 0:
            return
        m_new = torch.maximum(self.m, logits.amax(dim=1).double())  # (Q,)
        live = torch.isfinite(m_new)  # a row whose logits are all -inf so far adds nothing
        shift = torch.where(live, self.m - m_new, 0.0)  # <= 0, -inf on a row's first finite chunk
        scale = torch.exp(shift)
        # old terms: (l - m_old) = (l - m_new) - shift, so t_old becomes scale * (t + shift * s)
        self.t = torch.where(self.s > 0, scale * (self.t + shift * self.s), 0.0)
        self.s = scale * self.s
        z = logits if scratch else logits.clone()
        z.sub_(torch.where(live, m_new, 0.0).to(z.dtype).unsqueeze(1))  # (Q, C) <= 0
        z.clamp_(min=-1e4)  # exp(-1e4) == 0 and -1e4 * 0 == 0: -inf logits drop out without NaN
        w = torch.exp(z)
        # a chunk's sums in its own dtype (terms in [0, 1]: float32 keeps ~1e-6 relative over 4,096
        # of them), accumulated across chunks in float64; a float64 reduction of a float32 chunk
        # would cost ten times the chunk's exp
        self.s = self.s + w.sum(dim=1).double()
        self.t = self.t + z.mul_(w).sum(dim=1).double()
        self.m = m_new

    @property
    def log_partition(self) -> Tensor:
        """(Q,) ``log sum_j exp(l_j)``, float64."""
        return self.m + torch.log(self.s)

    @property
    def entropy(self) -> Tensor:
        """(Q,) ``-sum_j p_j log p_j`` in nats, float64 (clamped at 0 against rounding)."""
        return (torch.log(self.s) - self.t / self.s).clamp_min(0.0)

    @staticmethod
    def cat(parts: Sequence[OnlineSoftmax]) -> OnlineSoftmax:
        """Rows of several accumulators stacked (query blocks)."""
        out = OnlineSoftmax(0)
        out.m, out.s, out.t = (torch.cat([getattr(p, a) for p in parts]) for a in ("m", "s", "t"))
        return out


def topk_chunked(
    score_fn: Callable[..., Tensor],
    n: int,
    k: int,
    chunk_size: int,
    buffer: Tensor | None = None,
    logits: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, OnlineSoftmax]:
    """Exact top-k over ``n`` columns scored chunk by chunk: ``score_fn(start, end) -> (Q, end-start)``.

    Keeps a running (Q, k) top-k, so memory is O(Q * (k + chunk_size)). With ``buffer`` (a flat
    tensor of at least Q * chunk_size elements), ``score_fn(start, end, out)`` is called with a
    contiguous ``(Q, end-start)`` view of it to write into, which avoids allocating (and
    page-faulting) a fresh score matrix per chunk. With ``logits`` (a map from a score chunk to the
    retrieval distribution's logits, e.g. ``kappa * cos``; called after the chunk's top-k, so it may
    overwrite the chunk and return it), the same pass also accumulates that distribution's
    normaliser and entropy (:class:`OnlineSoftmax`), returned third.
    """
    best_v = best_i = None
    acc = None
    for s in range(0, n, chunk_size):
        e = min(n, s + chunk_size)
        if buffer is None:
            sc = score_fn(s, e)
        else:
            q = buffer.numel() // chunk_size
            sc = score_fn(s, e, buffer[: q * (e - s)].view(q, e - s))
        v, i = sc.topk(min(k, e - s), dim=1)
        i = i + s
        if logits is not None:  # after the top-k: the logits may be computed in the score buffer
            if acc is None:
                acc = OnlineSoftmax(sc.shape[0], sc.device)
            acc.update(logits(sc), scratch=True)
        if best_v is None:
            best_v, best_i = v, i
        else:
            v = torch.cat([best_v, v], dim=1)
            i = torch.cat([best_i, i], dim=1)
            best_v, pos = v.topk(min(k, v.shape[1]), dim=1)
            best_i = i.gather(1, pos)
    if logits is None:
        return best_v, best_i
    return best_v, best_i, acc


def blocked_topk(
    queries: Tensor,
    score: Callable[[Tensor, int, int, Tensor], Tensor],
    n: int,
    k: int,
    chunk_size: int,
    query_block: int,
    logits: Callable[[slice, Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor, OnlineSoftmax | None]:
    """:func:`topk_chunked` over blocks of ``query_block`` queries with one reused score buffer:
    peak memory is ``query_block * chunk_size`` floats whatever the number of queries. With
    ``logits(rows, scores)`` (``rows`` the block's slice of the queries) the retrieval
    distribution's statistics come back too (else None)."""
    chunk = min(chunk_size, n)
    block = min(query_block, queries.shape[0])
    buf = torch.empty(block * chunk, dtype=torch.float32, device=queries.device)
    values, indices, stats = [], [], []
    for s in range(0, queries.shape[0], block):
        xq = queries[s : s + block]
        rows = slice(s, s + xq.shape[0])
        out = topk_chunked(
            lambda a, b, out, xq=xq: score(xq, a, b, out),
            n,
            k,
            chunk,
            buf[: xq.shape[0] * chunk],
            None if logits is None else (lambda sc, rows=rows: logits(rows, sc)),
        )
        values.append(out[0])
        indices.append(out[1])
        if logits is not None:
            stats.append(out[2])
    return torch.cat(values), torch.cat(indices), (OnlineSoftmax.cat(stats) if stats else None)


def check_k(k: int, n: int) -> None:
    """A :class:`~asymvlm.errors.ConfigError` unless ``1 <= k <= n`` (``k`` an integer)."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ConfigError(f"k must be a positive integer, got {k!r}")
    if k > n:
        raise ConfigError(f"k={k} is larger than the gallery ({n} entries)")


def ids_for(ids: list[Any] | None, indices: Tensor) -> list[list[Any]]:
    """The gallery ids of the (Q, k) rows ``indices`` (the rows themselves when there are no ids)."""
    if ids is None:
        return indices.tolist()
    return [[ids[j] for j in row] for row in indices.tolist()]


def faiss_module():
    """The ``faiss`` module, or a :class:`MissingExtraError` saying how to install it."""
    try:
        import faiss
    except ImportError as err:
        from asymvlm.encoders import MissingExtraError

        raise MissingExtraError(
            "backend='faiss' needs FAISS: pip install 'asymvlm[faiss]' (or: pip install faiss-cpu)"
        ) from err
    return faiss


def check_ids(ids: Sequence[Any] | None, n: int) -> list[Any] | None:
    """The gallery's ids as a list, one per entry (an :class:`~asymvlm.errors.InputError` otherwise), or None."""
    if ids is None:
        return None
    ids = list(ids)
    if len(ids) != n:
        raise InputError(f"got {len(ids)} ids for {n} gallery entries")
    return ids
