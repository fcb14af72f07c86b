"""The embedded synthetic-scenes dataset: built from a seed in seconds, cached on disk.

`build_synthetic()` returns a `DatasetDict` with image tables `train`/`val`/`test` (region
features, 5-d boxes, region class labels, a detector-like `cls_prob`, five captions) and VCR
tables `vcr_train`/`vcr_val`/`vcr_test` (one question per image, `image_row` into the image
table). The directory also holds a word-level `tokenizer/` and a WordPiece `wordpiece/`.
The cache key is a hash of every parameter, so changing one rebuilds and nothing else does.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from datasets import DatasetDict, load_from_disk

from ..progress import progress_bar
from .scene_vcr import vcr_item
from .scenes import (
    BACKGROUND_KINDS,
    COLOURS,
    IMAGE_SIZE,
    SHAPES,
    Scene,
    captions_for,
    sample_scene,
)
from .store import (
    META_FILE,
    SplitWriter,
    atomic_directory,
    finish_dataset_dict,
    image_table_features,
    vcr_table_features,
)
from .tokenizer import build_word_vocab, save_tokenizer, train_wordpiece
from .vcr import vcr_row

GENERATOR_VERSION = 2  # 2: count templates always carry a grounded detail
SPLITS = ("train", "val", "test")
NUM_CLASSES = len(SHAPES) + 1  # background + shapes
_ID_OFFSET = {"train": 0, "val": 1_000_000, "test": 2_000_000}
_BATCH = 256

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyntheticConfig:
    """Every parameter that changes the synthetic data (and so its cache key)."""

    seed: int = 0
    feat_dim: int = 256
    num_train: int = 4000
    num_val: int = 500
    num_test: int = 500
    max_background: int = 3
    noise: float = 0.5
    dtype: str = "float32"
    captions_per_image: int = 5
    wordpiece_size: int = 1000

    def __post_init__(self) -> None:
        if self.feat_dim < 1 or min(self.num_train, self.num_val, self.num_test) < 0:
            raise ValueError(f"invalid synthetic config {self}")
        if self.dtype not in ("float32", "float16"):
            raise ValueError(f"dtype must be float32 or float16, got {self.dtype!r}")

    def key(self) -> str:
        payload = json.dumps({**asdict(self), "version": GENERATOR_VERSION}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def size(self, split: str) -> int:
        return {"train": self.num_train, "val": self.num_val, "test": self.num_test}[split]


def default_cache_dir() -> Path:
    """`$XMODALER_ACCEL_CACHE`, else `$XDG_CACHE_HOME/xmodaler_accel`, else ~/.cache/..."""
    if os.environ.get("XMODALER_ACCEL_CACHE"):
        return Path(os.environ["XMODALER_ACCEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "xmodaler_accel"


class AttributeVectors:
    """The fixed random vector of every attribute value; a region sums those of its object."""

    def __init__(self, seed: int, feat_dim: int) -> None:
        rng = np.random.default_rng([seed, 1000])
        self.shape = rng.standard_normal((len(SHAPES), feat_dim), dtype=np.float32)
        self.colour = rng.standard_normal((len(COLOURS), feat_dim), dtype=np.float32)
        self.size = rng.standard_normal((3, feat_dim), dtype=np.float32)
        self.cell = rng.standard_normal((9, feat_dim), dtype=np.float32)
        self.background = rng.standard_normal((BACKGROUND_KINDS, feat_dim), dtype=np.float32)


def region_arrays(
    scenes: list[Scene], vectors: AttributeVectors, rng: np.random.Generator, noise: float
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Features (n, D) and cls_prob (n, NUM_CLASSES) per scene, vectorised over all regions."""
    objs = [s.objects[o] if o >= 0 else None for s in scenes for o in s.region_objects]
    kinds = np.array([k for s in scenes for k in s.region_backgrounds])
    is_obj = kinds < 0
    attr = np.array([(o.shape, o.colour, o.size, o.cell) if o else (0, 0, 0, 0) for o in objs])
    feats = np.empty((len(objs), vectors.shape.shape[1]), dtype=np.float32)
    s, c, z, p = attr[is_obj].T
    feats[is_obj] = (vectors.shape[s] + vectors.colour[c] + vectors.size[z] + vectors.cell[p]) / 2
    feats[~is_obj] = vectors.background[kinds[~is_obj]]
    feats += noise * rng.standard_normal(feats.shape, dtype=np.float32)
    labels = np.where(is_obj, attr[:, 0] + 1, 0)
    logits = 3.0 * np.eye(NUM_CLASSES, dtype=np.float32)[labels]
    logits += rng.standard_normal(logits.shape, dtype=np.float32)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    bounds = np.cumsum([len(s.region_objects) for s in scenes])[:-1]
    return np.split(feats, bounds), np.split(probs, bounds)


def split_scenes(
    split: str, config: SyntheticConfig
) -> Iterator[tuple[Scene, list[str], list[str]]]:
    """(scene, captions, raw captions) for every image of a split, in order: what the split's
    rows (and `data.render`'s pictures) are made of; they do not depend on feat_dim."""
    for scene, (captions, raw), _ in _scene_stream(split, config):
        yield scene, captions, raw


