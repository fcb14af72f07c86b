"""Every package the library and recipes import is declared, and nothing is required that is
never imported (optional ones are extras)."""

import ast
import sys

import tomllib

from conftest import REPO

# Import name -> distribution name, where they differ.
DISTRIBUTION = {"yaml": "pyyaml", "PIL": "pillow"}
# Required without an import of their own: used through another package's API.
USED_INDIRECTLY: set[str] = set()


def imported_packages() -> set[str]:
    names = set()
    for path in [*(REPO / "src").rglob("*.py"), *(REPO / "recipes").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    siblings = {path.stem for path in (REPO / "recipes").glob("*.py")}  # recipes import recipes
    third_party = names - set(sys.stdlib_module_names) - {"xmodaler_accel"} - siblings
    return {DISTRIBUTION.get(name, name) for name in third_party}


def declared() -> tuple[set[str], dict[str, set[str]]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

    def name(requirement: str) -> str:
        return requirement.split(">")[0].split("=")[0].split("[")[0].strip().lower()

    extras = {k: {name(r) for r in v} for k, v in project["optional-dependencies"].items()}
    return {name(r) for r in project["dependencies"]}, extras


def test_every_import_is_declared_and_every_requirement_imported():
    required, extras = declared()
    optional = set().union(*(v for k, v in extras.items() if k != "dev"))
    imported = imported_packages()
    assert imported - required - optional == set()  # imported but not declared
    assert required - imported - USED_INDIRECTLY == set()  # required but never imported
    assert "wandb" not in required and "wandb" in extras["wandb"]


def test_dev_installs_every_extra_the_tests_use():
    _, extras = declared()
    for extra in ("wandb", "tensorboard", "coco-eval", "hdf5"):
        assert extras[extra] <= extras["dev"], extra
