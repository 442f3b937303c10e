"""The layout's rules, checked on the source: every package on its own layer and imports pointing
down, no cycle, imports at the top of the file, no private names across modules, short functions.

Every module of ``cbr/``, ``index/`` and ``explain/`` is parsed (nothing is imported). Every import
statement counts as an edge of the graph, including one inside a function; so does a torch- or
web-bound module bound at the top with ``LazyModule("...")`` (cbr/lazy_import.py), and a registry's
``"module:function"`` reference (resolved when used: cbr.cli.group's commands, the backbones'
builders).
"""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cbr", "index", "explain")
MAX_FUNCTION_LINES = 80

# Layers, highest first, one package each: a module may import its own package and the layers
# below it, never one above (a back-edge). cbr/errors.py, cbr/files.py and cbr/lazy_import.py are
# leaves that every layer may import.
LAYERS = (
    ("cli", ("cbr.cli", "cbr.__main__")),
    ("evaluation", ("cbr.evaluation",)),
    ("serve", ("cbr.serve",)),
    ("pipeline", ("cbr.pipeline",)),
    ("reporting", ("cbr.reporting",)),
    ("learn", ("cbr.learn",)),
    ("store", ("cbr.store",)),
    ("models", ("cbr.models",)),
    ("data", ("cbr.data",)),
    ("explain", ("explain",)),
    ("index", ("index",)),
)
LEAVES = ("cbr", "cbr.errors", "cbr.files", "cbr.lazy_import")

# Deferred to the functions that use them, so that `cbr --help` and the read-only commands stay
# fast (tests/test_startup.py runs them).
HEAVY = ("torch", "torchvision", "faiss", "sklearn", "scipy", "captum", "pytorch_grad_cam", "matplotlib", "cv2",
         "pydicom", "nibabel", "ray", "timm", "skimage")


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
TREES = {m: ast.parse(p.read_text(), str(p)) for m, p in MODULES.items()}


def _resolve(name: str, modules=MODULES) -> str | None:
    """The longest prefix of ``name`` that is one of our modules (None for third-party names)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def _statements(tree: ast.AST):
    """Every import statement of a module, with whether it sits inside a function."""
    def walk(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, in_function
            yield from walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                      ast.Lambda)))
    yield from walk(tree, False)


def _base(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` statement reads from."""
    base = node.module or ""
    if node.level:
        parts = module.split(".")
        anchor = parts[: len(parts) - node.level + (1 if is_package else 0)]
        base = ".".join(anchor + ([base] if base else []))
    return base


