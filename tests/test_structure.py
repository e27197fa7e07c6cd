"""The house's shape, checked from the source: modules import only downwards through the layers,
and inside a layer only from the entries listed before their own; never in a circle; no module
above the runtimes reaches a runtime's implementation, except the fronts named with a reason; each
name is imported from the one module that defines it; and no class or function outgrows what a
reader can hold (150 and 60 lines; a longer one says why in its docstring, with the words "Longer
than"). Each check is a function of an import graph that returns its violations, so the same
functions run on this repository and on small planted packages that must fail them.

`python tests/test_structure.py --sizes` prints how long the functions and classes are."""

from __future__ import annotations

import ast
import functools
import sys
from collections.abc import Iterator, Mapping
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
ROOT = "edge_metastone"  # its LAYERS entry is the package's `__init__` alone, not all beneath it

# Bottom to top. A module may import from its own entry (the longest name in LAYERS that is it or
# a package holding it), from the entries listed before that entry in the same layer, and from the
# layers below; never from an entry listed later in its own layer or from a layer above. So the
# order inside a layer is direction: an entry may import only those listed before it.
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
        "edge_metastone.model_records",
    ),
    # reasoning: options and results, the planner, the request gate, the stream bridge, Reasoner
    (
        "edge_metastone.options",
        "edge_metastone.planner",
        "edge_metastone.gate",
        "edge_metastone.bridge",
        "edge_metastone.reasoner",
    ),
    # fronts: training, the batch runner, the server, the package's lazy exports, the command line
    (
        "edge_metastone.training",
        "edge_metastone.batch",
        "edge_metastone.server",
        "edge_metastone",
        "edge_metastone.commands",
        "edge_metastone.cli",
        "edge_metastone.__main__",
    ),
)
# The runtimes' implementations: above their layer only the opener (`edge_metastone.runtime`) and
# the neutral protocol (`edge_metastone.backend`) are ways in. The converters share the layer but
# run no model, and torch is training's, so neither counts.
RUNTIME_IMPLEMENTATIONS = (
    "llama_cpp",
    "onnxruntime",
    "edge_metastone.decode",
    "edge_metastone.engine",
    "edge_metastone.onnx_backend",
)
RUNTIMES_LAYER = next(i for i, names in enumerate(LAYERS) if "edge_metastone.runtime" in names)
# module above the runtimes -> why it may import a runtime's implementation
RUNTIME_FRONTS = {
    "edge_metastone.commands.doctor": "reports the llama.cpp and onnxruntime builds, the native "
    "capture, the weight buffers' plan and a file's prompt facts",
    "edge_metastone.commands.inspect": "reports how this machine would load a file: its weight "
    "buffers and its prompt facts (from a vocabulary-only model)",
}
# an entry whose module no longer imports a runtime fails the check until it is deleted here
ALLOW_LISTS = {
    "RUNTIME_FRONTS": RUNTIME_FRONTS,
}
MAX_CLASS_LINES = 150
MAX_FUNCTION_LINES = 60

Graph = Mapping[str, set[str]]  # module -> what it imports
Entry = tuple[int, int, str]  # a LAYERS entry: layer, place in the layer, name


def find_modules(root: Path, packages: Mapping[str, str]) -> dict[str, Path]:
    """Every module of `packages` (dotted package -> its folder under `root`), by dotted name."""
    found = {}
    for pkg, folder in packages.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = path.relative_to(root / folder).with_suffix("").parts
            parts = tuple(pkg.split(".")) + (parts[:-1] if parts[-1] == "__init__" else parts)
            found[".".join(parts)] = path
    return found


@functools.cache
def modules() -> dict[str, Path]:
    """Every module of the three packages in this repository, by dotted name."""
    return find_modules(REPO, PACKAGES)


