"""The import graph of `dla/` runs one way, as docs/architecture.md draws it: `dla.ops` (bottom),
`dla.compile`, the public operator (`dla.operator`, `dla.testing`), `dla.model`, the run layer
`dla.run` (itself ordered: device, data and checkpoint helpers first, then distribution and
quantization, then training, then experiments), the command line on top.

The graph is read from the source (every `import` statement, at module level and inside
functions, relative ones resolved, and the packages whose `__init__` an import runs), so the
checks see what a reader sees without importing anything. Each test collects every violation
before it fails, so one run lists all of them. The last tests run the checks on small made-up
packages to show that each rule fails when broken.
"""

from __future__ import annotations

import ast
import io
import textwrap
import tokenize
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dla"

# Layers by module path prefix, bottom first; the longest matching prefix places a module. `dla`
# itself (the package's __init__: the names a user imports) sits on top with the command line.
LAYERS = {
    "dla.ops": 0,
    "dla.compile": 1,
    "dla.operator": 2,
    "dla.testing": 2,
    "dla.model": 3,
    "dla.run": 4,
    "dla.cli": 5,
    "dla.__main__": 5,
    "dla": 5,
}
# The run layer's own order (a module imports modules of its rank or below).
RUN_ORDER = {
    "dla.run": 0,
    "dla.run.device": 0,
    "dla.run.data": 0,
    "dla.run.optim": 0,
    "dla.run.synthetic": 0,
    "dla.run.eval": 0,
    "dla.run.eval.tasks": 0,
    "dla.run.eval.segmentation": 0,
    "dla.run.checkpoint": 1,
    "dla.run.eval.metrics": 1,
    "dla.run.distributed": 2,
    "dla.run.quantize": 2,
    "dla.run.eval.lm": 2,
    "dla.run.eval.task_accuracy": 2,
    "dla.run.train": 3,
    "dla.run.generate": 3,
    "dla.run.experiment": 4,
    "dla.run.demo": 4,
    "dla.run.segments": 4,
}
# Optional or heavy dependencies that a module may import inside a function, on the path that
# needs them (with a comment saying why); the last two never at module level.
OPTIONAL = {"triton", "torchao", "matplotlib"}
NEVER_AT_MODULE_LEVEL = {"torchao", "matplotlib"}


@dataclass(frozen=True)
class Import:
    importer: str  # module name
    target: str  # module name (a dla module, or the top-level name of another package)
    file: str  # the importer's path from the package's parent folder
    line: int
    in_function: bool
    implicit: bool  # a package whose __init__ runs because a module inside it is imported
    commented: bool  # a comment on its line, or above the run of import statements it belongs to

    def where(self) -> str:
        return f"{self.file}:{self.line}"


