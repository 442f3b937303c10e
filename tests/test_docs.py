"""The documentation: the site builds (``mkdocs build --strict``), the README stays short, no page
speaks the project's history, every option, test and benchmark a page names exists, and
ARCHITECTURE.md names only modules and definitions that exist where it places them.

ARCHITECTURE.md is checked against the parsed source (nothing is imported); options against the
click command tree.
"""

import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest

from cbr.cli import cli
from test_architecture import LAYERS

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = ROOT / "ARCHITECTURE.md"
PACKAGES = ("cbr", "index", "explain")
README_MAX_LINES = 320
FILE_SUFFIXES = {"py", "md", "html", "json", "csv", "png", "jpg", "yml", "toml", "db", "js", "css", "txt", "svg", "mako"}
# Options the pages name that belong to other tools (pip), not to cbr.
FOREIGN_OPTIONS = {"--no-deps"}
# Words that only mean something inside the project's own history, never to a reader.
# ("session" as a word; a module named sessions.py, or SessionMiddleware, is not history.)
HISTORY = re.compile(r"\bissues? #?\d+|\bthe issue\b|(?<![`\w-])sessions?\b(?![.`-])|last turn", re.IGNORECASE)


def _doc_pages() -> list[Path]:
    return [ROOT / "README.md", ARCHITECTURE, *sorted((ROOT / "docs").rglob("*.md"))]


@pytest.mark.slow
def test_mkdocs_builds_strict(tmp_path):
    missing = [m for m in ("mkdocs", "material") if importlib.util.find_spec(m) is None]
    if missing:
        # CI installs the dev extra, so there a missing MkDocs is a broken install, not a reason to skip.
        if os.environ.get("CI"):
            pytest.fail(f"{', '.join(missing)} not installed; pip install -e '.[dev]'")
        pytest.skip(f"{', '.join(missing)} not installed (the dev extra installs them)")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "results" / "index.html").is_file()


def test_readme_is_short():
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move reference material to docs/"


@pytest.mark.parametrize("page", _doc_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_page_speaks_project_history(page):
    hits = [f"{n}: {line.strip()}" for n, line in enumerate(page.read_text().splitlines(), 1)
            if HISTORY.search(line)]
    assert not hits, f"{page.relative_to(ROOT)} speaks of issues or sessions: {hits}"


def _cbr_options() -> set[str]:
    """Every option of every cbr command and sub-command, from the click tree."""
    found: set[str] = set()

    def walk(command, ctx):
        found.update(o for o in ctx.help_option_names if o.startswith("--"))
        for param in command.params:
            found.update(o for o in [*param.opts, *param.secondary_opts] if o.startswith("--"))
        if isinstance(command, click.Group):
            for name in command.list_commands(ctx):
                sub = command.get_command(ctx, name)
                walk(sub, click.Context(sub, info_name=name, parent=ctx))

    walk(cli, click.Context(cli, info_name="cbr"))
    return found


def test_documented_options_exist():
    # results.md quotes benchmark scripts' options; every other page speaks of cbr's own.
    options = _cbr_options()
    assert {"--db", "--explain", "--retain"} <= options  # the walk saw the commands
    unknown = {}
    for page in _doc_pages():
        if page.name == "results.md":
            continue
        named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9]", page.read_text()))
        if named - options - FOREIGN_OPTIONS:
            unknown[str(page.relative_to(ROOT))] = sorted(named - options - FOREIGN_OPTIONS)
    assert not unknown, f"pages name options no cbr command has: {unknown}"


def test_named_tests_and_benchmarks_exist():
    # The guarantees name the tests that hold them; a renamed test must not leave a dead name.
    missing = {}
    for page in _doc_pages():
        for path, function in re.findall(r"((?:tests/|benchmarks/)?(?:test|bench)_\w+\.py)(?:::(\w+))?",
                                         page.read_text()):
            name = path.split("/")[-1]
            file = ROOT / ("benchmarks" if name.startswith("bench_") else "tests") / name
            if not file.is_file():
                missing.setdefault(page.name, []).append(path)
            elif function and not re.search(rf"^\s*(?:async )?def {function}\b", file.read_text(), re.MULTILINE):
                missing.setdefault(page.name, []).append(f"{path}::{function}")
    assert not missing, f"pages name tests or benchmarks that do not exist: {missing}"


