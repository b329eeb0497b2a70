"""A mutation fuzzer for every artefact asymvlm writes (issue 26, "close the class").

For each artefact kind (:data:`KINDS`) the harness builds a small valid artefact (tiny dimensions,
seconds), then changes ONE thing at a time — a JSON field, a tensor, a whole file, a folder entry, a
field of a Flower reply — loads the result the way the package does, and classifies what happened:

==============  ==================================================================================
outcome         meaning
==============  ==================================================================================
``clean``       an :class:`asymvlm.errors.AsymVLMError` whose one-line message names the mutated
                file (its name appears in the message); for Flower replies: the node or client is
                named, or the run ends normally with that client's reply rejected and recorded
``equal``       the load succeeded and its result equals the unmutated one (same tensors, same
                config): the change did not matter
``traceback``   any other exception (or no result within the time limit)
``silent``      the load succeeded with a different result: a tampered artefact was used
``unnamed``     an AsymVLMError that does not name the file (or spans several lines)
==============  ==================================================================================

Only ``clean`` and ``equal`` are acceptable. The mutations (:class:`Mutation`):

* every JSON field (nested dicts; lists: each element of a short list, the first of a long one;
  of sibling containers with the same structure only the first is entered): wrong type
  (``null``, ``string``, ``list``, ``dict``, ``bool``, ``huge_int`` 2**62, ``float_for_int``),
  out of range (``negative``, ``1e30``), ``nan``, ``inf``, ``missing``; path-like strings
  (``abs_path``, ``dotdot_path``, ``symlink_path``: a link inside the artefact to a file outside);
  per object ``extra_key``; per file ``deep_nesting`` (100,000 levels as raw JSON text),
  ``truncated``, ``garbage``, ``missing_file``;
* every safetensors tensor: ``nan``, ``inf`` (floats), ``negative``, ``huge_int`` (integers),
  ``wrong_shape``, ``dtype_int``, ``dtype_float16`` (``dtype_float32`` for float16 tensors),
  ``missing_tensor``; per file ``extra_tensor``, ``truncated``, ``garbage``, ``missing_file``;
* every file and sub-folder: ``symlink_outside`` (replaced by a link to the same entry of another
  valid artefact, outside the folder).

Nothing here is imported by the package; the package under test is imported lazily, so the bench
(``bench/fuzz_artifacts.py --root``) can point this file at an older checkout.

Example (the outcome of one mutation; builds a tiny model folder, ~1 s):
    >>> import tempfile
    >>> h = Harness(tempfile.mkdtemp(), kinds=["model"])
    >>> m = next(m for m in h.mutations("model") if m.op == "garbage" and m.file == "head.safetensors")
    >>> h.run(m).outcome
    'clean'
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import re
import shutil
import signal
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "OUTCOMES",
    "ACCEPTABLE",
    "EXEMPT",
    "KINDS",
    "Mutation",
    "Result",
    "Harness",
    "same",
    "count_outcomes",
]

OUTCOMES = ("clean", "equal", "traceback", "silent", "unnamed")
ACCEPTABLE = frozenset({"clean", "equal"})

HUGE_INT = 2**62  # fits int64: reaches the code behind a parse (allocations, loops) instead of an overflow
DEEP = 100_000  # nesting levels of the deep_nesting mutation (issue 26: RecursionError in json.loads)
MAX_LIST_ITEMS = 4  # lists longer than this: only their first element is mutated
EXTRA_KEY = "fuzz_extra"
WIDE = 16  # objects with more keys (a run's whole config, kept for comparison): fewer mutations per key
WIDE_OPS = frozenset({"missing", "null"})
# keys whose string values name files or folders (besides values ending in a file suffix or naming
# an existing path): their values get the path-like mutations
PATH_KEYS = frozenset(
    {"text_adapter", "text_base_delta", "confidence", "init_from", "cache_dir", "output_dir", "mask_file",
     "config", "base", "finetuned", "adapter", "path", "file", "dir", "directory"}
)  # fmt: skip
FILE_SUFFIX = re.compile(r"\.(json|jsonl|safetensors|bin|pt|pth|txt|yaml|yml|index|md)$")
NOT_MUTATED = frozenset({".asymvlm-files.json", "README.md"})  # never read by a loader
# mutations that give another VALID artefact (a different value the format allows), so a load that
# differs is right: left out of the enumeration, each with its reason
EXEMPT = {
    "model:asymvlm_config.json:logit_scale:negative": "a negative log temperature is valid",
    "cache:caption_meta.json:level:missing": "caption_meta.json may hold either key",
    "cache:caption_meta.json:ambiguity:missing": "caption_meta.json may hold either key",
    "cache:caption_meta.json:ambiguity[0]:1e30": "any positive finite ambiguity is valid",
    "cache:caption_meta.json:ambiguity[0]:huge_int": "any positive finite ambiguity is valid",
    # null where the writer itself writes null (a valid artefact of another kind)
    "gallery:images/index.json:ids:null": "an index built without ids numbers its rows (the writer's null)",
    "gallery:gallery.json:thumbnails.max_side:null": "display only (the writer's null when thumbnails keep their size)",
    "gallery:gallery.json:encoder.spec:null": "display only: the fingerprint is what is checked",
    "cache:manifest.json:encoder.spec:null": "display only: the fingerprint is what is checked",
    "cache:manifest.json:encoder.fingerprint:null": "a cache of features made elsewhere (write_cache without an "
    "encoder) records none; every use against an encoder refuses it unless explicitly allowed",
    **{
        f"model:asymvlm_config.json:lineage.init_from:{op}": "display only (card, merge messages), never opened; "
        "merges check init_from_fingerprint, which is verified against the saved weights"
        for op in ("abs_path", "dotdot_path", "symlink_path")
    },
}


# ----------------------------------------------------------------------------------------------
# mutations and results
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Mutation:
    """One change to one artefact: ``op`` applied to ``field`` of ``file`` (relative to the artefact).

    ``field`` is a JSON path (``head.hidden_dims[0]``, ``<root>`` for the document, ``<file>`` for
    the whole file), a tensor name, a folder entry, or for Flower ``record.key`` of a reply.
    """

    kind: str
    file: str
    field: str
    op: str
    path: tuple = ()  # the JSON path as keys and indices (not shown)

    @property
    def id(self) -> str:
        return f"{self.kind}:{self.file}:{self.field}:{self.op}"

    def __str__(self) -> str:
        return self.id


@dataclass
class Result:
    """The outcome of one mutation (``line``: the exception or the difference, one line)."""

    kind: str
    file: str
    field: str
    op: str
    outcome: str
    line: str = ""
    seconds: float = 0.0

    @property
    def id(self) -> str:
        return f"{self.kind}:{self.file}:{self.field}:{self.op}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def count_outcomes(results: Sequence[Result]) -> dict[str, dict[str, int]]:
    """``{kind: {outcome: count}}`` (every outcome present, zeros included), plus ``"all"``."""
    out: dict[str, dict[str, int]] = {}
    for r in results:
        for key in (r.kind, "all"):
            row = out.setdefault(key, dict.fromkeys(OUTCOMES, 0))
            row[r.outcome] += 1
    if "all" in out:
        out["all"] = out.pop("all")
    return out


# ----------------------------------------------------------------------------------------------
# comparing loaded results
# ----------------------------------------------------------------------------------------------
def same(a: Any, b: Any) -> bool:
    """Structural equality of loaded results: tensors equal in dtype, shape and values; floats equal
    (NaN equals NaN); containers recursively; other values of the same type and equal.

    Example:
        >>> import torch
        >>> same({"w": torch.ones(2), "s": [1, 2.0]}, {"w": torch.ones(2), "s": (1, 2.0)})
        True
        >>> same({"w": torch.ones(2)}, {"w": torch.ones(2, dtype=torch.float64)}), same(1, 1.0), same(1, True)
        (False, False, False)
    """
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        if a.is_floating_point():
            return bool(
                torch.equal(a, b) or torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
            )
        return bool(torch.equal(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return set(a) == set(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return type(a) is type(b) and a == b


def _first_difference(a: Any, b: Any, where: str = "") -> str:
    """Where two loaded results first differ (for the report line)."""
    import torch

    if isinstance(a, Mapping) and isinstance(b, Mapping):
        if set(a) != set(b):
            return f"{where or 'result'}: keys {sorted(map(str, set(a) ^ set(b)))[:3]} differ"
        for k in a:
            if not same(a[k], b[k]):
                return _first_difference(a[k], b[k], f"{where}.{k}" if where else str(k))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if not same(x, y):
                return _first_difference(x, y, f"{where}[{i}]")
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.dtype != b.dtype or a.shape != b.shape:
            return f"{where}: {b.dtype} {tuple(b.shape)} instead of {a.dtype} {tuple(a.shape)}"
        finite = bool(torch.isfinite(b).all()) if b.is_floating_point() else True
        return f"{where}: other values{'' if finite else ' (not finite)'}"
    return f"{where}: {_short(b)} instead of {_short(a)}"


def _short(v: Any, n: int = 60) -> str:
    s = repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


# ----------------------------------------------------------------------------------------------
# running one load under limits
# ----------------------------------------------------------------------------------------------
class FuzzTimeout(BaseException):
    """A load ran past its time limit (a BaseException: ``except Exception`` in the code under test
    must not swallow it)."""


@contextlib.contextmanager
def _limits(seconds: float, extra_bytes: int = 6 << 30) -> Iterator[None]:
    """A wall-clock limit (SIGALRM, main thread only) and an address-space limit of the current size
    plus ``extra_bytes`` (Linux), so a mutation that allocates without bound fails instead of the
    machine; warnings are silenced (the outcome is what counts)."""
    timer = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
    old_handler = None
    if timer:

        def _expired(signum, frame):
            raise FuzzTimeout(f"no result within {seconds:g} s")

        old_handler = signal.signal(signal.SIGALRM, _expired)
        signal.setitimer(signal.ITIMER_REAL, seconds)
    old_as = None
    try:
        import resource

        size = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        want = size + extra_bytes
        if (soft == resource.RLIM_INFINITY or soft > want) and (hard == resource.RLIM_INFINITY or want <= hard):
            resource.setrlimit(resource.RLIMIT_AS, (want, hard))
            old_as = (soft, hard)
    except (ImportError, OSError, ValueError):
        pass
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if timer:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old_handler)
        if old_as is not None:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, old_as)


def _package_root() -> Path:
    """The checkout the package under test comes from (the folder holding asymvlm/, federated/, ...)."""
    return Path(importlib.import_module("asymvlm").__file__).resolve().parents[1]


def _exception_line(err: BaseException) -> str:
    """``Type: message (at folder/file.py:line)``: the innermost frame inside the package."""
    msg = str(err).strip().splitlines()
    text = f"{type(err).__name__}: {msg[0][:240] if msg else ''}"
    root = str(_package_root())
    where = None
    for frame in traceback.extract_tb(err.__traceback__):
        if frame.filename.startswith(root) and "/testing/" not in frame.filename:
            where = f"{os.path.relpath(frame.filename, root)}:{frame.lineno}"
    return f"{text} (at {where})" if where else text


# ----------------------------------------------------------------------------------------------
# JSON mutations
# ----------------------------------------------------------------------------------------------
def _show(path: tuple) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "<root>"


def _signature(v: Any) -> Any:
    if isinstance(v, dict):
        return ("d", tuple(sorted((k, _signature(x)) for k, x in v.items())))
    if isinstance(v, list):
        return ("l", _signature(v[0]) if v else None)
    return type(v).__name__


def _json_fields(doc: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any, str]]:
    """``(path, value, depth)`` of every field: dict entries, the elements of short lists (the first of
    a long one). ``depth``: ``"full"`` (every mutation), ``"shallow"`` (a container that repeats the
    structure of an earlier sibling: only ``missing``, and it is not entered) or ``"wide"`` (a scalar
    of an object of more than :data:`WIDE` keys, a run's config copied for comparison: ``missing``,
    one wrong type and the path mutations)."""
    if isinstance(doc, dict):
        items: list[tuple[Any, Any]] = list(doc.items())
    elif isinstance(doc, list):
        items = list(enumerate(doc))[: len(doc) if len(doc) <= MAX_LIST_ITEMS else 1]
    else:
        return
    seen: set = set()
    wide = len(items) > WIDE
    for key, value in items:
        p = (*path, key)
        container = isinstance(value, (dict, list)) and len(value) > 0
        sig = _signature(value) if container else None
        deep = not container or sig not in seen
        if container:
            seen.add(sig)
        yield p, value, "shallow" if not deep else "wide" if wide and not container else "full"
        if deep:
            yield from _json_fields(value, p)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _path_like(key: Any, value: Any, art: Path, file_dir: Path) -> bool:
    if not isinstance(value, str):
        return False
    if key in PATH_KEYS or FILE_SUFFIX.search(value):
        return True
    if value and (value.startswith("/") and Path(value).exists()):
        return True
    return bool(value) and "/" not in value and value not in (".", "..") and (file_dir / value).exists()


def _value_ops(key: Any, value: Any, path_like: bool) -> list[str]:
    ops = []
    if value is not None:
        ops.append("null")
    if not isinstance(value, str) and value is not None:  # (a null field may well hold a string)
        ops.append("string")
    if not isinstance(value, list):
        ops.append("list")
    if not isinstance(value, dict):
        ops.append("dict")
    if not isinstance(value, bool):
        ops.append("bool")
    ops.append("huge_int")
    if _is_number(value):
        if isinstance(value, int):
            ops.append("float_for_int")
        ops += ["negative", "1e30", "nan", "inf"]
    if path_like:
        ops += ["abs_path", "dotdot_path", "symlink_path"]
    return ops


def json_mutations(kind: str, rel: str, art: Path, optional: bool) -> list[Mutation]:
    """The mutations of one JSON file of an artefact (see the module docstring)."""
    path = art / rel
    doc = json.loads(path.read_text())
    out = [Mutation(kind, rel, "<file>", op) for op in ("deep_nesting", "truncated", "garbage")]
    if not optional:
        out.append(Mutation(kind, rel, "<file>", "missing_file"))
    out += [
        Mutation(kind, rel, "<root>", op, ())
        for op in ("null", "string", "huge_int", "list" if isinstance(doc, dict) else "dict")
    ]
    if isinstance(doc, dict):
        out.append(Mutation(kind, rel, "<root>", "extra_key", ()))
    for p, value, depth in _json_fields(doc):
        ops = ["missing"]
        if depth != "shallow":
            ops += _value_ops(p[-1], value, _path_like(p[-1], value, art, path.parent))
        if depth == "wide":
            ops = [op for op in ops if op in WIDE_OPS or op.endswith("_path")]
        out += [Mutation(kind, rel, _show(p), op, p) for op in ops]
        if depth == "full" and isinstance(value, dict):
            out.append(Mutation(kind, rel, _show(p), "extra_key", p))
    return out


def _get(doc: Any, path: tuple) -> Any:
    for p in path:
        doc = doc[p]
    return doc


def _negative(v: Any) -> Any:
    return -v if v > 0 else v - 1


def _outside_target(art: Path, variant: Path, file_dir: Path, value: Any) -> Path:
    """What a path-like mutation points at: the same entry of the other artefact when the value
    names one, else a system file."""
    if isinstance(value, str) and value:
        for base in (file_dir, art):
            cand = base / value
            if not value.startswith("/") and cand.exists():
                twin = variant / cand.relative_to(art)
                if twin.exists():
                    return twin
        if value.startswith("/") and Path(value).exists():
            return Path(value)
    return Path("/etc/passwd")


def _apply_file_op(op: str, path: Path) -> bool:
    """The whole-file mutations shared by every file kind (truncated, garbage, missing_file);
    False when ``op`` is none of them."""
    if op == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif op == "garbage":
        path.write_bytes(_garbage(path.stat().st_size))
    elif op == "missing_file":
        path.unlink()
    else:
        return False
    return True


def apply_json(m: Mutation, art: Path, variant: Path) -> None:
    """Apply a JSON mutation to the file in the artefact copy ``art``."""
    path = art / m.file
    if _apply_file_op(m.op, path):
        return
    doc = json.loads(path.read_bytes())
    marker = "__fuzz_deep_nesting__"
    if m.op == "deep_nesting":
        if isinstance(doc, dict) and doc:
            doc[next(iter(doc))] = marker
        elif isinstance(doc, list) and doc:
            doc[0] = marker
        else:
            doc = marker
        text = json.dumps(doc, indent=2).replace(f'"{marker}"', "[" * DEEP + "]" * DEEP)
        path.write_text(text)
        return
    if m.op == "extra_key":
        _get(doc, m.path)[EXTRA_KEY] = 1
    elif m.op == "missing":
        del _get(doc, m.path[:-1])[m.path[-1]]
    else:
        old = _get(doc, m.path)
        new = _json_value(m.op, old, art, variant, path.parent)
        if m.path:
            _get(doc, m.path[:-1])[m.path[-1]] = new
        else:
            doc = new
    path.write_text(json.dumps(doc, indent=2, allow_nan=True))


def _json_value(op: str, old: Any, art: Path, variant: Path, file_dir: Path) -> Any:
    if op == "null":
        return None
    if op == "string":
        return str(old) if _is_number(old) else "fuzz"
    if op == "list":
        return [old]
    if op == "dict":
        return {}
    if op == "bool":
        return True
    if op == "huge_int":
        return HUGE_INT
    if op == "float_for_int":
        return old + 0.5
    if op == "negative":
        return _negative(old)
    if op == "1e30":
        return 1e30
    if op == "nan":
        return float("nan")
    if op == "inf":
        return float("inf")
    if op == "abs_path":
        return str(_outside_target(art, variant, file_dir, old))
    if op == "dotdot_path":
        return "../../etc/passwd"
    if op == "symlink_path":
        target = _outside_target(art, variant, file_dir, old)
        link = file_dir / ("fuzz-link" + (target.suffix if target.is_file() else ""))
        link.symlink_to(target, target_is_directory=target.is_dir())
        return link.name
    raise ValueError(f"unknown JSON mutation {op!r}")


def _garbage(n: int) -> bytes:
    """``n`` deterministic pseudo-random bytes (a xorshift stream; no RNG state is touched)."""
    out = bytearray()
    x = 0x9E3779B97F4A7C15
    while len(out) < max(n, 16):
        x ^= (x << 13) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 7
        x ^= (x << 17) & 0xFFFFFFFFFFFFFFFF
        out += x.to_bytes(8, "little")
    return bytes(out[: max(n, 16)])


# ----------------------------------------------------------------------------------------------
# safetensors mutations
# ----------------------------------------------------------------------------------------------
def _read_tensors(path: Path) -> tuple[dict[str, Any], dict[str, str] | None]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k).clone() for k in f.keys()}, f.metadata()


def _tensor_ops(t: Any) -> list[str]:
    import torch

    ops = []
    if t.is_floating_point():
        ops += ["nan", "inf"]
    elif t.dtype in (torch.int64, torch.int32, torch.int16, torch.int8):
        ops += ["negative", "huge_int"]
    ops.append("wrong_shape")
    if t.is_floating_point():
        ops += ["dtype_int", "dtype_float32" if t.dtype == torch.float16 else "dtype_float16"]
    else:
        ops += ["dtype_float32"]
        if t.dtype == torch.int64:
            ops.append("dtype_int32")
    ops.append("missing_tensor")
    return ops


def safetensors_mutations(kind: str, rel: str, art: Path, optional: bool) -> list[Mutation]:
    """The mutations of one safetensors file of an artefact."""
    tensors, _ = _read_tensors(art / rel)
    out = [Mutation(kind, rel, "<file>", op) for op in ("truncated", "garbage", "extra_tensor")]
    if not optional:
        out.append(Mutation(kind, rel, "<file>", "missing_file"))
    for name in sorted(tensors):
        out += [Mutation(kind, rel, name, op) for op in _tensor_ops(tensors[name])]
    return out


def mutate_tensor(op: str, t: Any) -> Any:
    """``t`` changed by the tensor mutation ``op`` (a new tensor)."""
    import torch

    flat = t.detach().clone().reshape(-1)
    if op in ("nan", "inf", "negative", "huge_int"):
        if flat.numel() == 0:
            flat = torch.zeros(1, dtype=t.dtype)
        value = {"nan": float("nan"), "inf": float("inf"), "negative": -1}.get(op)
        if op == "negative" and not t.is_floating_point():
            value = int(flat[0]) - 1 if int(flat[0]) <= 0 else -int(flat[0])
        if op == "huge_int":
            value = min(HUGE_INT, torch.iinfo(t.dtype).max)
        flat[0] = value
        return flat.reshape(t.shape) if flat.numel() == t.numel() else flat
    if op == "wrong_shape":
        if t.dim() == 0:
            return t.reshape(1).clone()
        if t.shape[0] == 0:
            return torch.zeros((1, *t.shape[1:]), dtype=t.dtype)
        return torch.cat([t, t[:1]], dim=0)
    if op == "dtype_int":
        return t.to(torch.int64)
    if op == "dtype_int32":
        return t.to(torch.int32)
    if op == "dtype_float16":
        return t.to(torch.float16)
    if op == "dtype_float32":
        return t.to(torch.float32)
    raise ValueError(f"unknown tensor mutation {op!r}")


def apply_safetensors(m: Mutation, art: Path, variant: Path) -> None:
    """Apply a safetensors mutation to the file in the artefact copy ``art``."""
    import torch
    from safetensors.torch import save_file

    path = art / m.file
    if _apply_file_op(m.op, path):
        return
    tensors, meta = _read_tensors(path)
    if m.op == "extra_tensor":
        tensors[EXTRA_KEY] = torch.zeros(2)
    elif m.op == "missing_tensor":
        del tensors[m.field]
    else:
        tensors[m.field] = mutate_tensor(m.op, tensors[m.field])
    path.unlink()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)


def apply_symlink(m: Mutation, art: Path, variant: Path) -> None:
    """Replace a file or folder of the artefact with a link to the same entry of another artefact."""
    path = art / m.file
    target = (variant / m.file).resolve()
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
    path.symlink_to(target, target_is_directory=target.is_dir())


# ----------------------------------------------------------------------------------------------
# artefact kinds
# ----------------------------------------------------------------------------------------------
def _unit(n: int, d: int, g: Any) -> Any:
    import torch

    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)


def _fingerprint(seed: int) -> str:
    import hashlib

    return hashlib.sha256(f"asymvlm-fuzz-encoder-{seed}".encode()).hexdigest()


def _write_tiny_cache(path: Path, n_images: int, seed: int, dim: int = 8, extras: bool = False) -> Path:
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
    return _read_tensors(path)[0]


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
        return "silent", _first_difference(baseline, result)


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
        _write_tiny_cache(directory / "cache", 16, seed=0, extras=True)

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
        _write_tiny_cache(directory / "cache", 24, seed=1)

    def run(self, support: Path, out: Path, seed: int, **kw: Any) -> Any:
        from asymvlm.config import DataArguments, HeadArguments
        from asymvlm.federated.config import FederatedArguments
        from asymvlm.federated.data import get_federated_data
        from asymvlm.federated.rounds import run_federated

        stop_after = kw.pop("stop_after", None)
        fed = FederatedArguments(
            rounds=3, num_clients=2, local_steps=2, local_batch_size=8, output_dir=str(out), progress=False,
            eval_every=0, local_lr=0.2, recipe="fedadam", seed=seed, **kw,
        )  # fmt: skip
        data = get_federated_data(DataArguments(cache_dir=str(support / "cache")), fed)
        head = HeadArguments(hidden_dims=[8], direction="learned")
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

        from asymvlm.serve.gallery import write_gallery

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
        _write_tiny_cache(dest, 6, seed=seed, extras=True)

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


# -- Flower replies -----------------------------------------------------------------------------
FLOWER_NODE, FLOWER_PARTITION = 2, 1  # the node whose replies are mutated, and the partition it holds


def _message_key(msg: Any) -> str:
    kind = msg.metadata.message_type
    if kind == "query":
        return "query.loss" if "arrays" in msg.content.array_records else "query.handshake"
    return kind


class _ReplyApp:
    """Wraps a ClientApp: records the replies of one node, or mutates them."""

    def __init__(self, app: Any, mutation: Mutation | None = None):
        self.app, self.mutation, self.record = app, mutation, {}

    def __call__(self, msg: Any, context: Any) -> Any:
        reply = self.app(msg, context)
        if reply.has_error():
            return reply
        key = _message_key(msg)
        self.record.setdefault(key, reply.content)
        if self.mutation is not None and self.mutation.file == key:
            from flwr.app import Message

            return Message(mutate_reply(self.mutation, reply.content), reply_to=msg)
        return reply


def _record_kind(rec: Any) -> str:
    from flwr.app import ArrayRecord, ConfigRecord

    return "arrays" if isinstance(rec, ArrayRecord) else "config" if isinstance(rec, ConfigRecord) else "metrics"


def _reply_mutations(key: str, content: Any) -> list[Mutation]:
    out: list[Mutation] = []
    for rname, rec in content.items():
        kind = _record_kind(rec)
        out += [Mutation("flower", key, rname, op) for op in ("missing_record", "wrong_record_type")]
        if kind == "arrays":
            tensors = dict(rec.to_torch_state_dict())
            out.append(Mutation("flower", key, rname, "extra_tensor"))
            for name in sorted(tensors):
                ops = [o for o in _tensor_ops(tensors[name]) if o not in ("dtype_float32", "dtype_int32")]
                out += [Mutation("flower", key, f"{rname}.{name}", op) for op in ops]
            continue
        out.append(Mutation("flower", key, rname, "extra_key"))
        for fname, value in dict(rec).items():
            if kind == "metrics":
                ops = ["missing", "nan", "inf", "negative", "huge_int", "1e30", "list"]
                if isinstance(value, int) and not isinstance(value, bool):
                    ops.insert(1, "float_for_int")
            else:
                ops = ["missing", "empty", "other", "huge_int", "bool", "list"]
            out += [Mutation("flower", key, f"{rname}.{fname}", op) for op in ops]
    return out


def mutate_reply(m: Mutation, content: Any) -> Any:
    """A Flower reply's records with the mutation ``m`` applied (a new RecordDict)."""
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    records = dict(content.items())
    rname, _, fname = m.field.partition(".")
    rec = records[rname]
    kind = _record_kind(rec)
    if m.op == "missing_record":
        del records[rname]
    elif m.op == "wrong_record_type":
        records[rname] = ConfigRecord({"fuzz": "x"}) if kind != "config" else MetricRecord({"fuzz": 1.0})
    elif kind == "arrays":
        tensors = dict(rec.to_torch_state_dict())
        if m.op == "extra_tensor":
            import torch

            tensors[EXTRA_KEY] = torch.zeros(2)
        elif m.op == "missing_tensor":
            del tensors[fname]
        else:
            tensors[fname] = mutate_tensor(m.op, tensors[fname]).contiguous()
        records[rname] = ArrayRecord(tensors)
    else:
        values = dict(rec)
        if m.op == "extra_key":
            values["fuzz-extra"] = 1
        elif m.op == "missing":
            del values[fname]
        else:
            old = values[fname]
            values[fname] = {
                "nan": float("nan"), "inf": float("inf"), "huge_int": HUGE_INT, "1e30": 1e30,
                "float_for_int": old + 0.5 if _is_number(old) else old,
                "negative": _negative(old) if _is_number(old) else old,
                "list": [old, old], "empty": "", "other": "0" * 64, "bool": True,
            }[m.op]  # fmt: skip
        records[rname] = (MetricRecord if kind == "metrics" else ConfigRecord)(values)
    return RecordDict(records)