def _resolve(name: str, mods: Mapping[str, Path]) -> str | None:
    """The module of `mods` that `name` is, or the one it lives in (None where there is none)."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(mods: Mapping[str, Path]) -> dict[str, set[str]]:
    """Module -> what it imports, function-level imports too: a module of `mods` by its dotted
    name, anything else by the name it is imported under (`llama_cpp`, `os.path`). Every module
    of `mods` is a key, so `name in graph` tells the packages' own modules from outside ones."""
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps.update(_resolve(a.name, mods) or a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                for a in node.names:  # `from pkg import submodule` imports the submodule only
                    full = f"{base}.{a.name}"
                    deps.add(full if full in mods else _resolve(base, mods) or base)
        graph[name] = deps - {name}
    return graph


@functools.cache
def imports() -> dict[str, set[str]]:
    """The import graph of the three packages in this repository."""
    return import_graph(modules())


def entry_of(module: str) -> Entry | None:
    """(layer, place in the layer, entry) of the LAYERS entry that holds `module`: its own name
    or the closest package named there (the root package's entry holds its `__init__` alone).
    None where no entry holds it."""
    best = None
    for i, names in enumerate(LAYERS):
        for j, prefix in enumerate(names):
            inside = module == prefix or (prefix != ROOT and module.startswith(prefix + "."))
            if inside and (best is None or len(prefix) > len(best[2])):
                best = (i, j, prefix)
    return best


def layer_of(module: str) -> int:
    """The layer a module belongs to."""
    entry = entry_of(module)
    if entry is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS")
    return entry[0]


def _layered_edges(graph: Graph) -> Iterator[tuple[str, str, Entry, Entry]]:
    """(module, dependency, their entries) for each import between two layered modules of the
    graph."""
    for m in sorted(graph):
        for d in sorted(graph[m]):
            em, ed = entry_of(m), entry_of(d)
            if d in graph and em is not None and ed is not None:
                yield m, d, em, ed


def unlayered(graph: Graph) -> list[str]:
    """The graph's modules that no LAYERS entry holds."""
    return [f"{m} is in no layer: add it to LAYERS" for m in sorted(graph) if entry_of(m) is None]


def upward(graph: Graph) -> list[str]:
    """Imports from a higher layer."""
    return [
        f"{m} (layer {em[0]}) imports {d} (layer {ed[0]})"
        for m, d, em, ed in _layered_edges(graph)
        if ed[0] > em[0]
    ]


def against_the_order(graph: Graph) -> list[str]:
    """Imports, inside one layer, from an entry listed after the importer's own."""
    return [
        f"{m} imports {d}, but {ed[2]} is listed after {em[2]} in layer {em[0]}"
        for m, d, em, ed in _layered_edges(graph)
        if ed[0] == em[0] and ed[1] > em[1]
    ]


def circles(graph: Graph) -> list[str]:
    """Circles of imports among the graph's modules, each as `a -> b -> a`: one for each import
    that a depth-first walk (in sorted order) finds leading back to a module on its path. The
    list is empty exactly when the graph has no circle."""
    state: dict[str, int] = {}  # 1: on the walk's path, 2: done
    found = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(d for d in graph[node] if d in graph):
            if state.get(dep) == 1:
                found.append(" -> ".join([*path[path.index(dep) :], dep]))
            elif dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    return found


def _is_runtime(name: str) -> bool:
    return any(name == r or name.startswith(r + ".") for r in RUNTIME_IMPLEMENTATIONS)


def runtime_reach(
    graph: Graph, allow_lists: Mapping[str, Mapping[str, str]] = ALLOW_LISTS
) -> list[str]:
    """Modules above the runtimes layer that import a runtime's implementation without being
    named in an allow-list, and allow-listed modules that import none (to delete from the list)."""
    allowed = {m: list_name for list_name, names in allow_lists.items() for m in names}
    out, reaching = [], set()
    for m in sorted(graph):
        entry = entry_of(m)
        hits = sorted(d for d in graph[m] if _is_runtime(d))
        if entry is None or entry[0] <= RUNTIMES_LAYER or not hits:
            continue
        reaching.add(m)
        if m not in allowed:
            out.append(
                f"{m} imports the runtime {', '.join(hits)}: go through edge_metastone.runtime "
                "or edge_metastone.backend, or name it in RUNTIME_FRONTS with why"
            )
    out += [
        f"{m} imports no runtime now: remove it from {list_name}"
        for m, list_name in sorted(allowed.items())
        if m not in reaching
    ]
    return out


@pytest.mark.parametrize(
    "check",
    [unlayered, upward, against_the_order, circles, runtime_reach],
    ids=lambda check: check.__name__,
)
def test_the_real_graph_passes(check):
    """Every module has a layer, no import runs back up or against the order inside a layer,
    there is no circle, and only the named fronts reach a runtime's implementation."""
    problems = check(imports())
    assert not problems, "\n".join(problems)


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


def _sized(path: Path) -> Iterator[tuple[ast.ClassDef | ast.FunctionDef, int, int]]:
    """Each class and function in a file, with its length in lines and its limit."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef):
            yield node, node.end_lineno - node.lineno + 1, MAX_CLASS_LINES
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node, node.end_lineno - node.lineno + 1, MAX_FUNCTION_LINES


def _too_long(path: Path) -> list[str]:
    label = path.relative_to(REPO) if path.is_relative_to(REPO) else path.name
    return [
        f"{label}:{node.lineno} {node.name}: {n} lines"
        for node, n, limit in _sized(path)
        if n > limit and "Longer than" not in (ast.get_docstring(node) or "")
    ]


def test_no_class_or_function_outgrows_a_reader():
    long = [line for path in modules().values() for line in _too_long(path)]
    assert not long, "\n".join(long)


def test_the_checks_can_fail(tmp_path):
    """The file checks themselves: a long function is caught unless it says why, an imported
    name is not a definition, and the layers order the reasoner above the runtimes."""
    body = "    x = 1\n" * 60
    (tmp_path / "long.py").write_text(f"def f():\n{body}")
    (tmp_path / "why.py").write_text(f'def f():\n    """Longer than 60 lines: a table."""\n{body}')
    (tmp_path / "reexport.py").write_text("from os import sep\n\nX = 1\n")
    assert _too_long(tmp_path / "long.py") == ["long.py:1 f: 61 lines"]
    assert _too_long(tmp_path / "why.py") == []
    assert _defined(tmp_path / "reexport.py") == {"X"}
    assert layer_of("edge_metastone.reasoner") > layer_of("edge_metastone.engine.engine")


# A small fake repository with one plant for each graph check, beside imports that must pass.
PLANTED = {
    "edge_metastone/__init__.py": "",
    "edge_metastone/stray.py": "",  # named by no LAYERS entry (the root's entry is its own)
    # upward: the neutral data importing the reasoning layer
    "edge_metastone/types.py": "from edge_metastone.reasoner import Reasoner\n",
    "edge_metastone/reasoner.py": "class Reasoner:\n    pass\n",
    # a circle of two inside one entry, one way by a relative import
    "edge_metastone/search/__init__.py": "",
    "edge_metastone/search/vote.py": "from edge_metastone.search import best_of_k\n",
    "edge_metastone/search/best_of_k.py": "from .vote import vote\n",
    # a circle of three inside one entry, closed by a function-level import
    "edge_metastone/engine/__init__.py": "",
    "edge_metastone/engine/llama.py": "from edge_metastone.engine import pool\n",
    "edge_metastone/engine/pool.py": "from edge_metastone.engine.weights import Weights\n",
    "edge_metastone/engine/weights.py": "def load():\n    import edge_metastone.engine.llama\n",
    # against the order inside the runtimes layer: decode is listed before runtime
    "edge_metastone/decode/__init__.py": "def run():\n    from edge_metastone import runtime\n",
    "edge_metastone/runtime.py": "from edge_metastone.engine.llama import Model\n",
    "edge_metastone/backend.py": "",
    # a front reaching llama.cpp inside a function (torch is no runtime) ...
    "edge_metastone/server/__init__.py": "",
    "edge_metastone/server/app.py": "import torch\n\n\ndef load():\n    from llama_cpp import Llama\n",
    # ... one allowed to reach the engine, one allowed but reaching nothing (a stale entry), and
    # the command line going through the opener and the protocol, conversion through converters
    "edge_metastone/commands/__init__.py": "",
    "edge_metastone/commands/inspect.py": "import edge_metastone.engine.weights\n",
    "edge_metastone/commands/doctor.py": "import platform\n",
    "edge_metastone/commands/convert.py": "from edge_metastone.converters import convert\n",
    "edge_metastone/cli.py": "from edge_metastone.backend import Backend\n"
    "from edge_metastone.runtime import open_backend\n",
    "converters/__init__.py": "def convert():\n    pass\n",
}
PLANTED_PACKAGES = {"edge_metastone": "edge_metastone", "edge_metastone.converters": "converters"}


@pytest.fixture
def planted(tmp_path) -> dict[str, set[str]]:
    """The import graph of PLANTED, written out and parsed as the real repository is."""
    for rel, text in PLANTED.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return import_graph(find_modules(tmp_path, PLANTED_PACKAGES))


def test_the_graph_checks_catch_their_plants(planted):
    assert unlayered(planted) == ["edge_metastone.stray is in no layer: add it to LAYERS"]
    assert upward(planted) == [
        "edge_metastone.types (layer 1) imports edge_metastone.reasoner (layer 4)"
    ]
    assert against_the_order(planted) == [
        "edge_metastone.decode imports edge_metastone.runtime, but edge_metastone.runtime is "
        "listed after edge_metastone.decode in layer 2"
    ]
    assert circles(planted) == [
        "edge_metastone.engine.llama -> edge_metastone.engine.pool -> "
        "edge_metastone.engine.weights -> edge_metastone.engine.llama",
        "edge_metastone.search.best_of_k -> edge_metastone.search.vote -> "
        "edge_metastone.search.best_of_k",
    ]
    allowed = {"edge_metastone.commands.inspect": "why", "edge_metastone.commands.doctor": "why"}
    assert runtime_reach(planted, {"RUNTIME_FRONTS": allowed}) == [
        "edge_metastone.server.app imports the runtime llama_cpp: go through "
        "edge_metastone.runtime or edge_metastone.backend, or name it in RUNTIME_FRONTS with why",
        "edge_metastone.commands.doctor imports no runtime now: remove it from RUNTIME_FRONTS",
    ]


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


def print_sizes() -> None:
    """How long the functions and classes of the three packages are: a histogram of each kind
    (a column a package, in buckets up to the limit and one over it) and the ten longest of each
    kind, with file:line."""
    folders = list(PACKAGES.values())
    kinds = {
        "function": ("functions", 10, MAX_FUNCTION_LINES),
        "class": ("classes", 25, MAX_CLASS_LINES),
    }
    found: dict[str, list[tuple[int, str, str]]] = {kind: [] for kind in kinds}
    for path in modules().values():
        folder = path.relative_to(REPO).parts[0]
        for node, n, _ in _sized(path):
            kind = "class" if isinstance(node, ast.ClassDef) else "function"
            found[kind].append((n, folder, f"{path.relative_to(REPO)}:{node.lineno} {node.name}"))
    for kind, (plural, step, limit) in kinds.items():
        buckets = [f"{lo}-{lo + step - 1}" for lo in range(1, limit, step)] + [f"over {limit}"]
        counts = {(b, f): 0 for b in buckets for f in folders}
        for n, folder, _ in found[kind]:
            counts[buckets[min((n - 1) // step, len(buckets) - 1)], folder] += 1
        print(f"{kind} lines".ljust(14) + "".join(f.rjust(16) for f in folders) + "all".rjust(8))
        for b in buckets:
            row = [counts[b, f] for f in folders]
            print(b.ljust(14) + "".join(str(c).rjust(16) for c in row) + str(sum(row)).rjust(8))
        print(f"the 10 longest {plural}:")
        for n, _, where in sorted(found[kind], key=lambda x: -x[0])[:10]:
            print(f"{n:6}  {where}")
        print()


if __name__ == "__main__":
    if sys.argv[1:] != ["--sizes"]:
        sys.exit("usage: python tests/test_structure.py --sizes")
    print_sizes()
