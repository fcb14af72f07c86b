"""X-modaler's own captioning files into our Arrow store, keeping its vocabulary ids.

X-modaler's MSCoCoDataset reads `mscoco_caption_anno_{train,val,test}.pkl` (per image: str
`image_id`, `tokens_ids` rows `[0, w1..wn, 0..]`, `target_ids` rows `[w1..wn, 0, -1..]`),
`features/up_down/<image_id>.npz`, and `vocabulary.txt` (one word a line; `load_vocab` puts '.'
first, so line n has id n and id 0 is BOS, EOS and padding). The store keeps those ids: its
tokenizer maps word n to id n and wraps a caption as `. w1..wn .` (ids `0 w1..wn 0`), so a
caption's ids are the pkl's `tokens_ids` row plus the EOS, and a model trained on the store
decodes with X-modaler's vocabulary (and loads its checkpoints' embeddings as they are).
Evaluation references are the raw COCO captions of `captions_{val,test}5k.json`, as X-modaler's
COCOEvaler uses them, in the `raw_captions` column.
"""

from __future__ import annotations

import argparse
import json
import pickle
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from .converters import SPLITS, ImageEntry, convert_images
from .errors import DataError, EmptyCaptionError

BOUNDARY = "."  # xmodaler.functional.load_vocab's id 0: BOS, EOS and padding
ANNOTATION_FILE = "mscoco_caption_anno_{split}.pkl"
REFERENCE_FILES = {"val": "captions_val5k.json", "test": "captions_test5k.json"}


def read_vocabulary(path: str | Path) -> list[str]:
    """X-modaler's id order: '.' (id 0), then the file's words (line n has id n)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"vocabulary {path}: no such file")
    words = [BOUNDARY]
    seen: dict[str, int] = {BOUNDARY: 0}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        word = line.strip()
        if not word or len(word.split()) != 1:
            raise DataError(f"{path} line {number}: {line!r} is not one word")
        if word in seen:
            raise DataError(f"{path} line {number}: {word!r} repeats id {seen[word]}")
        seen[word] = len(words)
        words.append(word)
    return words


def xmodaler_tokenizer(words: Sequence[str]) -> PreTrainedTokenizerFast:
    """Word-level tokenizer with X-modaler's ids: '.' = 0 is BOS, EOS and PAD; no UNK (every
    caption in the store comes from the vocabulary, and an added token would change its size)."""
    tokenizer = Tokenizer(models.WordLevel(vocab={word: i for i, word in enumerate(words)}))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOUNDARY} $A {BOUNDARY}", special_tokens=[(BOUNDARY, 0)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOUNDARY, eos_token=BOUNDARY, pad_token=BOUNDARY
    )


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _field(entry: Mapping, name: str) -> Any:
    """A pkl entry's field; X-modaler loads with encoding='bytes', so keys may be bytes."""
    if name in entry:
        return entry[name]
    return entry.get(name.encode(), None)


def caption_words(row: np.ndarray, words: Sequence[str], where: str) -> list[str]:
    """The words of a `tokens_ids` row `[0, w1..wn, 0, ..]`."""
    ids = [int(i) for i in np.asarray(row).reshape(-1)]
    if not ids or ids[0] != 0:
        raise DataError(f"{where}: tokens_ids row {ids[:8]} does not start with BOS 0")
    body = ids[1:]
    body = body[: body.index(0)] if 0 in body else body
    if not body:
        raise EmptyCaptionError(f"{where}: tokens_ids row is empty (BOS then 0)")
    bad = [i for i in body if not 0 < i < len(words)]
    if bad:
        raise DataError(
            f"{where}: token id {bad[0]} is outside the vocabulary (1..{len(words) - 1})"
        )
    return [words[i] for i in body]


def _check_target(tokens: np.ndarray, target: np.ndarray, where: str) -> None:
    """`target_ids` must be `tokens_ids` shifted left (w1..wn, EOS 0), as the mapper trains on it."""
    ids = [int(i) for i in np.asarray(tokens).reshape(-1)][1:]
    n = ids.index(0) if 0 in ids else len(ids)
    expected = ids[:n] + [0]
    got = [int(i) for i in np.asarray(target).reshape(-1)][: n + 1]
    if got != expected[: len(got)]:
        raise DataError(f"{where}: target_ids {got} is not tokens_ids shifted by one {expected}")


