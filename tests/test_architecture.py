"""The layout's rules, checked on the source: imports point one way, no cycle, small modules.

Every module of ``cbr/``, ``index/`` and ``explain/`` is parsed (nothing is imported), and every
import statement counts, including those inside functions: a lazy import is still a dependency.
"""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cbr", "index", "explain")
MAX_LINES = 400

# Layers, highest first: a module may import its own layer and the layers below it, never above.
# cbr/errors.py and cbr/files.py are leaves that every layer may import.
LAYERS = (
    ("cli", ("cbr.cli", "cbr.__main__")),
    ("pipelines", ("cbr.pipeline", "cbr.learn", "cbr.evaluation", "cbr.serve")),
    ("parts", ("cbr.store", "cbr.models", "cbr.data", "cbr.reporting")),
    ("libraries", ("index", "explain")),
)
LEAVES = ("cbr", "cbr.errors", "cbr.files")


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the three packages."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The longest prefix of ``name`` that is one of our modules (None for third-party names)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in MODULES:
            return candidate
        parts.pop()
    return None


def _imports(module: str, path: Path) -> set[str]:
    """Our modules that ``module`` imports anywhere in its file (top level or inside functions)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import name` imports the submodule pkg.name when there is one, else pkg.
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for name in names:
            target = _resolve(name)
            if target is not None and target != module:
                found.add(target)
    return found


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _layer(module: str) -> int | None:
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    return None


def _cycles(graph=None) -> list[list[str]]:
    """Every import cycle, as the strongly connected components of more than one module (Tarjan)."""
    graph = GRAPH if graph is None else graph
    index, low, on_stack, stack, out = {}, {}, set(), [], []

    def visit(m):
        index[m] = low[m] = len(index)
        stack.append(m)
        on_stack.add(m)
        for n in sorted(graph[m]):
            if n not in index:
                visit(n)
                low[m] = min(low[m], low[n])
            elif n in on_stack:
                low[m] = min(low[m], index[n])
        if low[m] == index[m]:
            component = []
            while True:
                n = stack.pop()
                on_stack.discard(n)
                component.append(n)
                if n == m:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for m in sorted(graph):
        if m not in index:
            visit(m)
    return sorted(out)


def test_the_walk_sees_the_tree():
    # Guards the test itself: it must find the packages and their lazy imports.
    assert {"cbr.cli", "cbr.pipeline.query", "index.vectors", "explain.cam"} <= set(MODULES)
    assert "cbr.pipeline.query" in GRAPH["cbr.cli.retrieval"]  # imported inside a command function
    assert "index" in GRAPH["cbr.store.member"]  # `import index as ix` inside functions
    assert all(_layer(m) is not None or m in LEAVES for m in MODULES), \
        [m for m in MODULES if _layer(m) is None and m not in LEAVES]


def test_import_graph_has_no_cycle():
    cycles = _cycles()
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.split(".")[0] in ("index", "explain")))
def test_libraries_never_import_cbr(module):
    assert not [n for n in GRAPH[module] if n.split(".")[0] == "cbr"]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_the_layers(module):
    own = _layer(module)
    if own is None:  # a leaf (cbr, errors, files) imports only other leaves
        assert GRAPH[module] <= set(LEAVES), GRAPH[module]
        return
    upward = sorted(n for n in GRAPH[module] if n not in LEAVES and _layer(n) < own)
    assert not upward, f"{module} ({LAYERS[own][0]}) imports a higher layer: {', '.join(upward)}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_is_small(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[module].relative_to(ROOT)} has {lines} lines; split it by concept"


def _documented() -> set[str]:
    """Files named in ARCHITECTURE.md's module list: `name.py` under a `### `package/`` heading."""
    found, package = set(), None
    for line in (ROOT / "ARCHITECTURE.md").read_text().splitlines():
        heading = re.match(r"### `([\w/]+/)`", line)
        if heading:
            package = heading.group(1)
        elif line.startswith("## "):
            package = None
        elif package:
            found.update(package + name for name in re.findall(r"`([\w/]+\.py)`", line))
    return found


def test_every_module_has_its_line_in_architecture_md():
    # A package's __init__ is described by its heading; it may have a line of its own.
    files = {str(p.relative_to(ROOT)) for p in MODULES.values()}
    documented = _documented()
    assert len(documented) > 50  # the parser found the list
    missing = sorted(f for f in files - documented if not f.endswith("__init__.py"))
    assert not missing, f"add one line per new module to ARCHITECTURE.md: {missing}"
    stale = sorted(documented - files)
    assert not stale, f"ARCHITECTURE.md names modules that no longer exist: {stale}"


# Facts that once were spelled in several modules; each now has one home, which the rest import.
ONE_HOME = {
    r"""["']cbr-reports["']""": "cbr/pipeline/settings.py",  # DEFAULT_REPORTS
    r"""["']imagenet["'],\s*["']none["']""": "cbr/models/config.py",  # WEIGHTS
    r"""no query \{""": "cbr/store/rows.py",  # get_query
    r"""def _iso\b|def iso\b""": "cbr/store/rows.py",  # iso
    r"""encode_map\(""": "cbr/store/rows.py",  # explanation_row (explain/ itself defines it)
}


@pytest.mark.parametrize("pattern", sorted(ONE_HOME))
def test_one_fact_in_one_place(pattern):
    homes = sorted(str(p.relative_to(ROOT)) for p in MODULES.values()
                   if p.parts[len(ROOT.parts)] == "cbr" and re.search(pattern, p.read_text()))
    assert homes == [ONE_HOME[pattern]], f"{pattern!r} belongs in {ONE_HOME[pattern]} only; found in {homes}"
