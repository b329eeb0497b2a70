"""The dependency direction, checked on every import of every module (function-local ones too).

core (``asymvlm``: the model and its infrastructure) imports no other layer; ``asymvlm.worlds`` (the
offline worlds and toy encoders: plug-ins that register themselves in the core's registries through
the ``asymvlm.plugins`` entry point, see ``asymvlm.plugins``) -> core ; ``asymvlm.eval``,
``asymvlm.federated`` and ``asymvlm.serve`` (the HTTP layer: only training's composition root and the
harnesses import it) -> core + worlds ; ``asymvlm.federated.core`` -> core ; ``asymvlm.merging`` ->
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
    "worlds": {"core", "worlds"},
    "serve": {"core", "worlds", "serve"},
    "eval": {"core", "worlds", "eval"},
    "federated": {"core", "worlds", "federated.core", "federated"},
    "federated.core": {"core", "federated.core"},
    "merging": {"core", "federated.core", "eval", "merging"},
    "training": {"core", "worlds", "serve", "federated.core", "federated", "eval", "merging", "training"},
    "testing": {"core", "worlds", "serve", "federated.core", "federated", "eval", "merging", "training", "testing"},
}


def module_name(path: Path) -> str:
    folder = path.relative_to(ROOT).parts[0]
    rel = path.relative_to(ROOT / folder).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join([FOLDERS[folder], *parts])


def layer(module: str) -> str:
    if module == "asymvlm.testing" or module.startswith("asymvlm.testing."):
        return "testing"
    if module == "asymvlm.worlds" or module.startswith("asymvlm.worlds."):
        return "worlds"
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


def test_a_core_module_importing_the_worlds_fails_the_check():
    # issue 27: the core reaches the worlds only through the plug-in entry point, never by an import
    # (function-local or of the package itself); the same import from a world is fine
    fake = ROOT / "asymvlm" / "_layering_probe.py"
    fake.write_text(
        "from asymvlm import worlds\n\n\ndef f():\n    from asymvlm.worlds.toyclip import TOY_CLIP_SPECS\n"
        "    return TOY_CLIP_SPECS, worlds\n"
    )
    try:
        found = imports_of("asymvlm._layering_probe", fake)
        assert ("asymvlm.worlds.toyclip", 5, ["TOY_CLIP_SPECS"]) in found
        assert ("asymvlm.worlds", 1, []) in found
        allowed = ALLOWED[layer("asymvlm._layering_probe")]
        bad = [t for t, _, _ in found if resolve(t) and layer(resolve(t)) not in allowed]
        assert {resolve(t) for t in bad} == {"asymvlm.worlds", "asymvlm.worlds.toyclip"}
        assert layer("asymvlm._layering_probe") == "core" and layer("asymvlm.worlds.toyclip") == "worlds"
        assert "core" in ALLOWED["worlds"] and "worlds" not in ALLOWED["core"]
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


# The size of the house (issue 27): no package file over ~600 lines, no function over ~120. A file or
# function that must exceed them is listed here with its reason.
MAX_FILE_LINES, MAX_FUNCTION_LINES = 600, 120
SIZE_EXCEPTIONS: dict[str, str] = {}


def sizes() -> tuple[dict[str, int], dict[str, int]]:
    """(lines per package file, lines per function 'module:line name') over the five folders."""
    files, functions = {}, {}
    for name, path in MODULES.items():
        text = path.read_text()
        files[name] = text.count("\n")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions[f"{name}:{node.lineno} {node.name}"] = node.end_lineno - node.lineno + 1
    return files, functions


def test_no_package_file_or_function_outgrows_the_house():
    files, functions = sizes()
    assert len(files) == len(MODULES) and functions  # the walk saw every module and their functions
    big = {f"{m} ({n} lines)" for m, n in files.items() if n > MAX_FILE_LINES and m not in SIZE_EXCEPTIONS}
    long = {f"{f} ({n} lines)" for f, n in functions.items() if n > MAX_FUNCTION_LINES and f not in SIZE_EXCEPTIONS}
    assert not big, f"package files over {MAX_FILE_LINES} lines (split them, or list them with a reason): {big}"
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split them, or list them with a reason): {long}"
