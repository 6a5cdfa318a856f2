"""One-way structure: the package order declared in docs/structure.md holds for every import,
top-level and in-function alike (parsed with ``ast``), no two modules import each other at module
top, model code (layers, models, kernels) never names parallel or training code, and the config
imports no parallel code (the last two checked on the source text, as ``grep`` would)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent.parent / "lctrain"


def _mentions(paths, pattern: str) -> list[str]:
    rx = re.compile(pattern)
    hits = []
    for path in paths:
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if rx.search(line):
                hits.append(f"{path.relative_to(PKG.parent)}:{i}: {line.strip()}")
    return hits


def test_model_code_never_names_parallel_or_train():
    files = [p for sub in ("layers", "models", "kernels") for p in (PKG / sub).rglob("*.py")]
    assert len(files) > 20
    assert _mentions(files, r"lctrain\.parallel|lctrain\.train") == []


def test_config_imports_no_parallel_code():
    assert _mentions([PKG / "config.py"], r"lctrain\.parallel") == []


def test_parallel_code_takes_no_maths_from_layers():
    # parallel code may name layer *types* (e.g. MoE for expert sharding) and mark a recomputed
    # forward (activation checkpointing: routing statistics count once) but takes its maths from kernels
    files = list((PKG / "parallel").rglob("*.py"))
    hits = _mentions(files, r"^\s*(from|import) lctrain\.layers")
    assert all(h.endswith(("import MoE", "import recomputing")) for h in hits), hits


# ------------------------------------------------------------------------ the declared package order
# docs/structure.md declares it; a package may import from its own rank and the ranks below only.
ORDER: list[tuple[str, ...]] = [
    ("errors",),
    ("kernels",),
    ("layers",),
    ("models",),
    ("generate",),
    ("data",),
    ("config",),
    ("parallel",),
    ("checkpoint",),
    ("train",),
    ("eval",),
    ("cli",),
    ("upcycle", "export", "planner", "cluster"),
]
RANK = {name: i for i, names in enumerate(ORDER) for name in names}

# Imports that run upward today, each with its reason (to be removed, not extended).
KNOWN_UPWARD: dict[tuple[str, str], str] = {
    ("lctrain.config", "lctrain.upcycle.config"):
        "RunConfig carries the upcycle section (UpcycleConfig); it moves out with the config split of issue 26",
    ("lctrain.train.trainer", "lctrain.eval.run"):
        "the trainer calls run_training_eval for train.eval_tasks; the hook moves into train/ (issue 26)",
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _imports(path: Path, modules: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """``(imported lctrain module, line, at module top)`` for every import statement of ``path``.

    Top level: not inside a function (nor under ``if TYPE_CHECKING``), i.e. run when the module is
    imported. ``from a.b import c`` names the module ``a.b.c`` when that is one, else ``a.b``.
    """
    name = _module_name(path)
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, False)
                continue
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                visit(child, False)
                continue
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, top) for a in child.names if a.name.split(".")[0] == "lctrain")
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - child.level + 1]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                if target.split(".")[0] == "lctrain":
                    for a in child.names:
                        sub = f"{target}.{a.name}"
                        found.append((sub if sub in modules else target, child.lineno, top))
            visit(child, top)

    visit(tree, True)
    return found


def _package(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "lctrain"


def test_every_package_has_a_rank():
    packages = {_package(m) for m in _modules()} - {"lctrain"}
    assert packages <= set(RANK), f"packages missing from ORDER (and docs/structure.md): {packages - set(RANK)}"
    doc = (PKG.parent / "docs" / "structure.md").read_text(encoding="utf-8")
    declared = " < ".join(", ".join(names) for names in ORDER)
    assert declared in doc, f"docs/structure.md must declare the order as: {declared}"


def test_no_import_runs_from_a_lower_package_to_a_higher_one():
    modules = _modules()
    upward, seen = [], set()
    for name, path in sorted(modules.items()):
        for target, line, _ in _imports(path, modules):
            src, dst = _package(name), _package(target)
            if "lctrain" in (src, dst) or RANK[dst] <= RANK[src]:
                continue
            seen.add((name, target))
            if (name, target) not in KNOWN_UPWARD:
                upward.append(f"{path.relative_to(PKG.parent)}:{line}: {name} ({src}) imports {target} ({dst})")
    assert upward == [], "imports against the order of docs/structure.md:\n" + "\n".join(upward)
    assert set(KNOWN_UPWARD) <= seen, f"known exceptions that no longer exist: {set(KNOWN_UPWARD) - seen}"


def test_no_import_cycle_between_modules_at_module_top():
    modules = _modules()
    graph = {m: sorted({t for t, _, top in _imports(p, modules) if top and t in modules and t != m})
             for m, p in modules.items()}
    # Tarjan's strongly connected components: any with two or more modules is a cycle
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    assert cycles == [], f"modules importing each other at module top: {cycles}"
    assert sum(len(v) for v in graph.values()) > 200  # the walk sees the real graph (285 edges today)
