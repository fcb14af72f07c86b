"""Grid features from a `transformers` vision backbone: patch tokens as regions, patch cells as boxes.

Any checkpoint that `AutoModel` + `AutoImageProcessor` load works when its vision part returns a
`last_hidden_state` of patch tokens (ViT, DINOv2, the vision towers of CLIP and SigLIP, whose
full models are reduced to `model.vision_model`) or a feature map [B, C, h, w] (ConvNeXt, ResNet).
The boxes are the cells of the patch grid over the image the model sees, in the store's 5-d
convention, so the box embedding of the recipes still applies.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import DataError

# What PIL raises for a missing, truncated or not-an-image file (SyntaxError: some broken headers).
_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class BadImageError(DataError):
    """An image file that cannot be opened or decoded; the message names the file."""


class UnsupportedBackboneError(DataError):
    """A backbone whose output is not a sequence of patch tokens or a feature map."""


def load_image(path: str | os.PathLike) -> Image.Image:
    """RGB image with its EXIF orientation applied, fully decoded (a truncated file fails here)."""
    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            return image.convert("RGB")
    except _IMAGE_ERRORS as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else err
        raise BadImageError(f"{path}: cannot read the image ({reason})") from None


def save_random_backbone(
    directory: str | os.PathLike,
    *,
    image_size: int = 64,
    patch_size: int = 16,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
) -> Path:
    """A tiny randomly initialised ViT and its image processor saved to `directory` (for tests
    and examples: loadable offline by BackboneFeatures)."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    directory = Path(directory)
    config = ViTConfig(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=4 * hidden_size,
    )
    torch.manual_seed(seed)
    ViTModel(config).save_pretrained(directory)
    size = {"height": image_size, "width": image_size}
    ViTImageProcessor(size=size).save_pretrained(directory)
    return directory


def grid_boxes(grid_h: int, grid_w: int) -> np.ndarray:
    """5-d boxes (x1/w, y1/h, x2/w, y2/h, area fraction) of a grid's cells, row by row."""
    ys, xs = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    xs, ys = xs.reshape(-1).astype(np.float32), ys.reshape(-1).astype(np.float32)
    boxes = np.empty((grid_h * grid_w, 5), dtype=np.float32)
    boxes[:, 0] = xs / grid_w
    boxes[:, 1] = ys / grid_h
    boxes[:, 2] = (xs + 1) / grid_w
    boxes[:, 3] = (ys + 1) / grid_h
    boxes[:, 4] = 1.0 / (grid_h * grid_w)
    return boxes


WHOLE_IMAGE_BOX = np.array([[0.0, 0.0, 1.0, 1.0, 1.0]], dtype=np.float32)


def _patch_size(config: Any) -> tuple[int, int] | None:
    size = getattr(config, "patch_size", None)
    if isinstance(size, int):
        return size, size
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return int(size[0]), int(size[1])
    return None