def module_names(root: Path) -> dict[str, Path]:
    """Every module of the package at `root`, by dotted name."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = (root.name, *path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _reasoned(source: str, tree: ast.Module) -> set[int]:
    """First lines of the import statements that carry a comment: on their own lines, or on the
    line above them or above the run of adjacent import statements they belong to."""
    comments = {tok.start[0]: tok.start[1] == 0 or not tok.line[:tok.start[1]].strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    spans = {n.lineno: n.end_lineno for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))}
    starts = {end: start for start, end in spans.items()}
    reasoned = set()
    for start, end in spans.items():
        if any(line in comments for line in range(start, end + 1)):
            reasoned.add(start)
            continue
        above = start - 1
        while above in starts:  # climb over the imports just above
            above = starts[above] - 1
        if comments.get(above):  # a comment alone on its line
            reasoned.add(start)
    return reasoned


def imports(root: Path) -> list[Import]:
    """Every import of a `dla` module or of another package made by the package at `root`."""
    modules = module_names(root)
    found = []
    for name, path in modules.items():
        source = path.read_text()
        tree = ast.parse(source, filename=str(path))
        reasoned = _reasoned(source, tree)
        file = str(path.relative_to(root.parent))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]

        def record(node: ast.stmt, targets: list[str], in_function: bool) -> None:
            line, commented = node.lineno, node.lineno in reasoned
            for target in targets:
                top = target.split(".")[0]
                if top != root.name:
                    found.append(Import(name, top, file, line, in_function, False, commented))
                    continue
                found.append(Import(name, target, file, line, in_function, False, commented))
                parts = target.split(".")
                for i in range(1, len(parts)):
                    parent = ".".join(parts[:i])
                    if parent != name and not name.startswith(parent + "."):
                        found.append(Import(name, parent, file, line, in_function, True, commented))

        def resolve(node: ast.ImportFrom) -> str:
            if not node.level:
                return node.module or ""
            base = package.split(".")
            base = base[:len(base) - node.level + 1]
            return ".".join(base + ([node.module] if node.module else []))

        def visit(node: ast.AST, in_function: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and _is_type_checking(child.test):
                    for other in child.orelse:
                        visit_stmt(other, in_function)
                    continue
                visit_stmt(child, in_function)

        def visit_stmt(child: ast.AST, in_function: bool) -> None:
            if isinstance(child, ast.Import):
                record(child, [a.name for a in child.names], in_function)
            elif isinstance(child, ast.ImportFrom):
                module = resolve(child)
                targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module for a in child.names]
                record(child, list(dict.fromkeys(targets)), in_function)
            else:
                inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                visit(child, inner)

        visit(tree, False)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _longest_prefix(name: str, table: dict[str, int]) -> str | None:
    matches = [p for p in table if name == p or (name.startswith(p + ".") and p != "dla")]
    return max(matches, key=len) if matches else None


def rank(name: str) -> tuple[int, int] | None:
    """(layer, order inside the run layer) of a module, or None where the architecture has no place for it."""
    layer = _longest_prefix(name, LAYERS)
    if layer is None:
        return None
    if LAYERS[layer] != LAYERS["dla.run"]:
        return LAYERS[layer], 0
    sub = _longest_prefix(name, RUN_ORDER)
    return None if sub is None else (LAYERS[layer], RUN_ORDER[sub])


def unplaced(root: Path) -> list[str]:
    return [f"{name} ({path}): no place in the architecture (add it to docs/architecture.md and this test)"
            for name, path in module_names(root).items() if rank(name) is None]


def upward(root: Path) -> list[str]:
    out = []
    for imp in imports(root):
        if imp.target.split(".")[0] != root.name:
            continue
        mine, theirs = rank(imp.importer), rank(imp.target)
        if mine is not None and theirs is not None and theirs > mine:
            how = "runs the __init__ of" if imp.implicit else "imports"
            out.append(f"{imp.where()}: {imp.importer} {rank_name(mine)} {how} {imp.target} {rank_name(theirs)}, "
                       f"which is above it")
    return out


def rank_name(r: tuple[int, int]) -> str:
    layer = [p for p, v in LAYERS.items() if v == r[0]][0]
    return f"(layer {layer}" + (f", run order {r[1]})" if r[0] == LAYERS["dla.run"] else ")")


def cycles(root: Path) -> list[str]:
    """Every strongly connected group of modules (each reaches every other by imports, at module
    level or inside functions), with the imports that close it."""
    edges: dict[str, dict[str, Import]] = {}
    for imp in imports(root):
        if imp.target.split(".")[0] == root.name and imp.target != imp.importer:
            edges.setdefault(imp.importer, {}).setdefault(imp.target, imp)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(module_names(root)):
        if v not in index:
            connect(v)
    out = []
    for group in groups:
        inside = [imp for v in group for w, imp in edges.get(v, {}).items() if w in group]
        detail = "; ".join(f"{imp.where()} {imp.importer} -> {imp.target}"
                           + (" (in a function)" if imp.in_function else "") for imp in inside)
        out.append(f"import cycle among {', '.join(group)}: {detail}")
    return out


def _loading_optional(root: Path, found: list[Import]) -> set[str]:
    """Our modules whose import loads an optional dependency: they import one at module level,
    or import such a module of ours at module level (a Triton launcher over kernel files)."""
    loading = {i.importer for i in found if not i.in_function and i.target in OPTIONAL}
    while True:
        more = {i.importer for i in found if not i.in_function and i.target in loading} - loading
        if not more:
            return loading
        loading |= more


def function_level(root: Path) -> list[str]:
    """Imports inside functions: only of an optional or heavy dependency (or of a module of ours
    whose import loads one, such as a Triton kernel file), each with a comment."""
    found = imports(root)
    loading = _loading_optional(root, found)
    out = []
    for imp in found:
        if not imp.in_function or imp.implicit:
            continue
        optional = imp.target in OPTIONAL or imp.target in loading
        if not optional:
            out.append(f"{imp.where()}: {imp.importer} imports {imp.target} inside a function; import it at "
                       f"module level (function-level imports are for {sorted(OPTIONAL)} only)")
        elif not imp.commented:
            out.append(f"{imp.where()}: {imp.importer} imports {imp.target} inside a function without a comment "
                       f"saying why")
    return out


def optional_at_module_level(root: Path) -> list[str]:
    return [f"{imp.where()}: {imp.importer} imports {imp.target} at module level; import it inside the function "
            f"that needs it" for imp in imports(root) if not imp.in_function and imp.target in NEVER_AT_MODULE_LEVEL]


def _assert_none(violations: list[str]) -> None:
    assert not violations, f"{len(violations)} violation(s):\n" + "\n".join(violations)


# ---------------------------------------------------------------------------------------------
# the package


def test_every_module_has_a_place():
    _assert_none(unplaced(PACKAGE))


def test_imports_run_downward():
    _assert_none(upward(PACKAGE))


def test_no_import_cycle_at_module_or_function_level():
    _assert_none(cycles(PACKAGE))


def test_function_level_imports_are_for_optional_dependencies_with_a_reason():
    _assert_none(function_level(PACKAGE))


def test_optional_dependencies_load_only_when_needed():
    _assert_none(optional_at_module_level(PACKAGE))


def test_the_graph_is_read():
    """The checks above would pass on an empty graph: the package's known edges are in it."""
    edges = {(i.importer, i.target) for i in imports(PACKAGE)}
    assert ("dla.run.train", "dla.run.checkpoint") in edges and ("dla.cli", "dla.run.train") in edges
    assert ("dla.run.train", "dla.run.eval") in edges  # implicit: the package of dla.run.eval.lm
    assert len(module_names(PACKAGE)) > 30


