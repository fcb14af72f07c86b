"""Errors raised by the data layer; each message names the file and the image or line at fault."""

from __future__ import annotations

from ..errors import UserError


class DataError(UserError, ValueError):
    """Base class: input data that cannot be converted or loaded as it stands."""


class FeatureFileNotFoundError(DataError, FileNotFoundError):
    """The feature file (or the entry inside a feature file) for an image does not exist."""


class FeatureShapeError(DataError):
    """Region features, boxes or class probabilities have a shape other than expected."""


class EmptyCaptionError(DataError):
    """A caption has no tokens left after lower-casing and removing punctuation."""


class UnknownSplitError(DataError):
    """An annotation names a split that is not train/val/test (or restval, folded into train)."""


class MalformedLineError(DataError):
    """A line of a JSONL/TSV annotation file is not UTF-8, cannot be parsed, lacks a required
    field or has a field of the wrong type."""
