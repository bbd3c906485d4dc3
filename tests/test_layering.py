"""Layers point one way: no module of moe_lab imports a module of a higher layer (at module
level or inside a function), and there are no import cycles between modules.

The layers, lowest first (a module may import its own layer and the layers below):
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "moe_lab"

#: lowest first; a name matches a module and everything under it
LAYERS = [
    ["moe_lab.errors", "moe_lab.constants", "moe_lab.types", "moe_lab.version"],
    ["moe_lab.config", "moe_lab.dims", "moe_lab.jobs", "moe_lab.devices"],
    ["moe_lab.ops"],
    ["moe_lab.model"],
    ["moe_lab.data"],
    ["moe_lab.checkpoint"],
    ["moe_lab.training"],
    ["moe_lab.parallel"],
    ["moe_lab.inference", "moe_lab.analytics", "moe_lab.interop", "moe_lab.serving", "moe_lab.tuning"],
    ["moe_lab.runner", "moe_lab.launch"],
    ["moe_lab.orchestration"],
    ["moe_lab.cli", "moe_lab.__main__", "moe_lab"],
]

#: upward imports that are there on purpose (module, imported module): why
ALLOWED = {
    ("moe_lab", "moe_lab.orchestration.train"): "PEP 562: DistributedMoETrainer imports Ray on first use only",
    ("moe_lab.tuning", "moe_lab.orchestration.tune"): "PEP 562: run_sweep re-exported lazily from the Ray layer",
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    p = ROOT.parent / Path(*name.split("."))
    return p.with_suffix(".py").exists() or (p / "__init__.py").exists()


def _imports(path: Path, module: str):
    """Every moe_lab module ``path`` imports (absolute names), anywhere in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):  # imports for type checkers only do not run
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING":
            node.body = []
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("moe_lab")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith("moe_lab"):
                # "from .pkg import mod" imports the submodule mod; "from .pkg import name", pkg
                subs = [f"{name}.{a.name}" for a in node.names]
                subs = [m for m in subs if _is_module(m)]
                found |= set(subs) if len(subs) == len(node.names) else {name, *subs}
    return found


def _layer(module: str) -> int:
    best, best_len = None, -1
    for i, names in enumerate(LAYERS):
        for n in names:
            if (module == n or module.startswith(n + ".")) and len(n) > best_len:
                best, best_len = i, len(n)
    assert best is not None, f"{module} is in no layer; add it to LAYERS"
    return best


GRAPH = {_module_name(p): _imports(p, _module_name(p)) for p in sorted(ROOT.rglob("*.py"))}


def test_every_module_has_a_layer():
    for module in GRAPH:
        _layer(module)


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_import_from_a_higher_layer(module):
    mine = _layer(module)
    bad = [
        imp for imp in sorted(GRAPH[module])
        if _layer(imp) > mine and (module, imp) not in ALLOWED
    ]
    assert not bad, f"{module} (layer {mine}) imports higher layers: {bad}"


def test_no_import_cycles_between_modules():
    modules = set(GRAPH)

    def deps(m):
        return {d for d in GRAPH[m] if d in modules and d != m and (m, d) not in ALLOWED}

    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(deps(m)):
            if state.get(d) == "open":
                pytest.fail(f"import cycle: {' -> '.join(stack[stack.index(d):] + [d])}")
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(modules):
        if m not in state:
            visit(m)


def test_model_imports_nothing_from_training_or_parallel():
    for module, imports in GRAPH.items():
        if module.startswith("moe_lab.model"):
            assert not [i for i in imports if i.startswith(("moe_lab.training", "moe_lab.parallel"))], module
