"""Data layer: synthetic scenes, converters to Arrow, feature readers, tokenizers, batching.

Every dataset (synthetic or converted) is a directory that `datasets.load_from_disk` opens
memory-mapped, with `tokenizer/` and `meta.json` beside the splits. The command line lives in
`python -m xmodaler_accel.data.convert`.
"""

from .collate import (
    collate_images,
    collate_pairs,
    mask_regions,
    mask_tokens,
    pad_ids,
    pad_regions,
)
from .columns import ArrowColumns
from .converters import convert_images, convert_karpathy, read_karpathy
from .datasets import ImageDataset, PairDataset
from .errors import (
    DataError,
    EmptyCaptionError,
    FeatureFileNotFoundError,
    FeatureShapeError,
    MalformedLineError,
    UnknownSplitError,
)
from .features import (
    BottomUpTSV,
    HDF5Features,
    NpzFolder,
    RegionFeatures,
    location_features,
    open_features,
)
from .pairs import convert_pairs, read_pairs
from .source import DATASET_DEFAULTS, dataset_dir, open_dataset
from .store import (
    SplitWriter,
    atomic_directory,
    image_table_features,
    read_meta,
    vcr_table_features,
)
from .synthetic import SyntheticConfig, build_synthetic, default_cache_dir, synthetic_dir
from .tokenizer import (
    build_word_vocab,
    karpathy_tokenize,
    load_bert_vocab,
    load_tokenizer,
    save_tokenizer,
    train_wordpiece,
)
from .vcr import convert_vcr, read_vcr

__all__ = [
    "DATASET_DEFAULTS",
    "ArrowColumns",
    "BottomUpTSV",
    "DataError",
    "EmptyCaptionError",
    "FeatureFileNotFoundError",
    "FeatureShapeError",
    "HDF5Features",
    "ImageDataset",
    "MalformedLineError",
    "NpzFolder",
    "PairDataset",
    "RegionFeatures",
    "SplitWriter",
    "SyntheticConfig",
    "UnknownSplitError",
    "atomic_directory",
    "build_synthetic",
    "build_word_vocab",
    "collate_images",
    "collate_pairs",
    "convert_images",
    "convert_karpathy",
    "convert_pairs",
    "convert_vcr",
    "dataset_dir",
    "default_cache_dir",
    "image_table_features",
    "karpathy_tokenize",
    "load_bert_vocab",
    "load_tokenizer",
    "location_features",
    "mask_regions",
    "mask_tokens",
    "open_dataset",
    "open_features",
    "pad_ids",
    "pad_regions",
    "read_karpathy",
    "read_meta",
    "read_pairs",
    "read_vcr",
    "save_tokenizer",
    "synthetic_dir",
    "train_wordpiece",
    "vcr_table_features",
]
