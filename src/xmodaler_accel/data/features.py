"""Readers for the region-feature formats users download, with shape checks on every read.

- a folder of per-image `.npz` files (keys `features`, `boxes`, `image_h`, `image_w`, optional
  `cls_prob`; a single-array npz holds features only), as X-modaler reads them;
- bottom-up-attention TSV files (`image_id, image_w, image_h, num_boxes, boxes, features`, arrays
  base64-encoded float32), as released with the up-down features;
- HDF5 files, either meshed-memory style (`<id>_features`, `<id>_boxes`, `<id>_cls_prob` datasets)
  or one group per image holding `features`, `boxes`, ... datasets.
"""

from __future__ import annotations

import base64
import binascii
import logging
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from .errors import DataError, FeatureFileNotFoundError, FeatureShapeError

logger = logging.getLogger(__name__)

BOTTOM_UP_FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")


@dataclass
class RegionFeatures:
    """Regions of one image as read from disk; boxes are pixel (x1, y1, x2, y2)."""

    features: np.ndarray
    boxes: np.ndarray | None = None
    image_w: int | None = None
    image_h: int | None = None
    cls_prob: np.ndarray | None = None


class FeatureReader(Protocol):
    """What the converters need from a feature source."""

    source: str

    def read(self, key: str) -> RegionFeatures: ...

    def keys(self) -> Iterator[str]: ...

    def locate(self, key: str) -> str:
        """The file (and line) holding an image, with its key, for error messages."""
        ...


def check_regions(
    regions: RegionFeatures, where: str, feat_dim: int | None = None, why: str = ""
) -> RegionFeatures:
    """Raise FeatureShapeError unless features are (N>0, feat_dim), boxes (N, 4), all finite.

    `why` says where `feat_dim` came from; it ends the message of a width mismatch.
    """
    feats = regions.features
    if feats.ndim != 2 or feats.shape[0] == 0:
        raise FeatureShapeError(
            f"{where}: features have shape {feats.shape}, expected (N, D) with N > 0"
        )
    if feat_dim and feats.shape[1] != feat_dim:
        raise FeatureShapeError(
            f"{where}: features have shape {feats.shape}, expected (N, {feat_dim}){why}"
        )
    num = feats.shape[0]
    if regions.boxes is not None and regions.boxes.shape != (num, 4):
        raise FeatureShapeError(
            f"{where}: boxes have shape {regions.boxes.shape}, expected ({num}, 4)"
        )
    if regions.cls_prob is not None and (
        regions.cls_prob.ndim != 2 or regions.cls_prob.shape[0] != num
    ):
        raise FeatureShapeError(
            f"{where}: cls_prob has shape {regions.cls_prob.shape}, expected ({num}, C)"
        )
    if not np.isfinite(feats).all():
        raise FeatureShapeError(f"{where}: features contain NaN or infinite values")
    return regions


def location_features(boxes: np.ndarray, image_w: float, image_h: float) -> np.ndarray:
    """X-modaler's 5-d box features: (x1/w, y1/h, x2/w, y2/h, box area / image area)."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    out = np.empty((len(boxes), 5), dtype=np.float32)
    out[:, 0] = boxes[:, 0] / image_w
    out[:, 1] = boxes[:, 1] / image_h
    out[:, 2] = boxes[:, 2] / image_w
    out[:, 3] = boxes[:, 3] / image_h
    out[:, 4] = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / (image_w * image_h)
    return out


def _scalar(value: np.ndarray | int | float) -> int:
    """An image size stored as a number, a 0-d or a one-element array."""
    return int(np.asarray(value).reshape(-1)[0])


class NpzFolder:
    """`<root>/<key>.npz` per image (or `<key>.npy`, features only)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            state = "is not a folder" if self.root.exists() else "does not exist"
            raise FeatureFileNotFoundError(f"feature folder {self.root} {state}")
        self.source = str(self.root)

    def path(self, key: str) -> Path:
        """The `.npz` of an image, or its `.npy` when only that exists."""
        path = self.root / f"{key}.npz"
        npy = path.with_suffix(".npy")
        return npy if not path.is_file() and npy.is_file() else path

    def locate(self, key: str) -> str:
        return f"{self.path(key)} (image {key!r})"

    def read(self, key: str) -> RegionFeatures:
        path = self.path(key)
        if not path.is_file():
            raise FeatureFileNotFoundError(f"missing feature file {path} for image {key!r}")
        try:
            if path.suffix == ".npy":
                return RegionFeatures(np.load(path))
            return self._read_npz(path)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            if isinstance(err, DataError):
                raise
            raise FeatureShapeError(
                f"{path}: cannot read features for image {key!r} ({err})"
            ) from None

    @staticmethod
    def _read_npz(path: Path) -> RegionFeatures:
        with np.load(path) as content:
            names = list(content.files)
            if "features" in names or "feat" in names:
                feats = content["features" if "features" in names else "feat"]
            elif len(names) == 1:
                feats = content[names[0]]
            else:
                raise FeatureShapeError(f"{path}: no 'features' array among keys {names}")
            boxes = content["boxes"] if "boxes" in names else None
            size = [_scalar(content[k]) if k in names else None for k in ("image_w", "image_h")]
            cls_prob = content["cls_prob"] if "cls_prob" in names else None
        return RegionFeatures(feats, boxes, size[0], size[1], cls_prob)

    def keys(self) -> Iterator[str]:
        for path in sorted(self.root.rglob("*.np[zy]")):
            yield str(path.relative_to(self.root).with_suffix(""))


