"""Converter machinery shared by every source, and the Karpathy-split converter.

Annotations are read and checked first (fast failure), then each split's images are streamed
from the feature reader into Arrow shards in bounded-memory chunks, under a temporary name that
is renamed into place only when everything (tables, tokenizer, `meta.json`) is written.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..progress import progress_bar
from .errors import (
    DataError,
    EmptyCaptionError,
    FeatureShapeError,
    UnknownSplitError,
)
from .features import (
    FeatureReader,
    RegionFeatures,
    check_regions,
    location_features,
    open_features,
)
from .store import (
    SplitWriter,
    atomic_directory,
    finish_dataset_dict,
    image_table_features,
    vcr_table_features,
)
from .tokenizer import (
    build_word_vocab,
    karpathy_tokenize,
    load_bert_vocab,
    save_tokenizer,
    train_wordpiece,
)

logger = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
WIDTH_PROBE_IMAGES = 5  # images read up front to infer the feature width by majority


@dataclass
class ImageEntry:
    """One image to convert: ids, feature key, (normalised, raw) captions and, where the
    annotations name it, the image file (relative to the images folder)."""

    image_id: int
    key: str
    captions: list[str] = field(default_factory=list)
    raw_captions: list[str] = field(default_factory=list)
    file: str = ""


def normalise_caption(text: str, where: str) -> str:
    """Karpathy-normalised caption, or EmptyCaptionError naming the file and sample."""
    tokens = karpathy_tokenize(text)
    if not tokens:
        raise EmptyCaptionError(f"{where}: caption {text!r} is empty after tokenisation")
    return " ".join(tokens)


class RegionColumns:
    """Image-table region columns from a feature reader, checked image by image."""

    def __init__(
        self, reader: FeatureReader, *, feat_dim: int | None = None, keep_cls_prob: bool = True
    ) -> None:
        self.reader = reader
        self.feat_dim = feat_dim
        self.keep_cls_prob = keep_cls_prob
        self.cls_dim: int | None = None
        self._why = " as set by --feat-dim" if feat_dim else ""
        self._probed: dict[str, RegionFeatures] = {}
        self._warned: set[str] = set()

    def probe(self, keys: Sequence[str]) -> None:
        """Fix the feature width from the first few images (unless given) and the cls_prob width
        from the first.

        The width is the one a strict majority of `keys` share, so a first image of the wrong
        width is named as the odd one out rather than the correct image after it; with no
        majority the user is asked for `--feat-dim`. Probed images are kept for `__call__`.
        """
        keys = list(dict.fromkeys(keys))
        for key in keys:
            where = self._where(key)
            self._probed[key] = check_regions(
                self.reader.read(key), where, self.feat_dim, self._why
            )
        first = self._probed[keys[0]]
        if self.keep_cls_prob and first.cls_prob is not None:
            self.cls_dim = first.cls_prob.shape[1]
        if self.feat_dim:
            return
        widths = {key: regions.features.shape[1] for key, regions in self._probed.items()}
        width, count = Counter(widths.values()).most_common(1)[0]
        if 2 * count <= len(widths):
            found = ", ".join(f"{self._where(key)} has {dim}" for key, dim in widths.items())
            raise FeatureShapeError(
                f"cannot tell the feature width: the first {len(widths)} images disagree "
                f"({found}); pass --feat-dim to say which width is right"
            )
        self.feat_dim = width
        self._why = (
            f"; {width} is the width of {count} of the first {len(widths)} images"
            " (pass --feat-dim to set the width)"
        )
        for key in keys:  # names the first odd image, with the reason
            check_regions(self._probed[key], self._where(key), self.feat_dim, self._why)

    def _where(self, key: str) -> str:
        return self.reader.locate(key)

    def _warn_once(self, what: str, message: str) -> None:
        if what not in self._warned:
            self._warned.add(what)
            logger.warning(message)

    def __call__(self, key: str) -> dict[str, Any]:
        where = self._where(key)
        regions = self._probed.pop(key, None)
        if regions is None:
            regions = self.reader.read(key)
        regions = check_regions(regions, where, self.feat_dim, self._why)
        num = regions.features.shape[0]
        width, height = regions.image_w, regions.image_h
        if regions.boxes is None:
            self._warn_once("boxes", f"{self.reader.source} has no boxes: location features are 0")
            boxes = np.zeros((num, 5), dtype=np.float32)
        else:
            if not width or not height:
                self._warn_once(
                    "size",
                    f"{self.reader.source} has no image sizes: boxes are normalised by their extent",
                )
                width = float(max(regions.boxes[:, 2].max(), 1.0))
                height = float(max(regions.boxes[:, 3].max(), 1.0))
            boxes = location_features(regions.boxes, width, height)
        row = {
            "image_key": key,
            "image_w": int(width or 0),
            "image_h": int(height or 0),
            "num_regions": num,
            "features": regions.features,
            "boxes": boxes,
        }
        if self.cls_dim is not None:
            if regions.cls_prob is None or regions.cls_prob.shape[1] != self.cls_dim:
                got = None if regions.cls_prob is None else regions.cls_prob.shape
                raise FeatureShapeError(
                    f"{where}: cls_prob has shape {got}, expected ({num}, {self.cls_dim})"
                )
            row["cls_prob"] = regions.cls_prob
        return row


def _write_images(
    directory: Path,
    split: str,
    entries: Sequence[ImageEntry],
    regions: RegionColumns,
    dtype: str,
    captions: bool,
    progress: bool,
    chunk_bytes: int,
) -> list[int]:
    """Write one image table; returns the region count of every row."""
    assert regions.feat_dim is not None
    schema = image_table_features(
        regions.feat_dim, dtype=dtype, cls_dim=regions.cls_dim, captions=captions
    )
    writer = SplitWriter(directory / split, schema, split=split, chunk_bytes=chunk_bytes)
    counts = []
    for entry in progress_bar(entries, desc=f"{split} images", unit="img", main_process=progress):
        row = {"image_id": entry.image_id, **regions(entry.key)}
        if captions:
            row.update(captions=entry.captions, raw_captions=entry.raw_captions)
        writer.add(row)
        counts.append(row["num_regions"])
    writer.close()
    return counts


def check_tagged_regions(
    table: str, rows: Iterable[Mapping[str, Any]], region_counts: Sequence[int]
) -> None:
    """VCR tags index regions: every question's objects must have a region each."""
    for row in rows:
        have = region_counts[row["image_row"]]
        if len(row["objects"]) > have:
            raise FeatureShapeError(
                f"{table} question {row['annot_id']}: {len(row['objects'])} objects but image "
                f"{row['image_key']!r} has {have} regions; tags index regions, so the features "
                "must start with one region per annotated object"
            )