class _Capture:
    """Log records of some loggers at WARNING and above, kept (and not printed) while a run lasts."""

    def __init__(self, *names: str):
        import logging

        self.loggers = [logging.getLogger(n) for n in names]
        self.lines: list[str] = []
        capture = self

        class _H(logging.Handler):
            def emit(self, record):
                capture.lines.append(record.getMessage())

        self.handler = _H(logging.WARNING)

    def __enter__(self) -> _Capture:
        self.old = [(lg.level, lg.propagate, list(lg.handlers)) for lg in self.loggers]
        for lg in self.loggers:
            lg.handlers = [self.handler]
            lg.setLevel(min(lg.level or 30, 30))
            lg.propagate = False
        return self

    def __exit__(self, *exc) -> None:
        for lg, (level, propagate, handlers) in zip(self.loggers, self.old):
            lg.handlers = handlers
            lg.setLevel(level)
            lg.propagate = propagate


_SUBJECT = re.compile(
    rf"\bnode\D{{0,4}}{FLOWER_NODE}\b|\b(client|partition)(-id|_id)?\D{{0,4}}{FLOWER_PARTITION}\b", re.IGNORECASE
)


def _rejections(records: list[dict], logs: list[str]) -> list[str]:
    """Reasons recorded for rejecting the mutated node's replies (metrics.jsonl entries under a key
    naming a rejection, or warnings that name the node or its partition)."""
    found = []

    def walk(obj: Any, rejecting: bool) -> None:
        if isinstance(obj, dict):
            who = {obj.get(k) for k in ("client", "partition", "partition-id", "partition_id")}
            if rejecting and (FLOWER_PARTITION in who or obj.get("node") == FLOWER_NODE):
                found.append(str(obj.get("reason", obj)))
            for k, v in obj.items():
                walk(v, rejecting or any(w in str(k).lower() for w in ("reject", "exclu", "refus")))
        elif isinstance(obj, list):
            for v in obj:
                walk(v, rejecting)

    for r in records:
        walk(r, False)
    found += [line for line in logs if _SUBJECT.search(line)]
    return found


