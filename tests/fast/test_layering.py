"""The package's import graph: layers import only downwards, no cycles, no function hiding a
module, no torch in the package or in this fast lane.

Every ``import`` counts, deferred ones inside functions too; only imports under
``if TYPE_CHECKING:`` do not (they never run). Importing ``onnxprune.a.b`` also runs the
package ``onnxprune.a`` (its ``__init__``), so that is an edge too; the root package's own
``__init__`` is not (every import runs it; it is the public face, in the api layer).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "onnxprune"
FAST = Path(__file__).resolve().parent

# low to high; "pkg.*" is a whole subpackage, "pkg.__init__" only its __init__.py
LAYERS: list[tuple[str, list[str]]] = [
    ("base", ["errors", "progress", "callable_module", "outputs", "schemas.*",
              "weightstore", "protostream", "memory"]),
    ("graph", ["structure.__init__", "structure.graph", "structure.labels", "ops.*", "passes",
               "late_reads"]),
    ("io and data", ["runtime", "tracing", "modelio", "shapes", "input_roles", "data",
                     "datasets.*", "losses", "batches"]),
    ("structure", ["structure.axes", "structure.blocks", "structure.cost",
                   "structure.discover"]),
    ("units", ["units", "units.*"]),
    ("rewrites", ["gates", "verify", "surgery", "autodiff", "seed_axis"]),
    ("scores", ["scores.*"]),
    ("plan", ["plan", "search", "rearrange", "smoothing", "unit_names"]),
    ("stages", ["reconstruct", "reconstruct.*", "pipeline", "report", "bench", "evaluate",
                "finetune", "latency", "interleaved"]),
    ("api", ["api", "__init__"]),
    ("cli", ["cli", "__main__", "config"]),
]

# a public function of the same name would hide these modules from ``import onnxprune.x as m``
KNOWN_SHADOWED: list[str] = []

TORCH_WORLD = {"torch", "torchvision", "torchaudio", "transformers", "onnxscript", "forms",
               "hf_forms"}


def modules() -> dict[str, Path]:
    """Module name relative to the package ("structure.graph", "ops.__init__") → file."""
    return {".".join(p.relative_to(PACKAGE).with_suffix("").parts): p
            for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(name: str) -> int | None:
    best, found = -1, None
    for index, (_, patterns) in enumerate(LAYERS):
        for pattern in patterns:
            if pattern.endswith(".*"):
                hit = name.startswith(pattern[:-1])
                length = len(pattern) - 2
            else:
                hit = name == pattern
                length = len(pattern) + 1
            if hit and length > best:
                best, found = length, index
    return found


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement except those under ``if TYPE_CHECKING:``."""
    found = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _package_of(name: str) -> list[str]:
    """The package a module is in ("ops.registry" and "ops.__init__": ["ops"])."""
    return name.split(".")[:-1]


