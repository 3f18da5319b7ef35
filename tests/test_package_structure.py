"""Imports flow one way: format -> kernels -> layer -> quantizer -> trainer/export -> cli, with no cycle.

Every ``import`` statement of every module is read from the source (those inside functions too),
so a lazy import cannot hide an upward edge. The one exception is a module-level ``__getattr__``:
there a deprecation shim serves a moved name from its new module, on use only.
"""

import ast
from pathlib import Path

import pytest

import hf_qad

PACKAGE = Path(hf_qad.__file__).parent

# A module may import modules of its own rank or below, never above.
RANKS = {
    "hf_qad.version": 0,
    "hf_qad._deprecation": 0,
    "hf_qad.devices": 0,
    "hf_qad.nvfp4": 1,
    "hf_qad.quantizer": 2,
    "hf_qad.export": 3,
    "hf_qad.trainer": 3,
    "hf_qad.evaluation": 3,
    "hf_qad.data": 3,
    "hf_qad.plots": 3,
    "hf_qad.assets": 3,
    "hf_qad.smollm2": 3,
    "hf_qad.cli": 4,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The hf_qad modules that ``path`` imports (``from pkg import submodule`` counts the submodule)."""
    found = set()
    tree = ast.parse(path.read_text())
    shims = {id(node) for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "__getattr__"
             for node in ast.walk(f)}
    for node in ast.walk(tree):
        if id(node) in shims:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import sub` imports the submodule; `from pkg import name` the package's namespace
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                     for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found


def _rank(module: str) -> int:
    for prefix in sorted(RANKS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return RANKS[prefix]
    raise AssertionError(f"{module} has no rank: add its package to RANKS")


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def test_every_module_has_a_rank():
    for module in _modules():
        if module != "hf_qad":
            _rank(module)


def test_no_upward_import():
    upward = [
        f"{module} -> {target}"
        for module, targets in _graph().items()
        if module != "hf_qad"
        for target in targets
        if target == "hf_qad" or _rank(target) > _rank(module)
    ]
    assert not upward, "imports against the layering: " + ", ".join(sorted(upward))


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target] if target in path else [module, target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_checks_see_lazy_and_from_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from hf_qad.nvfp4 import conversion, fake_quant\n    import hf_qad.quantizer.config\n")
    assert _imports(source, _modules()) == {"hf_qad.nvfp4", "hf_qad.nvfp4.conversion", "hf_qad.quantizer.config"}
