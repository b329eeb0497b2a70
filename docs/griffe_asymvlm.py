"""The griffe extension behind the API reference (`mkdocs.yml`: `extensions: docs/griffe_asymvlm.py`).

Five things the package's docstrings and layout need that griffe does not do by itself:

* **One namespace, five folders.** `pyproject.toml` maps `asymvlm.federated` to `federated/` (and
  so on for merging, training and eval); griffe finds `asymvlm` by its folder and would not see the
  others. Each mapped folder is loaded and attached to the `asymvlm` package under its installed
  name, so `::: asymvlm.federated.recipes` and cross-references resolve as they import.
* **Doctests.** A doctest outside any section is fenced as `pycon` code.
* **`Example:` sections.** The house style writes `Example:` (Napoleon's spelling) above doctests;
  griffe reads only `Examples:` as an examples section and would render the doctest as Markdown
  (a `>>>` line as a quote, `x[0][1]` as a link). They are read as `Examples:`.
* **Parameters that share a description** are listed together (`chunk_size, query_block: ...`);
  such an entry becomes one entry per name, each checked against the signature like any other (a
  name the signature lacks still fails the strict build).
* **Sphinx roles** (`:func:`~asymvlm.cache.write_cache``) become cross-references into the API
  reference when they name something of the package (an unresolvable one fails the strict build,
  like a broken link), and plain code otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import griffe

ROOT = Path(__file__).resolve().parents[1]

_SECTION = re.compile(
    r"^(\s*)(Args|Arguments|Parameters|Keyword Args|Keyword Arguments|Other Parameters|Attributes):\s*$"
)
_SHARED = re.compile(r"^(\s*)((?:\*{0,2}\w+)(?:\s*,\s*\*{0,2}\w+)+)(\s*\([^)]*\))?:(\s.*)?$")
_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", flags=re.M)
_BARE_DOCTEST = re.compile(r"^(>>> .*(?:\n(?!\s*$).*)*)", flags=re.M)  # doctest lines outside any section
_ROLE = re.compile(r":(?:func|class|meth|mod|data|attr|exc|obj):`(~?)([\w.]+)`")


def sphinx_roles(text: str, resolve: Callable[[str], str | None]) -> str:
    """`:class:`~asymvlm.x.Y`` as the cross-reference `[`Y`][asymvlm.x.Y]` where the reference shows
    that object (``resolve`` gives its canonical path), as plain code where it names something the
    reference does not show (outside the package, private, undocumented, a short name). A name of
    the package that does not exist stays a cross-reference, which the strict build reports."""

    def one(m: re.Match) -> str:
        short, target = m.group(1), m.group(2)
        shown = target.rsplit(".", 1)[-1] if short else target
        if not target.startswith("asymvlm."):
            return f"`{shown}`"
        canonical = resolve(target)
        return f"`{shown}`" if canonical == "" else f"[`{shown}`][{canonical or target}]"

    return _ROLE.sub(one, text)


def package_dir(pyproject: Path) -> dict[str, str]:
    """`[tool.setuptools.package-dir]` of pyproject.toml (read by hand: tomllib is Python >= 3.11)."""
    text = pyproject.read_text()
    section = re.search(r"^\[tool\.setuptools\.package-dir\]\n(.*?)(?=^\[|\Z)", text, flags=re.M | re.S)
    return dict(re.findall(r'^"?([\w.]+)"?\s*=\s*"([^"]+)"', section.group(1) if section else "", flags=re.M))


def split_shared_entries(text: str) -> str:
    """Each `a, b: description` entry of an Args-like section as `a: description` and `b: description`."""
    lines = text.split("\n")
    out: list[str] = []
    section_indent: int | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        indent = len(line) - len(line.lstrip())
        if line.strip() and section_indent is not None and indent <= section_indent:
            section_indent = None
        header = _SECTION.match(line)
        if header:
            section_indent = len(header.group(1))
            out.append(line)
            i += 1
            continue
        shared = _SHARED.match(line) if section_indent is not None else None
        if shared:
            body = [line[len(shared.group(1)) + len(shared.group(2)) + len(shared.group(3) or "") :]]
            j = i + 1
            while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > indent):
                body.append(lines[j])
                j += 1
            while body and not body[-1].strip():
                j -= 1
                body.pop()
            for name in re.split(r"\s*,\s*", shared.group(2)):
                out.append(f"{shared.group(1)}{name}{shared.group(3) or ''}{body[0]}")
                out.extend(body[1:])
            i = j
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


def api_modules() -> set[str]:
    """The modules the API pages render (`::: name` lines of docs/api/*.md)."""
    names = set()
    for page in (ROOT / "docs" / "api").glob("*.md"):
        names.update(re.findall(r"^:::\s+([\w.]+)", page.read_text(), flags=re.M))
    return names


class AsymvlmDocs(griffe.Extension):
    """Attach the mapped folders to `asymvlm`; read `Example:` as `Examples:`; split shared entries;
    turn Sphinx roles into cross-references."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            text = _BARE_DOCTEST.sub(lambda m: f"```pycon\n{m.group(1)}\n```", obj.docstring.value)
            obj.docstring.value = split_shared_entries(_EXAMPLE.sub(r"\1Examples:", text))

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        for name, folder in sorted(package_dir(ROOT / "pyproject.toml").items()):
            parent, _, child = name.rpartition(".")
            if parent != pkg.path or child in pkg.members:
                continue
            sub = loader.load(ROOT / folder)
            sub.name = child
            pkg.set_member(child, sub)
        if pkg.path == "asymvlm":
            rendered = api_modules()

            def resolve(target: str) -> str | None:
                """The canonical path of what the reference shows; "" if it exists but is not shown."""
                try:
                    found = loader.modules_collection[target]
                    found = found.final_target if found.is_alias else found
                except Exception:  # noqa: BLE001 - any lookup failure: a name that does not exist
                    return None
                path = found.canonical_path
                module = found if found.is_module else found.module
                shown = any(module.path == m or module.path.startswith(m + ".") for m in rendered) and (
                    module.path in rendered or not found.is_module
                )
                public = not any(part.startswith("_") for part in path.split("."))
                documented = found.is_module or found.has_docstring
                return path if shown and public and documented else ""

            for obj in _walk(pkg):
                if obj.docstring is not None:
                    obj.docstring.value = sphinx_roles(obj.docstring.value, resolve)


def _walk(obj: griffe.Object):
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _walk(member)
