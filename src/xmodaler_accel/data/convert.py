"""Command line: `python -m xmodaler_accel.data.convert {karpathy,xmodaler,vcr,pairs,images,synthetic}`.

Examples:
    python -m xmodaler_accel.data.convert karpathy --annotations dataset_coco.json \\
        --features mscoco/features/up_down --output data/coco --min-count 5 --float16
    python -m xmodaler_accel.data.convert karpathy --annotations dataset_flickr30k.json \\
        --features trainval/flickr30k_resnet101_faster_rcnn_genome.tsv.* --output data/f30k
    python -m xmodaler_accel.data.convert xmodaler --annotations mscoco_dataset \\
        --features mscoco_dataset/features/up_down --output data/coco_xmodaler
    python -m xmodaler_accel.data.convert vcr --annotations vcr1annots/train.jsonl \\
        vcr1annots/val.jsonl --features vcr_features.h5 --vocab bert-base-uncased/vocab.txt \\
        --output data/vcr
    python -m xmodaler_accel.data.convert pairs --pairs train=cc_train.tsv val=cc_val.tsv \\
        --features cc_features/ --output data/cc
    python -m xmodaler_accel.data.convert images --images coco/images \\
        --annotations dataset_coco.json --backbone google/vit-base-patch16-224 --output data/coco_vit
    torchrun --nproc_per_node 8 -m xmodaler_accel.data.convert images ...   (8 GPUs, 8 shards)
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from . import xmodaler
from .converters import convert_karpathy
from .errors import DataError
from .image_folder import convert_image_folder
from .pairs import convert_pairs
from .synthetic import synthetic_dir
from .vcr import VCR_IMAGE_KEYS, convert_vcr

# What each input needs, shown by `<command> --help` (the region features are common to all).
FEATURES_HELP = """region features (--features), one entry per image, named by the image's key:
  folder of .npz     <key>.npz with arrays features [N, D] (required), boxes [N, 4] (pixels
                     x1 y1 x2 y2), image_h, image_w, cls_prob [N, C] (optional); a single-array
                     npz holds features only (X-modaler's up_down folders)
  bottom-up TSV      columns image_id image_w image_h num_boxes boxes features (base64
                     float32; other orders: --tsv-fields), cls_prob optional; several files ok
  HDF5 (.h5/.hdf5)   datasets <key>_features, <key>_boxes, <key>_cls_prob (meshed-memory), or
                     one group <key> holding features, boxes, ...
--float16 halves the disk size (COCO's 123k images x 50 x 2048 regions: ~25 GB instead of ~50)."""

COMMAND_HELP = {
    "karpathy": """Karpathy split JSON (dataset_coco.json / dataset_flickr30k.json) + region features.

annotations: {"images": [{"split": "train|restval|val|test", "sentences": [{"tokens": [...],
  "raw": "..."}], "cocoid": 391895, "filename": "COCO_val2014_000000391895.jpg", ...}]};
  restval joins train. The image's feature key is its cocoid when present, else the file name
  without extension (--feature-key to choose).

example:
  python -m xmodaler_accel.data.convert karpathy --annotations dataset_coco.json \\
      --features mscoco/features/up_down --output data/coco --min-count 5 --float16""",
    "xmodaler": """X-modaler's own data folder (what its configs read) + its npz features.

annotations: a folder with mscoco_caption_anno_{train,val,test}.pkl (lists of {image_id,
  tokens_ids, target_ids}), vocabulary.txt (one word per line) and, for val/test scoring,
  captions_{val,test}5k.json (COCO format). Features: <image_id>.npz as X-modaler reads them.

example:
  python -m xmodaler_accel.data.convert xmodaler --annotations mscoco_dataset \\
      --features mscoco_dataset/features/up_down --output data/coco_xmodaler""",
    "vcr": """VCR's train/val/test.jsonl + region features of its images.

annotations: one JSON object per line with question, answer_choices, rationale_choices (token
  lists where [i] names detection i), objects (class names), img_fn ("lsmdc_.../x.jpg"),
  answer_label and rationale_label (train/val). The feature key is img_fn without extension
  (--image-key basename: its file name alone; img_id: the img_id field).
  --vocab: BERT's vocab.txt (bert-base-uncased) so that pretrained weights fit.

example:
  python -m xmodaler_accel.data.convert vcr --annotations vcr1annots/train.jsonl \\
      vcr1annots/val.jsonl --features vcr_features.h5 --vocab bert-base-uncased/vocab.txt \\
      --output data/vcr""",
    "pairs": """Image-text pairs (retrieval, pretraining) + region features.

--pairs SPLIT=FILE: a TSV of image<TAB>caption lines (an optional header image_id<TAB>caption),
  or a .jsonl file of {"image_id": ..., "caption": ...} objects. Several captions of one image
  are grouped. The feature key is the image name without extension and Flickr's "#n"
  (1000268201.jpg#0 -> 1000268201). Conceptual Captions' Google TSVs are caption<TAB>url: see
  recipes/pretrain.yaml for the one-line conversion.

example:
  python -m xmodaler_accel.data.convert pairs --pairs train=cc_train.tsv val=cc_val.tsv \\
      --features cc/features/up_down --vocab bert-base-uncased/vocab.txt --output data/cc""",
    "images": """A folder of images + captions -> grid features from a vision backbone.

--images: the folder holding the image files (JPEG, PNG, ...; EXIF orientation is applied).
captions, one of:
  --annotations  Karpathy split JSON as for `karpathy`; an image's file is
                 <images>/<filepath>/<filename>, else <images>/<filename>
  --pairs        SPLIT=FILE as for `pairs`; the image column names the file in <images>
                 (1000268201.jpg#0 -> 1000268201.jpg; a name without suffix tries .jpg, .png, ...)
--backbone: a transformers vision model as a local folder or hub name (AutoModel +
  AutoImageProcessor; the user's cache is used, nothing forces a download): ViT, DINOv2, the
  vision tower of CLIP or SigLIP, ... Its patch tokens are the regions, the patch cells their
  boxes; --global-feature puts the pooled (or CLS) token first, its box the whole image.
Extraction runs in chunks of --chunk-images written to <output>.partial/: a killed run
continues where it stopped when rerun with the same arguments. Under `accelerate launch` or
`torchrun` each process extracts a share of the chunks (bfloat16 on GPUs by default).
An unreadable image is an error naming it; --skip-bad leaves it out (named in a warning and in
meta.json's skipped_images).

example:
  python -m xmodaler_accel.data.convert images --images coco/images \\
      --annotations dataset_coco.json --backbone facebook/dinov2-base --output data/coco_dino""",
}

BACKBONE_HELP = """store: image tables train/val/test (features [N, D] = patch tokens, boxes [N, 5] = patch
cells), tokenizer/ as the karpathy and pairs converters make it, meta.json naming the backbone.
--float16 halves the disk size (ViT-B/16 at 224 px: 196 x 768 regions, ~300 kB an image)."""


def _command(commands: Any, name: str, summary: str) -> argparse.ArgumentParser:
    return commands.add_parser(
        name,
        help=summary,
        description=COMMAND_HELP[name],
        epilog=FEATURES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", required=True, type=Path, help="dataset directory to create")
    parser.add_argument(
        "--features",
        required=True,
        nargs="+",
        help="folder of per-image .npz, bottom-up .tsv file(s), or an .h5/.hdf5 file",
    )
    parser.add_argument("--feature-format", default="auto", choices=["auto", "npz", "tsv", "hdf5"])
    parser.add_argument(
        "--tsv-fields",
        nargs="+",
        default=(),
        help="column names of a bottom-up TSV (default: image_id image_w image_h num_boxes "
        "boxes features); base64 arrays: boxes, features, cls_prob",
    )
    parser.add_argument("--feat-dim", type=int, default=None, help="expected feature width")
    parser.add_argument("--float16", action="store_true", help="store features as float16")
    parser.add_argument("--no-cls-prob", action="store_true", help="drop cls_prob if present")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--chunk-mb", type=int, default=64, help="rows buffered per write (MiB)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _bert(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vocab", type=Path, default=None, help="existing BERT vocab.txt")
    parser.add_argument("--wordpiece-size", type=int, default=8000, help="WordPiece vocab size")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m xmodaler_accel.data.convert",
        description="Convert datasets to memory-mapped Arrow tables (datasets.load_from_disk).",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    karpathy = _command(commands, "karpathy", "Karpathy split JSON + region features")
    karpathy.add_argument("--annotations", required=True, type=Path, help="dataset_coco.json")
    karpathy.add_argument("--min-count", type=int, default=5, help="vocabulary minimum count")
    karpathy.add_argument(
        "--feature-key",
        default="auto",
        choices=["auto", "cocoid", "imgid", "filename"],
        help="what names an image's features (auto: cocoid if present, else filename stem)",
    )
    karpathy.add_argument("--wordpiece-size", type=int, default=None, help="also train WordPiece")
    _common(karpathy)
    xmodaler.add_parser(commands, _common, partial(_command, name="xmodaler"))

    vcr = _command(commands, "vcr", "VCR train/val/test.jsonl + region features")
    vcr.add_argument("--annotations", required=True, nargs="+", type=Path)
    vcr.add_argument("--image-key", default="img_fn", choices=list(VCR_IMAGE_KEYS))
    _bert(vcr)
    _common(vcr)

    pairs = _command(commands, "pairs", "image-text pairs (TSV or JSONL) + features")
    pairs.add_argument(
        "--pairs", required=True, nargs="+", help="SPLIT=PATH (or PATH alone for train)"
    )
    _bert(pairs)
    _common(pairs)

    _images_command(commands)

    synthetic = commands.add_parser("synthetic", help="build the synthetic scenes dataset")
    synthetic.add_argument("--output", type=Path, default=None, help="cache directory")
    synthetic.add_argument("--seed", type=int, default=0)
    synthetic.add_argument("--feat-dim", type=int, default=256)
    synthetic.add_argument("--num-train", type=int, default=4000)
    synthetic.add_argument("--num-val", type=int, default=500)
    synthetic.add_argument("--num-test", type=int, default=500)
    synthetic.add_argument("--float16", action="store_true")
    synthetic.add_argument("--rebuild", action="store_true")
    return parser


def _images_command(commands: Any) -> None:
    images = commands.add_parser(
        "images",
        help="folder of images + captions -> backbone grid features",
        description=COMMAND_HELP["images"],
        epilog=BACKBONE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    images.add_argument("--images", required=True, type=Path, help="folder of image files")
    captions = images.add_mutually_exclusive_group(required=True)
    captions.add_argument("--annotations", type=Path, help="Karpathy split JSON")
    captions.add_argument("--pairs", nargs="+", help="SPLIT=PATH (or PATH alone for train)")
    images.add_argument("--backbone", required=True, help="transformers vision model (dir/name)")
    images.add_argument("--output", required=True, type=Path, help="dataset directory to create")
    images.add_argument(
        "--global-feature", action="store_true", help="the pooled token first, as a region"
    )
    images.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="forward precision (auto: bfloat16 on CUDA, else float32)",
    )
    images.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    images.add_argument("--chunk-images", type=int, default=256, help="images per resumable chunk")
    images.add_argument("--workers", type=int, default=4, help="image decoding processes")
    images.add_argument("--skip-bad", action="store_true", help="leave unreadable images out")
    images.add_argument("--min-count", type=int, default=5, help="vocabulary minimum (Karpathy)")
    images.add_argument(
        "--feature-key",
        default="auto",
        choices=["auto", "cocoid", "imgid", "filename"],
        help="what names an image (Karpathy; auto: cocoid if present, else filename stem)",
    )
    images.add_argument("--vocab", type=Path, default=None, help="BERT vocab.txt (pairs)")
    images.add_argument(
        "--wordpiece-size",
        type=int,
        default=None,
        help="WordPiece vocab size (pairs: 8000 by default; Karpathy: also train one)",
    )
    images.add_argument("--float16", action="store_true", help="store features as float16")
    images.add_argument("--overwrite", action="store_true", help="replace an existing output")
    images.add_argument("--chunk-mb", type=int, default=64, help="rows buffered per write (MiB)")
    images.add_argument("--quiet", action="store_true", help="no progress bars")


def _run_images(args: argparse.Namespace) -> Path:
    pairs = _split_paths(args.pairs) if args.pairs else None
    flag = "--pairs" if pairs else "--annotations"
    _check_annotations(list(pairs.values()) if pairs else [args.annotations], flag)
    return convert_image_folder(
        args.images,
        args.output,
        backbone=args.backbone,
        annotations=args.annotations,
        pairs=pairs,
        min_count=args.min_count,
        feature_key=args.feature_key,
        vocab=args.vocab,
        wordpiece_size=args.wordpiece_size,
        global_feature=args.global_feature,
        precision=args.precision,
        batch_size=args.batch_size,
        chunk_images=args.chunk_images,
        workers=args.workers,
        skip_bad=args.skip_bad,
        dtype="float16" if args.float16 else "float32",
        overwrite=args.overwrite,
        progress=not args.quiet,
        chunk_bytes=args.chunk_mb * 2**20,
    )


def _options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "feature_format": args.feature_format,
        "tsv_fields": tuple(args.tsv_fields),
        "feat_dim": args.feat_dim,
        "dtype": "float16" if args.float16 else "float32",
        "keep_cls_prob": not args.no_cls_prob,
        "overwrite": args.overwrite,
        "progress": not args.quiet,
        "chunk_bytes": args.chunk_mb * 2**20,
    }


def _split_paths(values: Sequence[str]) -> dict[str, Path]:
    out = {}
    for value in values:
        split, sep, path = value.partition("=")
        out[split if sep else "train"] = Path(path if sep else value)
    return out


def _check_annotations(paths: Sequence[Path], flag: str) -> None:
    """A missing or misnamed annotation file is a one-line error before any work."""
    for path in paths:
        if not path.is_file():
            state = "is a folder, not a file" if path.is_dir() else "no such file"
            raise DataError(f"{flag} {path}: {state}")


def run(args: argparse.Namespace) -> Path:
    if args.command == "synthetic":
        return synthetic_dir(
            args.output,
            rebuild=args.rebuild,
            seed=args.seed,
            feat_dim=args.feat_dim,
            num_train=args.num_train,
            num_val=args.num_val,
            num_test=args.num_test,
            dtype="float16" if args.float16 else "float32",
        )
    if args.command == "xmodaler":
        return xmodaler.run(args, _options(args))
    if args.command == "images":
        return _run_images(args)
    features = args.features[0] if len(args.features) == 1 else args.features
    if args.command == "pairs":
        _check_annotations(list(_split_paths(args.pairs).values()), "--pairs")
    else:
        annotations = args.annotations if args.command == "vcr" else [args.annotations]
        _check_annotations(annotations, "--annotations")
    if args.command == "karpathy":
        return convert_karpathy(
            args.annotations,
            features,
            args.output,
            min_count=args.min_count,
            feature_key=args.feature_key,
            wordpiece_size=args.wordpiece_size,
            **_options(args),
        )
    bert = {"vocab": args.vocab, "wordpiece_size": args.wordpiece_size}
    if args.command == "vcr":
        return convert_vcr(
            args.annotations,
            features,
            args.output,
            image_key=args.image_key,
            **bert,
            **_options(args),
        )
    return convert_pairs(_split_paths(args.pairs), features, args.output, **bert, **_options(args))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; data errors print one line naming the file and sample, exit status 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        output = run(args)
    except (DataError, FileNotFoundError, FileExistsError) as err:
        message = " ".join(str(err).splitlines())  # one line, even for a library's message
        print(f"error: {message}", file=sys.stderr)
        return 2
    print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
