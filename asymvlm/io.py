"""Artefact I/O: JSON + safetensors, written atomically, read with clear errors.

Every artefact asymvlm saves is a JSON document with a ``type`` tag and a ``format_version``
next to ``.safetensors`` files. Files are written to a temporary file in the same directory,
flushed and fsync'ed, then ``os.replace``'d into place, so a crash leaves either the old file
or the new one, never half of one. Nothing is pickled. Files get the permissions ``open()`` would
give them (``0o666 & ~umask``; directories ``0o777 & ~umask``), not ``tempfile``'s private 0600.

This module writes (atomic files and folders, JSON, safetensors whole or streamed); the readers
(JSON and safetensors with clear errors, memory-mapped :class:`LazyParams`, :func:`inside_folder`)
live in :mod:`asymvlm.io_read`, and every one of them is exported here as well.

Example:
    >>> import tempfile, torch
    >>> d = tempfile.mkdtemp()
    >>> p = atomic_save_safetensors({"w": torch.ones(2)}, f"{d}/w.safetensors")
    >>> load_safetensors(p)["w"].tolist()
    [1.0, 1.0]
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from asymvlm.errors import ArtefactError
from asymvlm.io_read import (
    LazyParams,
    inside_folder,
    is_json_int,
    is_json_number,
    load_safetensors,
    mmap_safetensors,
    parse_json,
    read_json,
    read_jsonl,
    read_safetensors_header,
    read_tagged_json,
)

__all__ = [
    "inside_folder",
    "ArtefactError",
    "atomic_directory",
    "owned_entries",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_save_safetensors",
    "require_finite",
    "non_finite_key",
    "read_safetensors_header",
    "load_safetensors",
    "parse_json",
    "is_json_int",
    "is_json_number",
    "read_json",
    "read_jsonl",
    "read_tagged_json",
    "json_safe",
    "tensor_fingerprint",
    "mmap_safetensors",
    "SafetensorsStreamWriter",
    "LazyParams",
]


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# O_EXCL: never reuse an existing name; O_NOFOLLOW: never write through a planted symlink
# (tempfile.mkstemp's flags); O_BINARY matters on Windows only
_TEMP_FLAGS = (
    os.O_RDWR
    | os.O_CREAT
    | os.O_EXCL
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_BINARY", 0)
)


def _create_temp_file(target: Path) -> tuple[int, Path]:
    """``(fd, path)`` of a new, uniquely named temp file next to ``target``, mode ``0o666 & ~umask``.

    ``tempfile.mkstemp`` creates its file with mode 0600 and ``os.replace`` keeps the mode, so every
    report.json / metrics.json / .safetensors would be private to its owner. Creating the file with
    ``os.open(..., O_CREAT | O_EXCL, 0o666)`` instead lets the kernel apply the process umask (and a
    directory's default ACL) at creation, exactly as ``open()`` does. No umask is read: the only
    portable way to read it, ``os.umask(0)`` then restoring it, is process-global, so a thread
    creating a file between the two calls would get a world-writable 0666 file; per call that
    race repeats on every write, and a value read once at import would go stale when the process
    changes its umask later. The kernel's own mask needs neither.
    """
    for _ in range(100):
        tmp = target.parent / f".{target.name}.{uuid.uuid4().hex[:12]}.tmp"
        try:
            return os.open(tmp, _TEMP_FLAGS, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a unique temporary file next to {target}")


def atomic_write_bytes(data: bytes, path: str | Path) -> Path:
    """Write ``data`` to ``path`` via a temp file in the same directory and ``os.replace``.

    The file gets mode ``0o666 & ~umask``, as with ``open(path, "wb")``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp_file(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


MANIFEST_NAME = ".asymvlm-files.json"  # the entries asymvlm wrote into a directory it built


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _owned_entries(path: Path) -> set[str] | None:
    """The entries asymvlm wrote into ``path`` (None: no record, i.e. not built by atomic_directory)."""
    record = path / MANIFEST_NAME
    if not record.is_file():
        return None
    try:
        doc = json.loads(record.read_text())
        entries = doc["entries"]
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            return None
        return set(entries) | {MANIFEST_NAME}
    except (ValueError, KeyError, TypeError, RecursionError, OSError):
        return None


def owned_entries(path: str | Path) -> set[str] | None:
    """The entries asymvlm wrote into the folder ``path`` (its ``.asymvlm-files.json`` record, which
    :func:`atomic_directory` writes), or None when it has no record."""
    return _owned_entries(Path(path))


def _lock_dir(folder: Path) -> int | None:
    """An open descriptor of ``folder`` holding an exclusive ``flock`` (released when the process
    ends, even by ``kill -9``), so a later run can tell a live run's temporary folder from a dead
    one's; None where ``flock`` is unavailable or the folder is already locked."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return None
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _unlock(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


def _move_back(names: list[str], src: Path, dst: Path) -> list[str]:
    """Move ``names`` from ``src`` back to ``dst`` (newest first); the names that could not be moved."""
    stuck = []
    for name in reversed(names):
        try:
            os.replace(src / name, dst / name)
        except OSError:
            stuck.append(name)
    return sorted(stuck)


def _recover_leftovers(path: Path) -> None:
    """Put back the user's entries that a killed :func:`atomic_directory` run left in its hidden
    ``.NAME.tmp-*`` / ``.NAME.old-*`` folder next to ``path`` (the run had moved them there and died
    before the exchange). A folder still locked by a live run is left alone; one without a record
    was killed before any move and holds nothing of the user's (it is left as it is); one whose
    entries are all asymvlm's is removed. What cannot be put back is named in a warning."""
    parent = path.parent
    try:
        candidates = sorted(
            p
            for p in parent.iterdir()
            if p.name.startswith((f".{path.name}.tmp-", f".{path.name}.old-")) and p.is_dir() and not p.is_symlink()
        )
    except OSError:
        return
    for left in candidates:
        fd = _lock_dir(left)
        if fd is None:
            continue  # a live run's folder (or no flock here): not ours to touch
        try:
            owned = _owned_entries(left)
            if owned is None:
                continue
            users = sorted({p.name for p in left.iterdir()} - owned)
            if users and not path.exists() and left.name.startswith(f".{path.name}.tmp-"):
                # killed between the two renames of the fallback: the folder is complete (its record
                # is written after the contents), so finishing the rename restores everything
                os.replace(left, path)
                warnings.warn(
                    f"recovered {path} from {left.name}, left by an interrupted write (with your entries {users[:6]})",
                    stacklevel=4,
                )
                continue
            if users:
                path.mkdir(exist_ok=True)
                movable = [n for n in users if not (path / n).exists() and not (path / n).is_symlink()]
                stuck = _move_back(movable, left, path) + [n for n in users if n not in movable]
                moved = [n for n in users if n not in stuck]
                if moved:
                    warnings.warn(
                        f"recovered {moved[:6]} into {path} from {left.name}, left by an interrupted write",
                        stacklevel=4,
                    )
                if stuck:
                    warnings.warn(
                        f"{left} holds entries of yours that an interrupted write moved out of {path} and that could "
                        f"not be put back ({stuck[:6]}): move them back by hand",
                        stacklevel=4,
                    )
                    continue
            shutil.rmtree(left, ignore_errors=True)  # only asymvlm's entries are left in it
        finally:
            _unlock(fd)


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Build a directory atomically: write into the yielded temporary folder next to ``path``;
    on success it takes ``path``'s place, on any error it is removed and ``path`` is untouched.

    Replacing an existing ``path`` never deletes what asymvlm did not write there: the new
    folder records its entries (``.asymvlm-files.json``); when it replaces a folder, the entries
    that folder's record lists are dropped, every other entry (a user's notes, results) is moved
    into the new folder first, and the two folders are swapped in one atomic step
    (``renameat2(RENAME_EXCHANGE)``: ``path`` is never missing; where the system lacks it, two
    renames). An existing non-empty folder without a record was not built by asymvlm: it is an
    :class:`ArtefactError`, and nothing is touched.

    A user's entry is never lost: when one cannot be moved (an immutable file, a read-only
    subfolder), the entries already moved are put back and the error names it, with ``path`` as it
    was; a temporary folder that still holds a user's entry is never removed (the error names it).
    A run killed between the moves and the swap leaves them in its hidden ``.NAME.tmp-*`` folder:
    the next run on ``path`` puts them back (with a warning naming the folder). A run's temporary
    folder is ``flock``'ed while it runs, so a concurrent run never takes a live run's entries.

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "out"
        >>> with atomic_directory(target) as tmp:
        ...     _ = (tmp / "a.txt").write_text("done")
        >>> (target / "a.txt").read_text()
        'done'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _recover_leftovers(path)
    keep: list[str] = []
    if path.exists():
        if not path.is_dir():
            raise ArtefactError(f"{path} exists and is not a directory")
        owned = _owned_entries(path)
        present = {p.name for p in path.iterdir()}
        if owned is None and present:
            raise ArtefactError(
                f"{path} exists, is not empty and was not written by asymvlm ({sorted(present)[:4]}): nothing was "
                "changed; choose another output path or empty it"
            )
        keep = sorted(present - (owned or set()))
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # mode 0o777 & ~umask, like any mkdir (tempfile.mkdtemp would make it 0700)
    lock = _lock_dir(tmp)
    moved: list[str] = []  # the user's entries now in tmp (never rmtree'd while this is not empty)
    try:
        yield tmp
        entries = sorted(p.name for p in tmp.iterdir())
        clash = [k for k in keep if k in entries]
        if clash:
            raise ArtefactError(
                f"{path}: {clash} were not written by asymvlm but the new contents have the same names; nothing "
                "was changed"
            )
        atomic_write_bytes(json.dumps({"entries": entries}).encode(), tmp / MANIFEST_NAME)
        if path.exists():
            _check_movable(path, keep)
            for name in keep:  # carried over: the user's entries survive the replacement
                try:
                    os.replace(path / name, tmp / name)
                except OSError as err:
                    _restore(moved, tmp, path)
                    raise ArtefactError(
                        f"{path}: your entry {name!r} cannot be moved into the new folder ({err.strerror or err}); "
                        "nothing was changed"
                    ) from err
                moved.append(name)
            if _exchange(tmp, path):  # now tmp holds the old folder (only asymvlm's entries)
                moved = []
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                _replace_by_renames(path, tmp, moved)
                moved = []
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as err:
        if moved and not isinstance(err, _KeptFolder):  # a failure after the moves: put the user's entries back
            _restore(moved, tmp, path)
        raise
    finally:
        _unlock(lock)
        if tmp.exists() and not moved:
            shutil.rmtree(tmp, ignore_errors=True)