# ----------------------------------------------------------------------------- Karpathy
def read_karpathy(path: str | Path, feature_key: str = "auto") -> dict[str, list[ImageEntry]]:
    """Images per split from `dataset_coco.json`-style files; restval is folded into train."""
    path = Path(path)
    if not path.is_file():
        state = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise DataError(f"annotation file {path} {state}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path}: not a UTF-8 JSON file ({err.reason} at byte {err.start})"
        ) from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{path}: expected an object with an 'images' list (Karpathy split JSON)")
    splits: dict[str, list[ImageEntry]] = {name: [] for name in SPLITS}
    for position, image in enumerate(data["images"]):
        if not isinstance(image, dict):
            raise DataError(f"{path}: images[{position}] is {image!r:.40}, expected an object")
        name = f"image {image.get('filename', position)!r} (imgid {image.get('imgid')})"
        split = {"restval": "train"}.get(image.get("split"), image.get("split"))
        if split not in splits:
            raise UnknownSplitError(
                f"{path}: {name} has split {image.get('split')!r}; "
                "expected train, val, test or restval"
            )
        entry = ImageEntry(_karpathy_id(image, position, f"{path}: {name}"), "")
        entry.key = _karpathy_key(image, feature_key, f"{path}: {name}")
        if image.get("filename"):
            entry.file = str(Path(str(image.get("filepath") or "")) / str(image["filename"]))
        sentences = image.get("sentences", [])
        if not isinstance(sentences, list):
            raise DataError(f"{path}: {name} has 'sentences' {sentences!r:.40}, expected a list")
        for k, sentence in enumerate(sentences):
            where = f"{path}: {name} sentence {k}"
            text = _karpathy_text(sentence, where)
            entry.captions.append(normalise_caption(text, where))
            entry.raw_captions.append(str(sentence.get("raw", text)))
        if not entry.captions:
            raise EmptyCaptionError(f"{path}: {name} has no sentences")
        splits[split].append(entry)
    return {name: entries for name, entries in splits.items() if entries}


def _karpathy_text(sentence: Any, where: str) -> str:
    """A sentence's text: its tokens joined, else its raw string."""
    if not isinstance(sentence, dict):
        raise DataError(f"{where} is {sentence!r:.40}, expected an object with 'tokens' or 'raw'")
    tokens = sentence.get("tokens")
    if tokens:
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise DataError(f"{where}: 'tokens' is {tokens!r:.40}, expected a list of strings")
        return " ".join(tokens)
    return str(sentence.get("raw", ""))


def _karpathy_id(image: Mapping[str, Any], position: int, where: str) -> int:
    value = image.get("cocoid", image.get("imgid", position))
    try:
        return int(value)
    except (TypeError, ValueError):
        key = "cocoid" if "cocoid" in image else "imgid"
        raise DataError(f"{where}: {key} {value!r:.40} is not an integer") from None


