"""The VCR annotation format: parsing `train.jsonl` lines and expanding detection tags.

VCR writes a reference to detected objects inside the token list, e.g.
`["What", "is", [0], "doing", "?"]`, where `[0]` indexes `objects` (and the image's regions).
We store text as words plus a parallel tag list: the tag is the region index for a word that
stands for a detection (rendered as the object's class name) and -1 otherwise.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .converters import SPLITS, ImageEntry, bert_tokenizer, convert_images
from .errors import DataError, MalformedLineError, UnknownSplitError
from .pairs import annotation_lines

REQUIRED_KEYS = ("question", "answer_choices", "rationale_choices", "objects", "img_fn")
NUM_CHOICES = 4


def expand_tags(
    tokens: Sequence[str | Sequence[int]],
    objects: Sequence[str],
    where: str,
    field: str = "tokens",
) -> tuple[list[str], list[int]]:
    """VCR tokens to (words, tags); a tag list `[1, 2]` becomes 'name1 and name2'.

    `where` (file:line) and `field` (e.g. `answer_choices[2]`) name the tokens in errors.
    """
    if not isinstance(tokens, (list, tuple)):
        raise MalformedLineError(
            f"{where}: {field} is {tokens!r:.40}, expected a list of words and tag lists "
            'such as ["Why", "is", [0], "?"]'
        )
    words: list[str] = []
    tags: list[int] = []
    for token in tokens:
        if isinstance(token, str):
            words.append(token)
            tags.append(-1)
            continue
        if not isinstance(token, (list, tuple)) or not token:
            raise MalformedLineError(
                f"{where}: token {token!r:.40} is neither a word nor a tag list (in {field})"
            )
        for k, index in enumerate(token):
            if isinstance(index, bool) or not isinstance(index, int):
                raise MalformedLineError(
                    f"{where}: tag {index!r:.40} is not an object index (in {field})"
                )
            if not 0 <= index < len(objects):
                raise MalformedLineError(
                    f"{where}: tag {index!r} does not index the {len(objects)} objects (in {field})"
                )
            if k:
                words.append("and")
                tags.append(-1)
            words.append(objects[index])
            tags.append(index)
    return words, tags


def parse_vcr_line(line: str, path: str, line_no: int) -> dict[str, Any] | None:
    """One JSONL line as a dict with the required keys checked; None for a blank line."""
    if not line.strip():
        return None
    where = f"{path}:{line_no}"
    try:
        item = json.loads(line)
    except json.JSONDecodeError as err:
        raise MalformedLineError(
            f"{where}: malformed JSON line ({err.msg}); expected one JSON object per line"
        ) from None
    if not isinstance(item, dict):
        raise MalformedLineError(f"{where}: expected a JSON object, got {type(item).__name__}")
    missing = [key for key in REQUIRED_KEYS if key not in item]
    if missing:
        raise MalformedLineError(f"{where}: missing keys {missing}")
    for key in ("answer_choices", "rationale_choices"):
        if not isinstance(item[key], list):
            raise MalformedLineError(
                f"{where}: {key} is {item[key]!r:.40}, expected a list of {NUM_CHOICES} choices, "
                "each a list of words and tag lists"
            )
        if len(item[key]) != NUM_CHOICES:
            raise MalformedLineError(
                f"{where}: {key} has {len(item[key])} entries, expected {NUM_CHOICES}"
            )
    return item


def _label(item: Mapping[str, Any], key: str, where: str) -> int:
    """A choice index 0-3; -1 when the item has no label (VCR's test split)."""
    value = item.get(key)
    if value is None:
        return -1
    if isinstance(value, bool) or not isinstance(value, int) or not -1 <= value < NUM_CHOICES:
        raise MalformedLineError(
            f"{where}: {key} is {value!r:.40}, expected the index of the right choice "
            f"(0 to {NUM_CHOICES - 1}), or no {key} for an unlabelled item"
        )
    return value


def vcr_row(item: dict[str, Any], where: str) -> dict[str, Any]:
    """Question-table columns (without the image columns) from a parsed VCR item."""
    objects = item["objects"]
    if not isinstance(objects, list) or not all(isinstance(name, str) for name in objects):
        raise MalformedLineError(
            f"{where}: objects is {objects!r:.60}, expected a list of class names "
            'such as ["person", "dog"]'
        )
    question, question_tags = expand_tags(item["question"], objects, where, "question")
    answers = [
        expand_tags(choice, objects, where, f"answer_choices[{k}]")
        for k, choice in enumerate(item["answer_choices"])
    ]
    rationales = [
        expand_tags(choice, objects, where, f"rationale_choices[{k}]")
        for k, choice in enumerate(item["rationale_choices"])
    ]
    return {
        "annot_id": str(item.get("annot_id", where)),
        "question": question,
        "question_tags": question_tags,
        "answer_choices": [words for words, _ in answers],
        "answer_tags": [tags for _, tags in answers],
        "rationale_choices": [words for words, _ in rationales],
        "rationale_tags": [tags for _, tags in rationales],
        "answer_label": _label(item, "answer_label", where),
        "rationale_label": _label(item, "rationale_label", where),
        "objects": list(objects),
    }


VCR_IMAGE_KEYS = ("img_fn", "basename", "img_id")


def _vcr_key(item: Mapping[str, Any], image_key: str, where: str) -> str:
    """The feature key of an item's image, as `--image-key` says."""
    if image_key == "img_id":
        value = item.get("img_id")
        if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value):
            got = f"is {value!r:.40}" if "img_id" in item else "is missing"
            raise MalformedLineError(
                f"{where}: img_id {got}, expected a string or integer naming the image's "
                "features (or use --image-key img_fn)"
            )
        return str(value)
    value = item["img_fn"]
    if not isinstance(value, str) or not value.strip():
        raise MalformedLineError(
            f"{where}: img_fn is {value!r:.40}, expected the image's file name such as "
            "'movie/img.jpg'"
        )
    stem = re.sub(r"\.[^./]+$", "", value)
    return stem.rsplit("/", 1)[-1] if image_key == "basename" else stem