def _targets(module: str, is_package: bool, node, modules=MODULES) -> set[str]:
    """Our modules one import statement imports."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = _base(module, is_package, node)
        # `from pkg import name` imports the submodule pkg.name when there is one, else pkg.
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    return {t for t in map(lambda n: _resolve(n, modules), names) if t is not None and t != module}


def _calls(tree: ast.AST, names: tuple[str, ...]):
    """Every call of a function named one of ``names`` (``f(...)`` or ``x.f(...)``), with whether
    it sits inside a function."""
    def walk(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Call):
                func = child.func
                if (func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)) in names:
                    yield child, in_function
            yield from walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                      ast.Lambda)))
    yield from walk(tree, False)


LAZY = ("LazyModule",)
DYNAMIC = ("import_module", "__import__")  # importlib.import_module, the builtin __import__


def _literal_name(call: ast.Call) -> str | None:
    """The module name a call's first argument spells: a string, or an f-string's leading text."""
    if not call.args:
        return None
    arg = call.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
        return str(arg.values[0].value)
    return None


def _ours(name: str | None) -> bool:
    """Whether a (possibly partial, or relative) module name names one of our modules."""
    return name is not None and (name.startswith(".") or name.split(".")[0] in PACKAGES)


def lazy_targets(tree: ast.AST, modules=MODULES) -> list[str]:
    """The modules a file binds with ``LazyModule("...")`` (anywhere in it)."""
    return [t for call, _ in _calls(tree, LAZY) if (t := _resolve(_literal_name(call) or "", modules))]


REFERENCE = re.compile(r"^((?:%s)(?:\.\w+)*):(\w+)$" % "|".join(PACKAGES))


def references(tree: ast.AST) -> list[tuple[str, str]]:
    """The ``"module:function"`` strings of a file (a registry's entries), as (module, name)."""
    return [(m.group(1), m.group(2)) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and (m := REFERENCE.match(node.value))]


def _graph(trees=TREES, modules=MODULES) -> dict[str, set[str]]:
    out = {}
    for m, tree in trees.items():
        edges = set().union(*(_targets(m, _is_package(m, modules), node, modules) for node, _ in _statements(tree)))
        edges |= set(lazy_targets(tree, modules))
        edges |= {t for name, _ in references(tree) if (t := _resolve(name, modules))}
        out[m] = edges - {m}
    return out


def _is_package(module: str, modules=MODULES) -> bool:
    path = modules.get(module)
    return path is not None and path.name == "__init__.py"


GRAPH = _graph()


def torch_modules(tree: ast.AST) -> bool:
    """Whether a module defines a subclass of torch.nn.Module."""
    return any(isinstance(node, ast.ClassDef) and any(ast.unparse(b) in ("nn.Module", "torch.nn.Module", "Module")
                                                      for b in node.bases)
               for node in ast.walk(tree))


# The modules that subclass torch.nn.Module load torch as they load; they count as heavy packages
# themselves (torch at their top). A light module that calls one binds it at its top with
# LazyModule (never inside a function), so that the read-only commands never load torch.
TORCH_BOUND = frozenset(m for m, tree in TREES.items() if torch_modules(tree))


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


# --- the checks, as functions of (module, its parsed source), so that the self-test can feed them

def back_edges(module: str, imports: set[str]) -> list[str]:
    """The modules ``module`` imports from a layer above its own."""
    own = _layer(module)
    if own is None:  # a leaf (cbr, errors, files) imports only other leaves
        return sorted(imports - set(LEAVES))
    return sorted(n for n in imports if n not in LEAVES and _layer(n) is not None and _layer(n) < own)


def late_imports(module: str, tree: ast.AST, modules=MODULES) -> list[str]:
    """``line: statement`` of each import of our modules inside a function: an import statement,
    ``importlib.import_module("cbr...")``, ``__import__("cbr...")`` or ``LazyModule("cbr...")``."""
    out = []
    for node, in_function in _statements(tree):
        if in_function and _targets(module, _is_package(module, modules), node, modules):
            out.append(f"{node.lineno}: {ast.unparse(node)}")
    out += [f"{call.lineno}: {ast.unparse(call)}" for call, in_function in _calls(tree, DYNAMIC + LAZY)
            if in_function and _ours(_literal_name(call))]
    return sorted(out, key=lambda line: int(line.split(":")[0]))


# The functions that import a module named by a value (not a literal): each resolves the
# "module:function" references of one registry, which the graph reads as edges.
RESOLVERS = {
    "cbr.cli.group": "COMMANDS, the lazy click group's commands",
    "cbr.models.backbones": "BACKBONES' builder and split functions",
    "cbr.lazy_import": "LazyModule",
}


def dynamic_imports(tree: ast.AST) -> list[str]:
    """``line: call`` of each import of a module named by a value rather than a literal."""
    return [f"{call.lineno}: {ast.unparse(call)}" for call, _ in _calls(tree, DYNAMIC) if _literal_name(call) is None]


def heavy_top_imports(tree: ast.AST, packages=HEAVY) -> list[str]:
    """The heavy third-party packages (of ``packages``) a module imports at its top level."""
    out = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.split(".")[0] in packages]
        elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] in packages:
            out.append(node.module)
    return out


# The web stack loads in over half a second. The serve package imports it at its top, and the
# modules that do so are bound lazily by the CLI, as the torch-bound ones are, so that
# `cbr serve --help` never loads it (tests/test_startup.py).
WEB = ("fastapi", "starlette", "uvicorn")


