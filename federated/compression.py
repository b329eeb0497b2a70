"""Compressed client uploads: composable client-side encoders and their server-side decoders.

A :class:`Codec` turns a client's delta ``{exchanged name: tensor}`` into a :class:`Payload` (flat
named tensors, a JSON-serialisable ``meta``, the bytes it costs); the server decodes it
(:meth:`Codec.decode`). The run's ``compression`` spec joins encoder names (:data:`COMPRESSORS`) by
``+``; they apply left to right to the values, the decoders in reverse. Bytes per tensor of ``n``:

==========  =======  ==========================================================================
``none``    --       the values as trained (``4 n`` in float32)
``lora_b``  keys     0 for the frozen LoRA A factors, which the server knows (decoded as zeros)
``topk``    select   the ``k = max(1, ceil(fraction n))`` largest magnitudes (``4 k``) and their
                     positions (``4 k``, int32, increasing; none when ``k = n``)
``fp16``    code     IEEE half (``2 n``); ``bf16``: bfloat16 (``2 n``, float32's range)
``int8``    code     blockwise absmax int8: ``n + 4 ceil(n / block)`` (one float32 scale a block)
==========  =======  ==========================================================================

A spec lists at most one encoder of each kind, in the order keys, select, code: ``topk+int8``
quantises the kept values (``k + 4 ceil(k/block) + 4 k`` bytes). ``topk``'s ``scope="global"``
selects over the whole update (every sent tensor flattened, in sorted-key order: one stream).

**Payload.** 1-D tensors named ``"<key>::values"``, ``"<key>::index"``, ``"<key>::scale"``
(``"@all::..."`` for a global top-k), as a Flower ``ArrayRecord`` carries them; ``meta`` holds the
codec's signature and the sent and dropped keys. Shapes and dtypes come from the server's own
parameters (``like``), and a payload is checked before it is decoded (names, lengths, dtypes,
finiteness, positions): a bad one is a :class:`~asymvlm.errors.ClientUpdateError` naming the client
and the tensor. Bytes depend on shapes only (:meth:`Codec.nbytes`); ``meta`` is not counted.

**Error feedback** (``topk``'s ``error_feedback``; Seide et al. 2014, 1-bit SGD; Stich et al. 2018,
https://arxiv.org/abs/1809.07599; Karimireddy et al. 2019, EF-SGD, https://arxiv.org/abs/1901.09847):
the client sends ``C(delta + e)`` and keeps ``e' = delta + e - decode(C(delta + e))``, the error of
the whole codec (a later ``int8`` included), so the sum of what was sent plus the last residual is
the sum of the raw deltas. The residual is a plain ``{sent key: tensor}`` that stays on the client.

**Batched form.** :meth:`Codec.roundtrip_stacked` encodes and decodes ``G`` clients' stacked
``(G, *shape)`` deltas with the same row-wise kernels: row ``g`` equals ``decode(encode(row g))``.

Blockwise int8: Dettmers et al. 2022, https://arxiv.org/abs/2110.02861. Only the trainable LoRA factor:
FFA-LoRA (https://arxiv.org/abs/2403.12313) and Fed-SB (https://arxiv.org/abs/2502.15436).

Example:
    >>> import torch
    >>> codec = build_codec("topk+int8", {"topk": {"fraction": 0.5}})
    >>> delta = {"w": torch.tensor([0.1, -1.0, 0.3, 4.0])}
    >>> payload, residual = codec.encode(delta)
    >>> sorted(payload.tensors), payload.nbytes  # 2 int8 values + 1 fp32 scale + 2 int32 positions
    (['w::index', 'w::scale', 'w::values'], 14)
    >>> [round(v, 3) for v in codec.decode(payload, delta)["w"].tolist()]
    [0.0, -1.008, 0.0, 4.0]
    >>> [round(v, 3) for v in residual["w"].tolist()]  # kept by the client, added next round
    [0.1, 0.008, 0.3, 0.0]
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from asymvlm.errors import ClientUpdateError, ConfigError, InputError
from asymvlm.federated.core.tree import Params
from asymvlm.registry import Param, Registry, at_least, in_range

__all__ = ["COMPRESSORS", "Payload", "Stage", "Cast", "Int8", "TopK", "DropKnown", "Codec", "build_codec",
           "compress_results", "GLOBAL_STREAM"]  # fmt: skip

GLOBAL_STREAM = "@all"  # the one stream of a global top-k
Layout = dict[str, tuple[int, torch.dtype]]  # stream -> (length of its values, their dtype)
Streams = dict[str, dict[str, Tensor]]  # stream -> {part: (G, length) tensor}; part "values" always
_ROLES = {"keys": 0, "select": 1, "code": 2}


@dataclass(frozen=True)
class Payload:
    """One client's upload: 1-D tensors ``"<stream>::<part>"``, JSON ``meta``, ``nbytes`` of the tensors."""

    tensors: dict[str, Tensor]
    meta: dict[str, Any]
    nbytes: int