def test_history_pattern_catches_what_it_must():
    assert HISTORY.search("measured in issue 19") and HISTORY.search("as last session showed")
    assert HISTORY.search("the issue's protocol") and not HISTORY.search("an issuer of tokens")
    assert not HISTORY.search("- `sessions.py`: `Sessions`, logins") and not HISTORY.search("SessionMiddleware")
    assert not HISTORY.search("`--session-key`")


# ---- ARCHITECTURE.md against the source -----------------------------------------------------------

def _bound_names(path: Path) -> set[str]:
    """Names a module defines: top-level functions, classes and assignments, and the members of its
    classes (as ``Class.member`` and bare). A package's ``__init__`` also counts what it imports (its
    re-exports), and any module what it imports from outside the project ("Starlette's
    `TrustedHostMiddleware` in `cbr/serve/app.py`" names a use, not a misplaced definition), and
    every name in its ``__all__``. A name imported from another of the project's modules, and not
    declared public here, is defined there, not here."""
    tree = ast.parse(path.read_text())
    names: set[str] = set()

    def targets(node) -> list[str]:
        if isinstance(node, ast.Name):
            return [node.id]
        if isinstance(node, (ast.Tuple, ast.List)):
            return [n for elt in node.elts for n in targets(elt)]
        return []

    def bind(body, prefix=""):
        for node in body:
            found: list[str] = []
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                found = [node.name]
                if isinstance(node, ast.ClassDef):
                    bind(node.body, prefix + node.name + ".")
            elif isinstance(node, ast.Assign):
                found = [n for t in node.targets for n in targets(t)]
                if found == ["__all__"] and isinstance(node.value, (ast.List, ast.Tuple)):
                    # What a module declares public is its own to name, re-exports included.
                    found += [e.value for e in node.value.elts if isinstance(e, ast.Constant)]
            elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
                found = targets(node.target)
            elif isinstance(node, (ast.Import, ast.ImportFrom)) and not prefix:
                if path.name == "__init__.py" or not _imports_project(node):
                    found = [(a.asname or a.name).split(".")[0] for a in node.names]
            elif isinstance(node, (ast.If, ast.Try)) and not prefix:
                bind(node.body + getattr(node, "orelse", []) + [h for x in getattr(node, "handlers", [])
                                                                 for h in x.body])
            for name in found:
                names.add(prefix + name)
                if prefix:
                    names.add(name)

    bind(tree.body)
    return names


def _imports_project(node) -> bool:
    if isinstance(node, ast.ImportFrom):
        return node.level > 0 or (node.module or "").split(".")[0] in PACKAGES
    return any(a.name.split(".")[0] in PACKAGES for a in node.names)


def _module_file(parts: list[str]) -> Path | None:
    """``["cbr", "models", "embedder"]`` -> its file, if it exists (a module or a package)."""
    base = ROOT.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _resolve(path: str) -> str:
    """A path as ARCHITECTURE.md writes it, relative to the root; the flows leave out ``cbr/``."""
    if path.split("/")[0] in PACKAGES or (ROOT / path).exists():
        return path
    return "cbr/" + path