def _resolve(dotted: str, known: dict[str, Path], importer: str = "") -> list[str]:
    """``onnxprune.a.b`` → the modules it runs: ``a.__init__`` (a package) and ``a.b``.
    The importer's own packages are left out where they only run implicitly: a package's
    ``__init__`` importing its submodules, which sit inside it, is not a cycle."""
    parts = dotted.split(".")[1:]
    own = _package_of(importer)
    out = []
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        if f"{name}.__init__" in known:
            if i == len(parts) or parts[:i] != own[:i]:
                out.append(f"{name}.__init__")
        elif name in known:
            out.append(name)
    return out


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    found: set[str] = set()
    for node in _runtime_imports(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:
                package = _package_of(name)[: len(_package_of(name)) - node.level + 1]
                base = ".".join(["onnxprune", *package, *([base] if base else [])])
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for target in targets:
            if target == "onnxprune" or target.startswith("onnxprune."):
                found.update(_resolve(target, known, name))
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_every_module_has_a_layer():
    missing = [name for name in modules() if layer_of(name) is None]
    assert not missing, f"add these modules to LAYERS in {__file__}: {missing}"


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_lower_layers_never_import_higher_ones():
    upward = []
    for name, targets in import_graph().items():
        mine = layer_of(name)
        for target in sorted(targets):
            theirs = layer_of(target)
            if mine is not None and theirs is not None and theirs > mine:
                upward.append(f"{name} ({LAYERS[mine][0]}) imports {target} "
                              f"({LAYERS[theirs][0]})")
    assert not upward, "\n".join(upward)


def test_the_checks_see_cycles_and_layers():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer_of("errors") == 0 and layer_of("ops.registry") == 1
    assert layer_of("structure.__init__") == 1 and layer_of("structure.blocks") == 3
    assert layer_of("scores.__init__") == layer_of("scores.gradient")
    assert layer_of("no_such_module") is None
    known = {"structure.__init__": PACKAGE, "structure.graph": PACKAGE, "api": PACKAGE}
    assert _resolve("onnxprune.structure.graph.GraphView", known) == [
        "structure.__init__", "structure.graph"]
    assert _resolve("onnxprune", known) == []
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                     "    import onnxprune.api\ndef f():\n    import onnxprune.cli\n")
    assert [ast.unparse(n) for n in _runtime_imports(tree)] == [
        "from typing import TYPE_CHECKING", "import onnxprune.cli"]
    assert _resolve("onnxprune.structure.graph", known, "structure.blocks") == [
        "structure.graph"]
    assert _resolve("onnxprune.structure", known, "structure.blocks") == ["structure.__init__"]


def _local_imports(path: Path, seen: set[Path]) -> set[str]:
    """Top-level names imported by ``path`` and by the test helpers it imports."""
    if path in seen:
        return set()
    seen.add(path)
    names: set[str] = set()
    for node in _runtime_imports(ast.parse(path.read_text(), str(path))):
        heads = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""])
        for head in (h.split(".")[0] for h in heads):
            names.add(head)
            for folder in (path.parent, FAST, FAST.parent):
                helper = folder / f"{head}.py"
                if head and helper.exists():
                    names |= _local_imports(helper, seen)
    return names


def test_the_fast_lane_never_imports_torch():
    seen: set[Path] = set()
    offending = {p.name: sorted(_local_imports(p, seen) & TORCH_WORLD)
                 for p in sorted(FAST.glob("*.py"))}
    assert not {k: v for k, v in offending.items() if v}
    # tests/conftest.py runs for this lane too: at module level it must stay torch-free (its
    # export fixtures import torch when a test asks for them)
    conftest = ast.parse((FAST.parent / "conftest.py").read_text())
    top = {(n.module or "") if isinstance(n, ast.ImportFrom) else a.name
           for n in conftest.body if isinstance(n, (ast.Import, ast.ImportFrom))
           for a in n.names}
    assert not {t.split(".")[0] for t in top} & TORCH_WORLD


_IMPORT_ALL = """
import importlib, json, sys
names = json.loads(sys.argv[1])
shadowed = []
for name in names:
    module = importlib.import_module(name)
    parent, _, child = name.rpartition(".")
    if getattr(sys.modules[parent], child) is not module:
        shadowed.append(name)
import onnxprune.bench as b
b.BenchRow
print(json.dumps({"torch": "torch" in sys.modules, "shadowed": shadowed,
                  "callable": [callable(getattr(sys.modules["onnxprune"], n))
                               for n in ("bench", "evaluate", "finetune")]}))
"""


def test_package_imports_without_torch_and_no_name_hides_a_module():
    names = ["onnxprune." + n.removesuffix(".__init__") for n in modules()
             if n not in ("__init__", "__main__")]
    done = subprocess.run([sys.executable, "-c", _IMPORT_ALL, json.dumps(names)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"torch": False, "shadowed": KNOWN_SHADOWED,
                      "callable": [True, True, True]}