def web_modules(tree: ast.AST) -> bool:
    """Whether a module imports FastAPI, Starlette or uvicorn at its top."""
    return bool(heavy_top_imports(tree, WEB))


WEB_BOUND = frozenset(m for m, tree in TREES.items() if web_modules(tree))
BOUND = TORCH_BOUND | WEB_BOUND


def private_imports(module: str, tree: ast.AST, modules=MODULES) -> list[str]:
    """``line: module.name`` of each private name imported from another of our modules."""
    out = []
    for node, _ in _statements(tree):
        if isinstance(node, ast.ImportFrom):
            base = _base(module, _is_package(module, modules), node)
            if _resolve(base, modules) is None:
                continue
            out += [f"{node.lineno}: {base}.{a.name}" for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")]
        else:
            out += [f"{node.lineno}: {a.name}" for a in node.names
                    if _resolve(a.name, modules) and any(p.startswith("_") and not p.startswith("__")
                                                         for p in a.name.split("."))]
    return out


def long_functions(tree: ast.AST, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``name (line): n lines`` of each function or method longer than ``limit`` lines."""
    return [f"{node.name} (line {node.lineno}): {node.end_lineno - node.lineno + 1} lines"
            for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > limit]


# --- the tree as it is ----------------------------------------------------------------------

def test_the_walk_sees_the_tree():
    # Guards the test itself: it must find the packages and the imports inside functions.
    assert {"cbr.cli", "cbr.pipeline.query", "index.vectors", "explain.cam"} <= set(MODULES)
    assert "cbr.pipeline.query" in GRAPH["cbr.cli.retrieval"]
    assert "index" in GRAPH["cbr.store.member"]
    assert "cbr.models.embedder" in GRAPH["cbr.pipeline.index"]  # a LazyModule at its top
    assert "cbr.cli.audit" in GRAPH["cbr.cli.group"]  # a "module:function" of COMMANDS
    assert all(_layer(m) is not None or m in LEAVES for m in MODULES), \
        [m for m in MODULES if _layer(m) is None and m not in LEAVES]


def test_import_graph_has_no_cycle():
    cycles = _cycles()
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.split(".")[0] in ("index", "explain")))
def test_libraries_never_import_cbr(module):
    assert not [n for n in GRAPH[module] if n.split(".")[0] == "cbr"]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_the_layers(module):
    upward = back_edges(module, GRAPH[module])
    assert not upward, f"{module} ({LAYERS[_layer(module)][0] if _layer(module) is not None else 'leaf'}) " \
                       f"imports a higher layer: {', '.join(upward)}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_our_modules_are_imported_at_the_top(module):
    late = late_imports(module, TREES[module])
    assert not late, f"{MODULES[module].relative_to(ROOT)}: move to the top of the file: {'; '.join(late)}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_only_torch_or_web_bound_modules_load_lazily(module):
    light = [t for t in lazy_targets(TREES[module]) if t not in BOUND]
    assert not light, f"{MODULES[module].relative_to(ROOT)} binds {', '.join(light)} with LazyModule; " \
                      "import a light module at the top"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_are_imported_by_name_only_in_resolvers(module):
    dynamic = dynamic_imports(TREES[module])
    assert module in RESOLVERS or not dynamic, \
        f"{MODULES[module].relative_to(ROOT)} imports a module named by a value ({'; '.join(dynamic)}); " \
        "import it at the top, or name it in a registry as \"module:function\""


@pytest.mark.parametrize("module", sorted(MODULES))
def test_registry_references_resolve(module):
    # A "module:function" string is an edge of the graph only if it names a real definition.
    def defined(tree):
        names = set()
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                names |= {t.id for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                          if isinstance(t, ast.Name)}
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        return names

    bad = [f"{m}:{n}" for m, n in references(TREES[module]) if m not in TREES or n not in defined(TREES[m])]
    assert not bad, f"{MODULES[module].relative_to(ROOT)} names what does not exist: {bad}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_heavy_packages_are_imported_inside_functions(module):
    heavy = heavy_top_imports(TREES[module])
    assert module in TORCH_BOUND or not heavy, \
        f"{MODULES[module].relative_to(ROOT)} imports {', '.join(heavy)} at its top; import it where it is used"


def test_the_torch_bound_modules_are_found():
    # The exception above: the modules that cannot load without torch, found from their classes.
    assert {"cbr.models.embedder", "cbr.models.layers", "cbr.models.timm_models", "explain.attribution"} <= TORCH_BOUND
    assert not TORCH_BOUND & {"cbr.models.checkpoint", "cbr.pipeline.query", "explain.cam", "index.vectors"}


def test_the_web_bound_modules_are_found():
    # The CLI binds the server lazily: it imports uvicorn and the app, which import FastAPI.
    assert {"cbr.serve.server", "cbr.serve.app"} <= WEB_BOUND
    assert not WEB_BOUND & {"cbr.serve", "cbr.serve.settings", "cbr.cli.serve"}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_name_crosses_modules(module):
    private = private_imports(module, TREES[module])
    assert not private, f"{MODULES[module].relative_to(ROOT)} imports private names " \
                        f"(make them public or move them): {'; '.join(private)}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_functions_are_short(module):
    long = long_functions(TREES[module])
    assert not long, f"{MODULES[module].relative_to(ROOT)}: split at a natural seam: {'; '.join(long)}"


# --- the checks can fail ---------------------------------------------------------------------

BAD = '''
from cbr.pipeline.query import Searcher
from cbr.models.embedder import _build
import torch


def late():
    from cbr.data.text import for_terminal
    from cbr.models.embedder import create_embedder  # torch-bound, but still at the top or lazy
    return for_terminal, create_embedder, importlib.import_module("cbr.data.text"), LazyModule("cbr.data.text")


embedder = LazyModule("cbr.models.embedder")
text = LazyModule("cbr.data.text")
BUILDERS = {"tiny": "cbr.data.text:for_terminal"}


def resolve(name):
    return importlib.import_module(name), __import__(f"cbr.{name}")


def long():
''' + "    x = 1\n" * MAX_FUNCTION_LINES


def test_the_checks_find_planted_faults():
    modules = {"cbr.store.bad": Path("cbr/store/bad.py"), "cbr.pipeline.query": Path("q.py"),
               "cbr.models.embedder": Path("e.py"), "cbr.data.text": Path("t.py")}
    tree = ast.parse(BAD)
    imports = _graph({"cbr.store.bad": tree}, modules)["cbr.store.bad"]
    assert imports == {"cbr.pipeline.query", "cbr.models.embedder", "cbr.data.text"}
    assert back_edges("cbr.store.bad", imports) == ["cbr.pipeline.query"]
    assert late_imports("cbr.store.bad", tree, modules) == [
        "8: from cbr.data.text import for_terminal", "9: from cbr.models.embedder import create_embedder",
        "10: importlib.import_module('cbr.data.text')", "10: LazyModule('cbr.data.text')",
        "19: __import__(f'cbr.{name}')"]
    assert [t for t in lazy_targets(tree, modules) if t not in TORCH_BOUND] == ["cbr.data.text", "cbr.data.text"]
    assert references(tree) == [("cbr.data.text", "for_terminal")]
    assert dynamic_imports(tree) == ["19: importlib.import_module(name)"]
    assert private_imports("cbr.store.bad", tree, modules) == ["3: cbr.models.embedder._build"]
    assert heavy_top_imports(tree) == ["torch"]
    assert long_functions(tree) == [f"long (line 22): {MAX_FUNCTION_LINES + 1} lines"]
    assert long_functions(ast.parse("def ok():\n" + "    x = 1\n" * (MAX_FUNCTION_LINES - 1))) == []
    assert torch_modules(ast.parse("class M(nn.Module):\n    pass\n"))


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


# --- the documentation of the layout --------------------------------------------------------

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
