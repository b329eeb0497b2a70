"""Reading artefacts with clear errors: JSON documents and safetensors files.

Every reader here turns a missing, corrupt, truncated or wrongly typed file into one
:class:`~asymvlm.errors.ArtefactError` naming the file (and the key or line): JSON (:func:`parse_json`,
:func:`read_json`, :func:`read_jsonl`, :func:`read_tagged_json` for a document with a ``type`` tag and
a ``format_version``) and safetensors (:func:`read_safetensors_header` from the header alone,
:func:`load_safetensors`, :func:`mmap_safetensors` and :class:`LazyParams`, memory-mapped). Writing
lives in :mod:`asymvlm.io` (atomic files and folders), which also exports every name of this module.

Example:
    >>> import tempfile, torch
    >>> from asymvlm.io import atomic_save_safetensors
    >>> p = atomic_save_safetensors({"w": torch.ones(2, 3)}, tempfile.mkdtemp() + "/w.safetensors")
    >>> read_safetensors_header(p)[0], LazyParams(p).shape("w")
    ({'w': ('F32', [2, 3])}, (2, 3))
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from asymvlm.errors import ArtefactError

__all__ = [
    "check_index_meta",
    "parse_json",
    "is_json_int",
    "is_json_number",
    "read_json",
    "read_jsonl",
    "read_tagged_json",
    "read_safetensors_header",
    "load_safetensors",
    "mmap_safetensors",
    "inside_folder",
    "LazyParams",
]


# ----------------------------------------------------------------------------------------------
# JSON
# ----------------------------------------------------------------------------------------------
def is_json_int(value: Any) -> bool:
    """An integer as a JSON document holds one (``True`` is not 1): the type check every artefact
    reader applies to its counts, steps and sizes."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_json_number(value: Any, *, finite: bool = False) -> bool:
    """An int or float as a JSON document holds one (not a bool); ``finite``: and not NaN or inf."""
    return isinstance(value, int | float) and not isinstance(value, bool) and (not finite or math.isfinite(value))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a finite number")


