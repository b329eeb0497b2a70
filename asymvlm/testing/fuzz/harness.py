"""The harness: builds each kind's artefacts once, runs one mutation under a time and memory limit,
and classifies the outcome (:data:`~asymvlm.testing.fuzz.outcomes.OUTCOMES`).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import signal
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .kinds import (
    CacheKind,
    FederatedCheckpointKind,
    GalleryKind,
    Kind,
    MergeOutputKind,
    ModelKind,
    TaskVectorKind,
    TrainingCheckpointKind,
)
from .outcomes import Mutation, Result, first_difference, same
from .replies import FlowerKind

__all__ = ["EXEMPT", "KINDS", "Harness", "FuzzTimeout"]

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
            raise RuntimeError(f"the loader of {name} is not deterministic: {first_difference(check, again)}")
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