def _check_movable(path: Path, names: list[str]) -> None:
    """Before any move: a folder can only be renamed to another parent with write permission on it
    (its ``..`` entry changes), and ``path`` itself must be writable."""
    if os.name != "posix" or (hasattr(os, "geteuid") and os.geteuid() == 0):
        return  # root passes these checks; an immutable entry shows when it is moved (and is put back)
    if not os.access(path, os.W_OK | os.X_OK):
        raise ArtefactError(f"{path} is not writable: its entries cannot be carried over; nothing was changed")
    for name in names:
        entry = path / name
        if entry.is_dir() and not entry.is_symlink() and not os.access(entry, os.W_OK):
            raise ArtefactError(
                f"{path}: your folder {name!r} is read-only, so it cannot be moved into the new folder; nothing was "
                "changed (make it writable, or move it elsewhere)"
            )


class _KeptFolder(ArtefactError):
    """Some of the user's entries could not be put back: their temporary folder is kept."""


def _restore(moved: list[str], tmp: Path, path: Path) -> None:
    """Move the user's entries ``moved`` from ``tmp`` back into ``path``; when one cannot be put
    back, ``tmp`` is kept (never removed) and an :class:`ArtefactError` names it."""
    stuck = _move_back(list(moved), tmp, path)
    moved.clear()
    if stuck:
        moved.extend(stuck)  # keeps tmp from being removed
        raise _KeptFolder(
            f"{path}: your entries {stuck[:6]} could not be put back and are in {tmp} (kept; the next write to "
            f"{path.name} puts them back, or move them by hand)"
        )


