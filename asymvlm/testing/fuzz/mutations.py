"""The mutations of files: every field of a JSON file, every tensor of a safetensors file, and any
file or folder replaced by a link outside the artefact (the ops are listed in
:mod:`asymvlm.testing.fuzz`).

Example:
    >>> _show(("head", "hidden_dims", 0)), _show(())
    ('head.hidden_dims[0]', '<root>')
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .outcomes import Mutation

__all__ = [
    "is_number",
    "negated",
    "read_tensors",
    "tensor_ops",
    "json_mutations",
    "apply_json",
    "safetensors_mutations",
    "mutate_tensor",
    "apply_safetensors",
    "apply_symlink",
]

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


def is_number(v: Any) -> bool:
    """A JSON number (an int or a float, not a bool)."""
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
    if is_number(value):
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


def negated(v: Any) -> Any:
    """A negative number other than ``v`` (``-v``, or ``v - 1`` when ``v`` is not positive)."""
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
        return str(old) if is_number(old) else "fuzz"
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
        return negated(old)
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
def read_tensors(path: Path) -> tuple[dict[str, Any], dict[str, str] | None]:
    """A safetensors file's tensors (copies) and its metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k).clone() for k in f.keys()}, f.metadata()


def tensor_ops(t: Any) -> list[str]:
    """The mutations of one tensor, by its dtype (:func:`mutate_tensor` applies them)."""
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
    tensors, _ = read_tensors(art / rel)
    out = [Mutation(kind, rel, "<file>", op) for op in ("truncated", "garbage", "extra_tensor")]
    if not optional:
        out.append(Mutation(kind, rel, "<file>", "missing_file"))
    for name in sorted(tensors):
        out += [Mutation(kind, rel, name, op) for op in tensor_ops(tensors[name])]
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
    tensors, meta = read_tensors(path)
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