class FlowerKind(Kind):
    name = "flower"
    description = (
        "Flower replies (handshake, initial loss, train, evaluate) of one node, read by the ServerApp (AdaFedAdam)"
    )

    def support(self, directory: Path) -> None:
        _write_tiny_cache(directory / "cache", 24, seed=3)

    def run_config(self, support: Path, out: Path) -> dict[str, Any]:
        return dict(
            cache_dir=str(support / "cache"), rounds=1, num_clients=2, eval_every=1, output_dir=str(out),
            hidden_dims="[8]", direction="learned", local_steps=2, local_batch_size=8, progress=False, local_lr=0.2,
            recipe="adafedadam", min_clients=1,
        )  # fmt: skip

    def _run(self, support: Path, wrapper: _ReplyApp) -> tuple[Any, list[dict], list[str]]:
        """The ServerApp over two nodes (node 2's replies through ``wrapper``): (state, metrics.jsonl
        records, warnings logged)."""
        from asymvlm.federated import flower as F

        out = support / "run"  # one output folder: the nodes' cached data stay valid between runs
        shutil.rmtree(out, ignore_errors=True)
        rc = self.run_config(support, out)
        nodes = [{"partition-id": p} for p in range(2)]
        with _Capture(F.__name__, "flwr") as cap:
            grid = F.LocalGrid(F.client_app, rc, nodes, apps={FLOWER_NODE: wrapper})
            state = F.run_flower_server(grid, rc)
        log = out / "metrics.jsonl"
        records = [json.loads(x) for x in log.read_text().splitlines() if x.strip()] if log.is_file() else []
        return state, records, cap.lines

    def build(self, dest: Path, seed: int, support: Path) -> None:
        dest.mkdir(parents=True, exist_ok=True)

    def mutations(self, art: Path, support: Path, baseline: Any) -> list[Mutation]:
        replies = baseline[3]  # node 2's first reply of each message kind in the unmutated run
        out = []
        for key in ("query.handshake", "query.loss", "train", "evaluate"):
            if key in replies:
                out += _reply_mutations(key, replies[key])
        return out

    def load(self, art, work, support, mutation):
        from asymvlm.federated import flower as F

        app = _ReplyApp(F.client_app, mutation=mutation)
        state, records, logs = self._run(support, app)
        snapshot = {"round": state.round, "params": {k: v.detach().clone() for k, v in state.params.items()}}
        return snapshot, records, logs, app.record

    def names(self, m: Mutation, message: str) -> bool:
        return bool(_SUBJECT.search(message))

    def judge(self, m: Mutation, result: Any, baseline: Any, work: Path) -> tuple[str, str]:
        import torch

        snapshot, records, logs = result[:3]
        if same(snapshot, baseline[0]):
            return "equal", ""
        reasons = _rejections(records, logs)
        finite = all(bool(torch.isfinite(v).all()) for v in snapshot["params"].values())
        if reasons and finite:
            return "clean", f"rejected: {reasons[0][:200]}"
        return "silent", _first_difference(baseline[0], snapshot) + ("" if finite else " (model not finite)")


