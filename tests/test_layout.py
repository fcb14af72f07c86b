"""The package's dependency rules, checked over the import graph of every module.

- the core (engine, events, hooks, checkpoints, config, set-up, samplers ...) imports no task
  module and no model;
- a task never imports another task;
- models import neither the core nor a task;
- nothing imports a recipe: recipes are scripts users copy, not a library.
"""

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "src" / "xmodaler_accel"
CORE = (
    "engine",
    "step_metrics",
    "stop_signal",
    "events",
    "checkpoint",
    "config",
    "setup",
    "writers",
    "samplers",
    "second_loader",
    "optim",
    "evaluation",
    "hooks",
    "run_dir",
    "errors",
)
RECIPES = {p.stem for p in (REPO / "recipes").glob("*.py")}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(source: str, module: str, is_package: bool) -> set[str]:
    """Absolute names of every module imported anywhere in `source` (functions included)."""
    found = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def inside(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(module: str, imported: set[str]) -> list[str]:
    """The dependency rules `module` breaks by importing `imported`."""
    pkg = "xmodaler_accel"
    own = [n for n in imported if inside(n, pkg)]
    found = []
    if any(inside(module, f"{pkg}.{c}") for c in CORE):
        found += [n for n in own if inside(n, f"{pkg}.tasks") or inside(n, f"{pkg}.models")]
    if inside(module, f"{pkg}.tasks") and module.count(".") >= 2:
        task = ".".join(module.split(".")[:3])
        found += [
            n
            for n in own
            if inside(n, f"{pkg}.tasks") and n.count(".") >= 2 and not inside(n, task)
        ]
    if inside(module, f"{pkg}.models"):
        found += [
            n
            for n in own
            if inside(n, f"{pkg}.tasks") or any(inside(n, f"{pkg}.{c}") for c in CORE)
        ]
    found += [n for n in imported if n.split(".")[0] in RECIPES or n.startswith("recipes")]
    return found


def test_the_package_keeps_its_dependency_rules():
    broken = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        imported = imports_of(path.read_text(), module, path.name == "__init__.py")
        if bad := violations(module, imported):
            broken[module] = sorted(set(bad))
    assert broken == {}


def test_the_rules_catch_each_kind_of_violation():
    def bad(module, source):
        return violations(module, imports_of(source, module, False))

    assert bad("xmodaler_accel.engine", "from .tasks.captioning import xe_step")
    assert bad("xmodaler_accel.hooks.eval", "from ..models import CaptionModel")
    assert bad("xmodaler_accel.tasks.vcr.steps", "from ..captioning.steps import xe_step")
    assert bad("xmodaler_accel.models.vcr", "from ..events import Event")
    assert bad("xmodaler_accel.data.source", "import xe")
    assert not bad("xmodaler_accel.tasks.vcr.steps", "from .data import collate_choices")
    assert not bad("xmodaler_accel.tasks.vcr.steps", "from ...models.vcr import MODEL_INPUTS")


def test_examples_tests_and_benchmarks_never_import_a_recipe():
    for folder in ("examples", "tests", "benchmarks"):
        for path in sorted((REPO / folder).rglob("*.py")):
            text = path.read_text()
            imported = imports_of(text, "outside", False)
            assert not [n for n in imported if n.split(".")[0] in RECIPES], path
            path_edits = [line for line in text.splitlines() if "sys.path.insert(" in line]
            assert not [line for line in path_edits if "recipes" in line], path