def _scene_stream(split: str, config: SyntheticConfig) -> Iterator[tuple[Scene, Any, Any]]:
    """(scene, (captions, raw), VCR item) from the split's scene generator."""
    scene_rng = np.random.default_rng([config.seed, SPLITS.index(split), 0])
    for _ in range(config.size(split)):
        scene = sample_scene(scene_rng, config.max_background)
        caps = captions_for(scene, scene_rng, config.captions_per_image)
        yield scene, caps, vcr_item(scene, scene_rng)


def _split_rows(
    split: str, config: SyntheticConfig, vectors: AttributeVectors
) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(image row, VCR row) for every image of a split; captions do not depend on feat_dim."""
    feat_rng = np.random.default_rng([config.seed, SPLITS.index(split), 1])
    scenes = _scene_stream(split, config)
    total = config.size(split)
    for start in range(0, total, _BATCH):
        batch = list(itertools.islice(scenes, min(_BATCH, total - start)))
        feats, probs = region_arrays([b[0] for b in batch], vectors, feat_rng, config.noise)
        for k, ((scene, (captions, raw), item), feat, prob) in enumerate(zip(batch, feats, probs)):
            index = start + k
            image = {
                "image_id": _ID_OFFSET[split] + index,
                "image_key": f"{split}_{index:06d}",
                "image_w": IMAGE_SIZE,
                "image_h": IMAGE_SIZE,
                "num_regions": len(scene.region_objects),
                "features": feat,
                "boxes": scene.boxes,
                "cls_prob": prob,
                "region_labels": scene.region_labels,
                "captions": captions,
                "raw_captions": raw,
            }
            question = vcr_row(item, f"synthetic {split} image {index}")
            question.update(
                annot_id=f"{split}-{index}",
                image_row=index,
                image_id=image["image_id"],
                image_key=image["image_key"],
            )
            yield image, question


def _vcr_text(row: dict[str, Any]) -> str:
    choices = row["answer_choices"] + row["rationale_choices"]
    return " ".join(row["question"] + [w for choice in choices for w in choice])


def _write(directory: Path, config: SyntheticConfig) -> None:
    vectors = AttributeVectors(config.seed, config.feat_dim)
    image_features = image_table_features(
        config.feat_dim, dtype=config.dtype, cls_dim=NUM_CLASSES, region_labels=True
    )
    counts: dict[str, int] = {}
    train_captions: list[str] = []
    train_vcr_text: list[str] = []
    for split in SPLITS:
        images = SplitWriter(
            directory / split, image_features, split=split, fingerprint=config.key()
        )
        questions = SplitWriter(
            directory / f"vcr_{split}", vcr_table_features(), split=f"vcr_{split}"
        )
        rows = progress_bar(
            _split_rows(split, config, vectors),
            desc=f"synthetic {split}",
            total=config.size(split),
            unit="img",
            main_process=os.environ.get("LOCAL_RANK", "0") == "0",
        )
        for image, question in rows:
            images.add(image)
            questions.add(question)
            if split == "train":
                train_captions.extend(image["captions"])
                train_vcr_text.append(_vcr_text(question))
        counts[split] = images.close()
        counts[f"vcr_{split}"] = questions.close()
    vocab = build_word_vocab(train_captions, min_count=1)
    save_tokenizer(vocab, directory / "tokenizer")
    wordpiece = train_wordpiece(
        train_captions + train_vcr_text, vocab_size=config.wordpiece_size, min_frequency=1
    )
    save_tokenizer(wordpiece, directory / "wordpiece")
    splits = [*SPLITS, *(f"vcr_{s}" for s in SPLITS)]
    meta = {
        "kind": "synthetic",
        "config": asdict(config),
        "generator_version": GENERATOR_VERSION,
        "num_rows": counts,
        "feat_dim": config.feat_dim,
        "num_region_classes": NUM_CLASSES,
        "vocab_size": len(vocab),
    }
    finish_dataset_dict(directory, splits, meta)


def synthetic_dir(
    cache_dir: str | Path | None = None, *, rebuild: bool = False, **params: Any
) -> Path:
    """Directory of the synthetic dataset for `params` (see SyntheticConfig), built if missing.

    Processes that find it missing at the same time (e.g. several ranks) each build a private
    copy; the first to finish renames it into place and the others discard theirs.
    """
    unknown = set(params) - {f.name for f in fields(SyntheticConfig)}
    if unknown:
        raise TypeError(f"unknown synthetic parameters {sorted(unknown)}")
    config = SyntheticConfig(**params)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / f"synthetic-{config.key()}"
    if (target / META_FILE).is_file() and not rebuild:
        return target
    logger.info("building the synthetic dataset (first use, cached after): %s", target)
    with atomic_directory(target, if_exists="replace" if rebuild else "keep") as tmp:
        _write(tmp, config)
    return target


def build_synthetic(
    cache_dir: str | Path | None = None, *, rebuild: bool = False, **params: Any
) -> DatasetDict:
    """The synthetic DatasetDict (memory-mapped), built on first use and cached by parameters."""
    return load_from_disk(str(synthetic_dir(cache_dir, rebuild=rebuild, **params)))