def parse_json(text: str | bytes, where: Any, *, allow_nan: bool = True) -> Any:
    """``json.loads(text)`` with every failure as one :class:`ArtefactError` naming ``where``: invalid
    JSON, invalid UTF-8, nesting too deep for the parser (a ``RecursionError`` otherwise), and with
    ``allow_nan=False`` the non-standard constants ``NaN``, ``Infinity`` and ``-Infinity``."""
    try:
        if allow_nan:
            return json.loads(text)
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ArtefactError(f"corrupt JSON in {where}: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as err:  # json.JSONDecodeError is a ValueError
        raise ArtefactError(f"corrupt JSON in {where}: {err}") from None


def read_json(path: str | Path, *, allow_nan: bool = True) -> Any:
    """Read JSON with an :class:`ArtefactError` naming the file when missing or corrupt (invalid,
    nested too deeply, or with ``allow_nan=False`` holding ``NaN`` / ``Infinity``)."""
    path = Path(path)
    if not path.is_file():
        raise ArtefactError(f"missing file: {path}")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ArtefactError(f"cannot read {path}: {err.strerror or err}") from None
    return parse_json(raw, path, allow_nan=allow_nan)


def read_jsonl(path: str | Path) -> list[Any]:
    """The records of a JSON-lines log (``train_log.jsonl``, ``metrics.jsonl``); [] when the file is
    missing, an :class:`ArtefactError` naming the file and line when one is corrupt."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ArtefactError(f"cannot read {path}: {err}") from None
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            records.append(parse_json(line, f"{path}, line {n}"))
    return records


def read_tagged_json(
    path: str | Path,
    type_tag: str,
    max_version: int,
    required: Iterable[str],
    known: Iterable[str],
    *,
    allow_nan: bool = True,
) -> dict[str, Any]:
    """Read an artefact JSON: check its ``type`` and ``format_version``, require keys, drop unknown ones.

    Unknown keys (written by a newer asymvlm) are dropped with a warning that names them;
    missing required keys and a wrong type tag are :class:`ArtefactError`. ``allow_nan=False``:
    ``NaN`` / ``Infinity`` anywhere in the file is an :class:`ArtefactError` (for artefacts whose
    writer never stores them).
    """
    doc = read_json(path, allow_nan=allow_nan)
    if not isinstance(doc, dict):
        raise ArtefactError(f"{path}: expected a JSON object")
    if doc.get("type") != type_tag:
        raise ArtefactError(f"{path}: type is {doc.get('type')!r}, expected {type_tag!r}")
    version = doc.get("format_version")
    if not isinstance(version, int):
        raise ArtefactError(f"{path}: missing or invalid format_version")
    if isinstance(version, bool) or version < 1:
        raise ArtefactError(f"{path}: invalid format_version {version!r}")
    if version > max_version:
        warnings.warn(
            f"{path} has format_version {version}, newer than this asymvlm reads ({max_version}); "
            f"reading what it knows",
            stacklevel=3,
        )
    missing = [k for k in required if k not in doc]
    if missing:
        raise ArtefactError(f"{path}: missing required key(s) {missing}")
    allowed = set(known) | set(required) | {"type", "format_version"}
    unknown = sorted(set(doc) - allowed)
    if unknown:
        warnings.warn(f"{path}: ignoring unknown key(s) {unknown} (written by a newer asymvlm?)", stacklevel=3)
        doc = {k: v for k, v in doc.items() if k in allowed}
    return doc


# ----------------------------------------------------------------------------------------------
# files named inside an artefact folder
# ----------------------------------------------------------------------------------------------
def inside_folder(
    directory: str | Path, name: str, *, source: str | Path | None = None, field: str | None = None
) -> Path:
    """``directory / name`` when ``name`` is a relative path that stays inside ``directory``: no
    absolute path, no ``..``, and no symbolic link (the entry itself, or anything under it when it is a
    folder) that resolves outside the folder; otherwise an :class:`ArtefactError` naming ``source``
    (the file that named ``name``; default: the entry itself) and ``field``. A Hugging Face Hub
    snapshot's files are links into its repo's ``blobs/`` folder: that folder counts as inside.

    Every artefact reader opens its files through this, so a tampered artefact cannot make a load read
    another model's, gallery's or cache's files, or anything else on the machine.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> inside_folder(d, "head.safetensors") == d / "head.safetensors"
        True
        >>> inside_folder(d, "../x", field="text_adapter")
        Traceback (most recent call last):
        ...
        asymvlm.errors.ArtefactError: ...: text_adapter '../x' points outside ... (absolute or with '..')
    """
    from pathlib import PurePosixPath, PureWindowsPath

    directory = Path(directory)
    what = f"{source}: {field}" if field else f"{source or directory / str(name)}:"
    if not isinstance(name, str) or not name:
        raise ArtefactError(f"{what} must be a relative file name, got {name!r}")
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or PureWindowsPath(name).drive or ".." in pure.parts or "\x00" in name:
        raise ArtefactError(f"{what} {name!r} points outside {directory} (absolute or with '..')")
    root = directory.resolve()
    roots = [root]
    if root.parent.name == "snapshots":
        roots.append(root.parent.parent / "blobs")
    target = directory / name
    checked = [target, *(sorted(target.rglob("*")) if target.is_dir() and not target.is_symlink() else [])]
    for p in checked:
        resolved = p.resolve()
        if not any(resolved == r or resolved.is_relative_to(r) for r in roots):
            raise ArtefactError(
                f"{what} {name!r} resolves outside {directory} ({p.relative_to(directory)} is a link to {resolved}): "
                "refused"
            )
    return target


# ----------------------------------------------------------------------------------------------
# safetensors
# ----------------------------------------------------------------------------------------------
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _read_header(f: Any, path: Path, size: int) -> tuple[dict[str, Any], int]:
    """The JSON header of the safetensors file open as ``f`` (``size`` bytes) and where its data
    start: 8-byte little-endian length, then the header object; an :class:`ArtefactError` otherwise."""
    n = int.from_bytes(f.read(8), "little")
    if n <= 0 or 8 + n > size:
        raise ArtefactError(f"corrupt or truncated safetensors file {path}: bad header length {n}")
    header = parse_json(f.read(n), f"the safetensors header of {path}", allow_nan=False)
    if not isinstance(header, dict):
        raise ArtefactError(f"corrupt safetensors file {path}: the header is not an object")
    return header, 8 + n


def _check_header_entry(path: Path, key: str, info: Any) -> None:
    """One tensor's safetensors header entry: ``{"dtype": known, "shape": [ints >= 0], "data_offsets":
    [start, end]}`` with ``end - start`` the shape's byte size; an :class:`ArtefactError` otherwise."""
    ok = (
        isinstance(info, dict)
        and info.get("dtype") in _DTYPES
        and isinstance(info.get("shape"), list)
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in info["shape"])
        and isinstance(info.get("data_offsets"), list)
        and len(info["data_offsets"]) == 2
        and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in info["data_offsets"])
    )
    if not ok:
        raise ArtefactError(f"corrupt safetensors file {path}: bad header entry for {key!r}")
    start, end = info["data_offsets"]
    size = math.prod(info["shape"]) * torch.empty((), dtype=_DTYPES[info["dtype"]]).element_size()
    if end - start != size:
        raise ArtefactError(
            f"corrupt safetensors file {path}: {key!r} spans {end - start} bytes, its shape "
            f"{info['shape']} needs {size}"
        )


