"""Backbone features of image files, extracted in resumable chunks and sharded over processes.

The images are cut into chunks of `chunk_images`; process `rank` of `world` extracts chunks
`i % world == rank` and writes each as `chunk-<i>.npz` in a work folder, atomically (a temporary
name renamed into place), so a killed extraction reruns only the chunks it had not finished and
the result does not depend on how many processes made it. `plan.json` there records what the
chunks hold (images, backbone, precision); a work folder of another plan is discarded.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import sys
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..progress import progress_bar
from .backbone import BackboneFeatures, BadImageError, load_image

logger = logging.getLogger(__name__)

PLAN_FILE = "plan.json"
# Test-only: a process exits abruptly (as if killed) after writing this many chunks.
DIE_AFTER_CHUNKS_ENV = "XMODALER_TEST_DIE_AFTER_CHUNKS"
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DIST_TIMEOUT_ENV = "XMODALER_DIST_TIMEOUT_S"  # as setup.make_accelerator reads it


@dataclass
class ExtractionPlan:
    """What the chunks of a work folder hold; a rerun resumes only under the same plan."""

    files: list[str]
    keys: list[str]
    backbone: str
    global_feature: bool
    precision: str
    dtype: str
    chunk_images: int

    @property
    def num_chunks(self) -> int:
        return -(-len(self.files) // self.chunk_images)

    def chunk(self, index: int) -> range:
        start = index * self.chunk_images
        return range(start, min(start + self.chunk_images, len(self.files)))


def chunk_path(work: Path, index: int) -> Path:
    return work / f"chunk-{index:06d}.npz"


def process_state() -> Any:
    """Accelerate's PartialState of this launch (gloo between processes on a machine without
    CUDA), checked against the launcher's WORLD_SIZE."""
    from accelerate import PartialState

    timeout = datetime.timedelta(seconds=int(os.environ.get(DIST_TIMEOUT_ENV, 1800)))
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=timeout)
    expected = int(os.environ.get("WORLD_SIZE", 1))
    if state.num_processes != expected:
        raise RuntimeError(
            f"WORLD_SIZE is {expected} but Accelerate started {state.num_processes} "
            "process(es); on a CPU-only machine use torchrun instead of `accelerate launch`"
        )
    return state


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` is bfloat16 on CUDA and float32 elsewhere."""
    if precision == "auto":
        return "bfloat16" if device.type == "cuda" else "float32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be auto, float32 or bfloat16, got {precision!r}")
    return precision


def prepare_work(work: Path, plan: ExtractionPlan) -> int:
    """Create or reuse the work folder (main process only); returns the chunks already done."""
    work.mkdir(parents=True, exist_ok=True)
    for stale in work.glob(".*.tmp-*"):  # a write cut short by a kill
        stale.unlink(missing_ok=True)
    plan_file = work / PLAN_FILE
    if plan_file.is_file():
        try:
            old = json.loads(plan_file.read_text())
        except json.JSONDecodeError:
            old = None
        if old != asdict(plan):
            logger.warning("%s holds chunks of another extraction: starting over", work)
            for path in work.glob("chunk-*.npz"):
                path.unlink()
    tmp = work / f".{PLAN_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(asdict(plan)))
    os.replace(tmp, plan_file)
    return sum(chunk_path(work, i).is_file() for i in range(plan.num_chunks))


class _Batches(torch.utils.data.Dataset):
    """Batches of images decoded and preprocessed (in DataLoader workers when there are some)."""

    def __init__(self, plan: ExtractionPlan, batches: list[tuple[int, range]], processor: Any):
        self.plan, self.batches, self.processor = plan, batches, processor

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> dict[str, Any]:
        chunk, positions = self.batches[index]
        images, sizes, errors = [], [], []
        for position in positions:
            try:
                image = load_image(self.plan.files[position])
            except BadImageError as err:
                errors.append(str(err))
                sizes.append((0, 0))
                continue
            errors.append("")
            sizes.append(image.size)
            images.append(image)
        pixels = None
        if images:
            pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        return {"chunk": chunk, "positions": positions, "sizes": sizes, "errors": errors,
                "pixel_values": pixels}  # fmt: skip


def _write_chunk(path: Path, plan: ExtractionPlan, parts: list[dict[str, Any]], dim: int) -> None:
    """One chunk's images: regions concatenated, per-image counts, sizes and read errors."""
    keys, sizes, errors, counts, features, boxes = [], [], [], [], [], []
    for part in parts:
        regions = iter(part["regions"])
        for position, size, error in zip(part["positions"], part["sizes"], part["errors"]):
            keys.append(plan.keys[position])
            sizes.append(size)
            errors.append(error)
            if error:
                counts.append(0)
                continue
            region = next(regions)
            counts.append(len(region["features"]))
            features.append(region["features"].astype(plan.dtype))
            boxes.append(region["boxes"])
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    with open(tmp, "wb") as handle:
        np.savez(
            handle,
            keys=np.array(keys, dtype=str),
            image_w=np.array([s[0] for s in sizes], dtype=np.int32),
            image_h=np.array([s[1] for s in sizes], dtype=np.int32),
            errors=np.array(errors, dtype=str),
            num_regions=np.array(counts, dtype=np.int32),
            features=np.concatenate(features) if features else np.zeros((0, dim), plan.dtype),
            boxes=np.concatenate(boxes) if boxes else np.zeros((0, 5), np.float32),
        )
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def extract_chunks(
    plan: ExtractionPlan,
    work: Path,
    *,
    batch_size: int = 64,
    workers: int = 0,
    skip_bad: bool = False,
    progress: bool = True,
) -> None:
    """Extract this process's missing chunks of `plan` into `work`; every process of the launch
    calls it (the main process prepares `work`), and all return once every chunk is written."""
    state = process_state()
    if state.is_main_process:
        done = prepare_work(work, plan)
        if done:
            logger.info("%s: %d of %d chunks already extracted", work, done, plan.num_chunks)
    state.wait_for_everyone()
    mine = [i for i in range(plan.num_chunks) if i % state.num_processes == state.process_index]
    todo = [i for i in mine if not chunk_path(work, i).is_file()]
    logger.info(
        "process %d of %d: %d of its %d chunks to extract",
        state.process_index,
        state.num_processes,
        len(todo),
        len(mine),
    )
    if todo:
        _extract(plan, work, todo, mine, state, batch_size, workers, skip_bad, progress)
    state.wait_for_everyone()


def _extract(plan, work, todo, mine, state, batch_size, workers, skip_bad, progress) -> None:
    backbone = BackboneFeatures(
        plan.backbone,
        device=state.device,
        dtype=PRECISIONS[plan.precision],
        global_feature=plan.global_feature,
    )
    batches = [
        (i, positions[start : start + batch_size])
        for i in todo
        for positions in [plan.chunk(i)]
        for start in range(0, len(positions), batch_size)
    ]
    loader = torch.utils.data.DataLoader(
        _Batches(plan, batches, backbone.processor),
        batch_size=None,
        num_workers=workers,
        prefetch_factor=2 if workers else None,
    )
    total = sum(len(plan.chunk(i)) for i in mine)
    bar = progress_bar(
        desc="image features",
        total=total,
        initial=total - sum(len(plan.chunk(i)) for i in todo),
        unit="img",
        main_process=progress and state.is_main_process,
    )
    die_after = int(os.environ.get(DIE_AFTER_CHUNKS_ENV, "0") or 0)
    written, parts = 0, []
    for batch in loader:
        bad = [error for error in batch["errors"] if error]
        if bad and not skip_bad:
            raise BadImageError(f"{bad[0]}; pass --skip-bad to leave unreadable images out")
        for error in bad:
            logger.warning("skipping %s", error)
        pixels = batch["pixel_values"]
        batch["regions"] = backbone.encode(pixels) if pixels is not None else []
        parts.append(batch)
        bar.update(len(batch["positions"]))
        chunk = batch["chunk"]
        if batch["positions"][-1] == plan.chunk(chunk)[-1]:  # the chunk's last batch
            _write_chunk(chunk_path(work, chunk), plan, parts, backbone.feat_dim)
            parts, written = [], written + 1
            if written == die_after:
                bar.close()
                print(f"{DIE_AFTER_CHUNKS_ENV}: exiting after {written} chunks", file=sys.stderr)
                os._exit(3)
    bar.close()


class ChunkRegions:
    """Image-table region columns read back from the chunks, in the RegionColumns interface
    that `convert_images` writes from."""

    def __init__(self, plan: ExtractionPlan, work: Path) -> None:
        self.plan, self.work = plan, work
        with np.load(chunk_path(work, 0)) as first:
            self.feat_dim: int | None = int(first["features"].shape[1])
        self.cls_dim: int | None = None
        self.reader = self  # `convert_images` names `reader.source` in messages
        self.source = plan.backbone
        self._chunk_of = {key: i // plan.chunk_images for i, key in enumerate(plan.keys)}
        self._cache: OrderedDict[int, dict[str, Any]] = OrderedDict()

    def probe(self, keys: Sequence[str]) -> None:
        """The width is known from the backbone; nothing to probe."""

    def errors(self) -> Iterator[tuple[str, str]]:
        """(key, reason) of every image that could not be read."""
        for i in range(self.plan.num_chunks):
            with np.load(chunk_path(self.work, i)) as chunk:
                for key, error in zip(chunk["keys"].tolist(), chunk["errors"].tolist()):
                    if error:
                        yield key, error

    def _load(self, index: int) -> dict[str, Any]:
        if index not in self._cache:
            path = chunk_path(self.work, index)
            with np.load(path) as content:
                chunk = {name: content[name] for name in content.files}
            offsets = np.zeros(len(chunk["keys"]) + 1, dtype=np.int64)
            np.cumsum(chunk["num_regions"], out=offsets[1:])
            chunk["offsets"] = offsets
            chunk["row"] = {key: k for k, key in enumerate(chunk["keys"].tolist())}
            self._cache[index] = chunk
            while len(self._cache) > 2:
                self._cache.popitem(last=False)
        return self._cache[index]

    def __call__(self, key: str) -> dict[str, Any]:
        chunk = self._load(self._chunk_of[key])
        k = chunk["row"][key]
        if chunk["errors"][k]:
            raise BadImageError(str(chunk["errors"][k]))
        start, end = chunk["offsets"][k], chunk["offsets"][k + 1]
        return {
            "image_key": key,
            "image_w": int(chunk["image_w"][k]),
            "image_h": int(chunk["image_h"][k]),
            "num_regions": int(end - start),
            "features": chunk["features"][start:end],
            "boxes": chunk["boxes"][start:end],
        }


def remove_work(work: Path) -> None:
    shutil.rmtree(work, ignore_errors=True)