KINDS: dict[str, type[Kind]] = {
    k.name: k
    for k in (
        ModelKind, TrainingCheckpointKind, FederatedCheckpointKind, GalleryKind, CacheKind, TaskVectorKind,
        MergeOutputKind, FlowerKind,
    )
}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# the harness
# ----------------------------------------------------------------------------------------------
@dataclass
class _Prepared:
    kind: Kind
    pristine: Path
    variant: Path
    support: Path
    baseline: Any
    mutations: list[Mutation] = field(default_factory=list)


class Harness:
    """Builds each kind's artefacts under ``workdir`` (once, on first use) and runs mutations.

    Args:
        workdir: a scratch folder (created).
        kinds: the kinds to use (default: all of :data:`KINDS`).
        time_limit: seconds one load may take before it counts as a hang (a ``traceback``).
    """

    def __init__(self, workdir: str | Path, kinds: Sequence[str] | None = None, time_limit: float = 60.0):
        self.root = Path(workdir)
        self.root.mkdir(parents=True, exist_ok=True)
        unknown = sorted(set(kinds or ()) - set(KINDS))
        if unknown:
            raise ValueError(f"unknown artefact kind(s) {unknown}; choose among {sorted(KINDS)}")
        self.kinds = list(kinds or KINDS)
        self.time_limit = time_limit
        self._prepared: dict[str, _Prepared] = {}

    def prepare(self, name: str) -> _Prepared:
        """Build the kind's support files, its valid artefact and a second one (another seed: what
        links and paths point at), and load the valid one twice (the loader must be deterministic)."""
        if name in self._prepared:
            return self._prepared[name]
        kind = KINDS[name]()
        base = self.root / name
        shutil.rmtree(base, ignore_errors=True)
        support, pristine, variant = base / "support", base / "pristine", base / "variant"
        support.mkdir(parents=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kind.support(support)
            kind.build(pristine, 0, support)
            kind.build(variant, 1, support)
            first = self._load(kind, pristine, support, None)
            again = self._load(kind, pristine, support, None)
        check = first[0] if name == "flower" else first
        if not same(check, again[0] if name == "flower" else again):
            raise RuntimeError(f"the loader of {name} is not deterministic: {_first_difference(check, again)}")
        prepared = _Prepared(kind, pristine, variant, support, first)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prepared.mutations = [m for m in kind.mutations(pristine, support, first) if m.id not in EXEMPT]
        self._prepared[name] = prepared
        return prepared

    def mutations(self, name: str) -> list[Mutation]:
        """Every mutation of the kind, in a fixed order."""
        return list(self.prepare(name).mutations)

    def all_mutations(self) -> list[Mutation]:
        return [m for name in self.kinds for m in self.mutations(name)]

    def _scratch(self, kind: Kind) -> tuple[Path, Path]:
        work = self.root / kind.name / "scratch"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        return work, work / "art"

    def _load(self, kind: Kind, pristine: Path, support: Path, m: Mutation | None, variant: Path | None = None) -> Any:
        work, art = self._scratch(kind)
        shutil.copytree(pristine, art, symlinks=True)
        if m is not None:
            kind.apply(m, art, variant or pristine)
        return kind.load(art, work / "out", support, m)

    def run(self, m: Mutation) -> Result:
        """Apply ``m`` to a fresh copy of the valid artefact, load it, and classify the outcome."""
        p = self.prepare(m.kind)
        errors = importlib.import_module("asymvlm.errors")
        t0 = time.perf_counter()
        try:
            with _limits(self.time_limit):
                result = self._load(p.kind, p.pristine, p.support, m, p.variant)
        except FuzzTimeout as err:
            outcome, line = "traceback", f"hang: {err}"
        except errors.AsymVLMError as err:
            msg = str(err).strip()
            one_line = "\n" not in msg
            named = p.kind.names(m, msg)
            outcome = "clean" if named and one_line else "unnamed"
            line = f"{type(err).__name__}: {msg.splitlines()[0][:300] if msg else ''}"
            if not one_line:
                line += f" [+{msg.count(chr(10))} more lines]"
        except Exception as err:  # RecursionError (deep nesting) included
            outcome, line = "traceback", _exception_line(err)
        else:
            outcome, line = p.kind.judge(m, result, p.baseline, self.root)
        finally:
            shutil.rmtree(self.root / m.kind / "scratch", ignore_errors=True)
        return Result(m.kind, m.file, m.field, m.op, outcome, line, round(time.perf_counter() - t0, 3))

    def run_all(
        self, kinds: Sequence[str] | None = None, on_result: Callable[[Result], None] | None = None
    ) -> list[Result]:
        """Every mutation of every kind (the full enumeration), in order."""
        results = []
        for name in kinds or self.kinds:
            for m in self.mutations(name):
                r = self.run(m)
                results.append(r)
                if on_result is not None:
                    on_result(r)
        return results
