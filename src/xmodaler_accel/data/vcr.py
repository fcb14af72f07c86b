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
from .errors import MalformedLineError, UnknownSplitError

REQUIRED_KEYS = ("question", "answer_choices", "rationale_choices", "objects", "img_fn")
NUM_CHOICES = 4


def expand_tags(
    tokens: Sequence[str | Sequence[int]], objects: Sequence[str], where: str
) -> tuple[list[str], list[int]]:
    """VCR tokens to (words, tags); a tag list `[1, 2]` becomes 'name1 and name2'."""
    words: list[str] = []
    tags: list[int] = []
    for token in tokens:
        if isinstance(token, str):
            words.append(token)
            tags.append(-1)
            continue
        if not isinstance(token, (list, tuple)) or not token:
            raise MalformedLineError(f"{where}: token {token!r} is neither a word nor a tag list")
        for k, index in enumerate(token):
            if not isinstance(index, int) or not 0 <= index < len(objects):
                raise MalformedLineError(
                    f"{where}: tag {index!r} does not index the {len(objects)} objects"
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
        raise MalformedLineError(f"{where}: malformed JSON line ({err.msg})") from None
    if not isinstance(item, dict):
        raise MalformedLineError(f"{where}: expected a JSON object, got {type(item).__name__}")
    missing = [key for key in REQUIRED_KEYS if key not in item]
    if missing:
        raise MalformedLineError(f"{where}: missing keys {missing}")
    for key in ("answer_choices", "rationale_choices"):
        if len(item[key]) != NUM_CHOICES:
            raise MalformedLineError(
                f"{where}: {key} has {len(item[key])} entries, expected {NUM_CHOICES}"
            )
    return item


def vcr_row(item: dict[str, Any], where: str) -> dict[str, Any]:
    """Question-table columns (without the image columns) from a parsed VCR item."""
    objects = [str(name) for name in item["objects"]]
    question, question_tags = expand_tags(item["question"], objects, where)
    answers = [expand_tags(choice, objects, where) for choice in item["answer_choices"]]
    rationales = [expand_tags(choice, objects, where) for choice in item["rationale_choices"]]
    return {
        "annot_id": str(item.get("annot_id", where)),
        "question": question,
        "question_tags": question_tags,
        "answer_choices": [words for words, _ in answers],
        "answer_tags": [tags for _, tags in answers],
        "rationale_choices": [words for words, _ in rationales],
        "rationale_tags": [tags for _, tags in rationales],
        "answer_label": int(item.get("answer_label", -1)),
        "rationale_label": int(item.get("rationale_label", -1)),
        "objects": objects,
    }


VCR_IMAGE_KEYS = ("img_fn", "basename", "img_id")


def _vcr_key(item: Mapping[str, Any], image_key: str) -> str:
    if image_key == "img_id":
        return str(item.get("img_id"))
    stem = re.sub(r"\.[^./]+$", "", str(item["img_fn"]))
    return stem.rsplit("/", 1)[-1] if image_key == "basename" else stem


def read_vcr(
    paths: Sequence[str | Path], image_key: str = "img_fn"
) -> tuple[dict[str, list[ImageEntry]], dict[str, list[dict[str, Any]]]]:
    """(images per split, question rows per `vcr_<split>`) from VCR JSONL files."""
    if image_key not in VCR_IMAGE_KEYS:
        raise ValueError(f"image_key must be one of {VCR_IMAGE_KEYS}, got {image_key!r}")
    images: dict[str, list[ImageEntry]] = {}
    questions: dict[str, list[dict[str, Any]]] = {}
    next_id = 0
    for path in map(Path, paths):
        split = path.name.split(".")[0]
        if split not in SPLITS:
            raise UnknownSplitError(
                f"{path}: cannot tell the split from the file name; expected train.jsonl, "
                "val.jsonl or test.jsonl"
            )
        rows: dict[str, ImageEntry] = {}
        positions: dict[str, int] = {}
        questions[f"vcr_{split}"] = []
        with open(path, encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, start=1):
                item = parse_vcr_line(line, str(path), line_no)
                if item is None:
                    continue
                key = _vcr_key(item, image_key)
                if key not in rows:
                    positions[key] = len(rows)
                    rows[key] = ImageEntry(next_id, key)
                    next_id += 1
                row = vcr_row(item, f"{path}:{line_no}")
                row.update(image_row=positions[key], image_id=rows[key].image_id, image_key=key)
                questions[f"vcr_{split}"].append(row)
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
