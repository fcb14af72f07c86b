"""Installing: the torch build `make install` asks pip for (checked with pip's dry-run report, so
nothing is installed or downloaded), and the pip route: a wheel that ships the recipes and the
`xmodaler-accel` command, whose copy of a recipe runs from a folder of the user's."""

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from base64 import urlsafe_b64encode
from pathlib import Path

import pytest
import tomllib
import yaml

from conftest import REPO, subprocess_env
from xmodaler_accel import recipes_command
from xmodaler_accel.recipes_command import RECIPES, main

TORCH_CPU = "torch==2.13.0+cpu"
# A pip that never waits long on an index it cannot reach.
QUICK_PIP = {"PIP_DEFAULT_TIMEOUT": "15", "PIP_RETRIES": "0", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
on_gpu_or_mac = shutil.which("nvidia-smi") is not None or sys.platform == "darwin"


def run(cmd, env=None, cwd=REPO, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(c) for c in cmd],
        env=env or subprocess_env(**QUICK_PIP),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 or not check, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def torch_args(env=None, **variables: str) -> list[str]:
    """`make -s torch-args`: the arguments `make install` gives `pip install` for torch."""
    cmd = ["make", "-s", "--no-print-directory", "torch-args", f"PIP={sys.executable} -m pip"]
    return shlex.split(run([*cmd, *(f"{k}={v}" for k, v in variables.items())], env).stdout)


def dry_run(args: list[str], tmp_path: Path, env=None) -> dict:
    """What `pip install <args>` would install (pip's --dry-run --report; torch only)."""
    report = tmp_path / "report.json"
    pip = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed"]
    run([*pip, "--no-deps", "--report", report, *args], env)
    (install,) = json.loads(report.read_text())["install"]
    return install


def make_wheel(folder: Path, name: str, version: str) -> Path:
    """A minimal pure-Python wheel (METADATA, WHEEL and RECORD only)."""
    dist_info = f"{name}-{version}.dist-info"
    files = {
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    record = [
        f"{path},sha256={urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).decode().rstrip('=')},{len(text)}"
        for path, text in files.items()
    ]
    files[f"{dist_info}/RECORD"] = "\n".join([*record, f"{dist_info}/RECORD,,", ""])
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


# ------------------------------------------------------------------------------ torch's build
@pytest.mark.skipif(on_gpu_or_mac, reason="a machine without an NVIDIA driver, not macOS")
def test_without_a_driver_torch_is_the_local_cpu_wheel_and_no_cuda_package(tmp_path):
    args = torch_args()
    if "--extra-index-url" in args:
        pytest.skip("no local CPU wheel of torch on this machine (the index case is tested below)")
    assert args == [TORCH_CPU]
    install = dry_run(args, tmp_path)
    assert install["metadata"]["version"] == "2.13.0+cpu"
    assert install["download_info"]["url"].startswith("file://")  # nothing downloaded
    assert not [r for r in install["metadata"]["requires_dist"] if r.startswith("nvidia")]


@pytest.mark.skipif(on_gpu_or_mac, reason="a machine without an NVIDIA driver, not macOS")
def test_without_a_local_wheel_torch_comes_from_the_cpu_index(tmp_path):
    """A stand-in for PyTorch's CPU index (a PEP 503 folder holding a hand-made CPU wheel), no
    pip configuration (so no local wheel folder) and a default index without torch, as PyPI has
    no `+cpu` build."""
    index, files, empty = tmp_path / "cpu", tmp_path / "files", tmp_path / "empty"
    for folder in (index / "torch", files, empty):
        folder.mkdir(parents=True)
    wheel = make_wheel(files, "torch", "2.13.0+cpu")
    href = f"../../files/{wheel.name.replace('+', '%2B')}"
    (index / "torch" / "index.html").write_text(f'<a href="{href}">{wheel.name}</a>\n')
    env = {k: v for k, v in subprocess_env(**QUICK_PIP).items() if not k.startswith("PIP_")}
    env |= QUICK_PIP | {"PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": empty.as_uri()}

    args = torch_args(env, TORCH_CPU_INDEX=index.as_uri())
    assert args == [TORCH_CPU, "--extra-index-url", index.as_uri()]
    install = dry_run(args, tmp_path, env)
    assert install["metadata"]["version"] == "2.13.0+cpu"
    assert (
        install["download_info"]["url"] == files.as_uri() + "/torch-2.13.0%2Bcpu-py3-none-any.whl"
    )


@pytest.mark.parametrize(
    "tool, output, expected", [("nvidia-smi", "", []), ("uname", "Darwin", ["torch==2.13.0"])]
)
def test_with_a_driver_pip_picks_torch_and_on_macos_the_release(tmp_path, tool, output, expected):
    if tool == "uname" and shutil.which("nvidia-smi"):
        pytest.skip("the driver wins on this machine")
    fake = tmp_path / tool
    fake.write_text(f"#!/bin/sh\necho {output}\n")
    fake.chmod(0o755)
    env = subprocess_env(PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert torch_args(env) == expected


def test_the_pinned_cpu_build_meets_the_requirement_and_the_docs_name_it():
    from packaging.requirements import Requirement

    (pin,) = re.findall(r"^TORCH_VERSION := (\S+)$", (REPO / "Makefile").read_text(), re.M)
    assert f"torch=={pin}+cpu" == TORCH_CPU
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    (torch,) = [Requirement(r) for r in project["dependencies"] if r.startswith("torch")]
    assert torch.specifier.contains(f"{pin}+cpu")
    for doc in ("pyproject.toml", "README.md"):
        assert f"{pin}+cpu" in (REPO / doc).read_text(), doc


# ------------------------------------------------------------------------- the shipped recipes
def test_every_recipe_and_config_is_listed_and_every_package_folder_is_packaged():
    scripts = {p.name for p in (REPO / "recipes").glob("*.py")} - {"__init__.py"}
    configs = {p.name for p in (REPO / "recipes").glob("*.yaml")}
    assert {r.script for r in RECIPES.values()} == scripts
    assert {c for r in RECIPES.values() for c in r.configs} == configs
    assert {s for r in RECIPES.values() for s in r.starts} <= scripts
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    src = REPO / "src"
    package = [src / "xmodaler_accel", *(src / "xmodaler_accel").rglob("*")]
    folders = {
        ".".join(p.relative_to(src).parts)
        for p in package
        if p.is_dir() and "__pycache__" not in p.parts
    }
    assert set(setuptools["packages"]) == folders | {"xmodaler_accel.recipes"}
    assert setuptools["package-dir"]["xmodaler_accel.recipes"] == "recipes"


def test_ls_prints_each_recipe_with_its_configs_and_imports_no_torch():
    proc = run([sys.executable, "-X", "importtime", "-m", "xmodaler_accel", "ls"], cwd=REPO)
    lines = proc.stdout.splitlines()
    for name, recipe in RECIPES.items():
        (line,) = [line for line in lines if line.split()[:1] == [name]]
        assert all(c in line for c in recipe.configs) and recipe.trains in line
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert not {"torch", "yaml", "numpy"} & {name.split(".")[0] for name in imported}


def test_cp_copies_a_recipe_with_its_configs_and_what_it_starts(tmp_path, capsys):
    assert main(["cp", "xe", str(tmp_path / "exp")]) == 0
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == [
        "coco.yaml",
        "synthetic.yaml",
        "xe.py",
    ]
    assert "python xe.py --config synthetic.yaml" in capsys.readouterr().out
    assert main(["cp", "demo", str(tmp_path / "demo")]) == 0  # demo.py runs xe.py and scst.py
    copied = sorted(p.name for p in (tmp_path / "demo").iterdir())
    assert copied == ["demo.py", "scst.py", "synthetic.yaml", "xe.py"]
    assert main(["cp", "vcr.py", str(tmp_path / "mine" / "train.py"), "--script-only"]) == 0
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["train.py"]


def test_cp_refuses_to_replace_a_file_unless_forced_and_names_an_unknown_recipe(tmp_path, capsys):
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "coco.yaml").write_text("mine")
    assert main(["cp", "xe", str(exp)]) == 1
    assert "coco.yaml already exists; nothing copied (--force replaces)" in capsys.readouterr().err
    assert [p.name for p in exp.iterdir()] == ["coco.yaml"]
    assert main(["cp", "xe", str(exp), "--force"]) == 0
    assert (exp / "coco.yaml").read_text() == (REPO / "recipes" / "coco.yaml").read_text()

    assert main(["cp", "captioning", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "unknown recipe or config 'captioning'; recipes: xe, scst, retrieval" in err
    assert "configs: coco.yaml" in err and not (tmp_path / "x").exists()
    assert main(["cp", "vcr", str(tmp_path / "x" / "mine.yaml")]) == 1  # vcr.yaml is the config
    assert "vcr is a recipe: name its copy *.py" in capsys.readouterr().err


def test_cp_of_a_config_brings_the_configs_its_base_names(tmp_path, monkeypatch):
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (shipped / "base.yaml").write_text("seed: 1\n")
    (shipped / "mid.yaml").write_text("_base_: base.yaml\nseed: 2\n")
    (shipped / "top.yaml").write_text("_base_: [mid.yaml]\nseed: 3\n")
    monkeypatch.setattr(recipes_command, "recipes_dir", lambda: shipped)
    assert main(["cp", "top", str(tmp_path / "out" / "mine.yaml")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "base.yaml",
        "mid.yaml",
        "mine.yaml",
    ]
    assert yaml.safe_load((tmp_path / "out" / "mine.yaml").read_text())["_base_"] == ["mid.yaml"]


# ------------------------------------------------------------------------------ the pip route
@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The project's packaging inputs, copied (building writes build/ and *.egg-info there)."""
    root = tmp_path_factory.mktemp("project")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, root / name)
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for folder in ("src", "recipes"):
        shutil.copytree(REPO / folder, root / folder, ignore=skip)
    return root


def pip_install_target(tmp_path: Path, *what) -> Path:
    target = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
    run([*pip, "--target", target, *what])
    return target


def test_the_wheel_ships_the_recipes_and_a_copied_recipe_runs_from_the_users_folder(
    project, tmp_path
):
    out = tmp_path / "dist"
    pip = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation"]
    run([*pip, "-w", out, project])
    (wheel,) = out.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {
        f"xmodaler_accel/recipes/{p.name}" for p in (REPO / "recipes").iterdir() if p.is_file()
    }
    package = {
        p.relative_to(REPO / "src").as_posix()
        for p in (REPO / "src" / "xmodaler_accel").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert shipped | package <= names

    site = pip_install_target(tmp_path, wheel)
    env = subprocess_env(PYTHONPATH=str(site))
    user = tmp_path / "user"
    user.mkdir()
    listed = run([site / "bin" / "xmodaler-accel", "ls"], env, cwd=user).stdout
    assert f"in {site / 'xmodaler_accel' / 'recipes'};" in listed  # the wheel's, not the checkout's
    run([sys.executable, "-m", "xmodaler_accel", "cp", "xe", "exp"], env, cwd=user)
    exp = user / "exp"
    shown = run(
        [sys.executable, "xe.py", "--config", "synthetic.yaml", "--print-config"], env, cwd=exp
    )
    assert yaml.safe_load(shown.stdout)["output_dir"] == "output/synthetic_xe"
    assert sorted(p.name for p in exp.iterdir()) == ["coco.yaml", "synthetic.yaml", "xe.py"]
    where = run(
        [sys.executable, "-c", "import xmodaler_accel; print(xmodaler_accel.__file__)"],
        env,
        cwd=exp,
    )
    assert where.stdout.strip() == str(site / "xmodaler_accel" / "__init__.py")


def test_an_editable_install_maps_the_recipes_to_the_checkouts_folder(project, tmp_path):
    """`pip install -e .`, as `make install` does: the package's recipes are recipes/ itself."""
    site = pip_install_target(tmp_path, "-e", project)
    code = (
        f"import site; site.addsitedir({str(site)!r}); "  # the install's .pth, without the venv's
        "from xmodaler_accel.recipes_command import recipes_dir; print(recipes_dir())"
    )
    shown = run([sys.executable, "-S", "-c", code], cwd=tmp_path).stdout.strip()
    assert shown == str(project / "recipes")
