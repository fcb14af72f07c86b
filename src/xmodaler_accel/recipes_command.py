"""`xmodaler-accel ls` and `xmodaler-accel cp`: the recipes the package ships, and a copy of one
(with the configs it runs on) in a folder of your own, as torchtune's `tune ls` / `tune cp`.

    xmodaler-accel ls
    xmodaler-accel cp xe my_exp              # my_exp/xe.py, synthetic.yaml, coco.yaml
    cd my_exp && python xe.py --config synthetic.yaml
    xmodaler-accel cp coco.yaml my_exp       # one config (and the files its `_base_` names)
    xmodaler-accel cp xe my_exp/train.py     # the recipe under a name of your own

Light on purpose: it imports neither torch nor the models, so it answers at once.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from xmodaler_accel import __version__

PROG = "xmodaler-accel"


@dataclass(frozen=True)
class Recipe:
    """A recipe script, what it trains, the configs it runs on (the synthetic one, minutes on a
    CPU, first) and the sibling scripts it starts."""

    script: str
    trains: str
    configs: tuple[str, ...]
    starts: tuple[str, ...] = ()


RECIPES = {
    "xe": Recipe(
        "xe.py",
        "image captioning with cross-entropy (X-modaler's DefaultTrainer)",
        ("synthetic.yaml", "coco.yaml"),
    ),
    "scst": Recipe(
        "scst.py",
        "image captioning with self-critical RL, from an XE run (RLTrainer)",
        ("synthetic.yaml", "coco.yaml"),
    ),
    "retrieval": Recipe(
        "retrieval.py",
        "image-text retrieval, two- or single-stream, hard negatives",
        ("synthetic_retrieval.yaml", "flickr30k.yaml"),
    ),
    "vcr": Recipe(
        "vcr.py",
        "visual commonsense reasoning, Q->A and QA->R (VCRTrainer)",
        ("synthetic_vcr.yaml", "vcr.yaml"),
    ),
    "pretrain": Recipe(
        "pretrain.py",
        "vision-language pretraining: MLM, MRM, ITM and captioning (TDEN)",
        ("synthetic_pretrain.yaml", "pretrain.yaml"),
    ),
    "demo": Recipe(
        "demo.py",
        "XE then SCST on the synthetic scenes, then test metrics (make demo)",
        ("synthetic.yaml",),
        starts=("xe.py", "scst.py"),
    ),
    "caption_images": Recipe(
        "caption_images.py",
        "no training: captions image files with a trained captioner and its backbone",
        ("synthetic.yaml",),
    ),
    "demo_images": Recipe(
        "demo_images.py",
        "XE on rendered scenes' backbone features, then captions new images (make demo-images)",
        ("synthetic.yaml",),
        starts=("demo.py", "xe.py", "caption_images.py"),
    ),
}


class CommandError(Exception):
    """A mistake on the command line, said in a sentence that names the thing at fault."""


def recipes_dir() -> Path:
    """The shipped recipes: the `xmodaler_accel.recipes` folder (a wheel, or an editable install,
    which maps it to the checkout's recipes/), else recipes/ of the checkout this file lies in (an
    editable install made before the mapping, or `PYTHONPATH=src`)."""
    spec = importlib.util.find_spec("xmodaler_accel.recipes")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    checkout = Path(__file__).resolve().parents[2] / "recipes"
    if (checkout / "xe.py").is_file():
        return checkout
    raise CommandError(f"no recipes next to {Path(__file__).parent}: reinstall xmodaler-accel")


def configs_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.yaml"))


def with_bases(folder: Path, config: str) -> list[str]:
    """`config` and the configs its `_base_` chain names (paths relative to `folder`, each once),
    so that a copied config loads where it is copied to."""
    import yaml  # only `cp` reads YAML

    found: list[str] = []
    pending = [config]
    while pending:
        name = pending.pop(0)
        if name in found:
            continue
        found.append(name)
        data = yaml.safe_load((folder / name).read_text()) or {}
        bases = data.get("_base_", []) if isinstance(data, dict) else []
        for base in [bases] if isinstance(bases, str) else bases:
            path = ((folder / name).parent / base).resolve()
            if path.is_relative_to(folder.resolve()) and path.is_file():
                pending.append(path.relative_to(folder.resolve()).as_posix())
    return found


def resolve(folder: Path, name: str) -> tuple[Recipe | None, str]:
    """The recipe `name` names (`xe` or `xe.py`), else the config (`coco.yaml` or `coco`)."""
    stem = name.removesuffix(".py")
    if stem in RECIPES and not name.endswith((".yaml", ".yml")):
        return RECIPES[stem], RECIPES[stem].script
    configs = configs_in(folder)
    for candidate in (name, f"{name}.yaml"):
        if candidate in configs:
            return None, candidate
    raise CommandError(
        f"unknown recipe or config {name!r}; recipes: {', '.join(RECIPES)}; "
        f"configs: {', '.join(configs)}"
    )


def copy_plan(folder: Path, name: str, dest: Path, alone: bool) -> list[tuple[Path, Path]]:
    """(source, target) pairs: the named file, then what it needs to run from `dest`.

    `dest` names the copied file when it ends like it (`train.py`, `mine.yaml`); otherwise it is
    the folder everything goes into. A recipe brings its configs and the scripts it starts,
    unless `alone`; a config brings the configs its `_base_` names (they keep their names)."""
    recipe, source = resolve(folder, name)
    suffix = Path(source).suffix
    if dest.suffix in (".py", ".yaml", ".yml") and dest.suffix != suffix:
        kind = "config" if recipe is None else "recipe"
        raise CommandError(f"{name} is a {kind}: name its copy *{suffix}, or give a folder")
    renamed = dest.suffix == suffix
    target_dir = dest.parent if renamed else dest
    if not renamed and dest.exists() and not dest.is_dir():
        raise CommandError(f"{dest} is a file, not a folder (a new name must end in {suffix})")
    plan = [(folder / source, dest if renamed else dest / source)]
    if recipe is not None and alone:
        companions = []
    elif recipe is not None:
        companions = [
            *recipe.starts,
            *(c for cfg in recipe.configs for c in with_bases(folder, cfg)),
        ]
    else:
        companions = with_bases(folder, source)[1:]
    for companion in dict.fromkeys(companions):
        plan.append((folder / companion, target_dir / companion))
    return plan


def copy(name: str, dest: Path, *, alone: bool = False, force: bool = False) -> list[Path]:
    """Copy a recipe or config (see `copy_plan`); refuse to replace a file unless `force`.
    Returns the files written."""
    plan = copy_plan(recipes_dir(), name, dest, alone)
    existing = [target for _, target in plan if target.exists()]
    if existing and not force:
        raise CommandError(
            f"{', '.join(map(str, existing))} already exist{'s' if len(existing) == 1 else ''}; "
            "nothing copied (--force replaces)"
        )
    for source, target in plan:
        if target.exists() and target.samefile(source):
            raise CommandError(f"{target} is the shipped file itself")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return [target for _, target in plan]


def listing() -> str:
    """One line per recipe: its name, its configs and what it trains."""
    folder = recipes_dir()
    rows = [("RECIPE", "CONFIGS", "TRAINS")]
    rows += [(name, " ".join(r.configs), r.trains) for name, r in RECIPES.items()]
    claimed = {c for r in RECIPES.values() for c in r.configs}
    if others := [c for c in configs_in(folder) if c not in claimed]:
        rows.append(("", " ".join(others), "(other configs)"))
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    lines = [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c}" for a, b, c in rows]
    lines += ["", f"in {folder}; copy one: {PROG} cp xe my_exp (the script and its configs)"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="List the recipes the package ships, or copy one into a folder of yours.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="{ls,cp}")
    commands.add_parser("ls", help="the recipes, their configs and what each trains")
    cp = commands.add_parser(
        "cp",
        help="copy a recipe (with its configs) or a config",
        description="Copy a recipe with the configs it runs on (and the scripts it starts), or "
        "one config. DEST is a folder (made if missing), or the copied file's new name when it "
        "ends in .py for a recipe, .yaml for a config.",
    )
    cp.add_argument("name", help="a recipe (xe, scst, ...) or a config (coco.yaml); see `ls`")
    cp.add_argument("dest", type=Path, help="a folder, or the new file name")
    cp.add_argument(
        "--script-only", action="store_true", help="copy the recipe script alone, no configs"
    )
    cp.add_argument("--force", action="store_true", help="replace files that already exist")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "ls":
            print(listing())
        elif args.command == "cp":
            written = copy(args.name, args.dest, alone=args.script_only, force=args.force)
            print("copied " + ", ".join(map(str, written)))
            recipe, _ = resolve(recipes_dir(), args.name)
            if recipe is not None and not args.script_only:
                script = written[0]
                run = f"python {script.name} --config {recipe.configs[0]}"
                print(f"run it: cd {script.parent} && {run}")
        else:
            parser.print_help()
            return 2
    except CommandError as err:
        print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
        return 1
    return 0