def _replace_by_renames(path: Path, tmp: Path, moved: list[str]) -> None:
    """Where ``renameat2(RENAME_EXCHANGE)`` is unavailable: ``path`` -> ``.NAME.old-*``, ``tmp`` ->
    ``path``; a failure of either rename restores the old folder (the caller puts back ``moved``)."""
    old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_json(obj: Any, path: str | Path) -> Path:
    """Atomically write ``obj`` as indented, key-sorted JSON."""
    return atomic_write_bytes((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), path)


def non_finite_key(tensors: Mapping[str, Tensor]) -> str | None:
    """The first key (in the given order) of a floating tensor holding NaN or inf, or None."""
    for k, v in tensors.items():
        if isinstance(v, Tensor) and (v.is_floating_point() or v.is_complex()) and v.numel():
            if not bool(torch.isfinite(v).all()):
                return k
    return None


def require_finite(tensors: Mapping[str, Tensor], path: str | Path) -> None:
    """An :class:`ArtefactError` naming the tensor and ``path`` when a floating tensor of ``tensors``
    holds NaN or inf (the invariant: nothing non-finite is saved)."""
    key = non_finite_key(tensors)
    if key is not None:
        raise ArtefactError(f"tensor {key!r} holds NaN or inf: not saved to {path}; nothing was written")


