"""Zero-copy row access to memory-mapped Arrow columns (region features, boxes, captions).

`datasets`' own formatters convert each row through Python or copy whole batches; reading the
Arrow buffers directly gives each image's (num_regions, dim) matrix as a read-only numpy view of
the memory-mapped file. Only the `datasets.Dataset` is pickled into data workers (it reopens the
file by path), never the views, so workers share the page cache instead of holding copies.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
from datasets import Dataset


class _ColumnChunks:
    """One column's chunks with the row index each chunk starts at."""

    def __init__(self, column: pa.ChunkedArray) -> None:
        self.chunks = [chunk for chunk in column.chunks if len(chunk)]
        self.starts = np.zeros(len(self.chunks) + 1, dtype=np.int64)
        np.cumsum([len(chunk) for chunk in self.chunks], out=self.starts[1:])
        self._views: list[tuple[np.ndarray, np.ndarray | None, np.ndarray, int]] | None = None

    def locate(self, row: int) -> tuple[int, int]:
        chunk = int(np.searchsorted(self.starts, row, side="right")) - 1
        return chunk, row - int(self.starts[chunk])

    def views(self) -> list[tuple[np.ndarray, np.ndarray | None, np.ndarray, int]]:
        """Per chunk: outer offsets, inner offsets (2-D columns) or None, flat values, row width."""
        if self._views is None:
            self._views = [_chunk_views(chunk) for chunk in self.chunks]
        return self._views


def _chunk_views(chunk: pa.Array) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, int]:
    storage = chunk.storage if isinstance(chunk, pa.ExtensionArray) else chunk
    if not pa.types.is_list(storage.type):
        raise TypeError(f"column of type {chunk.type} is not a list or Array2D column")
    outer = storage.offsets.to_numpy()
    inner = storage.values
    if pa.types.is_list(inner.type):  # Array2D: list<list<dtype>> with a fixed row width
        width = chunk.type.shape[1] if isinstance(chunk, pa.ExtensionArray) else -1
        return outer, inner.offsets.to_numpy(), inner.values.to_numpy(zero_copy_only=True), width
    return outer, None, inner.to_numpy(zero_copy_only=True), 0


class ArrowColumns:
    """Row access to a `datasets.Dataset` without `datasets`' per-row Python conversion."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self._table: pa.Table = dataset.data.table
        indices = getattr(dataset, "_indices", None)  # set by .select/.shuffle/.filter
        self._rows = None if indices is None else indices.column(0).to_numpy().astype(np.int64)
        self._columns: dict[str, _ColumnChunks] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"dataset": self.dataset}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["dataset"])

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def column_names(self) -> list[str]:
        return self.dataset.column_names

    def _chunks(self, name: str) -> _ColumnChunks:
        if name not in self._columns:
            if name not in self._table.column_names:
                raise KeyError(f"no column {name!r}; columns are {self._table.column_names}")
            self._columns[name] = _ColumnChunks(self._table.column(name))
        return self._columns[name]

    def _row(self, index: int) -> int:
        if not -len(self) <= index < len(self):
            raise IndexError(f"row {index} out of range for {len(self)} rows")
        index = index % len(self)
        return index if self._rows is None else int(self._rows[index])

    def array(self, name: str, index: int) -> np.ndarray:
        """Row `index` of a list or Array2D column as a read-only numpy view (no copy)."""
        columns = self._chunks(name)
        chunk, local = columns.locate(self._row(index))
        outer, inner, values, width = columns.views()[chunk]
        start, stop = int(outer[local]), int(outer[local + 1])
        if inner is None:
            return values[start:stop]
        rows = values[int(inner[start]) : int(inner[stop])]
        return rows.reshape(stop - start, width if width > 0 else -1)

    def value(self, name: str, index: int) -> Any:
        """Row `index` of any column as a Python object."""
        columns = self._chunks(name)
        chunk, local = columns.locate(self._row(index))
        return columns.chunks[chunk][local].as_py()

    def list_lengths(self, name: str) -> np.ndarray:
        """Length of every row's list in a list column (e.g. captions per image), in row order."""
        lengths = np.concatenate(
            [np.diff(chunk.offsets.to_numpy()) for chunk in self._chunks(name).chunks] or [[]]
        ).astype(np.int64)
        return lengths if self._rows is None else lengths[self._rows]

    def scalars(self, name: str) -> np.ndarray:
        """A whole scalar column (ids, counts) as numpy, in row order; cheap for numbers."""
        values = self._table.column(name).to_numpy()
        return values if self._rows is None else values[self._rows]
