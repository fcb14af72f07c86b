"""Write `datasets` Arrow tables in bounded-memory chunks, atomically, in `load_from_disk` layout.

A converted dataset is a directory that `datasets.load_from_disk` opens memory-mapped:
`dataset_dict.json`, one folder per split (Arrow shards, `state.json`, `dataset_info.json`),
plus our `meta.json` (what produced it) and `tokenizer/`. It is written under a temporary
name and renamed into place, so a failed or killed conversion never leaves a loadable output.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from datasets import Array2D, DatasetDict, DatasetInfo, Features, Value, load_from_disk
from datasets.arrow_writer import ArrowWriter
from datasets.features.features import Array2DExtensionType

try:  # datasets >= 4 names variable-length lists `List`; older releases call it `Sequence`
    from datasets import List
except ImportError:  # pragma: no cover - depends on the installed datasets
    from datasets import Sequence as List

META_FILE = "meta.json"
FORMAT_VERSION = 1
_INT32_MAX = 2**31 - 1


def image_table_features(
    feat_dim: int,
    *,
    dtype: str = "float32",
    cls_dim: int | None = None,
    region_labels: bool = False,
    captions: bool = True,
) -> Features:
    """Schema of an image table: one row per image, regions of variable count, optional captions."""
    columns: dict[str, Any] = {
        "image_id": Value("int64"),
        "image_key": Value("string"),
        "image_w": Value("int32"),
        "image_h": Value("int32"),
        "num_regions": Value("int32"),
        "features": Array2D(shape=(None, feat_dim), dtype=dtype),
        "boxes": Array2D(shape=(None, 5), dtype="float32"),
    }
    if cls_dim is not None:
        columns["cls_prob"] = Array2D(shape=(None, cls_dim), dtype=dtype)
    if region_labels:
        columns["region_labels"] = List(Value("int32"))
    if captions:
        columns["captions"] = List(Value("string"))
        columns["raw_captions"] = List(Value("string"))
    return Features(columns)


def vcr_table_features() -> Features:
    """Schema of a VCR question table; `*_tags` give the region index of each token, or -1."""
    words, tags = List(Value("string")), List(Value("int32"))
    return Features(
        {
            "annot_id": Value("string"),
            "image_row": Value("int64"),
            "image_id": Value("int64"),
            "image_key": Value("string"),
            "question": words,
            "question_tags": tags,
            "answer_choices": List(words),
            "answer_tags": List(tags),
            "rationale_choices": List(words),
            "rationale_tags": List(tags),
            "answer_label": Value("int32"),
            "rationale_label": Value("int32"),
            "objects": words,
        }
    )


def _ragged_2d(values: list[np.ndarray], feature: Array2D) -> pa.Array:
    """Build an Array2D column (list<list<dtype>>) from (n_i, d) arrays without Python loops."""
    dim = feature.shape[1]
    arrays = [np.asarray(v, dtype=feature.dtype).reshape(-1, dim) for v in values]
    counts = np.array([len(a) for a in arrays], dtype=np.int64)
    total = int(counts.sum())
    if total * dim > _INT32_MAX:
        raise ValueError(f"one chunk holds {total * dim} values (> 2^31); lower chunk_bytes")
    flat = np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0, feature.dtype)
    inner_offsets = np.arange(total + 1, dtype=np.int32) * np.int32(dim)
    outer_offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum(counts, out=outer_offsets[1:])
    inner = pa.ListArray.from_arrays(pa.array(inner_offsets), pa.array(flat))
    storage = pa.ListArray.from_arrays(pa.array(outer_offsets), inner)
    ext_type = Array2DExtensionType(shape=feature.shape, dtype=feature.dtype)
    return pa.ExtensionArray.from_storage(ext_type, storage)


class SplitWriter:
    """Streams rows of one split to Arrow shards, flushing every `chunk_bytes` of array data."""

    def __init__(
        self,
        directory: str | Path,
        features: Features,
        *,
        split: str | None = None,
        chunk_bytes: int = 64 * 2**20,
        max_chunk_rows: int = 10_000,
        shard_bytes: int = 4 * 2**30,
        fingerprint: str | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.features = features
        self.split = split
        self.chunk_bytes = chunk_bytes
        self.max_chunk_rows = max_chunk_rows
        self.shard_bytes = shard_bytes
        self.fingerprint = fingerprint or uuid.uuid4().hex[:16]
        self._schema = features.arrow_schema
        self._buffer: dict[str, list[Any]] = {name: [] for name in features}
        self._buffered_bytes = self._buffered_rows = 0
        self._shards: list[str] = []
        self._writer: ArrowWriter | None = None
        self.num_rows = 0
        self._open_shard()

    def _open_shard(self) -> None:
        name = f"data-{len(self._shards):05d}.arrow"
        self._shards.append(name)
        self._shard_nbytes = 0
        self._writer = ArrowWriter(features=self.features, path=str(self.directory / name))

    def add(self, row: Mapping[str, Any]) -> None:
        """Buffer one row (a dict with every column); flush when the buffer is large enough."""
        missing = [name for name in self._buffer if name not in row]
        if missing:
            raise ValueError(f"row for split {self.split!r} lacks columns {missing}")
        for name, column in self._buffer.items():
            value = row[name]
            column.append(value)
            if isinstance(value, np.ndarray):
                self._buffered_bytes += value.nbytes
        self._buffered_rows += 1
        if self._buffered_bytes >= self.chunk_bytes or self._buffered_rows >= self.max_chunk_rows:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows as one record batch."""
        rows = self._buffered_rows
        if rows == 0:
            return
        arrays = []
        for name, values in self._buffer.items():
            feature = self.features[name]
            if isinstance(feature, Array2D):
                arrays.append(_ragged_2d(values, feature))
            else:
                arrays.append(pa.array(values, type=self._schema.field(name).type))
        table = pa.Table.from_arrays(arrays, schema=self._schema)
        assert self._writer is not None
        if self._shard_nbytes and self._shard_nbytes + table.nbytes > self.shard_bytes:
            self._writer.finalize()
            self._writer.close()
            self._open_shard()
        self._writer.write_table(table)
        self._shard_nbytes += table.nbytes
        self.num_rows += rows
        self._buffer = {name: [] for name in self._buffer}
        self._buffered_bytes = self._buffered_rows = 0

    def close(self) -> int:
        """Flush, finish the shards and write the `state.json`/`dataset_info.json` pair."""
        self.flush()
        assert self._writer is not None
        self._writer.finalize()
        self._writer.close()
        state = {
            "_data_files": [{"filename": name} for name in self._shards],
            "_fingerprint": self.fingerprint,
            "_format_columns": None,
            "_format_kwargs": {},
            "_format_type": None,
            "_output_all_columns": False,
            "_split": self.split,
        }
        (self.directory / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
        DatasetInfo(features=self.features).write_to_directory(str(self.directory))
        return self.num_rows


def finish_dataset_dict(directory: str | Path, splits: list[str], meta: Mapping[str, Any]) -> None:
    """Write `dataset_dict.json` and `meta.json`, then check that the result loads."""
    directory = Path(directory)
    (directory / "dataset_dict.json").write_text(json.dumps({"splits": list(splits)}))
    meta = {"format_version": FORMAT_VERSION, **meta}
    (directory / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    loaded = load_from_disk(str(directory))
    if not isinstance(loaded, DatasetDict) or list(loaded) != list(splits):
        raise RuntimeError(f"{directory} did not load back as a DatasetDict with splits {splits}")
    counts = meta.get("num_rows", {})
    for split, expected in counts.items():
        if loaded[split].num_rows != expected:
            raise RuntimeError(
                f"{directory}/{split}: {loaded[split].num_rows} rows, wrote {expected}"
            )


def read_meta(directory: str | Path) -> dict[str, Any]:
    """The `meta.json` of a converted or synthetic dataset directory."""
    return json.loads((Path(directory) / META_FILE).read_text())


@contextlib.contextmanager
def atomic_directory(
    target: str | Path, *, if_exists: Literal["error", "replace", "keep"] = "error"
) -> Iterator[Path]:
    """Yield a temporary directory beside `target`, renamed to `target` only on success.

    `if_exists` decides what happens when `target` exists: "error" refuses before any work,
    "replace" swaps it out after the new one is complete, "keep" discards the new one (used by
    caches that several processes may fill at once).
    """
    target = Path(target)
    if target.exists() and if_exists == "error":
        raise FileExistsError(f"{target} already exists; pass overwrite to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        if if_exists == "keep":
            shutil.rmtree(tmp, ignore_errors=True)
            return
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.rename(tmp, target)
    except OSError:  # another process renamed its copy in first
        if if_exists == "keep" and target.exists():
            shutil.rmtree(tmp, ignore_errors=True)
            return
        shutil.rmtree(tmp, ignore_errors=True)
        raise
