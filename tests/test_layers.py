"""The import layering (DESIGN.md, "Layers"), read from the source: every `import sleigh...` and
`from sleigh... import`, at module level or inside a function, must point at a layer below or the same.

    ground    errors, progress, staging, onnx_files   (imports nothing of Sleigh but the ground)
    runtime   the torch-free runtime                   ground
    data      synthetic data, JSONL                    runtime
    sleighvl  the PyTorch reference and its backend    data, runtime
    export    torch -> ONNX, parity                    sleighvl, data, runtime
    evaluate  task accuracy (sleigh eval)              runtime, data
    engines   conversions, calibration, TensorRT, gate runtime, data, evaluate   (torch-free, beside export)
    serve, bench                                       runtime, data
    cli       composes them all
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import ROOT

SLEIGH = ROOT / "sleigh"
GROUND = {"sleigh", "sleigh.errors", "sleigh.progress", "sleigh.staging", "sleigh.onnx_files"}
LAYERS = {  # layer -> the layers it may import (besides itself and the ground)
    "ground": set(),
    "runtime": set(),
    "data": {"runtime"},
    "sleighvl": {"data", "runtime"},
    "export": {"sleighvl", "data", "runtime"},
    "engines": {"data", "runtime", "evaluate"},  # the task-accuracy gate runs `sleigh eval`
    "serve": {"runtime"},
    "bench": {"runtime"},
    "evaluate": {"runtime", "data"},
    "cli": {"runtime", "data", "sleighvl", "export", "engines", "serve", "bench", "evaluate"},
}


def layer_of(module: str) -> str:
    if module in GROUND:
        return "ground"
    part = module.split(".")[1]
    if part not in LAYERS:
        raise AssertionError(f"{module} belongs to no layer: add it to tests/test_layers.py and DESIGN.md")
    return part


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SLEIGH.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sleigh_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) for each import of Sleigh in the file; `from sleigh import x` counts as sleigh.x
    where x is a module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "sleigh"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] == "sleigh":
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                is_module = (SLEIGH.parent / sub.replace(".", "/")).with_suffix(".py").exists() or \
                    (SLEIGH.parent / sub.replace(".", "/")).is_dir()
                found.append((node.lineno, sub if is_module else node.module))
    return found


SOURCES = sorted(SLEIGH.rglob("*.py"))


def test_every_module_belongs_to_a_layer():
    assert len(SOURCES) > 40
    for path in SOURCES:
        layer_of(module_name(path))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(SLEIGH)))
def test_imports_point_down(path):
    here = layer_of(module_name(path))
    allowed = LAYERS[here] | {here, "ground"}
    wrong = [f"{path.relative_to(SLEIGH.parent)}:{line} imports {mod} ({layer_of(mod)})"
             for line, mod in sleigh_imports(path) if layer_of(mod) not in allowed]
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_a_wrong_import(tmp_path):
    """Negative control: a runtime module importing the reference is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from sleigh.sleighvl.checkpoint import load_checkpoint\n")
    assert [layer_of(m) for _, m in sleigh_imports(bad)] == ["sleighvl"]
    assert "sleighvl" not in LAYERS["runtime"]


def import_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of `graph` (module -> the modules it imports) as [a, b, ..., a], or [] if there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> list[str]:
        state[module] = 1
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep in graph and dep not in state and (found := visit(dep, path + [dep])):
                return found
        state[module] = 2
        return []

    for module in sorted(graph):
        if module not in state and (found := visit(module, [module])):
            return found
    return []


def test_imports_form_no_cycle():
    """Within a layer too, imports run one way (module level or inside a function): a module that
    needs another's constant or helper does not also serve that module (engines/calibration/int8.py)."""
    graph = {module_name(p): {m for _, m in sleigh_imports(p)} - {module_name(p)} for p in SOURCES}
    assert import_cycle(graph) == []


def test_the_cycle_finder_sees_a_lazy_cycle():
    """Negative control: qdq -> build_engine -> qdq, as the two once imported each other lazily."""
    graph = {"e.build_engine": {"e.qdq", "e.options"}, "e.qdq": {"e.int8", "e.build_engine"}, "e.int8": set(), "e.options": set()}
    assert import_cycle(graph) == ["e.build_engine", "e.qdq", "e.build_engine"]
    graph["e.qdq"].discard("e.build_engine")
    assert import_cycle(graph) == []
