"""Image-text pairs for pretraining (TSV `image<TAB>caption` or JSONL) with region features.

Captions are grouped per image (a Flickr-style `name.jpg#3` names image `name`), Karpathy-
normalised and checked; the output is image tables with captions and a WordPiece tokenizer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .converters import SPLITS, ImageEntry, bert_tokenizer, convert_images, normalise_caption
from .errors import MalformedLineError, UnknownSplitError

_CAPTION_INDEX = re.compile(r"#\d+$")
_IMAGE_SUFFIX = re.compile(r"\.(jpe?g|png|gif|bmp)$", re.IGNORECASE)


def pair_key(image: str) -> str:
    """Feature key of an image name: Flickr-style `name.jpg#3` becomes `name`."""
    return _IMAGE_SUFFIX.sub("", _CAPTION_INDEX.sub("", image.strip()))


def read_pairs(path: str | Path) -> list[tuple[int, str, str]]:
    """(line number, image name, caption) from a TSV (`image<TAB>caption`) or JSONL file."""
    path = Path(path)
    rows = []
    jsonl = path.suffix.lower() in (".jsonl", ".json")
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            if jsonl:
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as err:
                    raise MalformedLineError(f"{where}: malformed JSON line ({err.msg})") from None
                image = item.get("image_id", item.get("image")) if isinstance(item, dict) else None
                caption = item.get("caption", item.get("text")) if isinstance(item, dict) else None
                if image is None or caption is None:
                    raise MalformedLineError(f"{where}: expected 'image_id' and 'caption' keys")
            else:
                parts = line.rstrip("\r\n").split("\t", 1)
                if len(parts) != 2:
                    raise MalformedLineError(f"{where}: expected 'image<TAB>caption'")
                if line_no == 1 and parts[0].strip().lower() in ("image_id", "image"):
                    continue  # header
                image, caption = parts
            rows.append((line_no, str(image), str(caption)))
    return rows


def group_pairs(path: str | Path, first_id: int = 0) -> list[ImageEntry]:
    """Captions grouped per image in order of first appearance, normalised and checked.

    Images whose names are all numbers keep them as `image_id`; otherwise ids count up from
    `first_id` (the converter continues the count across splits so ids stay unique).
    """
    grouped: dict[str, ImageEntry] = {}
    for line_no, image, caption in read_pairs(path):
        key = pair_key(image)
        entry = grouped.setdefault(key, ImageEntry(first_id + len(grouped), key))
        entry.captions.append(normalise_caption(caption, f"{path}:{line_no} (image {key!r})"))
        entry.raw_captions.append(caption.strip())
    entries = list(grouped.values())
    if entries and all(e.key.isdigit() for e in entries):
        for entry in entries:
            entry.image_id = int(entry.key)
    return entries


def convert_pairs(
    pairs: Mapping[str, str | Path],
    features: str | Path | Sequence[str | Path],
    output: str | Path,
    *,
    vocab: str | Path | None = None,
    wordpiece_size: int = 8000,
    **options: Any,
) -> Path:
    """Image-text pairs (per split) + features -> image tables with grouped captions and a
    WordPiece `tokenizer/` (trained on the train captions, or loaded from `vocab`)."""
    splits: dict[str, list[ImageEntry]] = {}
    for split, path in pairs.items():
        if split not in SPLITS:
            raise UnknownSplitError(f"{path}: unknown split {split!r}; expected train, val or test")
        splits[split] = group_pairs(path, first_id=sum(map(len, splits.values())))
    texts = [raw for e in splits.get("train", []) for raw in e.raw_captions]
    meta = {"annotations": {s: str(p) for s, p in pairs.items()}, "vocab": str(vocab or "")}
    return convert_images(
        output,
        splits,
        features,
        kind="pairs",
        tokenizer=bert_tokenizer(vocab, texts, wordpiece_size),
        meta=meta,
        **options,
    )
