"""The dependency direction, checked on every import of every module (function-local ones too).

core (``asymvlm``) <- ``asymvlm.eval`` ; core <- ``asymvlm.federated`` ; core <- ``asymvlm.serve`` (the
HTTP layer: only training's composition root and the harnesses import it) ; ``asymvlm.merging`` ->
``asymvlm.federated.core`` + core + ``asymvlm.eval`` ; ``asymvlm.training`` -> everything;
``asymvlm.testing`` (harnesses for tests and benchmarks) -> anything, and nothing imports it. No
module imports another module's ``_private`` names, and the module graph has no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"asymvlm": "asymvlm", "federated": "asymvlm.federated", "merging": "asymvlm.merging",
           "training": "asymvlm.training", "eval": "asymvlm.eval"}  # fmt: skip
SUBPACKAGES = ("asymvlm.federated", "asymvlm.merging", "asymvlm.training", "asymvlm.eval")

# layer of a module -> the layers it may import
ALLOWED = {
    "core": {"core"},
    "serve": {"core", "serve"},
    "eval": {"core", "eval"},
    "federated": {"core", "federated.core", "federated"},
    "federated.core": {"core", "federated.core"},
    "merging": {"core", "federated.core", "eval", "merging"},
    "training": {"core", "serve", "federated.core", "federated", "eval", "merging", "training"},
    "testing": {"core", "serve", "federated.core", "federated", "eval", "merging", "training", "testing"},
}


def module_name(path: Path) -> str:
    folder = path.relative_to(ROOT).parts[0]
    rel = path.relative_to(ROOT / folder).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join([FOLDERS[folder], *parts])


def layer(module: str) -> str:
    if module == "asymvlm.testing" or module.startswith("asymvlm.testing."):
        return "testing"
    if module == "asymvlm.serve" or module.startswith("asymvlm.serve."):
        return "serve"
    if module.startswith("asymvlm.federated.core"):
        return "federated.core"
    for sub in SUBPACKAGES:
        if module == sub or module.startswith(sub + "."):
            return sub.split(".", 1)[1]
    return "core"


def package_modules() -> dict[str, Path]:
    out = {}
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            out[module_name(path)] = path
    return out


MODULES = package_modules()


def imports_of(name: str, path: Path) -> list[tuple[str, int, list[str]]]:
    """(imported module, line, imported names) for every import statement anywhere in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((a.name, node.lineno, []) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [a.name for a in node.names]
            out.append((target, node.lineno, names))
            # `from pkg import submodule` imports the submodule
            out.extend((f"{target}.{n}", node.lineno, []) for n in names if f"{target}.{n}" in MODULES)
    return [(t, line, names) for t, line, names in out if t == "asymvlm" or t.startswith("asymvlm.")]


def resolve(target: str) -> str | None:
    """The package module an import refers to (the longest known prefix)."""
    parts = target.split(".")
    while parts:
        cand = ".".join(parts)
        if cand in MODULES:
            return cand
        parts.pop()
    return None


def graph() -> dict[str, set[str]]:
    g: dict[str, set[str]] = {m: set() for m in MODULES}
    for name, path in MODULES.items():
        for target, _, _ in imports_of(name, path):
            mod = resolve(target)
            if mod is not None and mod != name and mod != "asymvlm":  # a parent package import is no edge
                g[name].add(mod)
    return g


def test_the_walk_sees_every_kind_of_import():
    # the checker itself must be able to fail: a function-local import against the direction is found
    mods = imports_of("asymvlm.heads", MODULES["asymvlm.heads"])
    assert all(t.startswith("asymvlm") for t, _, _ in mods)
    fake = ROOT / "asymvlm" / "_layering_probe.py"
    fake.write_text("def f():\n    from asymvlm.training.loop import train\n    return train\n")
    try:
        found = imports_of("asymvlm._layering_probe", fake)
        assert ("asymvlm.training.loop", 2, ["train"]) in found
        assert layer(resolve("asymvlm.training.loop")) not in ALLOWED["core"]
    finally:
        fake.unlink()
    # a core module importing the HTTP layer is against the direction (issue 27: serve was "core")
    fake.write_text("def f():\n    from asymvlm.serve.app import create_app\n    return create_app\n")
    try:
        found = imports_of("asymvlm._layering_probe", fake)
        assert ("asymvlm.serve.app", 2, ["create_app"]) in found
        assert layer(resolve("asymvlm.serve.app")) == "serve"
        assert "serve" not in ALLOWED[layer("asymvlm._layering_probe")]
    finally:
        fake.unlink()


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_import_against_the_direction(name):
    bad = []
    for target, line, _ in imports_of(name, MODULES[name]):
        mod = resolve(target)
        if mod is None:
            continue
        if layer(mod) not in ALLOWED[layer(name)]:
            bad.append(f"line {line}: {name} ({layer(name)}) imports {mod} ({layer(mod)})")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_private_names_from_other_modules(name):
    bad = []
    for target, line, names in imports_of(name, MODULES[name]):
        mod = resolve(target)
        if mod is None or mod == name:
            continue
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        if private and f"{target}.{private[0]}" not in MODULES:
            bad.append(f"line {line}: {name} imports {private} from {target}")
    assert not bad, "\n".join(bad)


def test_no_cycles():
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(g[n]):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state:
                cyc = visit(m)
                if cyc:
                    return cyc
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state:
            cycle = visit(n)
            assert cycle is None, " -> ".join(cycle)
