"""The `images` converter: a folder of images + captions -> the image tables the recipes read, with
grid features from a `transformers` vision backbone (data/backbone.py).

Captions come from a Karpathy split JSON (the image file is `filepath/filename`, or `filename`
alone) or from image-caption pairs (the image column names the file). Features are extracted
in resumable chunks (data/extraction.py), sharded over the processes of an Accelerate or
torchrun launch; the main process then writes the store, and the chunks are removed only once
the store is complete.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .converters import (
    SPLITS,
    ImageEntry,
    _train_texts,
    bert_tokenizer,
    convert_images,
    read_karpathy,
)
from .errors import DataError, UnknownSplitError
from .extraction import (
    ChunkRegions,
    ExtractionPlan,
    extract_chunks,
    process_state,
    remove_work,
    resolve_precision,
)
from .pairs import _CAPTION_INDEX, group_pairs, pair_key, read_pairs
from .tokenizer import build_word_vocab, train_wordpiece

logger = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MISSING_SHOWN = 5  # missing files named in the error


def work_dir(output: str | Path) -> Path:
    """Where the chunks of an extraction into `output` wait for the store to be written."""
    output = Path(output)
    return output.parent / f"{output.name}.partial"


def _find_image(folder: Path, names: list[str]) -> Path:
    """The first of `names` (relative to `folder`) that exists, trying image suffixes for names
    without one; else the first name (reported as missing)."""
    candidates = []
    for name in filter(None, names):
        candidates.append(folder / name)
        if Path(name).suffix.lower() not in IMAGE_SUFFIXES:
            candidates += [folder / f"{name}{suffix}" for suffix in IMAGE_SUFFIXES]
    for path in candidates:
        if path.is_file():
            return path
    return candidates[0]


def image_files(folder: Path, splits: Mapping[str, list[ImageEntry]]) -> dict[str, Path]:
    """Image file of every key, in order of first appearance over the splits."""
    files: dict[str, Path] = {}
    for entries in splits.values():
        for entry in entries:
            if entry.key not in files:
                names = [entry.file, Path(entry.file).name, entry.key]
                files[entry.key] = _find_image(folder, names)
    return files


def _pairs_splits(pairs: Mapping[str, str | Path]) -> dict[str, list[ImageEntry]]:
    splits: dict[str, list[ImageEntry]] = {}
    for split, path in pairs.items():
        if split not in SPLITS:
            raise UnknownSplitError(f"{path}: unknown split {split!r}; expected train, val or test")
        entries = group_pairs(path, first_id=sum(map(len, splits.values())))
        by_key = {entry.key: entry for entry in entries}
        for _, image, _ in read_pairs(path):  # the file name, which group_pairs drops
            entry = by_key.get(pair_key(image))
            if entry is not None and not entry.file:
                entry.file = _CAPTION_INDEX.sub("", image.strip())
        splits[split] = entries
    return splits


def convert_image_folder(
    images: str | Path,
    output: str | Path,
    *,
    backbone: str | Path,
    annotations: str | Path | None = None,
    pairs: Mapping[str, str | Path] | None = None,
    min_count: int = 5,
    feature_key: str = "auto",
    vocab: str | Path | None = None,
    wordpiece_size: int | None = None,
    global_feature: bool = False,
    precision: str = "auto",
    batch_size: int = 64,
    chunk_images: int = 256,
    workers: int = 0,
    skip_bad: bool = False,
    dtype: str = "float32",
    overwrite: bool = False,
    progress: bool = True,
    chunk_bytes: int = 64 * 2**20,
) -> Path:
    """Images + Karpathy JSON (`annotations`) or pairs (`pairs`, split -> file) -> image tables
    with backbone grid features. Every process of a launch calls it; the main one writes the
    store. Karpathy captions get a word vocabulary (`min_count`, optional WordPiece), pairs a
    WordPiece (or BERT's `vocab`), as the karpathy and pairs converters do."""
    images, output = Path(images), Path(output)
    if (annotations is None) == (pairs is None):
        raise ValueError("give either annotations (Karpathy JSON) or pairs")
    if not images.is_dir():
        raise DataError(f"--images {images}: not a folder")
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} already exists; pass overwrite to replace it")
    if annotations is not None:
        splits = read_karpathy(annotations, feature_key)
        meta: dict[str, Any] = {"annotations": str(annotations), "min_count": min_count}
    else:
        assert pairs is not None
        splits = _pairs_splits(pairs)
        meta = {"annotations": {s: str(p) for s, p in pairs.items()}, "vocab": str(vocab or "")}
    files = image_files(images, splits)
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing and not skip_bad:
        shown = ", ".join(missing[:MISSING_SHOWN])
        more = f" and {len(missing) - MISSING_SHOWN} more" if len(missing) > MISSING_SHOWN else ""
        raise DataError(
            f"{len(missing)} images not found in {images}: {shown}{more} "
            "(pass --skip-bad to leave them out)"
        )

    state = process_state()
    local = Path(backbone)
    plan = ExtractionPlan(
        files=[str(path) for path in files.values()],
        keys=list(files),
        backbone=str(local.resolve()) if local.is_dir() else str(backbone),
        global_feature=global_feature,
        precision=resolve_precision(precision, state.device),
        dtype=dtype,
        chunk_images=chunk_images,
    )
    work = work_dir(output)
    extract_chunks(
        plan, work, batch_size=batch_size, workers=workers, skip_bad=skip_bad, progress=progress
    )
    if state.is_main_process:
        regions = ChunkRegions(plan, work)
        splits, skipped = _leave_out_bad(regions, splits, skip_bad)
        train = splits.get("train", [])
        if annotations is not None:
            tokenizer = build_word_vocab(_train_texts(train), min_count=min_count)
            extra = {}
            if wordpiece_size:
                extra["wordpiece"] = train_wordpiece(_train_texts(train), vocab_size=wordpiece_size)
        else:
            raw = [text for entry in train for text in entry.raw_captions]
            tokenizer, extra = bert_tokenizer(vocab, raw, wordpiece_size or 8000), {}
        meta.update(
            images=str(images),
            features=plan.backbone,
            feature_format="backbone",
            backbone=plan.backbone,
            global_feature=plan.global_feature,
            precision=plan.precision,
            skipped_images=skipped,
        )
        convert_images(
            output,
            splits,
            None,
            kind="images",
            tokenizer=tokenizer,
            extra_tokenizers=extra,
            dtype=plan.dtype,
            overwrite=overwrite,
            progress=progress,
            chunk_bytes=chunk_bytes,
            meta=meta,
            regions=regions,
        )
        remove_work(work)
    state.wait_for_everyone()
    return output


def _leave_out_bad(
    regions: ChunkRegions, splits: Mapping[str, list[ImageEntry]], skip_bad: bool
) -> tuple[dict[str, list[ImageEntry]], dict[str, str]]:
    """The splits without the images that could not be read, and those images' reasons."""
    skipped = dict(regions.errors())
    if skipped and not skip_bad:  # chunks written by an earlier --skip-bad run
        key, reason = next(iter(skipped.items()))
        raise DataError(f"{reason} (image {key!r}); pass --skip-bad to leave it out")
    for key, reason in skipped.items():
        logger.warning("left out image %r: %s", key, reason)
    kept = {
        split: [entry for entry in entries if entry.key not in skipped]
        for split, entries in splits.items()
    }
    return {split: entries for split, entries in kept.items() if entries}, skipped