def atomic_save_safetensors(
    tensors: dict[str, Tensor],
    path: str | Path,
    metadata: dict[str, str] | None = None,
    *,
    check_finite: bool = True,
) -> Path:
    """Atomically write a safetensors file (tensors are made contiguous and moved to CPU).

    Nothing non-finite is saved: a floating tensor holding NaN or inf is an :class:`ArtefactError`
    naming the key and ``path``, and nothing is written. ``check_finite=False`` is the opt-out for a
    file that legitimately stores such values (no caller in the package needs it).
    """
    from safetensors.torch import save

    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    if check_finite:
        require_finite(cpu, path)
    return atomic_write_bytes(save(cpu, metadata=metadata), path)


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None (strict JSON has no NaN or inf).

    Example:
        >>> json_safe({"a": [1.0, float("nan")], "b": float("inf")})
        {'a': [1.0, None], 'b': None}
    """
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def tensor_fingerprint(params: Mapping[str, Tensor], keys: Sequence[str] | None = None) -> str:
    """sha256 over the named tensors (name, dtype, shape, bytes), in key order (what a saved model
    records as the weights it was fine-tuned from, and task vectors as their base)."""
    h = hashlib.sha256()
    for k in sorted(keys if keys is not None else params.keys()):
        t = params[k].detach().cpu().contiguous()
        h.update(f"|{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# streamed writing
# ----------------------------------------------------------------------------------------------
_ST_NAMES = {
    torch.float16: "F16",
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.float64: "F64",
    torch.bool: "BOOL",
    torch.uint8: "U8",
}


class SafetensorsStreamWriter:
    """Write a safetensors file whose tensor shapes are known up front, one chunk at a time.

    Tensors are laid out in the order given; ``write(name, chunk)`` appends rows of that tensor
    and must be called in layout order until every tensor is complete.

    Example:
        >>> import tempfile
        >>> p = tempfile.mkdtemp() + "/x.safetensors"
        >>> with SafetensorsStreamWriter(p, {"a": (torch.float32, (3, 2))}) as w:
        ...     w.write("a", torch.zeros(2, 2)); w.write("a", torch.ones(1, 2))
        >>> load_safetensors(p)["a"].tolist()
        [[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]]
    """

    def __init__(
        self,
        path: str | Path,
        specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
    ):
        self.path = Path(path)
        header: dict[str, Any] = {}
        offset = 0
        self._layout = []
        for name, (dtype, shape) in specs.items():
            nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._layout.append((name, dtype, tuple(shape), nbytes))
            offset += nbytes
        if metadata:
            header["__metadata__"] = metadata
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # 8-byte alignment of the data section
        self._file = open(self.path, "wb")  # a plain open(): mode 0o666 & ~umask
        self._file.write(len(raw).to_bytes(8, "little"))
        self._file.write(raw)
        self._current = 0
        self._written = 0

    def write(self, name: str, chunk: Tensor) -> None:
        while self._current < len(self._layout) and self._layout[self._current][3] == 0:
            self._current += 1  # skip empty tensors
        if self._current >= len(self._layout):
            raise ValueError(f"all tensors of {self.path} are complete; got more data for {name!r}")
        lname, dtype, shape, nbytes = self._layout[self._current]
        if name != lname:
            raise ValueError(f"expected data for {lname!r} next, got {name!r}")
        chunk = chunk.detach().to("cpu", dtype).contiguous()
        if tuple(chunk.shape[1:]) != shape[1:]:
            raise ValueError(f"{name}: rows of shape {tuple(chunk.shape[1:])}, expected {shape[1:]}")
        data = memoryview(chunk.reshape(-1).view(torch.uint8).numpy()) if chunk.numel() else memoryview(b"")
        if self._written + len(data) > nbytes:
            raise ValueError(f"{name}: more rows than the declared shape {shape}")
        self._file.write(data)  # straight from the tensor's memory, no intermediate bytes copy
        self._written += len(data)
        if self._written == nbytes:
            self._current += 1
            self._written = 0

    def close(self) -> None:
        if self._file.closed:
            return
        while self._current < len(self._layout) and self._layout[self._current][3] == 0:
            self._current += 1
        complete = self._current == len(self._layout)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        if not complete:
            raise ValueError(f"{self.path}: tensor {self._layout[self._current][0]!r} is incomplete")

    def __enter__(self) -> SafetensorsStreamWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._file.close()
