"""Image-text pairs for pretraining (TSV `image<TAB>caption` or JSONL) with region features.

Captions are grouped per image (a Flickr-style `name.jpg#3` names image `name`), Karpathy-
normalised and checked; the output is image tables with captions and a WordPiece tokenizer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .converters import SPLITS, ImageEntry, bert_tokenizer, convert_images, normalise_caption
from .errors import DataError, MalformedLineError, UnknownSplitError

_CAPTION_INDEX = re.compile(r"#\d+$")
_IMAGE_SUFFIX = re.compile(r"\.(jpe?g|png|gif|bmp)$", re.IGNORECASE)


def pair_key(image: str) -> str:
    """Feature key of an image name: Flickr-style `name.jpg#3` becomes `name`."""
    return _IMAGE_SUFFIX.sub("", _CAPTION_INDEX.sub("", image.strip()))


def annotation_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 annotation file, a leading byte-order mark dropped.

    Lines are decoded one by one so that a file in another encoding fails on the line at fault
    as a MalformedLineError, not as a UnicodeDecodeError somewhere in a buffer.
    """
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as err:
                utf16 = line_no == 1 and raw[:2] in (b"\xff\xfe", b"\xfe\xff")
                reason = "it looks like UTF-16" if utf16 else f"{err.reason} at byte {err.start}"
                raise MalformedLineError(
                    f"{path}:{line_no}: not UTF-8 ({reason}); save the file as UTF-8"
                ) from None
            yield line_no, text


def _field(item: Mapping[str, Any], names: Sequence[str]) -> tuple[str, Any]:
    """The first of `names` present in `item` and its value; (names[0], None) if none is."""
    for name in names:
        if name in item:
            return name, item[name]
    return names[0], None


def _jsonl_pair(line: str, where: str) -> tuple[str, str]:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as err:
        raise MalformedLineError(
            f"{where}: malformed JSON line ({err.msg}); expected one JSON object per line"
        ) from None
    if not isinstance(item, dict):
        raise MalformedLineError(
            f"{where}: expected a JSON object with 'image_id' and 'caption' keys, "
            f"got {type(item).__name__}"
        )
    image_field, image = _field(item, ("image_id", "image"))
    caption_field, caption = _field(item, ("caption", "text"))
    if image_field not in item or caption_field not in item:
        raise MalformedLineError(
            f"{where}: expected 'image_id' and 'caption' keys (or 'image' and 'text'), "
            f"got {sorted(item)}"
        )
    if isinstance(image, bool) or not isinstance(image, (str, int)):
        raise MalformedLineError(
            f"{where}: {image_field} is {image!r:.40}, expected a string or integer naming the "
            "image's features"
        )
    if not isinstance(caption, str):
        raise MalformedLineError(f"{where}: {caption_field} is {caption!r:.40}, expected a string")
    return str(image), caption


def read_pairs(path: str | Path) -> list[tuple[int, str, str]]:
    """(line number, image name, caption) from a TSV (`image<TAB>caption`) or JSONL file."""
    path = Path(path)
    rows = []
    jsonl = path.suffix.lower() in (".jsonl", ".json")
    for line_no, line in annotation_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        if jsonl:
            image, caption = _jsonl_pair(line, where)
        else:
            parts = line.rstrip("\r\n").split("\t", 1)
            if len(parts) != 2:
                raise MalformedLineError(f"{where}: expected 'image<TAB>caption'")
            if line_no == 1 and parts[0].strip().lower() in ("image_id", "image"):
                continue  # header
            image, caption = parts
            if caption.strip().startswith(("http://", "https://")):
                raise MalformedLineError(
                    f"{where}: the second column is a URL: this looks like Conceptual Captions' "
                    "`caption<TAB>url` file; give `image<TAB>caption` lines, the image named as "
                    "its features are (recipes/pretrain.yaml shows the command)"
                )
        if not pair_key(image):
            raise MalformedLineError(
                f"{where}: image name {image!r:.40} is empty; expected e.g. '1000268201.jpg#0'"
            )
        rows.append((line_no, image, caption))
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
    if not entries:
        raise DataError(
            f"{path}: no image-caption pairs; expected 'image<TAB>caption' lines (TSV) "
            "or one JSON object per line (.jsonl)"
        )
    if all(e.key.isdigit() for e in entries):
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