def read_annotations(path: str | Path, words: Sequence[str]) -> list[ImageEntry]:
    """One `ImageEntry` per pkl entry, captions decoded to words (raw captions: the same)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"annotations {path}: no such file")
    try:
        with path.open("rb") as f:
            data = pickle.load(f, encoding="bytes")
    except Exception as err:  # any unpickling failure is a bad input file
        raise DataError(f"{path}: not a readable pickle ({type(err).__name__}: {err})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of images, got {type(data).__name__}")
    entries = []
    for position, entry in enumerate(data):
        where = f"{path}: entry {position}"
        if not isinstance(entry, Mapping) or _field(entry, "image_id") is None:
            raise DataError(f"{where} is not a dict with an 'image_id'")
        key = _text(_field(entry, "image_id"))
        where = f"{path}: image_id {key!r} (entry {position})"
        try:
            image_id = int(key)
        except ValueError:
            raise DataError(f"{where}: image_id is not an integer") from None
        tokens, targets = _field(entry, "tokens_ids"), _field(entry, "target_ids")
        if tokens is None or np.asarray(tokens).ndim != 2:
            raise DataError(f"{where}: 'tokens_ids' must be a 2-D array, one row per caption")
        captions = []
        for k, row in enumerate(np.asarray(tokens)):
            captions.append(" ".join(caption_words(row, words, f"{where} caption {k}")))
            if targets is not None:
                _check_target(row, np.asarray(targets)[k], f"{where} caption {k}")
        entries.append(ImageEntry(image_id, key, captions, list(captions)))
    return entries


def read_references(path: str | Path) -> dict[int, list[str]]:
    """Raw captions per int image id from a COCO caption file (captions_val5k.json)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"references {path}: no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        annotations = data["annotations"]
        out: dict[int, list[str]] = {}
        for annotation in annotations:
            out.setdefault(int(annotation["image_id"]), []).append(str(annotation["caption"]))
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path}: not a COCO caption file ({type(err).__name__}: {err})") from None
    return out


def convert_xmodaler(
    annotations: str | Path,
    features: str | Path | Sequence[str | Path],
    output: str | Path,
    *,
    vocab: str | Path | None = None,
    references: Mapping[str, str | Path] | None = None,
    splits: Sequence[str] = SPLITS,
    **options: Any,
) -> Path:
    """X-modaler's annotation folder + npz features -> our store, with X-modaler's token ids.

    `vocab` defaults to `<annotations>/vocabulary.txt`; `references` (split -> COCO caption
    json) default to `captions_{val,test}5k.json` in the folder when they exist.
    """
    folder = Path(annotations)
    if not folder.is_dir():
        raise DataError(f"--annotations {folder}: expected X-modaler's annotation folder")
    vocab_path = Path(vocab) if vocab else folder / "vocabulary.txt"
    words = read_vocabulary(vocab_path)
    if references is None:
        references = {s: folder / n for s, n in REFERENCE_FILES.items() if (folder / n).is_file()}
    tables = {}
    for split in splits:
        entries = read_annotations(folder / ANNOTATION_FILE.format(split=split), words)
        if split in references:
            raw = read_references(references[split])
            for entry in entries:
                if entry.image_id not in raw:
                    raise DataError(f"{references[split]}: no caption of image {entry.image_id}")
                entry.raw_captions = raw[entry.image_id]
        tables[split] = entries
    meta = {
        "annotations": str(folder),
        "vocab": str(vocab_path),
        "references": {split: str(path) for split, path in references.items()},
        "token_ids": "xmodaler: '.' = 0 is BOS/EOS/PAD, vocabulary line n is id n",
    }
    return convert_images(
        output,
        tables,
        features,
        kind="xmodaler",
        tokenizer=xmodaler_tokenizer(words),
        meta=meta,
        **options,
    )


def add_parser(
    commands: Any,
    common: Callable[[argparse.ArgumentParser], None],
    make: Callable[..., argparse.ArgumentParser],
) -> None:
    """The `xmodaler` sub-command of `python -m xmodaler_accel.data.convert` (`make` adds it
    with the converter's description of the input)."""
    parser = make(
        commands, summary="X-modaler's mscoco_caption_anno_*.pkl + vocabulary.txt + npz features"
    )
    parser.add_argument(
        "--annotations", required=True, type=Path, help="folder of mscoco_caption_anno_*.pkl"
    )
    parser.add_argument(
        "--vocab", type=Path, default=None, help="default <annotations>/vocabulary.txt"
    )
    parser.add_argument(
        "--references",
        nargs="+",
        default=None,
        help="SPLIT=captions.json (default val/test: captions_{val,test}5k.json in the folder)",
    )
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=list(SPLITS))
    common(parser)


def run(args: argparse.Namespace, options: Mapping[str, Any]) -> Path:
    references = None
    if args.references is not None:
        references = {}
        for value in args.references:
            split, sep, path = value.partition("=")
            if not sep or split not in SPLITS:
                raise DataError(
                    f"--references {value!r}: expected SPLIT=PATH with SPLIT in {SPLITS}"
                )
            references[split] = Path(path)
    features = args.features[0] if len(args.features) == 1 else args.features
    return convert_xmodaler(
        args.annotations,
        features,
        args.output,
        vocab=args.vocab,
        references=references,
        splits=args.splits,
        **options,
    )
