"""`make demo`: build the synthetic scenes, train a captioner with XE then SCST, print test metrics.

    python recipes/demo.py [--config recipes/synthetic.yaml] [--output output/demo]

Runs the two recipes as a user would (each a separate process), then scores the best constant
caption (the best of the 30 most frequent training captions) on the same test split for scale.
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

from xmodaler_accel.checkpoint import latest_checkpoint
from xmodaler_accel.data import open_dataset
from xmodaler_accel.metrics import score_captions
from xmodaler_accel.tasks.captioning import load_caption_config

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
    args = parser.parse_args()
    xe_dir, scst_dir = Path(args.output) / "xe", Path(args.output) / "scst"

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


if __name__ == "__main__":
    main()