def _karpathy_key(image: Mapping[str, Any], feature_key: str, where: str) -> str:
    key = feature_key
    if key == "auto":
        key = "cocoid" if "cocoid" in image else "filename"
    if key not in image:
        wanted = "'cocoid' or 'filename'" if feature_key == "auto" else repr(key)
        raise DataError(f"{where} has no {wanted} to name its feature file (see --feature-key)")
    if key == "filename":
        return Path(str(image["filename"])).stem
    return str(image[key])


def _train_texts(entries: Iterable[ImageEntry]) -> list[str]:
    return [caption for entry in entries for caption in entry.captions]


def convert_images(
    output: str | Path,
    splits: Mapping[str, Sequence[ImageEntry]],
    features: str | Path | Sequence[str | Path],
    *,
    kind: str,
    tokenizer: Any,
    extra_tables: Mapping[str, Sequence[dict[str, Any]]] | None = None,
    extra_tokenizers: Mapping[str, Any] | None = None,
    captions: bool = True,
    feature_format: str = "auto",
    tsv_fields: Sequence[str] = (),
    feat_dim: int | None = None,
    dtype: str = "float32",
    keep_cls_prob: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    chunk_bytes: int = 64 * 2**20,
    meta: Mapping[str, Any] | None = None,
    regions: RegionColumns | None = None,
) -> Path:
    """Shared tail of every converter: image tables, extra (VCR) tables, tokenizers, meta.

    `splits` maps split names to the images to write; the result is renamed into `output`
    only when all of it is written and loads back. `regions` replaces the feature files
    (`features` is then unused): the columns of features extracted beforehand.
    """
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be float32 or float16, got {dtype!r}")
    output = Path(output)
    if not any(splits.values()):
        raise DataError(f"no images to convert into {output}")
    with atomic_directory(output, if_exists="replace" if overwrite else "error") as tmp:
        if regions is None:
            reader = open_features(features, feature_format, tsv_fields)
            regions = RegionColumns(reader, feat_dim=feat_dim, keep_cls_prob=keep_cls_prob)
            keys = (entry.key for entries in splits.values() for entry in entries)
            regions.probe(list(itertools.islice(keys, WIDTH_PROBE_IMAGES)))
        counts, region_counts = {}, {}
        for split, entries in splits.items():
            region_counts[split] = _write_images(
                tmp, split, entries, regions, dtype, captions, progress, chunk_bytes
            )
            counts[split] = len(region_counts[split])
        for name, rows in (extra_tables or {}).items():
            check_tagged_regions(name, rows, region_counts[name.removeprefix("vcr_")])
            writer = SplitWriter(tmp / name, vcr_table_features(), split=name)
            for row in rows:
                writer.add(row)
            counts[name] = writer.close()
        save_tokenizer(tokenizer, tmp / "tokenizer")
        for name, extra in (extra_tokenizers or {}).items():
            save_tokenizer(extra, tmp / name)
        info = {
            "kind": kind,
            "features": regions.reader.source,
            "feature_format": type(regions.reader).__name__,
            "feat_dim": regions.feat_dim,
            "dtype": dtype,
            "cls_dim": regions.cls_dim,
            "num_rows": counts,
            "vocab_size": len(tokenizer),
            **(meta or {}),
        }
        finish_dataset_dict(tmp, list(counts), info)
    return output


def convert_karpathy(
    annotations: str | Path,
    features: str | Path | Sequence[str | Path],
    output: str | Path,
    *,
    min_count: int = 5,
    feature_key: str = "auto",
    wordpiece_size: int | None = None,
    **options: Any,
) -> Path:
    """Karpathy JSON + features -> image tables train/val/test with captions, word vocab in
    `tokenizer/` (and a WordPiece in `wordpiece/` when `wordpiece_size` is given)."""
    splits = read_karpathy(annotations, feature_key)
    train_text = _train_texts(splits.get("train", []))
    extra = {}
    if wordpiece_size:
        extra["wordpiece"] = train_wordpiece(train_text, vocab_size=wordpiece_size)
    meta = {"annotations": str(annotations), "min_count": min_count, "feature_key": feature_key}
    return convert_images(
        output,
        splits,
        features,
        kind="karpathy",
        tokenizer=build_word_vocab(train_text, min_count=min_count),
        extra_tokenizers=extra,
        meta=meta,
        **options,
    )


def bert_tokenizer(vocab: str | Path | None, texts: list[str], wordpiece_size: int) -> Any:
    """The user's BERT `vocab.txt` when given, else a WordPiece trained on `texts`."""
    if vocab is not None:
        return load_bert_vocab(vocab)
    return train_wordpiece(texts, vocab_size=wordpiece_size)