def _decode(field: bytes, rows: int, where: str, name: str) -> np.ndarray:
    try:
        array = np.frombuffer(base64.b64decode(field, validate=True), dtype=np.float32)
    except (binascii.Error, ValueError) as err:
        raise FeatureShapeError(f"{where}: {name} is not base64 float32 ({err})") from None
    if rows <= 0 or array.size % rows:
        raise FeatureShapeError(f"{where}: {name} has {array.size} values for {rows} boxes")
    return array.reshape(rows, -1)


def _number(row: dict[str, bytes], name: str, where: str) -> int:
    try:
        return int(float(row[name]))
    except ValueError:
        raise FeatureShapeError(f"{where}: {name} is {row[name][:20]!r}, not a number") from None


class BottomUpTSV:
    """Bottom-up-attention TSV files, indexed by one scan of byte offsets (no data kept)."""

    def __init__(self, paths: Sequence[str | Path], fields: Sequence[str] = BOTTOM_UP_FIELDS):
        self.paths = [Path(p) for p in paths]
        self.fields = tuple(fields)
        missing = [f for f in ("image_id", "num_boxes", "features") if f not in self.fields]
        if missing:
            raise DataError(f"TSV fields {' '.join(self.fields)} (--tsv-fields) lack {missing}")
        self.source = ", ".join(str(p) for p in self.paths)
        self._offsets: dict[str, tuple[int, int, int]] = {}
        for file_index, path in enumerate(self.paths):
            if not path.is_file():
                state = "is not a file" if path.exists() else "does not exist"
                raise FeatureFileNotFoundError(f"feature file {path} {state}")
            self._index(file_index, path)

    def _index(self, file_index: int, path: Path) -> None:
        id_column = self.fields.index("image_id")
        with open(path, "rb") as handle:
            offset = 0
            for line_no, line in enumerate(handle, start=1):
                if line.strip():
                    parts = line.split(b"\t", id_column + 1)
                    if len(parts) <= id_column:
                        raise FeatureShapeError(
                            f"{path}:{line_no}: {len(parts)} fields, expected {len(self.fields)} "
                            f"({' '.join(self.fields)}; see --tsv-fields)"
                        )
                    key = parts[id_column].decode("utf-8", "replace").strip()
                    self._offsets[key] = (file_index, offset, line_no)
                offset += len(line)

    def keys(self) -> Iterator[str]:
        return iter(self._offsets)

    def locate(self, key: str) -> str:
        if key not in self._offsets:
            return f"image {key!r} in {self.source}"
        file_index, _, line_no = self._offsets[key]
        return f"{self.paths[file_index]}:{line_no} (image {key!r})"

    def read(self, key: str) -> RegionFeatures:
        if key not in self._offsets:
            raise FeatureFileNotFoundError(
                f"image {key!r} not found in feature files {self.source}"
            )
        file_index, offset, line_no = self._offsets[key]
        path = self.paths[file_index]
        with open(path, "rb") as handle:
            handle.seek(offset)
            parts = handle.readline().rstrip(b"\r\n").split(b"\t")
        where = f"{path}:{line_no} (image {key!r})"
        if len(parts) != len(self.fields):
            raise FeatureShapeError(
                f"{where}: {len(parts)} fields, expected {len(self.fields)} "
                f"({' '.join(self.fields)}; see --tsv-fields)"
            )
        row = dict(zip(self.fields, parts))
        rows = _number(row, "num_boxes", where)
        boxes = _decode(row["boxes"], rows, where, "boxes") if "boxes" in row else None
        cls_prob = _decode(row["cls_prob"], rows, where, "cls_prob") if "cls_prob" in row else None
        size = [_number(row, k, where) if k in row else None for k in ("image_w", "image_h")]
        feats = _decode(row["features"], rows, where, "features")
        return RegionFeatures(feats, boxes, size[0], size[1], cls_prob)


