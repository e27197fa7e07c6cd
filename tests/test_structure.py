"""The house's shape, checked from the source: modules import only downwards through the layers and
never in a circle, each name is imported from the one module that defines it, and no class or
function outgrows what a reader can hold (150 and 60 lines; a longer one says why in its docstring,
with the words "Longer than")."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# dotted package -> its folder: the converters and kernels sit at the top of the repository and
# install inside the package (pyproject's package-dir), so no generic top-level name is installed
PACKAGES = {
    "edge_metastone": "edge_metastone",
    "edge_metastone.converters": "converters",
    "edge_metastone.quant_kernels": "quant_kernels",
}

# Bottom to top. A module may import from its own layer and the ones below, never from above.
LAYERS: tuple[tuple[str, ...], ...] = (
    # foundation: errors, constants, text and SPRM rules, GGUF primitives, the embedded model
    (
        "edge_metastone.errors",
        "edge_metastone.cpu",
        "edge_metastone.keys",
        "edge_metastone.limits",
        "edge_metastone.paths",
        "edge_metastone.normalization",
        "edge_metastone.sprm",
        "edge_metastone.answers",
        "edge_metastone.gguf_io",
        "edge_metastone.chat",
        "edge_metastone.models",
        "edge_metastone.quant_kernels",
    ),
    # neutral data: settings and results, the KV layout rule, model files, the backend protocol
    (
        "edge_metastone.types",
        "edge_metastone.kvpolicy",
        "edge_metastone.modelfile",
        "edge_metastone.backend",
    ),
    # runtimes: the one decode loop, llama.cpp, onnxruntime, opening a model; the converters
    (
        "edge_metastone.decode",
        "edge_metastone.engine",
        "edge_metastone.onnx_backend",
        "edge_metastone.runtime",
        "edge_metastone.converters",
    ),
    # policy: the scheduler and its calibration, the search strategies, adaptive compute's budget
    (
        "edge_metastone.scheduler",
        "edge_metastone.calibration",
        "edge_metastone.search",
        "edge_metastone.adaptive_budget",
        "edge_metastone.thinking_scaling",
    ),
    # reasoning: options and results, the planner, the request gate, the stream bridge, Reasoner
    (
        "edge_metastone.options",
        "edge_metastone.planner",
        "edge_metastone.gate",
        "edge_metastone.bridge",
        "edge_metastone.reasoner",
    ),
    # fronts: batch runner, server, training, the command line, the package's lazy exports
    (
        "edge_metastone.batch",
        "edge_metastone.server",
        "edge_metastone.training",
        "edge_metastone.commands",
        "edge_metastone.cli",
        "edge_metastone.__main__",
        "edge_metastone",
    ),
)
MAX_CLASS_LINES = 150
MAX_FUNCTION_LINES = 60


@functools.cache
def modules() -> dict[str, Path]:
    """Every module of the three packages, by dotted name."""
    found = {}
    for pkg, folder in PACKAGES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            parts = tuple(pkg.split(".")) + (parts[:-1] if parts[-1] == "__init__" else parts)
            found[".".join(parts)] = path
    return found


def _resolve(name: str) -> str | None:
    """The module `name` is, or the one it lives in (None outside the three packages)."""
    mods = modules()
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


@functools.cache
def imports() -> dict[str, set[str]]:
    """Module -> the modules of the three packages it imports (function-level imports too)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules().items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps.update(_resolve(a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                for a in node.names:  # `from pkg import submodule` imports the submodule only
                    full = f"{base}.{a.name}"
                    deps.add(full if full in modules() else _resolve(base))
        graph[name] = {d for d in deps if d is not None and d != name}
    return graph


def layer_of(module: str) -> int:
    """The layer a module belongs to (its own name or the closest package named in LAYERS)."""
    best = None
    for i, names in enumerate(LAYERS):
        for prefix in names:
            inside = module == prefix or module.startswith(prefix + ".")
            if inside and (best is None or len(prefix) > len(best[1])):
                best = (i, prefix)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS")
    return best[0]


def test_every_module_has_a_layer():
    for name in modules():
        layer_of(name)


def test_no_import_runs_back_up():
    upward = [
        f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
        for m, deps in imports().items()
        for d in sorted(deps)
        if layer_of(d) > layer_of(m)
    ]
    assert not upward, "\n".join(upward)


def test_no_circles():
    graph = imports()
    state: dict[str, int] = {}
    circles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                circles.append(" -> ".join([*path[path.index(dep) :], dep]))
            elif dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not circles, "\n".join(circles)


def _defined(path: Path) -> set[str]:
    """Names a module defines itself (not the ones it imports), and its submodules."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                names.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            outside = node.module.split(".")[0] not in PACKAGES
            # an outside type given a name of ours (`GGMLQuantizationType as GGMLType`) is ours
            names.update(a.asname for a in node.names if outside and a.asname)
    if path.name == "__init__.py":
        names.update(p.name.split(".")[0] for p in path.parent.glob("*.py"))
        names.update(p.name.split(".")[0] for p in path.parent.glob("*.so"))  # compiled modules
        names.update(p.name for p in path.parent.iterdir() if (p / "__init__.py").is_file())
        if "__getattr__" in names:  # the package's lazy exports name what they hand out
            names.update(_lazy_exports(tree))
    return names


def _lazy_exports(tree: ast.Module) -> set[str]:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            return {ast.literal_eval(e) for e in node.value.elts}
    return set()


SOURCES = sorted(
    p
    for folder in (*PACKAGES, "tests", "bench", "examples")
    for p in (REPO / folder).rglob("*.py")
    if ".venv" not in p.parts
)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_each_name_is_imported_from_its_one_home(path):
    wrong = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom) or node.level or not node.module:
            continue
        home = modules().get(node.module)
        if home is None:
            continue
        defined = _defined(home)
        wrong += [
            f"line {node.lineno}: {a.name} from {node.module}, which only imports it"
            for a in node.names
            if a.name not in defined
        ]
    assert not wrong, "\n".join(wrong)


def _too_long(path: Path) -> list[str]:
    out = []
    label = path.relative_to(REPO) if path.is_relative_to(REPO) else path.name
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef):
            limit = MAX_CLASS_LINES
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            limit = MAX_FUNCTION_LINES
        else:
            continue
        n = node.end_lineno - node.lineno + 1
        if n > limit and "Longer than" not in (ast.get_docstring(node) or ""):
            out.append(f"{label}:{node.lineno} {node.name}: {n} lines")
    return out


def test_no_class_or_function_outgrows_a_reader():
    long = [line for path in modules().values() for line in _too_long(path)]
    assert not long, "\n".join(long)


def test_the_checks_can_fail(tmp_path):
    """The checks themselves: a long function is caught unless it says why, an imported name is
    not a definition, and the layers order the reasoner above the runtimes."""
    body = "    x = 1\n" * 60
    (tmp_path / "long.py").write_text(f"def f():\n{body}")
    (tmp_path / "why.py").write_text(f'def f():\n    """Longer than 60 lines: a table."""\n{body}')
    (tmp_path / "reexport.py").write_text("from os import sep\n\nX = 1\n")
    assert _too_long(tmp_path / "long.py") == ["long.py:1 f: 61 lines"]
    assert _too_long(tmp_path / "why.py") == []
    assert _defined(tmp_path / "reexport.py") == {"X"}
    assert layer_of("edge_metastone.reasoner") > layer_of("edge_metastone.engine.engine")


def test_every_package_is_installed():
    """pyproject's explicit package list names every folder with an `__init__.py`, each mapped
    where it lies (a new subpackage left out would be missing from the wheel)."""
    import tomllib

    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = tool.get("package-dir", {})
    want = set()
    for pkg, folder in PACKAGES.items():
        assert dirs.get(pkg, pkg.replace(".", "/")) == folder, pkg
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder).parts
            want.add(".".join((pkg, *rel)))
    assert set(tool["packages"]) == want