def read_safetensors_header(path: str | Path) -> tuple[dict[str, tuple[str, list[int]]], dict[str, str]]:
    """``({key: (dtype, shape)}, metadata)`` of a safetensors file from its header alone (no tensor
    is read or allocated); an :class:`ArtefactError` naming the file when it is missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise ArtefactError(f"missing file: {path}")
    with open(path, "rb") as f:
        header, _ = _read_header(f, path, path.stat().st_size)
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ArtefactError(f"corrupt safetensors file {path}: __metadata__ must map names to strings")
    for k, info in header.items():
        _check_header_entry(path, k, info)
    return {k: (info["dtype"], list(info["shape"])) for k, info in header.items()}, meta


def load_safetensors(
    path: str | Path, keys: Iterable[str] | None = None, *, mmap: bool = True, device: str = "cpu"
) -> dict[str, Tensor]:
    """Load tensors from a safetensors file with a clear error for missing/corrupt/truncated files.

    With ``mmap=True`` (default) the tensors are backed by a read-only memory map of the file:
    pages are read on demand and shared with the OS page cache, so a 1M x 512 float16 file costs
    no private memory until touched. Such tensors must not be modified in place (clone first).

    Args:
        path: the ``.safetensors`` file.
        keys: only these tensors (all if None); a missing key is an error.
        mmap: memory-map instead of reading into private memory.
        device: target device (mmap only applies to "cpu").
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ArtefactError(f"missing file: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            available = set(f.keys())
            wanted = list(available if keys is None else keys)
            missing = [k for k in wanted if k not in available]
            if missing:
                raise ArtefactError(f"{path} has no tensor(s) {missing}; it holds {sorted(available)}")
            header = {k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in wanted}
    except ArtefactError:
        raise
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise ArtefactError(f"corrupt or truncated safetensors file {path}: {err}") from err
    if mmap and device == "cpu":
        out = _mmap_tensors(path, wanted)
    else:
        with safe_open(str(path), framework="pt", device=device) as f:
            out = {k: f.get_tensor(k) for k in wanted}
    for k, t in out.items():
        dtype, shape = header[k]
        if list(t.shape) != list(shape):
            raise ArtefactError(f"{path}: tensor {k!r} has shape {tuple(t.shape)}, header says {shape}")
    return out


def _mmap_tensors(path: Path, keys: list[str]) -> dict[str, Tensor]:
    return mmap_safetensors(path, keys)[1]


def mmap_safetensors(
    path: str | Path, keys: list[str] | None = None
) -> tuple[Any, dict[str, Tensor], dict[str, tuple[int, int]]]:
    """``(mmap, tensors, byte ranges)``: tensors viewing a private read-only memory map of the file
    (safetensors layout: 8-byte little-endian header length, JSON header with byte offsets, then
    raw data); the byte ranges are absolute file offsets, for ``madvise``."""
    import mmap as _mmap

    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        header, data_start = _read_header(f, path, size)
        if keys is None:
            keys = [k for k in header if k != "__metadata__"]
        missing = [k for k in keys if k not in header]
        if missing:
            raise ArtefactError(f"{path} has no tensor(s) {missing}")
        for k in keys:
            _check_header_entry(path, k, header[k])
        ranges = {
            k: (data_start + header[k]["data_offsets"][0], data_start + header[k]["data_offsets"][1]) for k in keys
        }
        if size == data_start:  # nothing but a header (all tensors empty)
            return None, {k: torch.empty(header[k]["shape"], dtype=_DTYPES[header[k]["dtype"]]) for k in keys}, ranges
        mm = _mmap.mmap(f.fileno(), 0, access=_mmap.ACCESS_COPY)
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "buffer is not writable"
        for k in keys:
            info = header[k]
            start, end = info["data_offsets"]
            if data_start + end > size:
                raise ArtefactError(f"corrupt or truncated safetensors file {path}: tensor {k!r} ends past EOF")
            dtype = _DTYPES.get(info["dtype"])
            if dtype is None:
                raise ArtefactError(f"{path}: unsupported dtype {info['dtype']} for {k!r}")
            count = (end - start) // torch.empty((), dtype=dtype).element_size()
            t = (
                torch.frombuffer(mm, dtype=dtype, count=count, offset=data_start + start)
                if count
                else torch.empty(0, dtype=dtype)
            )
            out[k] = t.reshape(info["shape"])
    return mm, out, ranges


_POPULATE_READ = 22  # madvise(MADV_POPULATE_READ): Linux >= 5.14; Python's mmap module may not name it
_MADVISE_MIN_BYTES = 1 << 18  # smaller tensors are left to ordinary page faults and the page cache


class LazyParams(Mapping):
    """A read-only ``{key: tensor}`` view of a safetensors file, memory-mapped.

    Tensors are zero-copy views of a private read-only mapping of the file (pages are read on
    first touch). When a different key is requested, the pages of the previous one are handed back
    to the OS (``madvise(MADV_DONTNEED)``), so reading a model key by key keeps resident memory at
    about one tensor per file. The returned tensors must not be modified in place (nothing in
    :mod:`asymvlm.federated.core` or :mod:`asymvlm.merging` does); clone them to keep or edit them.

    Args:
        path: the ``.safetensors`` file.
        keys: restrict to these keys (e.g. trainable/adapter keys); a missing one is an error.
        dtype: cast tensors to this dtype on access (None keeps the stored dtype).
    """

    error: type[Exception] = ArtefactError  # what a missing, corrupt or truncated file raises

    def __init__(self, path: str | Path, keys: Sequence[str] | None = None, dtype: torch.dtype | None = None):
        import mmap

        path = Path(path)
        self.path = path
        self.dtype = dtype
        if not path.is_file():
            raise self.error(f"missing file: {path}")
        try:
            self._mm, self._tensors, self._ranges = mmap_safetensors(path)
        except (ArtefactError, ValueError, KeyError) as err:
            raise self.error(f"corrupt or truncated safetensors file {path}: {err}") from err
        self._page = mmap.PAGESIZE
        self._shapes = {k: tuple(t.shape) for k, t in self._tensors.items()}
        if keys is not None:
            missing = [k for k in keys if k not in self._shapes]
            if missing:
                raise self.error(f"{path} misses key(s) {missing[:5]}")
        self._keys = list(keys) if keys is not None else sorted(self._shapes)
        self._last: str | None = None
        self.meta: dict[str, Any] = {}

    def _release(self, key: str) -> None:
        start, end = self._ranges[key]
        if self._mm is None or end - start < _MADVISE_MIN_BYTES:
            return
        try:
            import mmap as _mmap

            lo = (start // self._page) * self._page
            self._mm.madvise(_mmap.MADV_DONTNEED, lo, end - lo)
        except (AttributeError, OSError, ValueError):  # no madvise on this platform: pages stay cached
            pass

    def _populate(self, key: str) -> None:
        """Map the key's pages in one call (MADV_POPULATE_READ, Linux >= 5.14) instead of one page
        fault per 4 KiB; silently skipped where unsupported."""
        start, end = self._ranges[key]
        if self._mm is None or end - start < _MADVISE_MIN_BYTES:
            return
        lo = (start // self._page) * self._page
        try:
            self._mm.madvise(_POPULATE_READ, lo, end - lo)
        except (OSError, ValueError):
            pass

    def __getitem__(self, key: str) -> Tensor:
        if key not in self._shapes:
            raise KeyError(key)
        if self._last is not None and self._last != key:
            self._release(self._last)
        if self._last != key:
            self._populate(key)
        self._last = key
        t = self._tensors[key]
        return t if self.dtype is None else t.to(self.dtype)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def stored_dtype(self, key: str) -> torch.dtype:
        """The dtype on access, without reading the tensor's pages."""
        return self.dtype if self.dtype is not None else self._tensors[key].dtype

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def numel(self) -> int:
        return sum(self._tensors[k].numel() for k in self._keys)


_INDEX_DTYPES = ("float16", "float32", "bfloat16", "float64")


def check_index_meta(meta: dict[str, Any], where: Path, version: int) -> None:
    """Types and ranges of an image index's ``index.json`` (:class:`asymvlm.retrieval.ImageIndex`, format
    ``version``); an :class:`ArtefactError` naming the file and the field otherwise."""
    if meta["format_version"] > version:
        raise ArtefactError(f"{where}: format_version {meta['format_version']} is newer than this asymvlm reads")
    for key in ("size", "dim"):
        v = meta[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ArtefactError(f"{where}: {key} must be an integer >= 1, got {v!r}"[:300])
    fp = meta["encoder_fingerprint"]
    if fp is not None and not isinstance(fp, str):
        raise ArtefactError(f"{where}: encoder_fingerprint must be a string or null, got {fp!r}"[:300])
    if "dtype" in meta and meta["dtype"] not in _INDEX_DTYPES:
        raise ArtefactError(f"{where}: dtype must be one of {list(_INDEX_DTYPES)}, got {meta['dtype']!r}"[:300])
    ids = meta["ids"]
    if ids is None:
        return
    if not isinstance(ids, list) or len(ids) != meta["size"]:
        got = f"{type(ids).__name__} of {len(ids)}" if isinstance(ids, (list, str, dict)) else repr(ids)
        raise ArtefactError(f"{where}: ids must be null or a list of {meta['size']} ids (size), got {got}"[:300])
    for row, i in enumerate(ids):
        if not (isinstance(i, str) or (isinstance(i, int) and not isinstance(i, bool))):
            raise ArtefactError(f"{where}: ids[{row}] must be a string or an integer, got {i!r}"[:300])