class HDF5Features:
    """One HDF5 file: `<key>_features` datasets (meshed-memory) or a group per image."""

    def __init__(self, path: str | Path) -> None:
        try:
            import h5py
        except ImportError as err:  # pragma: no cover - h5py is a dev extra
            raise ImportError("reading HDF5 features needs h5py: pip install h5py") from err
        self.path = Path(path)
        if not self.path.is_file():
            state = "is not a file" if self.path.exists() else "does not exist"
            raise FeatureFileNotFoundError(f"feature file {self.path} {state}")
        self.source = str(self.path)
        self._h5py = h5py
        self._file = None
        self._handle()  # a file that is not HDF5 fails here, before any conversion work

    def _handle(self):
        if self._file is None:
            try:
                self._file = self._h5py.File(self.path, "r")
            except OSError as err:
                raise FeatureShapeError(f"{self.path}: cannot open as HDF5 ({err})") from None
        return self._file

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None}

    def keys(self) -> Iterator[str]:
        for name in self._handle():
            if name.endswith("_features"):
                yield name[: -len("_features")]
            elif isinstance(self._handle()[name], self._h5py.Group):
                yield name

    def locate(self, key: str) -> str:
        return f"{self.path} (image {key!r})"

    def read(self, key: str) -> RegionFeatures:
        try:
            return self._read(key)
        except (OSError, KeyError) as err:  # h5py's errors for damaged objects and data
            if isinstance(err, DataError):
                raise
            raise FeatureShapeError(f"{self.locate(key)}: cannot read features ({err})") from None

    def _read(self, key: str) -> RegionFeatures:
        handle = self._handle()
        if key in handle and isinstance(handle[key], self._h5py.Group):
            group, prefix = handle[key], ""
        elif f"{key}_features" in handle:
            group, prefix = handle, f"{key}_"
        else:
            raise FeatureFileNotFoundError(f"image {key!r} not found in feature file {self.path}")

        def get(name: str) -> np.ndarray | None:
            full = prefix + name
            if full in group:
                return group[full][()]
            if name in group.attrs and not prefix:
                return np.asarray(group.attrs[name])
            return None

        features = get("features")
        if features is None:
            raise FeatureShapeError(f"{self.locate(key)}: no 'features' dataset")
        width, height = (get(k) for k in ("image_w", "image_h"))
        return RegionFeatures(
            np.asarray(features),
            get("boxes"),
            None if width is None else _scalar(width),
            None if height is None else _scalar(height),
            get("cls_prob"),
        )


def open_features(
    paths: str | Path | Sequence[str | Path], fmt: str = "auto", tsv_fields: Sequence[str] = ()
) -> FeatureReader:
    """Open a feature source: a folder of npz, bottom-up TSV file(s), or an HDF5 file."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FeatureFileNotFoundError(f"feature path {', '.join(missing)} does not exist")
    if fmt == "auto":
        suffix = paths[0].suffix.lower()
        if paths[0].is_dir():
            fmt = "npz"
        elif suffix in (".h5", ".hdf5"):
            fmt = "hdf5"
        elif suffix == ".tsv" or ".tsv." in paths[0].name:
            fmt = "tsv"
        else:
            raise FeatureFileNotFoundError(
                f"cannot tell the feature format of {paths[0]}: expected a folder of .npz files, "
                "a .tsv or a .h5/.hdf5 file"
            )
    if fmt == "npz":
        return NpzFolder(paths[0])
    if fmt == "tsv":
        return BottomUpTSV(paths, tuple(tsv_fields) or BOTTOM_UP_FIELDS)
    if fmt == "hdf5":
        return HDF5Features(paths[0])
    raise ValueError(f"unknown feature format {fmt!r}; expected auto, npz, tsv or hdf5")
