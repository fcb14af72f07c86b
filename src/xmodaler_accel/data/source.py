"""Where a recipe's data comes from: `data.source` is "synthetic" (the embedded scenes, built on
first use with `data.synthetic`, then cached) or a directory written by
`python -m xmodaler_accel.data.convert`. Every task reads its data through here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import ConfigError
from .errors import DataError
from .store import read_meta
from .synthetic import build_synthetic, synthetic_dir

# The `data:` keys every recipe understands; each task adds its own beside them.
DATASET_DEFAULTS: dict[str, Any] = {
    "source": "synthetic",
    "cache_dir": "",
    "synthetic": {"seed": 0, "feat_dim": 256, "num_train": 4000, "num_val": 500, "num_test": 500},
}


def dataset_dir(cfg: Any) -> Path:
    """The dataset directory (built for the synthetic task on first use, then cached)."""
    if cfg.data.source == "synthetic":
        return synthetic_dir(cfg.data.cache_dir or None, **cfg.data.synthetic)
    path = Path(cfg.data.source)
    if not path.is_dir():
        raise ConfigError(
            f"config key 'data.source': no dataset directory at {path} (give 'synthetic', or a "
            "directory written by `python -m xmodaler_accel.data.convert`)"
        )
    return path


def open_dataset(cfg: Any):
    """The `DatasetDict` of `data.source`, memory-mapped."""
    from datasets import load_from_disk

    if cfg.data.source == "synthetic":
        return build_synthetic(cfg.data.cache_dir or None, **cfg.data.synthetic)
    path = dataset_dir(cfg)
    try:
        data = load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as err:
        raise DataError(
            f"data.source {path} is not a dataset written by `python -m xmodaler_accel.data.convert`"
            f" ({err})"
        ) from None
    check_patch_regions(cfg, path, data)
    return data


def check_patch_regions(cfg: Any, path: Path, data: Any) -> None:
    """A backbone's patch grid (the `images` converter) is the whole picture: `data.max_feat_num`
    below its size would keep the first patches only (the top rows), so it is refused. Bottom-up
    regions, sorted by confidence, are cut as X-modaler cuts them."""
    limit = getattr(cfg.data, "max_feat_num", 0)
    if limit <= 0 or read_meta(path).get("kind") != "images":
        return
    split = next(iter(data.values()))
    regions = max(split["num_regions"], default=0)
    if regions > limit:
        raise ConfigError(
            f"data.max_feat_num is {limit} but the images of {path} have {regions} patch regions "
            f"each (a backbone's grid): set data.max_feat_num=0 (all) or {regions}"
        )