def read_vcr(
    paths: Sequence[str | Path], image_key: str = "img_fn"
) -> tuple[dict[str, list[ImageEntry]], dict[str, list[dict[str, Any]]]]:
    """(images per split, question rows per `vcr_<split>`) from VCR JSONL files."""
    if image_key not in VCR_IMAGE_KEYS:
        raise ValueError(f"image_key must be one of {VCR_IMAGE_KEYS}, got {image_key!r}")
    images: dict[str, list[ImageEntry]] = {}
    questions: dict[str, list[dict[str, Any]]] = {}
    files: dict[str, Path] = {}
    next_id = 0
    for path in map(Path, paths):
        split = path.name.split(".")[0]
        if split not in SPLITS:
            raise UnknownSplitError(
                f"{path}: cannot tell the split from the file name; expected train.jsonl, "
                "val.jsonl or test.jsonl"
            )
        if split in files:
            raise DataError(
                f"{path}: a second {split} file (the first is {files[split]}); give one file "
                "per split"
            )
        files[split] = path
        rows: dict[str, ImageEntry] = {}
        positions: dict[str, int] = {}
        questions[f"vcr_{split}"] = []
        for line_no, line in annotation_lines(path):
            item = parse_vcr_line(line, str(path), line_no)
            if item is None:
                continue
            where = f"{path}:{line_no}"
            key = _vcr_key(item, image_key, where)
            if key not in rows:
                positions[key] = len(rows)
                rows[key] = ImageEntry(next_id, key)
                next_id += 1
            row = vcr_row(item, where)
            row.update(image_row=positions[key], image_id=rows[key].image_id, image_key=key)
            questions[f"vcr_{split}"].append(row)
        if not rows:
            raise DataError(f"{path}: no questions; expected one VCR JSON object per line")
        images[split] = list(rows.values())
    return images, questions


def _vcr_text(row: Mapping[str, Any]) -> str:
    choices = row["answer_choices"] + row["rationale_choices"]
    return " ".join(row["question"] + [word for choice in choices for word in choice])


def convert_vcr(
    annotations: Sequence[str | Path],
    features: str | Path | Sequence[str | Path],
    output: str | Path,
    *,
    image_key: str = "img_fn",
    vocab: str | Path | None = None,
    wordpiece_size: int = 8000,
    **options: Any,
) -> Path:
    """VCR JSONL + features -> image tables `<split>` and question tables `vcr_<split>`."""
    images, questions = read_vcr(annotations, image_key)
    texts = [_vcr_text(row) for row in questions.get("vcr_train", [])]
    meta = {"annotations": [str(p) for p in annotations], "image_key": image_key}
    return convert_images(
        output,
        images,
        features,
        kind="vcr",
        tokenizer=bert_tokenizer(vocab, texts, wordpiece_size),
        extra_tables=questions,
        captions=False,
        meta=meta,
        **options,
    )
