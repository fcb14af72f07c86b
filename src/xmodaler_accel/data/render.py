"""The synthetic scenes drawn as pixels: the same shapes, colours, sizes and positions as the
region features of `data.synthetic`, so that images -> backbone features -> captioner runs
offline end to end.

    python -m xmodaler_accel.data.render --output data/rendered --size 64 --num-train 2000

writes `images/<split>_<index>.png` for train/val/test and `dataset_rendered.json` in Karpathy's
`dataset_coco.json` layout (the captions of the synthetic split of the same seed), which
`python -m xmodaler_accel.data.convert images` turns into the store the recipes read.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .scenes import COLOURS, SHAPES, Scene
from .synthetic import _ID_OFFSET, SPLITS, SyntheticConfig, split_scenes

ANNOTATIONS_FILE = "dataset_rendered.json"
IMAGES_DIR = "images"
SUPERSAMPLE = 4  # drawn this many times larger, then averaged down: smooth edges at 64 px
CANVAS_RGB = (128, 128, 128)
COLOUR_RGB = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (40, 70, 220),
    "yellow": (240, 220, 40),
    "purple": (130, 40, 170),
    "orange": (245, 140, 20),
    "white": (250, 250, 250),
    "black": (10, 10, 10),
    "pink": (250, 150, 200),
    "brown": (130, 80, 30),
}
BACKGROUND_RGB = ((160, 160, 160), (96, 96, 96), (112, 124, 146))  # per background kind
assert set(COLOUR_RGB) == set(COLOURS)


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    points = []
    for k in range(10):
        radius = r if k % 2 == 0 else 0.45 * r
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, box: Iterable[float], fill: tuple[int, int, int]
) -> None:
    """One shape filling the pixel box (x1, y1, x2, y2), its centre always covered."""
    x1, y1, x2, y2 = box
    cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
    if shape == "circle":
        draw.ellipse((x1, y1, x2, y2), fill=fill)
    elif shape == "square":
        draw.rectangle((x1 + 0.1 * w, y1 + 0.1 * h, x2 - 0.1 * w, y2 - 0.1 * h), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y1), (x2, y2), (x1, y2)], fill=fill)
    elif shape == "star":
        draw.polygon(_star(cx, cy + 0.05 * h, min(w, h) / 2), fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y1), (x2, cy), (cx, y2), (x1, cy)], fill=fill)
    elif shape == "cross":
        draw.rectangle((cx - w / 6, y1, cx + w / 6, y2), fill=fill)
        draw.rectangle((x1, cy - h / 6, x2, cy + h / 6), fill=fill)
    elif shape == "heart":
        r = w / 4
        draw.ellipse((x1, y1 + 0.05 * h, cx + 0.02 * w, y1 + 0.05 * h + 2 * r), fill=fill)
        draw.ellipse((cx - 0.02 * w, y1 + 0.05 * h, x2, y1 + 0.05 * h + 2 * r), fill=fill)
        draw.polygon(
            [
                (x1 + 0.02 * w, y1 + 0.05 * h + r * 1.3),
                (x2 - 0.02 * w, y1 + 0.05 * h + r * 1.3),
                (cx, y2),
            ],
            fill=fill,
        )
    elif shape == "hexagon":
        draw.regular_polygon((cx, cy, min(w, h) / 2), 6, fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")


def render_scene(scene: Scene, size: int = 64) -> np.ndarray:
    """The scene as a `size` x `size` RGB image, uint8 [H, W, 3]: background regions as muted
    rectangles, then every object in its colour, filling its box (size class and grid cell)."""
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), CANVAS_RGB)
    draw = ImageDraw.Draw(image)
    boxes = scene.boxes[:, :4].astype(np.float64) * big
    for box, kind in zip(boxes, scene.region_backgrounds):
        if kind >= 0:
            draw.rectangle(tuple(box), fill=BACKGROUND_RGB[kind])
    for obj, box in zip(scene.region_objects, boxes):
        if obj >= 0:
            shape = scene.objects[obj]
            draw_shape(draw, SHAPES[shape.shape], box, COLOUR_RGB[COLOURS[shape.colour]])
    return np.asarray(image.resize((size, size), Image.Resampling.BOX))


def write_rendered_split(
    directory: str | Path, split: str, config: SyntheticConfig, size: int = 64
) -> list[dict]:
    """Draw every scene of a synthetic split into `directory/images/<split>_<index>.png`;
    returns the split's Karpathy image entries (ids and captions as the synthetic split's)."""
    folder = Path(directory) / IMAGES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for index, (scene, captions, raw) in enumerate(split_scenes(split, config)):
        name = f"{split}_{index:06d}.png"
        Image.fromarray(render_scene(scene, size)).save(folder / name)
        image_id = _ID_OFFSET[split] + index
        sentences = [
            {"raw": r, "tokens": c.split(), "imgid": image_id, "sentid": image_id * 10 + k}
            for k, (c, r) in enumerate(zip(captions, raw))
        ]
        entries.append(
            {
                "filepath": IMAGES_DIR,
                "filename": name,
                "split": split,
                "imgid": image_id,
                "sentids": [s["sentid"] for s in sentences],
                "sentences": sentences,
            }
        )
    return entries


def write_rendered_scenes(
    directory: str | Path,
    config: SyntheticConfig | None = None,
    *,
    size: int = 64,
    splits: Iterable[str] = SPLITS,
) -> Path:
    """Every split of the synthetic config drawn as PNGs under `directory/images/`, and
    `directory/dataset_rendered.json` (Karpathy layout) naming them; returns the JSON's path."""
    config = config or SyntheticConfig()
    directory = Path(directory)
    images = [
        entry for split in splits for entry in write_rendered_split(directory, split, config, size)
    ]
    path = directory / ANNOTATIONS_FILE
    info = {"synthetic": {"seed": config.seed, "max_background": config.max_background}}
    path.write_text(json.dumps({"dataset": "synthetic_rendered", "images": images, **info}))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", required=True, type=Path, help="folder to write into")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="the synthetic config's seed")
    parser.add_argument("--num-train", type=int, default=4000)
    parser.add_argument("--num-val", type=int, default=500)
    parser.add_argument("--num-test", type=int, default=500)
    args = parser.parse_args(argv)
    config = SyntheticConfig(
        seed=args.seed, num_train=args.num_train, num_val=args.num_val, num_test=args.num_test
    )
    path = write_rendered_scenes(args.output, config, size=args.size)
    print(
        f"wrote {sum(config.size(s) for s in SPLITS)} images under {args.output / IMAGES_DIR}, {path}"
    )


if __name__ == "__main__":
    main()