def _architecture_facts():
    """(paths, placements) named by ARCHITECTURE.md.

    paths: module files and package folders, e.g. ``cbr/models/embedder.py``, ``index/``.
    placements: (file, name) pairs, from four forms:
      - a module-list line, ``- `embedder.py`: `Embedder` ...`` under ``### `cbr/models/` ``;
      - ``"`name` in `path.py`"`` and ``"`name` (`path.py`)"`` in prose;
      - a dotted path in the flows, ``models/embedder.create_embedder``;
      - a dotted module name, ``cbr.data.dicom.KEPT`` or ``explain.cam``.
    """
    text = ARCHITECTURE.read_text()
    paths: set[str] = set()
    placements: set[tuple[str, str]] = set()
    package = None
    for line in text.splitlines():
        heading = re.match(r"### `([\w/]+/)`", line)
        if heading:
            package = heading.group(1)
            continue
        if line.startswith("## "):
            package = None
        if package and line.lstrip().startswith("- "):
            # Each "`file.py`: description" item of the module list (a line may hold several).
            for item in re.split(r"(?=`[\w/]+\.py`:)", line):
                head = re.match(r"\s*(?:- )?`([\w/]+\.py)`:(.*)", item)
                if not head:
                    continue
                file = package + head.group(1)
                paths.add(file)
                for name in re.findall(r"`([A-Za-z_][\w.]*)`", head.group(2)):
                    if not name.endswith(".py") and "." not in name.strip("."):
                        placements.add((file, name))
    for path in re.findall(r"(?<![\w./-])((?:cbr|index|explain|migrations|tests|benchmarks)/[\w/]*(?:\.py)?)", text):
        paths.add(path)
    for name, path in re.findall(r"`([A-Za-z_][\w.]*)`\s+(?:(?:in|from)\s+|\()`([\w/]+\.py)`", text):
        if "/" in path:  # a bare `app.py` in prose is ambiguous; the module list places those
            placements.add((_resolve(path), name))
    for path, name in re.findall(r"(?<![\w./-])((?:[a-z_]+/)+[a-z_]+)\.([A-Za-z_]\w*(?:\.\w+)?)\b", text):
        if path.split("/")[0] in ("tests", "benchmarks", "migrations") or name in FILE_SUFFIXES:
            continue
        placements.add((_resolve(path) + ".py", name))
    for dotted in re.findall(r"`((?:cbr|index|explain)(?:\.\w+)+)`", text):
        parts = dotted.split(".")
        for cut in range(len(parts), 0, -1):
            file = _module_file(parts[:cut])
            if file:
                rest = ".".join(parts[cut:])
                if rest in FILE_SUFFIXES:  # `explain.py` is a file name, not the package explain
                    break
                paths.add(str(file.relative_to(ROOT)))
                if rest:
                    placements.add((str(file.relative_to(ROOT)), rest))
                break
        else:
            paths.add(dotted.replace(".", "/") + ".py")
    return paths, placements


def test_architecture_names_only_existing_paths():
    paths, _ = _architecture_facts()
    assert len(paths) > 50  # the parser found the module list
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"ARCHITECTURE.md names paths that do not exist: {missing}"


def test_architecture_places_definitions_where_they_are():
    _, placements = _architecture_facts()
    assert ("cbr/pipeline/vote.py", "VOTE_RULES") in placements  # the parser found the prose and the list
    wrong = []
    for file, name in sorted(placements):
        path = ROOT / file
        if not path.is_file():
            wrong.append(f"{name} in {file} (no such file)")
        elif name not in _bound_names(path):
            wrong.append(f"{name} in {file}")
    # In the module list every backticked name is read as a definition of the line's file: a name
    # the file only uses belongs in plain words there.
    assert not wrong, f"ARCHITECTURE.md places definitions where they are not defined: {wrong}"


def test_architecture_draws_the_layers_the_architecture_test_enforces():
    text = ARCHITECTURE.read_text()
    block = re.search(r"## Layers.*?```\n(.*?)```", text, re.S).group(1)
    drawn = [m.group(1).rstrip("/").replace("/", ".") for m in re.finditer(r"^((?:cbr/)?\w+/)", block, re.M)]
    enforced = [name for _, names in LAYERS for name in names if name != "cbr.__main__"]
    assert drawn == enforced, f"ARCHITECTURE.md draws the layers {drawn}; tests/test_architecture.py enforces {enforced}"


def test_architecture_parser_catches_a_misplaced_definition(tmp_path, monkeypatch):
    # The check must be able to fail: a definition placed in the wrong module is caught.
    fake = tmp_path / "ARCHITECTURE.md"
    fake.write_text("`resolve_device` in `cbr/models/backbones.py`\n")
    monkeypatch.setattr(sys.modules[__name__], "ARCHITECTURE", fake)
    _, placements = _architecture_facts()
    assert placements == {("cbr/models/backbones.py", "resolve_device")}
    assert "resolve_device" not in _bound_names(ROOT / "cbr/models/backbones.py")
