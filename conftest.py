"""Repository-root pytest plugin: the doctests of the five source folders, under their installed names.

The folders ``asymvlm/``, ``federated/``, ``merging/``, ``training/`` and ``eval/`` install as one
namespace (``asymvlm``, ``asymvlm.federated``, ...; pyproject ``[tool.setuptools.package-dir]``).
Pytest's own ``--doctest-modules`` imports a file by its path, so ``federated/core/__init__.py``
would become a second copy of the code named ``federated.core`` (its own classes, registries and
module state) next to the installed ``asymvlm.federated.core`` the code itself imports. Here every
``.py`` module of the five folders is collected as an :class:`InstalledDoctestModule`, which imports
``asymvlm.<folder>.<path>`` with :func:`importlib.import_module` (the same object the tests and the
package use) and checks that it comes from the collected file. Package directories import their
``__init__`` the same way (:class:`InstalledPackage`; pytest's ``Package.setup`` would import it by
path too). Items stay named by file path: ``eval/retrieval.py::asymvlm.eval.retrieval``.

* ``__main__.py`` files are never collected (importing one runs its CLI); the ``if __name__ ==
  "__main__":`` guards of the CLI modules do not fire because the module is imported by its name.
* ``--doctest-modules`` is not needed (pyproject's addopts leave it out); given explicitly, its
  path-imported copy of a file in the five folders is dropped, so nothing is collected twice. A
  source file named on the command line, which pytest also collects for test functions, is
  imported by its installed name too (:class:`InstalledModule`).

Example (the mapping from a file to its installed module name):
    >>> installed_name(ROOT / "federated" / "core" / "__init__.py")
    'asymvlm.federated.core'
    >>> installed_name(ROOT / "asymvlm" / "io.py"), installed_name(ROOT / "tests" / "conftest.py")
    ('asymvlm.io', None)
"""

from __future__ import annotations

import importlib
import os
from functools import partial
from pathlib import Path

import pytest
from _pytest.doctest import DoctestModule
from _pytest.python import Package, _call_with_optional_argument, _get_first_non_fixture_func

# no network, ever (tests/conftest.py does the same for tests/; doctests of the folders run without it)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent

# repository folder -> installed package; the same map as pyproject's [tool.setuptools.package-dir]
# (checked against it in pytest_configure, so the two cannot drift apart silently)
PACKAGES = {
    "asymvlm": "asymvlm",
    "federated": "asymvlm.federated",
    "merging": "asymvlm.merging",
    "training": "asymvlm.training",
    "eval": "asymvlm.eval",
}


def installed_name(path: str | os.PathLike[str]) -> str | None:
    """The installed module name of a ``.py`` file in one of the five folders, else None.

    ``<folder>/<a>/<b>.py`` -> ``<package>.<a>.<b>``; ``__init__.py`` -> its package. None for files
    outside the folders, ``__main__.py``, non-identifier names and folders without ``__init__.py``
    (those are not part of the installed package).
    """
    path = Path(path).resolve()
    if path.suffix != ".py" or path.name == "__main__.py":
        return None
    try:
        parts = path.relative_to(ROOT).parts
    except ValueError:
        return None
    if len(parts) < 2 or parts[0] not in PACKAGES:
        return None
    inner = [*parts[1:-1], path.stem]
    if not all(p.isidentifier() for p in inner):
        return None
    for depth in range(1, len(parts)):  # every folder on the way must be a package
        if not (ROOT.joinpath(*parts[:depth]) / "__init__.py").is_file():
            return None
    if inner[-1] == "__init__":
        inner.pop()
    return ".".join([PACKAGES[parts[0]], *inner])


def _import_installed(path: Path) -> object:
    """Import the installed module of ``path`` and check that it is that file (an editable install
    of this checkout); a module installed from elsewhere would test other code than the file."""
    name = installed_name(path)
    try:
        module = importlib.import_module(name)
    except Exception as err:  # SyntaxError, ImportError, any error raised at import time
        raise pytest.Collector.CollectError(f"importing {name} (from {path}) failed: {err!r}") from err
    origin = getattr(module, "__file__", None)
    if origin is None or Path(origin).resolve() != Path(path).resolve():
        raise pytest.Collector.CollectError(
            f"{name} is imported from {origin}, not from {path}: install this checkout editable (pip install -e .)"
        )
    return module


class InstalledDoctestModule(DoctestModule):
    """A doctest module imported by its installed name instead of by file path."""

    def _getobj(self):
        return _import_installed(self.path)


class InstalledModule(pytest.Module):
    """A python test module imported by its installed name: what pytest makes of a source file named
    on the command line (``pytest eval/retrieval.py``), which it collects for test functions."""

    def _getobj(self):
        return _import_installed(self.path)


class InstalledPackage(Package):
    """A package folder whose ``__init__`` (for setUpModule/tearDownModule) is imported by its installed name."""

    def setup(self) -> None:  # mirrors _pytest.python.Package.setup, importing by name
        init_mod = _import_installed(self.path / "__init__.py")
        setup_module = _get_first_non_fixture_func(init_mod, ("setUpModule", "setup_module"))
        if setup_module is not None:
            _call_with_optional_argument(setup_module, init_mod)
        teardown_module = _get_first_non_fixture_func(init_mod, ("tearDownModule", "teardown_module"))
        if teardown_module is not None:
            self.addfinalizer(partial(_call_with_optional_argument, teardown_module, init_mod))


def pytest_configure(config: pytest.Config) -> None:
    try:
        import tomllib
    except ImportError:  # Python 3.10: no tomllib, skip the consistency check
        return
    pyproject = ROOT / "pyproject.toml"
    if pyproject.is_file():
        package_dir = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-dir"]
        if {folder: name for name, folder in package_dir.items()} != PACKAGES:
            raise pytest.UsageError(f"conftest.PACKAGES {PACKAGES} differs from pyproject's package-dir {package_dir}")


@pytest.hookimpl(tryfirst=True)
def pytest_collect_directory(path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if installed_name(path / "__init__.py") is not None:
        return InstalledPackage.from_parent(parent, path=path)
    return None


@pytest.hookimpl(wrapper=True)
def pytest_collect_file(file_path: Path, parent: pytest.Collector):
    collected = yield
    if installed_name(file_path) is None:
        return collected
    # pytest's own collectors of the file import it by path: its doctest module (only there with an
    # explicit --doctest-modules) is dropped, its python test module (a file named on the command
    # line) is replaced by one importing the installed module
    out = []
    for c in collected:
        if type(c) is pytest.Module:
            out.append(InstalledModule.from_parent(parent, path=file_path))
        elif not isinstance(c, DoctestModule):
            out.append(c)
    return [*out, InstalledDoctestModule.from_parent(parent, path=file_path)]