class BackboneFeatures:
    """Patch-token features of a batch of images from a `transformers` vision backbone.

    `backbone` is a local directory or a hub name (read from the user's cache or the hub as
    `from_pretrained` does; nothing forces a download). `dtype` bfloat16 runs the forward under
    autocast (the default on CUDA); the features come back as float32 either way.
    """

    def __init__(
        self,
        backbone: str | os.PathLike,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        global_feature: bool = False,
    ) -> None:
        from transformers import AutoImageProcessor, AutoModel

        self.backbone = str(backbone)
        self.device = torch.device(device)
        if dtype is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.dtype = dtype
        self.global_feature = global_feature
        try:
            self.processor = AutoImageProcessor.from_pretrained(self.backbone)
            model = AutoModel.from_pretrained(self.backbone)
        except (OSError, ValueError) as err:
            raise UnsupportedBackboneError(
                f"cannot load backbone {self.backbone!r} with AutoModel and AutoImageProcessor "
                f"({' '.join(str(err).splitlines())})"
            ) from None
        # CLIP / SigLIP / BLIP full models: keep the vision tower only.
        self.model = getattr(model, "vision_model", model).to(self.device).eval()
        self.config = getattr(self.model, "config", model.config)
        if hasattr(self.config, "vision_config"):
            self.config = self.config.vision_config
        width = getattr(self.config, "hidden_size", None)
        if width is None:
            sizes = getattr(self.config, "hidden_sizes", None)
            width = sizes[-1] if sizes else None
        if width is None:
            raise UnsupportedBackboneError(
                f"backbone {self.backbone!r} ({type(self.model).__name__}): its config has no "
                "hidden_size to tell the feature width"
            )
        self.feat_dim: int = int(width)

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Pixel values [B, 3, H, W] as the backbone's image processor makes them."""
        return self.processor(images=list(images), return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor) -> list[dict[str, np.ndarray]]:
        """One forward of a preprocessed batch; per image `features` [N, feat_dim] and `boxes`
        [N, 5] (see `__call__`)."""
        pixel_values = pixel_values.to(self.device)
        autocast = self.dtype != torch.float32
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=autocast):
            output = self.model(pixel_values=pixel_values)
        tokens, boxes = self._patch_tokens(output.last_hidden_state, pixel_values.shape[-2:])
        if self.global_feature:
            pooled = self._pooled(output)
            tokens = torch.cat([pooled[:, None], tokens], dim=1)
            boxes = np.concatenate([WHOLE_IMAGE_BOX, boxes])
        features = tokens.float().cpu().numpy()
        return [{"features": f, "boxes": boxes.copy()} for f in features]

    def __call__(self, images: Sequence[Image.Image]) -> list[dict[str, np.ndarray]]:
        """Per image: `features` [N, feat_dim] float32, the patch tokens of the last hidden state
        (with `global_feature`, the pooled token first), and `boxes` [N, 5] float32, the patch
        cells (x1/w, y1/h, x2/w, y2/h, area fraction) of the image the model sees; the global
        token's box is the whole image. One batched forward."""
        return self.encode(self.preprocess(images))

    def _patch_tokens(
        self, hidden: torch.Tensor, pixel_hw: Sequence[int]
    ) -> tuple[torch.Tensor, np.ndarray]:
        if hidden.ndim == 4:  # a feature map [B, C, h, w]
            grid_h, grid_w = hidden.shape[-2:]
            return hidden.flatten(2).transpose(1, 2), grid_boxes(grid_h, grid_w)
        if hidden.ndim != 3:
            raise UnsupportedBackboneError(
                f"backbone {self.backbone!r}: last_hidden_state has shape {tuple(hidden.shape)}, "
                "expected patch tokens [B, L, D] or a feature map [B, C, h, w]"
            )
        length = hidden.shape[1]
        patch = _patch_size(self.config)
        grid = None
        if patch is not None:
            grid = (int(pixel_hw[0]) // patch[0], int(pixel_hw[1]) // patch[1])
        if grid is None or not 0 < grid[0] * grid[1] <= length:
            # No usable patch size (e.g. a hierarchical model): a square grid after prefix tokens.
            for prefix in range(0, 9):
                side = math.isqrt(length - prefix) if length > prefix else 0
                if side and side * side == length - prefix:
                    grid = (side, side)
                    break
            else:
                raise UnsupportedBackboneError(
                    f"backbone {self.backbone!r}: cannot lay {length} tokens out as a patch grid "
                    f"of a {pixel_hw[0]}x{pixel_hw[1]} input"
                )
        prefix = length - grid[0] * grid[1]  # CLS and register tokens come first
        return hidden[:, prefix:], grid_boxes(*grid)

    def _pooled(self, output: Any) -> torch.Tensor:
        """The pooled output when the model has one of the feature width, else the CLS token."""
        pooled = getattr(output, "pooler_output", None)
        if pooled is not None and pooled.ndim == 4:  # conv nets: [B, C, 1, 1]
            pooled = pooled.flatten(1)
        if pooled is not None and pooled.ndim == 2 and pooled.shape[-1] == self.feat_dim:
            return pooled
        hidden = output.last_hidden_state
        if hidden.ndim == 3:
            return hidden[:, 0]
        return hidden.mean(dim=(2, 3))
