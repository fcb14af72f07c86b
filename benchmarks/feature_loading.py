"""Random-access region-feature batches: memory-mapped Arrow store vs per-image `.npz` files.

Both sides read the same images (50 regions x 2048 float32 + boxes) for the same random batches
of 50 and pad them with the same `collate_images`; the only difference is the source: our
converted Arrow table (`ImageDataset`, zero-copy views) or one `np.load` per image, which is
how X-modaler reads features. Rounds alternate which side goes first; the page cache is warm
for both (the files were just written). Also reports the conversion's speed and peak memory
growth (bounded by the write chunk, not the data size), the default synthetic build time
(4000/500/500 images, target < 10 s), and DataLoader batches/s with 0 and 2 workers.

    python benchmarks/feature_loading.py [--images 1000] [--rounds 30]

The last line printed is the headline ratio.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from datasets import load_from_disk
from torch.utils.data import DataLoader, Dataset

from xmodaler_accel.data import (
    ImageDataset,
    build_synthetic,
    collate_images,
    convert_karpathy,
    location_features,
)

REGIONS, DIM, BATCH = 50, 2048, 50


class NpzImageDataset(Dataset):
    """The baseline: one `np.load` per image, as X-modaler's dataset does."""

    def __init__(self, folder: Path, keys: list[str]) -> None:
        self.folder, self.keys = folder, keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> dict:
        with np.load(self.folder / f"{self.keys[index]}.npz") as content:
            features, boxes = content["features"], content["boxes"]
            width, height = int(content["image_w"]), int(content["image_h"])
        return {
            "index": index,
            "image_id": int(self.keys[index]),
            "features": features,
            "boxes": location_features(boxes, width, height),
        }


def write_fixture(root: Path, images: int) -> tuple[Path, Path]:
    """Per-image npz files (uncompressed, the faster baseline) and a Karpathy JSON over them."""
    rng = np.random.default_rng(0)
    folder = root / "npz"
    folder.mkdir()
    entries = []
    for i in range(images):
        xy = rng.uniform(0, 300, size=(REGIONS, 2)).astype(np.float32)
        boxes = np.concatenate([xy, xy + rng.uniform(10, 300, size=(REGIONS, 2))], axis=1)
        np.savez(
            folder / f"{i}.npz",
            features=rng.standard_normal((REGIONS, DIM), dtype=np.float32),
            boxes=boxes.astype(np.float32),
            image_w=640,
            image_h=480,
        )
        sentence = {"raw": f"image {i}", "tokens": ["image", str(i)]}
        entries.append({"filename": f"{i}.jpg", "imgid": i, "cocoid": i, "split": "train"})
        entries[-1]["sentences"] = [sentence]
    annotations = root / "dataset.json"
    annotations.write_text(json.dumps({"images": entries}))
    return folder, annotations


def time_batch(dataset: Dataset, indices: np.ndarray) -> float:
    start = time.perf_counter()
    batch = collate_images([dataset[int(i)] for i in indices])
    elapsed = time.perf_counter() - start
    assert batch["features"].shape == (BATCH, REGIONS, DIM)
    return elapsed


def loader_rate(dataset: Dataset, workers: int, batches: int) -> float:
    """Batches per second after the first batch (worker start-up excluded)."""
    loader = DataLoader(
        dataset, batch_size=BATCH, shuffle=True, collate_fn=collate_images, num_workers=workers
    )
    iterator = iter(loader)
    next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    rate = batches / (time.perf_counter() - start)
    del iterator
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--loader-batches", type=int, default=15)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder, annotations = write_fixture(root, args.images)
        megabytes = args.images * REGIONS * DIM * 4 / 2**20
        peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        start = time.perf_counter()
        out = convert_karpathy(annotations, folder, root / "arrow", min_count=1, progress=False)
        seconds = time.perf_counter() - start
        peak_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - peak_before
        print(
            f"convert {args.images} npz -> Arrow ({megabytes:.0f} MB): {seconds:.2f} s, "
            f"{megabytes / seconds:.0f} MB/s, peak RSS grew {peak_growth:.0f} MB"
        )
        start = time.perf_counter()
        build_synthetic(root / "synthetic", rebuild=True)
        print(f"synthetic build (4000/500/500 images, 256-d): {time.perf_counter() - start:.2f} s")

        arrow = ImageDataset(load_from_disk(str(out))["train"])
        npz = NpzImageDataset(folder, [str(i) for i in range(args.images)])
        rng = np.random.default_rng(1)
        check = rng.choice(args.images, size=BATCH, replace=False)
        same = [collate_images([d[int(i)] for i in check]) for d in (arrow, npz)]
        assert torch.equal(same[0]["features"], same[1]["features"]), "stores differ"
        assert torch.allclose(same[0]["boxes"], same[1]["boxes"]), "boxes differ"
        times: dict[str, list[float]] = {"arrow": [], "npz": []}
        for round_ in range(args.rounds + 2):
            indices = rng.choice(args.images, size=BATCH, replace=False)
            order = [("arrow", arrow), ("npz", npz)][:: 1 if round_ % 2 else -1]
            for name, dataset in order:
                elapsed = time_batch(dataset, indices)
                if round_ >= 2:  # two warm-up rounds
                    times[name].append(elapsed)
        arrow_ms = 1000 * statistics.median(times["arrow"])
        npz_ms = 1000 * statistics.median(times["npz"])
        print(f"random batch, Arrow store:     {arrow_ms:6.2f} ms (median of {args.rounds})")
        print(f"random batch, per-image npz:   {npz_ms:6.2f} ms (median of {args.rounds})")

        for workers in (0, 2):
            for name, dataset in (("Arrow", arrow), ("npz", npz)):
                rate = loader_rate(dataset, workers, args.loader_batches)
                print(f"DataLoader {name:5s} num_workers={workers}: {rate:6.1f} batches/s")
        print(
            f"ratio {npz_ms / arrow_ms:.1f}x (Arrow vs per-image npz, 50x50x2048 float32 batches)"
        )


if __name__ == "__main__":
    main()
