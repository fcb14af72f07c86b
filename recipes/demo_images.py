"""`make demo-images`: the synthetic scenes drawn as pictures, their features from a small random
vision backbone, XE on those features, then captions of new pictures and the test metrics next
to the best constant caption's. Offline: the backbone is built from a config, not downloaded.

    python recipes/demo_images.py [--output output/demo_images] [--num-train 4000] [--size 96]

Each stage is the command a user would run on a folder of their own images:
  1. python -m xmodaler_accel.data.render --output OUT/rendered ...   (PNGs + Karpathy JSON)
  2. a random ViT saved to OUT/backbone (data.backbone.save_random_backbone; a real one is a
     local folder or hub name, e.g. facebook/dinov2-small)
  3. python -m xmodaler_accel.data.convert images --images OUT/rendered
        --annotations OUT/rendered/dataset_rendered.json --backbone OUT/backbone --output OUT/store
  4. python recipes/xe.py --config recipes/synthetic.yaml data.source=OUT/store output_dir=OUT/xe
  5. python recipes/caption_images.py --config OUT/xe/config.yaml --images OUT/new
The grid of patches matches the scenes' 3x3 grid (image side = 3 patches), so each patch token
sees one cell.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from demo import SHOWN, constant_caption_metrics, final_metrics

RECIPES = Path(__file__).resolve().parent


def timed(*command: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *command], check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(RECIPES / "synthetic.yaml"), help="XE config")
    parser.add_argument("--output", type=Path, default=Path("output/demo_images"))
    parser.add_argument("--size", type=int, default=96, help="image side, pixels (3 patches)")
    parser.add_argument("--hidden", type=int, default=128, help="the backbone's feature width")
    parser.add_argument("--num-train", type=int, default=4000)
    parser.add_argument("--num-test", type=int, default=500)
    parser.add_argument("--num-new", type=int, default=8, help="new pictures to caption")
    parser.add_argument("opts", nargs="*", help="XE overrides: train.max_steps=500 ...")
    args = parser.parse_args()
    out = args.output
    out.mkdir(parents=True, exist_ok=True)
    times = {}

    # 1-2. Pictures of the scenes (same captions as the synthetic split of seed 0), a backbone.
    times["render"] = timed(
        "-m",
        "xmodaler_accel.data.render",
        f"--output={out / 'rendered'}",
        f"--size={args.size}",
        f"--num-train={args.num_train}",
        f"--num-val={args.num_test // 2}",
        f"--num-test={args.num_test}",
    )
    from xmodaler_accel.data.backbone import save_random_backbone  # torch: after the arguments

    backbone = save_random_backbone(
        out / "backbone",
        image_size=args.size,
        patch_size=args.size // 3,
        hidden_size=args.hidden,
        num_heads=4,
    )

    # 3. Features: patch tokens as regions, patch cells as boxes.
    times["features"] = timed(
        "-m",
        "xmodaler_accel.data.convert",
        "images",
        f"--images={out / 'rendered'}",
        f"--annotations={out / 'rendered' / 'dataset_rendered.json'}",
        f"--backbone={backbone}",
        f"--output={out / 'store'}",
        "--min-count=1",
        "--workers=0",
        "--overwrite",
        "--quiet",
    )

    # 4. XE on the store: the synthetic recipe, data pointed at the converted images.
    xe_dir = out / "xe"
    times["XE"] = timed(
        str(RECIPES / "xe.py"),
        "--config",
        args.config,
        "--overwrite",
        f"data.source={out / 'store'}",
        f"output_dir={xe_dir}",
        "eval.splits=[test]",
        "eval.metrics=[bleu,rouge,cider]",
        *args.opts,
    )

    # 5. New pictures (another seed: scenes the model has not seen), captioned.
    from xmodaler_accel.data.render import write_rendered_scenes
    from xmodaler_accel.data.synthetic import SyntheticConfig

    new = SyntheticConfig(seed=1, num_train=0, num_val=0, num_test=args.num_new)
    annotations = write_rendered_scenes(out / "new", new, size=args.size, splits=["test"])
    captions = out / "captions.json"
    times["captions"] = timed(
        str(RECIPES / "caption_images.py"),
        f"--config={xe_dir / 'config.yaml'}",
        f"--images={out / 'new' / 'images'}",
        f"--output={captions}",
        "--device=cpu",
    )
    truth = {
        i["filename"]: i["sentences"][0]["raw"]
        for i in json.loads(annotations.read_text())["images"]
    }
    print("\none true caption of each new picture:")
    for row in json.loads(captions.read_text()):
        print(f"  {Path(row['image']).name}  {truth[Path(row['image']).name]}")

    # Test metrics against the best constant caption (recipes/demo.py's comparison).
    caption, constant = constant_caption_metrics(str(xe_dir / "config.yaml"))
    xe = final_metrics(xe_dir)
    print(f"\ntest split of the rendered scenes ({args.size}x{args.size} px, random ViT features)")
    print(f"{'':28}" + "".join(f"{m:>10}" for m in SHOWN))
    for name, metrics in (("best constant caption", constant), ("XE", xe)):
        print(f"{name:28}" + "".join(f"{metrics[m]:10.3f}" for m in SHOWN))
    print(f"(best constant caption: {caption!r}; XE CIDEr {xe['CIDEr'] / constant['CIDEr']:.1f}x)")
    print("time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items()))


if __name__ == "__main__":
    main()
