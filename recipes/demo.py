"""`make demo`: build the synthetic scenes, train a captioner with XE then SCST, print test metrics.

    python recipes/demo.py [--config recipes/synthetic.yaml] [--output output/demo] [--print-config]

Runs the two recipes as a user would (each a separate process), then scores the best constant
caption (the best of the 30 most frequent training captions) on the same test split for scale.
--print-config prints the config of each of the two runs (two YAML documents) and exits.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

RECIPES = Path(__file__).resolve().parent
SHOWN = ("Bleu_4", "ROUGE_L", "CIDEr")


def run(script: str, *args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, str(RECIPES / script), *args], check=True)
    return time.perf_counter() - start


def final_metrics(output_dir: Path, split: str = "test") -> dict[str, float]:
    """Metrics of the last evaluation of `split` (eval/<split>_step<N>.json)."""
    pattern = re.compile(rf"^{split}_step(\d+)\.json$")
    steps = {
        int(m.group(1)): p for p in (output_dir / "eval").iterdir() if (m := pattern.match(p.name))
    }
    return json.loads(steps[max(steps)].read_text())["metrics"]


def constant_caption_metrics(config: str, candidates: int = 30) -> tuple[str, dict[str, float]]:
    """The best of the most frequent training captions, used as the caption of every test image."""
    from xmodaler_accel.data import open_dataset
    from xmodaler_accel.metrics import score_captions
    from xmodaler_accel.tasks.captioning import load_caption_config

    data = open_dataset(load_caption_config(config))
    counts = Counter(c for caps in data["train"]["captions"] for c in caps)
    test = data["test"]
    refs = dict(zip(test["image_id"], test["captions"]))
    scored = [
        (score_captions({i: c for i in refs}, refs, metrics=("bleu", "rouge", "cider")), c)
        for c, _ in counts.most_common(candidates)
    ]
    metrics, caption = max(scored, key=lambda pair: pair[0]["CIDEr"])
    return caption, metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=str(RECIPES / "synthetic.yaml"))
    parser.add_argument("--output", default="output/demo")
    parser.add_argument("--print-config", action="store_true", help="print both runs' configs")
    args = parser.parse_args()
    xe_dir, scst_dir = Path(args.output) / "xe", Path(args.output) / "scst"
    if args.print_config:
        print_configs(args.config, xe_dir, scst_dir)
        return
    from xmodaler_accel.checkpoint import latest_checkpoint  # torch: after the command line

    # The demo starts afresh each time: --overwrite replaces its previous runs.
    xe_time = run("xe.py", "--config", args.config, "--overwrite", f"output_dir={xe_dir}")
    weights = latest_checkpoint(xe_dir / "checkpoints")
    scst_time = run(
        "scst.py",
        "--config",
        args.config,
        "--overwrite",
        f"model.weights={weights}",
        f"output_dir={scst_dir}",
    )
    caption, constant = constant_caption_metrics(args.config)
    rows = {
        "best constant caption": constant,
        f"XE ({xe_time / 60:.1f} min)": final_metrics(xe_dir),
        f"XE + SCST ({scst_time / 60:.1f} min)": final_metrics(scst_dir),
    }
    print(f"\ntest split of the synthetic scenes ({args.config})")
    print(f"{'':28}" + "".join(f"{m:>10}" for m in SHOWN))
    for name, metrics in rows.items():
        print(f"{name:28}" + "".join(f"{metrics[m]:10.3f}" for m in SHOWN))
    print(
        f"(best constant caption: {caption!r}, the best of the 30 most frequent training captions)"
    )


def print_configs(config: str, xe_dir: Path, scst_dir: Path) -> None:
    """What each run would write to its config.yaml (the recipes' --print-config)."""
    weights = xe_dir / "checkpoints" / "<newest>"  # known once XE has run
    for script, *overrides in (
        ("xe.py", f"output_dir={xe_dir}"),
        ("scst.py", f"model.weights={weights}", f"output_dir={scst_dir}"),
    ):
        print(f"--- # recipes/{script}", flush=True)
        run(script, "--config", config, "--print-config", *overrides)


if __name__ == "__main__":
    main()
