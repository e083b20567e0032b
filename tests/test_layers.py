"""The package's layers, enforced: each module imports only from its own package or from a lower layer,
never sideways into another package of its own layer, and no import circle exists. Function-level imports
count too. Layers, bottom up: core (and the model zoo), then calibration and exporters, then stages,
targets and devices, then pipeline, then the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

import edgebundle

ROOT = Path(edgebundle.__file__).resolve().parent
RANK = {"core": 0, "zoo": 0, "__init__": 0, "calibration": 1, "exporters": 1, "stages": 2, "targets": 2, "devices": 2,
        "pipeline": 3, "cli": 4, "__main__": 4}


def _modules() -> dict[str, set[str]]:
    graph = {}
    for p in ROOT.rglob("*.py"):
        rel = p.relative_to(ROOT.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        deps = set()
        for n in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(n, ast.ImportFrom) and n.module and n.module.split(".")[0] == "edgebundle":
                deps.add(n.module)
                deps.update(f"{n.module}.{a.name}" for a in n.names)  # `from pkg import module`
            elif isinstance(n, ast.Import):
                deps.update(a.name for a in n.names if a.name.split(".")[0] == "edgebundle")
            else:
                target = _string_import(n)
                if target is not None and target.split(".")[0] == "edgebundle":
                    deps.add(target)  # import_module("edgebundle.x") is an import like any other
        graph[name] = deps
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def _string_import(n: ast.AST) -> str | None:
    """The module named by a constant string in import_module("...") or __import__("..."), else None."""
    if not isinstance(n, ast.Call) or not n.args or not isinstance(n.args[0], ast.Constant):
        return None
    f = n.func
    called = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
    if called in ("import_module", "__import__") and isinstance(n.args[0].value, str):
        return n.args[0].value
    return None


def test_no_module_of_the_package_is_imported_by_a_string():
    """import_module/__import__ with a constant string hides an arrow from the layer check: none are left."""
    found = []
    for p in ROOT.rglob("*.py"):
        for n in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            t = _string_import(n)
            if t is not None and t.split(".")[0] == "edgebundle":
                found.append(f"{p.relative_to(ROOT.parent)}: {t}")
    assert not found, "string imports of the package:\n" + "\n".join(found)


def test_validating_a_recipe_imports_no_upper_layer_and_not_torch():
    import subprocess
    import sys

    code = ("import sys\nfrom edgebundle.core.recipe import load_recipe\nload_recipe(None)\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[:2] in (['edgebundle', 'targets'], "
            "['edgebundle', 'stages'], ['edgebundle', 'calibration'], ['edgebundle', 'exporters'], "
            "['edgebundle', 'pipeline']) or m == 'torch')\nprint(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT.parent).stdout.strip()
    assert out == "", f"validating a recipe imported: {out}"


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_module_has_a_layer():
    assert {_package(m) for m in _modules()} <= set(RANK), "a new top-level package needs a layer here"


def test_imports_only_go_down_or_stay_in_the_package():
    bad = []
    for m, deps in _modules().items():
        for d in deps:
            pm, pd = _package(m), _package(d)
            if "__init__" in (pm, pd) and RANK[pm] == RANK[pd] == 0:
                continue  # the package root re-exports core's errors and carries the version
            if pm != pd and RANK[pd] >= RANK[pm]:
                bad.append(f"{m} -> {d}")
    assert not bad, "imports that run up or sideways a layer:\n" + "\n".join(sorted(bad))


def test_no_import_circles():
    graph = _modules()
    state: dict[str, int] = {}
    path: list[str] = []
    circles = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                circles.append(" -> ".join(path[path.index(d):] + [d]))
            elif d not in state:
                visit(d)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_no_function_is_longer_than_sixty_lines():
    long = []
    for p in ROOT.rglob("*.py"):
        for n in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 60:
                long.append(f"{p.relative_to(ROOT)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)")
    assert not long, long


def test_the_cpu_targets_fill_the_template_build():
    from edgebundle.targets.base import TargetBase
    from edgebundle.targets.executorch_xnnpack import ExecutorchTarget
    from edgebundle.targets.openvino import OpenVinoTarget
    from edgebundle.targets.ort_cpu import OrtCpuTarget

    for t in (OrtCpuTarget, OpenVinoTarget, ExecutorchTarget):
        assert issubclass(t, TargetBase) and "build" not in vars(t), t