# ---------------------------------------------------------------------------------------------
# the checks on made-up packages


def make_package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "dla"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    for folder in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        (folder / "__init__.py").touch()
    return root


def test_the_checks_report_every_violation(tmp_path):
    root = make_package(tmp_path, {
        "ops/kernel.py": "from dla.model import lm\n",  # upward, across layers
        "model/lm.py": "import dla.ops.kernel\n",
        "run/checkpoint.py": "def load():\n    from dla.run import distributed\n",  # upward inside the run layer, hidden
        "run/distributed.py": "from dla.run import checkpoint\n",
        "run/train.py": "def plot():\n    import matplotlib\n\n\ndef step():\n    import json\n",
        "run/quantize.py": "import torchao\n",
        "run/optim.py": "def adamw8bit():\n    # torchao: optional\n    from torchao.optim import AdamW8bit\n",
        "stray.py": "",
    })
    assert unplaced(root) == [f"dla.stray ({root / 'stray.py'}): no place in the architecture (add it to "
                              f"docs/architecture.md and this test)"]
    up = upward(root)
    assert len(up) == 3, up  # dla.model.lm, the package dla.model whose __init__ that runs, dla.run.distributed
    assert "dla/ops/kernel.py:1: dla.ops.kernel (layer dla.ops) imports dla.model.lm (layer dla.model)" in up[0]
    assert "dla.ops.kernel (layer dla.ops) runs the __init__ of dla.model (layer dla.model)" in up[1]
    assert "dla.run.checkpoint (layer dla.run, run order 1) imports dla.run.distributed" in up[2]
    found = cycles(root)
    assert len(found) == 2, found
    assert any("dla.model.lm, dla.ops.kernel" in c for c in found)
    assert any("dla.run.checkpoint, dla.run.distributed" in c and "(in a function)" in c for c in found)
    functions = function_level(root)
    assert len(functions) == 3, functions  # the distributed and json imports, matplotlib without a reason
    assert sum("inside a function; import it at module level" in v for v in functions) == 2
    assert sum("without a comment" in v for v in functions) == 1 and any("matplotlib" in v for v in functions)
    assert not any("dla.run.optim" in v for v in functions)  # torchao, with its reason
    assert optional_at_module_level(root) == [
        "dla/run/quantize.py:1: dla.run.quantize imports torchao at module level; import it inside the function "
        "that needs it"]


def test_kernel_modules_may_be_imported_inside_a_function_with_a_reason(tmp_path):
    root = make_package(tmp_path, {
        "ops/kernel_triton.py": "import triton\n",
        "ops/launcher.py": "from dla.ops.kernel_triton import f\n",  # loads triton through the kernel file
        "ops/plain.py": "import torch\n",
        "compile/ops.py": "def cuda():\n    # triton: only on CUDA\n    from dla.ops import kernel_triton\n"
                          "\n\ndef cpu():\n    from dla.ops.kernel_triton import f\n"
                          "\n\ndef launch():\n    # triton, through the launcher: only on CUDA\n"
                          "    from dla.ops import launcher\n    from dla.ops import plain\n",
    })
    assert [v.split(": ", 1)[1] for v in function_level(root)] == [
        "dla.compile.ops imports dla.ops.kernel_triton inside a function without a comment saying why",
        "dla.compile.ops imports dla.ops.plain inside a function; import it at module level (function-level "
        "imports are for ['matplotlib', 'torchao', 'triton'] only)"]
    assert upward(root) == [] and cycles(root) == []
