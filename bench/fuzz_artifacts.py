"""The full mutation enumeration of every artefact asymvlm writes (issue 26), with counts.

Runs every mutation of every kind of :mod:`asymvlm.testing.fuzz` (deterministic: the same list
in the same order each time), prints a table of counts per kind and outcome and the failing
mutations (kind, file, field, mutation, exception or difference), and with ``--json`` saves them.

The harness is always this checkout's (the package ``asymvlm/testing/fuzz/``, loaded by path); the
package under test can come from another checkout with ``--root`` (e.g. ``git worktree add
/tmp/before <commit>``), so the same mutations give "before" and "after" counts::

    python bench/fuzz_artifacts.py                                   # this checkout
    python bench/fuzz_artifacts.py --root /tmp/before --json before.json
    python bench/fuzz_artifacts.py --kinds model,cache --json now.json

``--root`` takes precedence over the editable install for all five folders (``asymvlm``,
``asymvlm.federated``, ``asymvlm.merging``, ``asymvlm.training``, ``asymvlm.eval``; the map is read
from the root's ``pyproject.toml``): the editable finder is appended to ``sys.meta_path`` and would
answer ``asymvlm.federated`` from the installed checkout even when ``asymvlm`` came from the root, so
a finder for the root's map goes first. The script checks where every folder was imported from.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
HARNESS = HERE / "asymvlm" / "testing" / "fuzz"  # a package: its modules import one another relatively
FOLDERS = {"asymvlm": "asymvlm", "asymvlm.federated": "federated", "asymvlm.merging": "merging",
           "asymvlm.training": "training", "asymvlm.eval": "eval"}  # fmt: skip


def package_dirs(root: Path) -> dict[str, Path]:
    """The root's ``[tool.setuptools.package-dir]`` map (the five folders by default)."""
    mapping = dict(FOLDERS)
    pyproject = root / "pyproject.toml"
    if pyproject.is_file():
        try:
            import tomllib
        except ImportError:  # Python 3.10
            tomllib = None
        if tomllib is not None:
            doc = tomllib.loads(pyproject.read_text())
            mapping.update(doc.get("tool", {}).get("setuptools", {}).get("package-dir", {}))
    return {name: (root / folder).resolve() for name, folder in mapping.items()}


class _RootFinder(importlib.abc.MetaPathFinder):
    """Finds the five top-level packages of the namespace in ``root`` (sub-modules then follow their
    package's ``__path__``)."""

    def __init__(self, dirs: dict[str, Path]):
        self.dirs = dirs

    def find_spec(self, fullname, path=None, target=None):
        folder = self.dirs.get(fullname)
        if folder is None or not (folder / "__init__.py").is_file():
            return None
        return importlib.util.spec_from_file_location(
            fullname, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )


def use_root(root: Path) -> dict[str, str]:
    """Import the package from ``root``; returns where each of the five packages came from."""
    if any(m == "asymvlm" or m.startswith("asymvlm.") for m in sys.modules):
        raise RuntimeError("asymvlm was imported before --root took effect")
    dirs = package_dirs(root)
    sys.meta_path.insert(0, _RootFinder(dirs))
    sys.path.insert(0, str(root))
    where = {}
    for name, folder in dirs.items():
        mod = importlib.import_module(name)
        got = Path(mod.__file__).resolve().parent
        if got != folder:
            raise RuntimeError(f"{name} was imported from {got}, not from {folder}")
        where[name] = str(got)
    return where


def load_harness():
    spec = importlib.util.spec_from_file_location(
        "asymvlm_fuzz_harness", HARNESS / "__init__.py", submodule_search_locations=[str(HARNESS)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def git_head(root: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True,
                               timeout=10).stdout.strip()  # fmt: skip
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def table(counts: dict[str, dict[str, int]], outcomes: tuple[str, ...]) -> str:
    rows = [["kind", *outcomes, "total", "failing"]]
    for kind, row in counts.items():
        total = sum(row.values())
        rows.append([kind, *(str(row[o]) for o in outcomes), str(total), str(total - row["clean"] - row["equal"])])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    ap.add_argument("--root", type=Path, help="import the package under test from this checkout")
    ap.add_argument("--json", type=Path, help="save the counts and every result here")
    ap.add_argument("--kinds", help="comma-separated kinds (default: all)")
    ap.add_argument("--workdir", type=Path, help="scratch folder (default: a new temporary one)")
    ap.add_argument("--time_limit", type=float, default=60.0, help="seconds one load may take (a hang after that)")
    ap.add_argument("--quiet", action="store_true", help="no progress line per kind")
    args = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    root = (args.root or HERE).resolve()
    where = use_root(root) if args.root else None
    fuzz = load_harness()
    import torch

    torch.set_num_threads(1)
    logging.getLogger("asymvlm").addHandler(logging.NullHandler())  # the loads' own log lines are not the report
    logging.getLogger("asymvlm").propagate = False
    kinds = args.kinds.split(",") if args.kinds else list(fuzz.KINDS)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="asymvlm-fuzz-"))
    harness = fuzz.Harness(workdir, kinds=kinds, time_limit=args.time_limit)
    import asymvlm

    print(
        f"package under test: {Path(asymvlm.__file__).resolve().parents[1]} ({git_head(root) or 'not a git checkout'})"
    )
    if where:
        for name, folder in where.items():
            print(f"  {name:18s} <- {folder}")
    print(f"harness: {HARNESS}")
    results = []
    t0 = time.perf_counter()
    for kind in kinds:
        t = time.perf_counter()
        mutations = harness.mutations(kind)
        for m in mutations:
            results.append(harness.run(m))
        if not args.quiet:
            done = [r for r in results if r.kind == kind]
            bad = sum(r.outcome not in fuzz.ACCEPTABLE for r in done)
            print(f"  {kind}: {len(done)} mutations, {bad} failing ({time.perf_counter() - t:.1f} s)", flush=True)
    seconds = time.perf_counter() - t0
    counts = fuzz.count_outcomes(results)
    print()
    print(table(counts, fuzz.OUTCOMES))
    failing = [r for r in results if r.outcome not in fuzz.ACCEPTABLE]
    print(f"\n{len(failing)} failing of {len(results)} mutations ({seconds:.0f} s):")
    for r in failing:
        print(f"  {r.outcome:9s} {r.kind} | {r.file} | {r.field} | {r.op} | {r.line}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "package_root": str(root),
            "commit": git_head(root),
            "harness": str(HARNESS),
            "kinds": kinds,
            "seconds": round(seconds, 1),
            "counts": counts,
            "kinds_described": {k: fuzz.KINDS[k].description for k in kinds},
            "results": [r.to_dict() for r in results],
        }
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"\nsaved {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