# -- stages: each works on rows (G, length) of every stream (G = 1 for one client) -------------------
class Stage:
    """One encoder/decoder pair: ``plan(layout)`` gives the output layout (each stream's values:
    length, dtype), ``parts(layout)`` the extra tensors it adds, ``encode`` / ``decode`` map streams
    (``layout`` is the stage's input layout), ``check`` validates its parts in a received payload."""

    name = ""
    role = ""

    def options(self) -> dict[str, Any]:
        """The stage's declared options (its registry entry's parameters) and their values."""
        return {p: getattr(self, p) for p in COMPRESSORS.entry(self.name).param_names}

    def parts(self, layout: Layout) -> Layout:
        return {}

    def check(self, streams: Streams, layout: Layout) -> None:
        return None


@dataclass(frozen=True)
class Cast(Stage):
    """Cast the values to a 2-byte float (``fp16``: overflow beyond 65504 is an error; ``bf16``)."""

    name: str = "fp16"
    dtype: torch.dtype = torch.float16
    role = "code"

    def plan(self, layout: Layout) -> Layout:
        return {s: (m, self.dtype) for s, (m, _) in layout.items()}

    def encode(self, streams: Streams, layout: Layout) -> Streams:
        out = {}
        for s, p in streams.items():
            out[s] = {**p, "values": p["values"].to(self.dtype)}
            if not bool(torch.isfinite(out[s]["values"]).all()):
                big = torch.finfo(self.dtype).max
                raise InputError(f"key {s!r}: a value exceeds the {self.name} range (|x| > {big:g}); use bf16")
        return out

    def decode(self, streams: Streams, layout: Layout) -> Streams:
        return {s: {**p, "values": p["values"].to(layout[s][1])} for s, p in streams.items()}


