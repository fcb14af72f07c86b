"""The Engine: a small training loop around one `accelerate.Accelerator` that emits events.

It owns the model, optimizer, LR scheduler, prepared train loader, step function and counters. It
knows nothing about tasks: a step function `step(engine, batch) -> dict[str, Tensor]` (with a
`loss`) does the task's work, and hooks subscribed to events do everything periodic.

Between sync points no tensor reaches the host: step outputs stay on the device (`StepMetrics`)
until a writer asks (`collect_metrics`); non-finite losses and stop requests (`StopSignal`) are
checked every `sync_every` steps and before every checkpoint.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from . import sharding
from .config import Config, save_config
from .events import Event, EventBus
from .samplers import ResumableSampler, find_resumable_sampler
from .step_metrics import NonFiniteLossError, StepMetrics
from .stop_signal import StopSignal, TrainingInterrupted  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)

StepFn = Callable[["Engine", Any], dict[str, torch.Tensor]]


class Engine:
    def __init__(
        self,
        accelerator: Any,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        train_loader: torch.utils.data.DataLoader,
        step_fn: StepFn,
        *,
        max_steps: int,
        scheduler: Any | None = None,
        clip_grad: str = "none",
        clip_grad_max: float = 0.1,
        output_dir: str | Path = "output",
        checkpoint_prefix: str = "step",
        checkpoint_keep: int = 3,
        sync_every: int = 20,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        if clip_grad not in ("none", "norm", "value"):
            raise ValueError(f"clip_grad must be 'none', 'norm' or 'value', got {clip_grad!r}")
        if find_resumable_sampler(train_loader) is None:
            raise TypeError(
                "train_loader must sample with xmodaler_accel.samplers.ResumableSampler "
                "(build it with build_train_loader) so that --resume restores the data order"
            )
        self.accelerator = accelerator
        self.device: torch.device = accelerator.device  # fixed for the accelerator's life
        self.world_size: int = accelerator.num_processes
        self.is_main_process: bool = accelerator.is_main_process
        sharding.same_initial_weights(accelerator, model)  # as DDP does; FSDP does not
        self.model, self.optimizer, self.train_loader = accelerator.prepare(
            model, optimizer, train_loader
        )
        # The scheduler is stepped by the engine once per optimizer step, never prepared:
        # Accelerate would step it num_processes times per call.
        self.scheduler = scheduler
        self.sampler: ResumableSampler = find_resumable_sampler(self.train_loader)
        self.step_fn = step_fn
        self.max_steps = int(max_steps)  # None: train.epochs never went through resolve_epochs
        self.clip_grad, self.clip_grad_max = clip_grad, clip_grad_max
        self.output_dir = Path(output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.checkpoint_prefix, self.checkpoint_keep = checkpoint_prefix, checkpoint_keep
        self.sync_every = max(1, sync_every)
        self.config = config  # the run's resolved config, saved in each checkpoint (config.yaml)
        self.events = EventBus()

        self.step, self.epoch = 0, 0  # optimizer steps completed, passes over the data
        self.samples_in_epoch = 0  # consumed in the current epoch, over all processes
        self.batch: Any = None
        self.outputs: dict[str, torch.Tensor] = {}
        self.scalars: dict[str, float] = {}  # host-side values (lr, timings) for writers
        self.exception: BaseException | None = None
        self.data_time = 0.0  # seconds spent waiting for the last batch
        self.step_time = 0.0  # seconds of the last step's own work, no hooks (set before STEP_END)
        self.eval_results: dict[str, dict[str, float]] = {}  # an EvalHook's latest (before EVAL)

        self.metrics = StepMetrics(accelerator.device)
        self.stop = StopSignal()
        self._metrics_cache: tuple[int, dict[str, float]] | None = None

    # ------------------------------------------------------------------ conveniences
    def on(self, event: Event, fn: Callable | None = None, **filters: Any):
        """Subscribe a hook (`engine.on(Event.STEP_END, hook, every=100)`)."""
        return self.events.on(event, fn, **filters)

    def fire(self, event: Event) -> None:
        self.events.fire(event, self)

    @property
    def unwrapped_model(self) -> torch.nn.Module:
        """Without DDP/compile wrappers; FSDP and ZeRO-3 shards: see `gathered_model()`."""
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    def gathered_model(self) -> AbstractContextManager[torch.nn.Module]:
        """The unwrapped model, whole on every process (collective), for generation and exports."""
        return sharding.gathered(self.accelerator, self.model)

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per pass over the loader, as `samplers.steps_per_epoch` predicts."""
        return math.ceil(len(self.train_loader) / self.accelerator.gradient_accumulation_steps)

    @property
    def global_batch_size(self) -> int:
        """Samples consumed per micro-step over all processes."""
        return getattr(self.train_loader, "total_batch_size", None) or self.train_loader.batch_size

    # ------------------------------------------------------------------ the loop
    def run(self) -> None:
        """Train until `max_steps`; hooks see TRAIN_START ... TRAIN_END (or EXCEPTION)."""
        self.events.load_pending_states(warn_unused=True)
        if self.config is not None and self.is_main_process:  # now resolved (train.epochs)
            save_config(Config(self.config), self.output_dir / "config.yaml")
        with self.stop.caught():
            try:
                self.fire(Event.TRAIN_START)
                while self.step < self.max_steps:
                    self._run_epoch()
                self.fire(Event.TRAIN_END)
                # Finish together: end_training() tears the process group down at once, and a
                # rank that leaves while another still writes can abort in gloo's threads.
                self.accelerator.wait_for_everyone()
            except BaseException as err:
                self.exception = err
                self.fire(Event.EXCEPTION)
                raise

    def _run_epoch(self) -> None:
        self._start_epoch()
        self.fire(Event.EPOCH_START)
        micro, started = 0, 0.0
        batches = iter(self.train_loader)
        while self.step < self.max_steps:
            batch = self._next_batch(batches)
            if batch is None:
                break
            if micro == 0:
                self.fire(Event.STEP_START)
                started = time.perf_counter()  # step_time leaves the hooks' time out
            self._micro_step(batch)
            micro += 1
            if self.accelerator.sync_gradients:
                micro = 0
                self._finish_step(started)
        else:
            return  # max_steps reached: the epoch stays open for a later resume
        self.epoch += 1
        self.samples_in_epoch = 0

    def _start_epoch(self) -> None:
        if self.samples_in_epoch >= len(self.train_loader.dataset):
            self.epoch += 1
            self.samples_in_epoch = 0
        self.train_loader.set_epoch(self.epoch)
        dataset = self.train_loader.dataset
        if hasattr(dataset, "set_epoch"):  # e.g. per-epoch caption sampling
            dataset.set_epoch(self.epoch)
        self.sampler.skip(self.samples_in_epoch)
        generator = getattr(self.train_loader, "generator", None)
        if generator is not None:  # worker seeds depend on (seed, epoch, position) only
            generator.manual_seed(self.sampler.position_seed(self.samples_in_epoch))
        # Checkpoints are taken at optimizer-step boundaries, where accumulation restarts.
        self.accelerator.step = 0

    def _next_batch(self, batches: Iterator) -> Any:
        start = time.perf_counter()
        batch = next(batches, None)
        self.data_time = time.perf_counter() - start
        return batch

    def _micro_step(self, batch: Any) -> None:
        self.batch = batch
        with self.accelerator.accumulate(self.model):
            with self.accelerator.autocast():
                outputs = self.step_fn(self, batch)
            if "loss" not in outputs:
                raise KeyError(
                    f"step function {getattr(self.step_fn, '__name__', self.step_fn)} must return "
                    f"a dict with 'loss'; got keys {sorted(outputs)}"
                )
            grad_norm = self._update(outputs["loss"], clip=self.accelerator.sync_gradients)
            if grad_norm is not None:
                outputs = {**outputs, "grad_norm": grad_norm}
        self.outputs = outputs
        self.metrics.add(outputs)
        self.samples_in_epoch += self.global_batch_size

    def inner_update(self, loss: torch.Tensor) -> torch.Tensor | None:
        """An extra optimizer update from inside a step function, for X-modaler's trainers that
        update twice per batch (TDEN's two stages, VCR's alternating sub-tasks): backward, clip
        as the Engine clips, step, zero; the gradient norm when clipping by norm. The Engine
        still makes the step's own update on the loss the step returns."""
        if self.accelerator.gradient_accumulation_steps > 1:
            raise ValueError("an update inside a step function needs train.grad_accum=1")
        return self._update(loss, clip=True)

    def _update(self, loss: torch.Tensor, *, clip: bool) -> torch.Tensor | None:
        """Backward, clip (when gradients are complete), step, zero; the norm if clipped by it."""
        self.accelerator.backward(loss)
        grad_norm, params = None, self.model.parameters()
        if clip and self.clip_grad == "value":
            self.accelerator.clip_grad_value_(params, self.clip_grad_max)
        elif clip and self.clip_grad == "norm":
            grad_norm = self.accelerator.clip_grad_norm_(params, self.clip_grad_max)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _finish_step(self, started: float) -> None:
        if self.scheduler is not None and not self.accelerator.optimizer_step_was_skipped:
            self.scheduler.step()
        self.step += 1
        self.metrics.end_step()
        self.step_time = time.perf_counter() - started
        self.fire(Event.STEP_END)
        self.fire(Event.LOG)
        if self.step % self.sync_every == 0:
            self.check_finite()
        if self.stop.should_stop(self.step, self.sync_every, self.world_size):
            raise self.stop.interrupted(self.step, self.save_checkpoint())

    # ------------------------------------------------------------------ sync points
    def collect_metrics(self) -> dict[str, float]:
        """Mean of each step output since the last call, averaged over processes (collective):
        the one sync point where training metrics reach the host."""
        if self._metrics_cache is None or self._metrics_cache[0] != self.step:
            self.check_finite()
            self._metrics_cache = (self.step, self.metrics.collect(self.accelerator))
        return self._metrics_cache[1]

    def check_finite(self) -> None:
        """Raise NonFiniteLossError naming the first step and terms that were NaN/inf (collective);
        the same exchange tells every process whether any of them was asked to stop."""
        bad, self.stop.agreed = self.metrics.first_non_finite(self.accelerator, self.stop.received)
        if bad:
            raise NonFiniteLossError.at(bad, detected_at=self.step)

    # ------------------------------------------------------------------ checkpoints
    def trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "samples_in_epoch": self.samples_in_epoch,
            "sampler_seed": self.sampler.seed,
            "global_batch_size": self.global_batch_size,
        }

    def _model_optimizer_scheduler(self) -> dict[str, Any]:
        return {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler}

    def save_checkpoint(self, prefix: str | None = None, keep: int | None = None) -> Path:
        """Write `checkpoints/<prefix>_<step>` atomically (collective); never with NaN weights."""
        self.check_finite()
        prefix = prefix or self.checkpoint_prefix
        path = ckpt.write_checkpoint(
            self.accelerator,
            self.checkpoint_dir,
            f"{prefix}_{self.step}",
            **self._model_optimizer_scheduler(),
            trainer_state=self.trainer_state(),
            hook_states=self.events.state_dicts(),
            config=self.config,
        )
        if self.is_main_process:
            keep = self.checkpoint_keep if keep is None else keep
            ckpt.prune_checkpoints(self.checkpoint_dir, keep, prefix)
        self.accelerator.wait_for_everyone()
        self.fire(Event.CHECKPOINT)
        return path

    def resume(self, path: str | Path | None = None, *, evaluate_only: bool = False) -> bool:
        """Continue from `path` or the newest intact checkpoint (checked against its manifest);
        False when there is none. With `evaluate_only` (`--eval-only --resume`), a missing one is
        an error, and the batch size or process count may differ from the training run's."""
        root, prefix = self.checkpoint_dir, self.checkpoint_prefix
        path = ckpt.verify_checkpoint(path) if path else ckpt.find_resume_checkpoint(root, prefix)
        if path is None and evaluate_only:
            raise FileNotFoundError(f"--eval-only --resume: no complete checkpoint under {root}")
        if path is None:
            logger.info("no checkpoint under %s: starting from scratch", self.checkpoint_dir)
            return False
        state, hooks = ckpt.read_checkpoint(
            self.accelerator, path, **self._model_optimizer_scheduler()
        )
        if state["global_batch_size"] != self.global_batch_size and not evaluate_only:
            raise ValueError(
                f"checkpoint {path} was trained with {state['global_batch_size']} samples per "
                f"micro-step, this run has {self.global_batch_size}: the data position would not "
                "match (change train.batch_size or the number of processes back)"
            )
        self.step, self.epoch = state["step"], state["epoch"]
        self.samples_in_epoch = state["samples_in_epoch"]
        self.sampler.seed = state["sampler_seed"]
        self.metrics.start_at(self.step)
        self.events.load_states(hooks)  # hooks that subscribe later get theirs at run()
        logger.info("resumed from %s at step %d (epoch %d)", path, self.step, self.epoch)
        return True
