"""Build helpers of the documentation site (``mkdocs.yml``; not part of the package, not copied to the site).

* an mkdocs hook, :func:`on_page_markdown`: a page's link to a file outside ``docs/`` (say
  ``../benchmarks/results/segmentation_shapes.md``) must name a file of the repository (else the strict
  build fails, naming the page and the link); on the site it becomes a link to the repository when
  ``repo_url`` is set, else plain text naming the file (the site has no page for it). Links inside
  ``docs/`` are mkdocs' own business (``validation`` in ``mkdocs.yml``). Sphinx roles in a page
  (``:class:`X```, moved there from module docstrings) become Markdown code, as in the API reference.
* a Griffe extension, :class:`PackageDirs`, for mkdocstrings: ``datamodules/`` and ``callbacks/`` are
  installed as ``lightning_convnets.datamodules`` and ``lightning_convnets.callbacks`` (pyproject's
  ``[tool.setuptools.package-dir]``), which a static reader of the source tree cannot guess: it grafts each
  folder under its installed name. It also reads the docstrings as written here (:func:`docstring_markdown`):
  Sphinx roles (``:class:`X```) become Markdown code, an ``Example:`` or ``Example (note):`` section is
  Griffe's ``Examples:`` (its ``>>>`` lines rendered as code), and an ``Args:`` entry naming several
  parameters at once (``mean, std: ...``) becomes one entry per parameter, so that Griffe still checks
  every documented name against the signature.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import griffe

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("mkdocs.hooks.outside_links")

LINK = re.compile(r"(?<!!)\[(?P<text>[^\]]*)\]\((?P<target>[^)\s]+)\)")
FENCE = re.compile(r"^\s*(```|~~~)")
ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):`(?P<short>~?)(?P<name>[^`]+)`")


def _role(match: re.Match) -> str:
    """``:class:`~a.b.C``` -> ```C```, ``:func:`a.f``` -> ```a.f``` (Sphinx's ``~`` keeps the last name)."""
    name = match["name"].rsplit(".", 1)[-1] if match["short"] else match["name"]
    return f"`{name}`"
EXAMPLE_TITLE = re.compile(r"^(?P<indent>\s*)Examples?(?: \((?P<note>.*)\))?:\s*$")
PARAM_SECTION = re.compile(r"^(?P<indent>\s*)(?:Args|Arguments|Parameters|Params|Keyword Args|Other Parameters):\s*$")
GROUPED_ENTRY = re.compile(r"^(?P<indent>\s+)(?P<names>\w+(?:\s*,\s*\w+)+)(?P<type>\s*\([^)]*\))?:(?P<rest>.*)$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def docstring_markdown(text: str) -> str:
    """A docstring in this project's style, made ready for Griffe's Google parser (see the module docstring).

    Example:
        >>> print(docstring_markdown("Args:\\n    a, b: the sides\\n        (pixels).\\nExample (tiny):\\n    x = 1"))
        Args:
            a: the sides
                (pixels).
            b: the sides
                (pixels).
        Examples:
            (tiny)
            x = 1
    """
    lines = ROLE.sub(_role, text).splitlines()
    out: list[str] = []
    section_indent: int | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        title = EXAMPLE_TITLE.match(line)
        if title:
            out.append(f"{title['indent']}Examples:")
            if title["note"]:
                body = next((_indent(x) for x in lines[i + 1 :] if x.strip()), len(title["indent"]) + 4)
                out.append(" " * body + f"({title['note']})")
            section_indent, i = None, i + 1
            continue
        if PARAM_SECTION.match(line):
            section_indent = _indent(line)
        elif line.strip() and section_indent is not None and _indent(line) <= section_indent:
            section_indent = None
        entry = GROUPED_ENTRY.match(line) if section_indent is not None else None
        if entry:
            block = [line]
            while i + 1 < len(lines) and (not lines[i + 1].strip() or _indent(lines[i + 1]) > _indent(line)):
                if not lines[i + 1].strip() and (i + 2 >= len(lines) or _indent(lines[i + 2]) <= _indent(line)):
                    break
                i += 1
                block.append(lines[i])
            for name in re.split(r"\s*,\s*", entry["names"]):
                out.append(f"{entry['indent']}{name}{entry['type'] or ''}:{entry['rest']}")
                out.extend(block[1:])
        else:
            out.append(line)
        i += 1
    return "\n".join(out)


def outside_target(target: str, page_dir: Path, docs_dir: Path) -> Path | None:
    """The repository file a relative link leaves ``docs/`` for, else ``None`` (a URL, an anchor, a page)."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith(("#", "/")):
        return None
    path = (page_dir / target.split("#", 1)[0]).resolve()
    return None if path.is_relative_to(docs_dir.resolve()) else path


def rewrite_outside_links(markdown: str, page_dir: Path, docs_dir: Path, repo_url: str | None) -> tuple[str, list[str]]:
    """``markdown`` with its links out of ``docs/`` rewritten, and the links whose file does not exist."""
    missing: list[str] = []

    def replace(match: re.Match) -> str:
        text, target = match["text"], match["target"]
        path = outside_target(target, page_dir, docs_dir)
        if path is None:
            return match[0]
        if not path.is_relative_to(ROOT) or not path.exists():
            missing.append(target)
            return match[0]
        rel = path.relative_to(ROOT).as_posix()
        if repo_url:
            return f"[{text}]({repo_url.rstrip('/')}/blob/HEAD/{rel})"
        return text if rel in text else f"{text} (`{rel}`)"

    out, in_fence = [], False
    for line in markdown.splitlines(keepends=True):
        if FENCE.match(line):
            in_fence = not in_fence
        out.append(line if in_fence else ROLE.sub(_role, LINK.sub(replace, line)))
    return "".join(out), missing


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    docs_dir = Path(config["docs_dir"])
    page_dir = Path(page.file.abs_src_path).parent
    markdown, missing = rewrite_outside_links(markdown, page_dir, docs_dir, config.get("repo_url"))
    for target in missing:
        log.warning("%s: the link %r leaves docs/ for a file that does not exist", page.file.src_uri, target)
    return markdown


class PackageDirs(griffe.Extension):
    """Graft the folders that pyproject maps to subpackages (``lightning_convnets.datamodules`` =
    ``datamodules/``) under their installed names, and turn Sphinx roles into Markdown code."""

    def __init__(self) -> None:
        package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
        self.grafts: dict[str, dict[str, str]] = {}
        for name, folder in package_dir.items():
            parent, _, child = name.rpartition(".")
            if parent and folder != name.replace(".", "/"):
                if Path(folder).name != child:
                    raise ValueError(f"pyproject package-dir {name} = {folder}: the folder must be named {child}")
                self.grafts.setdefault(parent, {})[child] = folder

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        for child, folder in self.grafts.get(pkg.path, {}).items():
            pkg.set_member(child, loader.load(folder, try_relative_path=False))

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = docstring_markdown(obj.docstring.value)
