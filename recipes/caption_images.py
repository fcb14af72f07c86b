"""Caption new images with a trained captioner: images -> backbone features -> the beam search of
evaluation -> one caption per image, written as JSON and shown as a table.

    python recipes/caption_images.py --config output/rendered_xe/config.yaml \\
        --images photos/ more.jpg [--backbone <dir>] [--output captions.json] [key=value ...]

--config is a run's config.yaml (or the YAML it ran with, plus its overrides): it names the
dataset the captioner trained on (its tokenizer and feature width), the model and the decoding
(decode.beam_size, decode.max_len). The weights are model.weights=<checkpoint dir or file> when
given here, else the newest intact checkpoint of the config's output_dir. --backbone is the vision backbone that
extracted the training features (a local folder: nothing is downloaded); by default the one the
dataset's meta.json names. The JSON is [{"image": path, "caption": text}, ...] in input order.
"""

import argparse
import sys
from pathlib import Path

# The command line first: --help and a mistyped flag answer before torch and the models load.
if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="the run's config.yaml (or its YAML)")
    parser.add_argument(
        "--images", nargs="+", required=True, type=Path, help="image files and/or folders of them"
    )
    parser.add_argument(
        "--backbone", help="the backbone folder (default: the one the dataset's meta.json names)"
    )
    parser.add_argument(
        "--output", type=Path, default=Path("captions.json"), help="JSON file to write"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("opts", nargs="*", help="config overrides: model.weights=<checkpoint>")
    args = parser.parse_intermixed_args()

import json

import torch

from xmodaler_accel.checkpoint import find_resume_checkpoint
from xmodaler_accel.config import ConfigError
from xmodaler_accel.data import DataError, dataset_dir, load_tokenizer, open_dataset
from xmodaler_accel.data.backbone import BackboneFeatures, load_image
from xmodaler_accel.data.store import read_meta
from xmodaler_accel.decoding import beam_search
from xmodaler_accel.setup import launch
from xmodaler_accel.tasks.captioning import (
    captioner_from_config,
    feature_dim,
    image_collate,
    load_caption_config,
)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def image_files(paths: list[Path]) -> list[Path]:
    """The files given, and the images in each folder given (sorted by name), in order."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            inside = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not inside:
                raise DataError(f"--images: no {'/'.join(IMAGE_SUFFIXES)} files in {path}")
            found += inside
        elif path.is_file():
            found.append(path)
        else:
            raise DataError(f"--images: {path} does not exist")
    return found


def open_backbone(args, data_dir: Path, device: torch.device) -> BackboneFeatures:
    """--backbone (else the one the dataset's meta.json names), with the options the dataset's
    features were extracted with (the pooled token first or not, the forward precision)."""
    meta = read_meta(data_dir)
    backbone = args.backbone or meta.get("backbone")
    if not backbone:
        raise ConfigError(
            f"{data_dir} does not name the backbone its features came from: give --backbone <dir>"
        )
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(meta.get("precision"))
    if dtype is torch.bfloat16 and device.type == "cpu":
        dtype = torch.float32
    return BackboneFeatures(
        backbone,
        device=device,
        dtype=dtype,
        global_feature=bool(meta.get("global_feature", False)),
    )


def captioner_weights(cfg, opts: list[str]) -> str:
    """model.weights from the command line, else the run's newest intact checkpoint, else the
    config's model.weights (a run's config.yaml names the weights it started from: an SCST
    run's names its XE checkpoint, so its own newest checkpoint comes first)."""
    if any(opt.startswith("model.weights=") for opt in opts):
        return cfg.model.weights
    runs = Path(cfg.output_dir) / "checkpoints"
    checkpoint = find_resume_checkpoint(runs, cfg.checkpoint.prefix)
    if checkpoint is not None:
        return str(checkpoint)
    if cfg.model.weights:
        return cfg.model.weights
    raise ConfigError(
        f"no checkpoint under {runs} and no model.weights: give "
        "model.weights=<checkpoint dir or .safetensors>"
    )


def main(args) -> list[dict[str, str]]:
    cfg = load_caption_config(args.config, args.opts)
    cfg.model.weights = captioner_weights(cfg, args.opts)
    paths = image_files(args.images)  # a wrong path fails before the model loads

    # The captioner, with the tokenizer and feature width of the data it trained on.
    data_dir = dataset_dir(cfg)
    tokenizer, table = load_tokenizer(data_dir), open_dataset(cfg)["train"]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = captioner_from_config(cfg, tokenizer, table).to(device).eval()
    backbone = open_backbone(args, data_dir, device)
    if backbone.feat_dim != feature_dim(table):
        raise ConfigError(
            f"--backbone gives {backbone.feat_dim}-d features, and the captioner was trained on "
            f"{feature_dim(table)}-d ones ({data_dir}): give the backbone that extracted them"
        )
    collate = image_collate(cfg)

    # Batches of images: features, then the beam search of evaluation (recipes/xe.py `decode`).
    captions: list[str] = []
    for start in range(0, len(paths), args.batch_size):
        chunk = paths[start : start + args.batch_size]
        images = [load_image(path) for path in chunk]  # BadImageError names an unreadable file
        regions = backbone(images)
        batch = collate([{"index": k, "image_id": k, **r} for k, r in enumerate(regions)])
        with torch.no_grad():
            enc = model.encode(
                batch["features"].to(device),
                batch["boxes"].to(device),
                batch["region_mask"].to(device),
            )
            sequences = beam_search(
                model,
                enc,
                beam_size=cfg.decode.beam_size,
                max_len=cfg.decode.max_len,
                length_norm=float(cfg.decode.length_norm),
            ).sequences
        captions += tokenizer.batch_decode(sequences.tolist(), skip_special_tokens=True)

    results = [{"image": str(path), "caption": text} for path, text in zip(paths, captions)]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1) + "\n")
    print_table(results, weights=cfg.model.weights, output=args.output)
    return results


def print_table(results: list[dict[str, str]], *, weights: str, output: Path) -> None:
    width = min(max(len(r["image"]) for r in results), 60)
    print(f"{'image':<{width}}  caption")
    for row in results:
        name = row["image"] if len(row["image"]) <= width else "..." + row["image"][-width + 3 :]
        print(f"{name:<{width}}  {row['caption']}")
    print(f"({len(results)} captions by {weights}, written to {output})", file=sys.stderr)


if __name__ == "__main__":
    launch(main, 1, args=(args,))
