"""On-disk cache of CIDEr-D document frequencies, keyed by the reference corpus and settings.

X-modaler's ``tools/cider_cache.py`` pickles document frequencies once per training set; a stale
or missing file then silently skews rewards or crashes SCST (CLIP-ViL #2). Here the file stores a
SHA-256 of the normalised reference token ids and every setting that changes the frequencies; a
file whose key differs is rebuilt, a missing one is built. The file is a plain ``.npz`` read with
``allow_pickle=False`` and written atomically (temporary file, then rename).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

__all__ = [
    "CACHE_VERSION",
    "DocFrequencies",
    "corpus_key",
    "load_df",
    "resolve_cache_file",
    "save_df",
]

CACHE_VERSION = 1
logger = logging.getLogger(__name__)

# Sorted uint64 n-gram keys, the number of images whose references contain each, each one's order
# (0 for unigrams), and the number of images.
DocFrequencies = tuple[np.ndarray, np.ndarray, np.ndarray, int]


def corpus_key(
    tokens: np.ndarray, lengths: np.ndarray, refs_per_image: np.ndarray, settings: dict
) -> str:
    """SHA-256 over the references as scored (cut, with EOS if included) and the settings."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"version": CACHE_VERSION, **settings}, sort_keys=True).encode())
    digest.update(np.ascontiguousarray(refs_per_image, dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(lengths, dtype=np.int64).tobytes())
    mask = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
    digest.update(np.ascontiguousarray(tokens[mask], dtype=np.int64).tobytes())
    return digest.hexdigest()


def resolve_cache_file(cache_path: str | os.PathLike, key: str) -> Path:
    """A directory gets a file named after the key; anything else is the file itself."""
    path = Path(cache_path)
    if path.is_dir():
        return path / f"cider_df_{key[:16]}.npz"
    return path


def load_df(path: Path, key: str, n: int) -> DocFrequencies | None:
    """The cached frequencies if ``path`` holds them for exactly this ``key``; else None."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["key"]) != key or int(data["n"]) != n:
                logger.warning("CIDEr-D cache %s was built for another corpus; rebuilding", path)
                return None
            return data["df_keys"], data["df_counts"], data["df_order"], int(data["num_images"])
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as err:
        logger.warning("CIDEr-D cache %s is unreadable (%s); rebuilding", path, err)
        return None


def save_df(path: Path, key: str, df: DocFrequencies, n: int) -> None:
    """Write the frequencies to ``path`` atomically."""
    keys, counts, orders, num_images = df
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f,
                key=np.array(key),
                n=n,
                num_images=num_images,
                df_keys=keys,
                df_counts=counts,
                df_order=orders,
            )
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