def _blocks(x: Tensor, block: int) -> Tensor:
    """(G, m) -> (G, ceil(m / block), block), zero padded at the end."""
    g, m = x.shape
    nb = -(-m // block)
    return F.pad(x, (0, nb * block - m)).reshape(g, nb, block)


@dataclass(frozen=True)
class Int8(Stage):
    """Blockwise absmax int8 (Dettmers et al. 2022, https://arxiv.org/abs/2110.02861): each block of
    ``block`` consecutive values (of the flattened tensor) has ``scale = absmax / 127`` (float32) and
    sends ``round(x / scale)`` in [-127, 127]; decoding gives ``q * scale``, so ``|error| <= scale/2``."""

    block: int = 256
    name = "int8"
    role = "code"

    def plan(self, layout: Layout) -> Layout:
        return {s: (m, torch.int8) for s, (m, _) in layout.items()}

    def parts(self, layout: Layout) -> Layout:
        return {f"{s}::scale": (-(-m // self.block), torch.float32) for s, (m, _) in layout.items()}

    def encode(self, streams: Streams, layout: Layout) -> Streams:
        out = {}
        for s, p in streams.items():
            x = p["values"].to(torch.float32)  # (G, m)
            blocks = _blocks(x, self.block)  # (G, nb, block)
            scale = blocks.abs().amax(dim=2) / 127.0  # (G, nb) float32
            safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero block stays 0
            q = torch.round(blocks / safe.unsqueeze(2)).clamp(-127, 127).to(torch.int8)
            out[s] = {**p, "values": q.flatten(1)[:, : x.shape[1]], "scale": scale}
        return out

    def decode(self, streams: Streams, layout: Layout) -> Streams:
        out = {}
        for s, p in streams.items():
            m, dtype = layout[s]
            q = p["values"].to(torch.float32)
            x = (_blocks(q, self.block) * p["scale"].unsqueeze(2)).flatten(1)[:, :m]
            out[s] = {**{k: v for k, v in p.items() if k != "scale"}, "values": x.to(dtype)}
        return out


@dataclass(frozen=True)
class TopK(Stage):
    """Top-k sparsification (Stich et al. 2018, https://arxiv.org/abs/1809.07599): keep the
    ``k = max(1, ceil(fraction n))`` largest magnitudes per tensor (``scope="tensor"``) or over the
    whole update (``"global"``); positions travel as int32, in increasing order (none when k = n).
    ``error_feedback`` makes the codec stateful (see the module docstring)."""

    fraction: float = 0.01
    scope: str = "tensor"
    error_feedback: bool = True
    name = "topk"
    role = "select"

    def k(self, n: int) -> int:
        """Values kept of ``n``: ``ceil(fraction n)`` (the product rounded to 9 digits first, so
        that 0.07 * 100 keeps 7), at least 1, at most n."""
        return min(n, max(1, math.ceil(round(self.fraction * n, 9)))) if n else 0

    def _input(self, layout: Layout) -> Layout:
        """The streams it selects from: each tensor, or (global) their concatenation."""
        if self.scope != "global" or not layout:
            return dict(layout)
        dtype = functools.reduce(torch.promote_types, [d for _, d in layout.values()])
        return {GLOBAL_STREAM: (sum(m for m, _ in layout.values()), dtype)}

    def plan(self, layout: Layout) -> Layout:
        return {s: (self.k(n), d) for s, (n, d) in self._input(layout).items()}

    def parts(self, layout: Layout) -> Layout:
        return {f"{s}::index": (self.k(n), torch.int32) for s, (n, _) in self._input(layout).items() if self.k(n) < n}

    def encode(self, streams: Streams, layout: Layout) -> Streams:
        if self.scope == "global" and streams:  # one (G, N) stream, in the layout's (sorted) key order
            dtype = self._input(layout)[GLOBAL_STREAM][1]
            streams = {GLOBAL_STREAM: {"values": torch.cat([streams[s]["values"].to(dtype) for s in layout], 1)}}
        out = {}
        for s, p in streams.items():
            x = p["values"]  # (G, n)
            k = self.k(x.shape[1])
            if k == x.shape[1]:
                out[s] = {"values": x}
                continue
            idx = torch.topk(x.abs(), k, dim=1, sorted=False).indices.sort(dim=1).values  # (G, k) increasing
            out[s] = {"values": x.gather(1, idx), "index": idx.to(torch.int32)}
        return out

    def decode(self, streams: Streams, layout: Layout) -> Streams:
        out = {}
        for s, (n, dtype) in self._input(layout).items():
            vals, idx = streams[s]["values"].to(dtype), streams[s].get("index")
            if idx is not None:
                vals = torch.zeros(vals.shape[0], n, dtype=dtype, device=vals.device).scatter(1, idx.long(), vals)
            out[s] = {"values": vals}
        if self.scope == "global" and layout:
            parts = torch.split(out[GLOBAL_STREAM]["values"], [m for m, _ in layout.values()], dim=1)
            out = {s: {"values": part.to(d)} for (s, (_, d)), part in zip(layout.items(), parts)}
        return out

    def check(self, streams: Streams, layout: Layout) -> None:
        for s, (n, _) in self._input(layout).items():
            idx = streams[s].get("index")
            if idx is None or idx.numel() == 0:
                continue
            inside = bool(idx[:, 0].min() >= 0) and bool(idx[:, -1].max() < n)
            if not (inside and bool((idx[:, 1:] > idx[:, :-1]).all())):
                raise InputError(f"tensor {s + '::index'!r}: positions must increase strictly within [0, {n})")


@dataclass(frozen=True)
class DropKnown(Stage):
    """Send nothing for keys the server knows never change (the frozen LoRA A factors of FFA-LoRA,
    https://arxiv.org/abs/2403.12313; Fed-SB, https://arxiv.org/abs/2502.15436); the codec drops
    them before the value stages and decodes them as zero deltas."""

    frozen: frozenset[str] = frozenset()
    name = "lora_b"
    role = "keys"


# -- the registry ------------------------------------------------------------------------------------
COMPRESSORS = Registry("compressor")
COMPRESSORS.register("none", help="Identity: the delta as trained (4 bytes a float32 value).", role="none")(
    lambda: None
)
for _name, _dtype, _help, _ref in (
    ("fp16", torch.float16, "Cast to IEEE float16: 2 bytes a value, relative error <= 2^-11 (normal range).",
     "https://doi.org/10.1109/IEEESTD.2019.8766229"),
    ("bf16", torch.bfloat16, "Cast to bfloat16: 2 bytes a value, float32's range, relative error <= 2^-8.",
     "https://arxiv.org/abs/1905.12322"),
):  # fmt: skip
    COMPRESSORS.register(_name, help=_help, reference=_ref, role="code")(functools.partial(Cast, _name, _dtype))
COMPRESSORS.register(
    "int8",
    params=[Param("block", int, 256, "Values per block of the flattened tensor, one float32 absmax scale each.",
                  check=at_least(1))],
    help="Blockwise absmax int8: n + 4 ceil(n/block) bytes; |error| <= absmax/254 per block.",
    reference="https://arxiv.org/abs/2110.02861", role="code",
)(Int8)  # fmt: skip
COMPRESSORS.register(
    "topk",
    params=[
        Param("fraction", float, 0.01, "Fraction of the values kept: k = max(1, ceil(fraction n)).",
              check=in_range(0, 1, lo_open=True)),
        Param("scope", Literal["tensor", "global"], "tensor",
              "'tensor': the k largest of each tensor; 'global': of the whole update."),
        Param("error_feedback", bool, True,
              "Keep what was not sent (the whole codec's error) on the client and add it next round.",
              reference="https://arxiv.org/abs/1901.09847"),
    ],
    help="Top-k magnitude sparsification: k values + k int32 positions.",
    reference="https://arxiv.org/abs/1809.07599", role="select",
)(TopK)  # fmt: skip
COMPRESSORS.register(
    "lora_b", help="Send only the trainable LoRA factor: the frozen A factors (lora_mode frozen_a) cost 0 bytes.",
    reference="https://arxiv.org/abs/2403.12313", role="keys",
)(lambda: DropKnown())  # fmt: skip


# -- the codec ---------------------------------------------------------------------------------------
def _bad(message: str, client: Any = None, key: str | None = None) -> ClientUpdateError:
    where = f"client {client}: " if client is not None else ""
    return ClientUpdateError(where + message, client, key)


def _check_tensors(tree: Mapping[str, Any], what: str, rows: int | None = None) -> None:
    """Float tensors, finite, named without '::' (with ``rows``: a leading dimension of that size)."""
    for k, v in tree.items():
        if not isinstance(v, Tensor) or not v.is_floating_point():
            raise InputError(f"{what} key {k!r} is not a floating-point tensor")
        if "::" in k or k == GLOBAL_STREAM:
            raise InputError(f"{what} key {k!r}: names may not contain '::' or be {GLOBAL_STREAM!r}")
        if rows is not None and (v.dim() == 0 or v.shape[0] != rows):
            raise InputError(f"{what} key {k!r} has shape {tuple(v.shape)}; expected {rows} stacked rows first")
        if v.numel() and not all(math.isfinite(float(e)) for e in torch.aminmax(v)):  # one pass; NaN propagates
            bad = ~torch.isfinite(v)
            at = "" if rows is None else f" (row {int(bad.reshape(rows, -1).any(dim=1).nonzero()[0, 0])})"
            raise InputError(f"{what} key {k!r} is not finite{at}")


@dataclass(frozen=True)
class Codec:
    """Encoders applied left to right, decoders in reverse (build it with :func:`build_codec`).

    Attributes:
        stages: the encoders, in spec order.
        frozen_keys: the keys ``lora_b`` drops (empty without it).
    """

    stages: tuple[Stage, ...] = ()
    frozen_keys: frozenset[str] = field(default_factory=frozenset)

    @property
    def spec(self) -> str:
        return "+".join(s.name for s in self.stages) or "none"

    @property
    def signature(self) -> list[list[Any]]:
        """``[[name, options], ...]``: what encoded a payload (JSON; checked when decoding)."""
        return [[s.name, s.options()] for s in self.stages]

    @property
    def stateful(self) -> bool:
        """Does a client keep a residual (error feedback) between rounds?"""
        return any(getattr(s, "error_feedback", False) for s in self.stages)

    @property
    def _values(self) -> tuple[Stage, ...]:
        return tuple(s for s in self.stages if s.role != "keys")

    def describe(self) -> str:
        """The spec, then each encoder with its options, help and reference, one line each."""
        lines = [f"compression {self.spec}" + (" (stateful: error feedback)" if self.stateful else "")]
        for s in self.stages:
            e, opts = COMPRESSORS.entry(s.name), ", ".join(f"{k}={v!r}" for k, v in s.options().items())
            lines.append(f"  {s.name}({opts}): {e.help} <{e.reference}>")
        return "\n".join(lines)

    def split(self, keys: Iterable[str]) -> tuple[list[str], list[str]]:
        """(sent keys, dropped keys), both sorted."""
        keys = sorted(keys)
        if not any(s.role == "keys" for s in self.stages):
            return keys, []
        return [k for k in keys if k not in self.frozen_keys], [k for k in keys if k in self.frozen_keys]

    # -- shared by every path ------------------------------------------------------------------------
    def _plan(self, layout: Layout) -> list[Layout]:
        layouts = [layout]
        for st in self._values:
            layouts.append(st.plan(layouts[-1]))
        return layouts

    def _expected(self, layouts: Sequence[Layout]) -> Layout:
        out: Layout = {}
        for st, lay in zip(self._values, layouts):
            out.update(st.parts(lay))
        out.update({f"{s}::values": md for s, md in layouts[-1].items()})
        return out

    def _run(self, rows: Mapping[str, Tensor], layout: Layout) -> tuple[Streams, list[Layout]]:
        streams: Streams = {k: {"values": rows[k]} for k in layout}
        layouts = self._plan(layout)
        for st, lay in zip(self._values, layouts):
            streams = st.encode(streams, lay)
        return streams, layouts

    def _undo(self, streams: Streams, layouts: Sequence[Layout]) -> dict[str, Tensor]:
        for st, lay in zip(reversed(self._values), reversed(layouts[:-1])):
            streams = st.decode(streams, lay)
        return {k: p["values"] for k, p in streams.items()}

    def _prepare(
        self, delta: Mapping[str, Tensor], residual: Mapping[str, Tensor] | None, rows: int | None
    ) -> tuple[dict[str, Tensor], list[str], list[str]]:
        """The values to encode (delta plus residual), the sent keys and the dropped keys."""
        _check_tensors(delta, "delta", rows)
        sent, dropped = self.split(delta)
        moved = [k for k in dropped if bool((delta[k] != 0).any())]
        if moved:
            raise InputError(f"frozen key {moved[0]!r} changed on the client; lora_b sends nothing for it")
        x = {k: delta[k] for k in sent}
        if residual is None:
            return x, sent, dropped
        if not self.stateful:
            raise InputError(f"compression {self.spec!r} keeps no residual (no error feedback), got one")
        _check_tensors(residual, "residual", rows)
        odd = sorted(set(residual) ^ set(sent)) or [k for k in sent if residual[k].shape != x[k].shape]
        if odd:
            raise InputError(f"residual key {odd[0]!r}: a residual has the sent keys, each shaped as the delta")
        return {k: x[k] + residual[k].to(x[k].dtype) for k in sent}, sent, dropped

    def nbytes(self, like: Mapping[str, Tensor]) -> int:
        """Bytes of one client's payload for a delta shaped as ``like`` (data-independent).

        Example:
            >>> build_codec("int8", {"int8": {"block": 4}}).nbytes({"w": torch.zeros(10)})  # 10 + 4 * 3
            22
        """
        sent, _ = self.split(like)
        layouts = self._plan({k: (like[k].numel(), like[k].dtype) for k in sent})
        return sum(m * torch.empty(0, dtype=d).element_size() for m, d in self._expected(layouts).values())

    # -- one client -----------------------------------------------------------------------------------
    def encode(
        self, delta: Mapping[str, Tensor], residual: Mapping[str, Tensor] | None = None
    ) -> tuple[Payload, Params | None]:
        """Client side: ``(payload, new residual)``; the residual is None unless :attr:`stateful`
        (``residual=None`` on a client's first round means zeros).

        Raises:
            InputError: a delta or residual value that is not finite, a residual that does not match.
        """
        x, sent, dropped = self._prepare(delta, residual, None)
        layout = {k: (x[k].numel(), x[k].dtype) for k in sent}
        streams, layouts = self._run({k: x[k].reshape(1, -1) for k in sent}, layout)
        tensors = {f"{s}::{part}": t[0].contiguous() for s, parts in streams.items() for part, t in parts.items()}
        meta = {"format": "asymvlm.compression/1", "codec": self.signature, "keys": sent, "dropped": dropped}
        payload = Payload(tensors, meta, sum(t.numel() * t.element_size() for t in tensors.values()))
        if not self.stateful:
            return payload, None
        sent_values = self._undo(streams, layouts)
        return payload, {k: x[k] - sent_values[k].reshape(x[k].shape).to(x[k].dtype) for k in sent}

    def decode(self, payload: Payload, like: Mapping[str, Tensor], *, client: Any = None) -> Params:
        """Server side: the delta a payload carries, shaped and typed as ``like`` (the server's
        params); the dropped frozen keys come back as zeros.

        Raises:
            ClientUpdateError: (an InputError) naming the client and the key or tensor: another codec, an
                unknown or undroppable key, a missing, extra or misshapen tensor, NaN/inf, bad positions.
        """
        meta = payload.meta
        if meta.get("codec") != self.signature:
            raise _bad(f"payload encoded by {meta.get('codec')!r}, the server decodes {self.signature!r}", client)
        keys, dropped = list(meta.get("keys", ())), list(meta.get("dropped", ()))
        if unknown := [k for k in keys + dropped if k not in like]:
            raise _bad(f"payload key {unknown[0]!r} is not a parameter of the server", client, unknown[0])
        if keys != sorted(set(keys)) or set(keys) & set(dropped):
            raise _bad("payload keys must be sorted, unique and disjoint from the dropped ones", client)
        if odd := [k for k in dropped if k not in self.split([k])[1]]:
            raise _bad(f"payload drops key {odd[0]!r}, which is not a frozen key of the server", client, odd[0])
        layouts = self._plan({k: (like[k].numel(), like[k].dtype) for k in keys})
        expected = self._expected(layouts)
        for name in sorted(set(payload.tensors) | set(expected)):
            t, want = payload.tensors.get(name), expected.get(name)
            key = name.rsplit("::", 1)[0]
            if not isinstance(t, Tensor) or want is None:
                raise _bad(f"payload tensor {name!r} is {'missing' if t is None else 'unexpected'}", client, key)
            if t.dim() != 1 or t.numel() != want[0] or t.dtype != want[1]:
                got = f"{tuple(t.shape)} {t.dtype}"
                raise _bad(f"payload tensor {name!r} is {got}; expected ({want[0]},) {want[1]}", client, key)
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise _bad(f"payload tensor {name!r} is not finite", client, key)
        streams: Streams = {}
        for name, t in payload.tensors.items():
            s, part = name.rsplit("::", 1)
            streams.setdefault(s, {})[part] = t.unsqueeze(0)
        try:
            for st, lay in zip(self._values, layouts):
                st.check(streams, lay)
        except InputError as err:
            raise _bad(str(err), client) from None
        rows = self._undo(streams, layouts)
        out = {k: rows[k].reshape(like[k].shape).to(like[k].dtype) for k in keys}
        return out | {k: torch.zeros_like(like[k]) for k in dropped}

    # -- G clients at once -----------------------------------------------------------------------------
    def roundtrip_stacked(
        self, stacked: Mapping[str, Tensor], residual: Mapping[str, Tensor] | None = None, *, chunk: int = 1 << 20
    ) -> tuple[Params, Params | None, list[int]]:
        """Encode and decode ``G`` clients at once: every row of ``stacked[key]`` (``(G, *shape)``) is
        one client's delta, every row of ``residual`` its residual. Returns the decoded rows (the
        dropped keys as zeros), the new residuals (None unless :attr:`stateful`) and the bytes each
        client sends; row ``g`` equals ``decode(encode(row g))`` exactly. The kernels act row by row, so
        rows go through in chunks of about ``chunk`` values (cache-sized on CPU; chunks change nothing).

        Example:
            >>> codec = build_codec("topk", {"topk": {"fraction": 0.5}})
            >>> out, res, nbytes = codec.roundtrip_stacked({"w": torch.tensor([[1.0, -3.0], [2.0, 0.5]])})
            >>> out["w"].tolist(), res["w"].tolist(), nbytes
            ([[0.0, -3.0], [2.0, 0.0]], [[1.0, 0.0], [0.0, 0.5]], [8, 8])
        """
        sizes = {v.shape[0] if isinstance(v, Tensor) and v.dim() else None for v in stacked.values()}
        if len(sizes) != 1 or None in sizes:
            raise InputError("stacked tensors need one leading client dimension G: (G, *shape) each")
        g = sizes.pop()
        x, sent, dropped = self._prepare(stacked, residual, g)
        layout = {k: (x[k].shape[1:].numel(), x[k].dtype) for k in sent}
        step, parts, per = max(1, chunk // max(1, sum(m for m, _ in layout.values()))), [], 0
        for i in range(0, max(g, 1), step):
            rows = min(step, g - i)
            streams, layouts = self._run({k: x[k][i : i + rows].reshape(rows, layout[k][0]) for k in sent}, layout)
            per = sum(t.shape[1] * t.element_size() for ps in streams.values() for t in ps.values())
            parts.append(self._undo(streams, layouts))
        dec = {k: torch.cat([p[k] for p in parts]).reshape(x[k].shape).to(x[k].dtype) for k in sent}
        out = {k: dec[k] if k in dec else torch.zeros_like(v) for k, v in stacked.items()}
        new = {k: x[k] - dec[k] for k in sent} if self.stateful else None
        return out, new, [per] * g


def build_codec(
    spec: str = "none", options: Mapping[str, Mapping[str, Any]] | None = None, *, frozen_keys: Iterable[str] = ()
) -> Codec:
    """The codec of a ``compression`` spec and its ``compression_options``.

    Args:
        spec: encoder names joined by ``+``, in the order keys (``lora_b``), select (``topk``),
            code (``fp16`` / ``bf16`` / ``int8``); ``"none"`` or ``""``: the identity.
        options: ``{encoder: {option: value}}`` (``fed.options_of("compression_options")``).
        frozen_keys: the exchanged keys that never change (``LoraLayers.frozen_keys``); ``lora_b`` drops them.

    Raises:
        ConfigError: an unknown encoder or option, a value out of range, an encoder twice or out of
            order, options for an encoder not in the spec, ``lora_b`` without frozen keys.

    Example:
        >>> build_codec("lora_b+topk", frozen_keys=["a.lora_A.w"]).describe().splitlines()[0]
        'compression lora_b+topk (stateful: error feedback)'
        >>> build_codec("int8+topk")
        Traceback (most recent call last):
        ...
        asymvlm.errors.ConfigError: compression 'int8+topk': order lora_b, topk, code (fp16/bf16/int8), ...
    """
    names = [n.strip() for n in (spec.strip() or "none").split("+")]
    if not all(names):
        raise ConfigError(f"compression {spec!r}: an empty encoder name")
    roles = [COMPRESSORS.entry(n).extra["role"] for n in names]  # unknown names: ConfigError
    if "none" in roles and len(names) > 1:
        raise ConfigError(f"compression {spec!r}: 'none' cannot be combined with other encoders")
    ranks = [_ROLES.get(r, -1) for r in roles]
    if any(b <= a for a, b in zip(ranks, ranks[1:])):
        raise ConfigError(f"compression {spec!r}: order lora_b, topk, code (fp16/bf16/int8), each at most once")
    options = dict(options or {})
    if stray := [k for k in options if k not in names]:
        raise ConfigError(f"compression_options name {stray[0]!r}, which is not in compression {spec!r}")
    frozen = frozenset(frozen_keys)
    stages: list[Stage] = []
    for name in names:
        opts = options.get(name) or {}
        if not isinstance(opts, Mapping):
            raise ConfigError(f"compression_options[{name!r}] must be a mapping of options, got {opts!r}")
        stage = COMPRESSORS.build(name, **dict(opts))
        if isinstance(stage, DropKnown):
            if not frozen:
                raise ConfigError("compression 'lora_b' needs frozen keys (lora_mode frozen_a): none were given")
            stage = DropKnown(frozen)
        if stage is not None:
            stages.append(stage)
    return Codec(tuple(stages), frozen if any(isinstance(s, DropKnown) for s in stages) else frozenset())


def compress_results(
    codec: Codec,
    deltas: Sequence[Mapping[str, Tensor]],
    residuals: Sequence[Mapping[str, Tensor] | None] | None = None,
    *,
    clients: Sequence[Any] | None = None,
) -> tuple[list[Params], list[Params | None], list[int]]:
    """``(decoded deltas, new residuals, bytes per client)`` of a round's clients (the sequential
    simulator's path): each delta encoded with its client's residual (``residuals`` None or a None
    entry: zeros) and decoded against itself; residuals are None where the codec is stateless;
    errors name the client (``clients``: ids, default 0, 1, ...).

    Example:
        >>> codec = build_codec("bf16")
        >>> dec, res, nbytes = compress_results(codec, [{"w": torch.tensor([1.0, 1/3])}])
        >>> dec[0]["w"].tolist(), res, nbytes
        ([1.0, 0.333984375], [None], [4])
    """
    residuals = list(residuals) if residuals is not None else [None] * len(deltas)
    clients = list(clients) if clients is not None else list(range(len(deltas)))
    if not len(residuals) == len(clients) == len(deltas):
        raise InputError(f"{len(deltas)} deltas, {len(residuals)} residuals and {len(clients)} client ids")
    decoded, new, sizes = [], [], []
    for delta, res, c in zip(deltas, residuals, clients):
        try:
            payload, r = codec.encode(delta, res)
        except InputError as err:
            raise _bad(str(err), c) from None
        decoded.append(codec.decode(payload, delta, client=c))
        new.append(r)
        sizes.append(payload.nbytes)
    return decoded, new, sizes
