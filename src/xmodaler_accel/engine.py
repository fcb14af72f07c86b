"""The Engine: a small training loop around one `accelerate.Accelerator` that emits events.

It owns the model, optimizer, LR scheduler, prepared train loader, step function and counters. It
knows nothing about tasks: a step function `step(engine, batch) -> dict[str, Tensor]` (with a
`loss`) does the task's work, and hooks subscribed to events do everything periodic.

Between sync points the loop never moves a tensor to the host: metrics are summed on the device
and reduced across processes only when a writer asks (`collect_metrics`), non-finite losses and
stop requests are checked every `sync_every` steps and before every checkpoint.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .checkpoint import (
    latest_checkpoint,
    prune_checkpoints,
    read_checkpoint,
    write_checkpoint,
)
from .events import Event, EventBus
from .samplers import ResumableSampler, find_resumable_sampler

logger = logging.getLogger(__name__)

StepFn = Callable[["Engine", Any], dict[str, torch.Tensor]]


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or inf; raised before any checkpoint of the damaged weights."""


class TrainingInterrupted(SystemExit):
    """SIGTERM/SIGINT: the current step finished and a checkpoint was saved; `--resume` continues."""


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
    ) -> None:
        if clip_grad not in ("none", "norm", "value"):
            raise ValueError(f"clip_grad must be 'none', 'norm' or 'value', got {clip_grad!r}")
        if find_resumable_sampler(train_loader) is None:
            raise TypeError(
                "train_loader must sample with xmodaler_accel.samplers.ResumableSampler "
                "(build it with build_train_loader) so that --resume restores the data order"
            )
        self.accelerator = accelerator
        self.model, self.optimizer, self.train_loader = accelerator.prepare(
            model, optimizer, train_loader
        )
        # The scheduler is stepped by the engine once per optimizer step, never prepared:
        # Accelerate would step it num_processes times per call.
        self.scheduler = scheduler
        self.sampler: ResumableSampler = find_resumable_sampler(self.train_loader)
        self.step_fn = step_fn
        self.max_steps = max_steps
        self.clip_grad, self.clip_grad_max = clip_grad, clip_grad_max
        self.output_dir = Path(output_dir)
        self.checkpoint_prefix, self.checkpoint_keep = checkpoint_prefix, checkpoint_keep
        self.sync_every = max(1, sync_every)
        self.events = EventBus()

        self.step = 0  # optimizer steps completed
        self.epoch = 0
        self.samples_in_epoch = 0  # consumed in the current epoch, over all processes
        self.batch: Any = None
        self.outputs: dict[str, torch.Tensor] = {}
        self.scalars: dict[str, float] = {}  # host-side values (lr, timings) for writers
        self.exception: BaseException | None = None
        self.data_time = 0.0

        self._accumulators: dict[tuple[str, ...], _Accumulator] = {}
        # Float so that it stacks with the step outputs; exact up to 2**24 steps.
        self._device_step = torch.zeros((), dtype=torch.float32, device=accelerator.device)
        self._signal: int | None = None
        self._pending_hook_states: dict[str, Any] = {}
        self._metrics_cache: tuple[int, dict[str, float]] | None = None
        self._stop_agreed = False

    # ------------------------------------------------------------------ conveniences
    def on(self, event: Event, fn: Callable | None = None, **filters: Any):
        """Subscribe a hook (`engine.on(Event.STEP_END, hook, every=100)`)."""
        return self.events.on(event, fn, **filters)

    def fire(self, event: Event) -> None:
        self.events.fire(event, self)

    @property
    def unwrapped_model(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def global_batch_size(self) -> int:
        """Samples consumed per micro-step over all processes."""
        return getattr(self.train_loader, "total_batch_size", None) or self.train_loader.batch_size

    # ------------------------------------------------------------------ the loop
    def run(self) -> None:
        """Train until `max_steps`; hooks see TRAIN_START ... TRAIN_END (or EXCEPTION)."""
        self._apply_pending_hook_states()
        self._warn_unused_hook_states()
        with self._signals_caught():
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
        micro = 0
        batches = iter(self.train_loader)
        while self.step < self.max_steps:
            batch = self._next_batch(batches)
            if batch is None:
                break
            if micro == 0:
                self.fire(Event.STEP_START)
            self._micro_step(batch)
            micro += 1
            if self.accelerator.sync_gradients:
                micro = 0
                self._finish_step()
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
            generator.manual_seed(
                self.sampler.seed * 1_000_003 + self.epoch * 7919 + self.samples_in_epoch
            )
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
            self.accelerator.backward(outputs["loss"])
            if self.accelerator.sync_gradients:
                grad_norm = self._clip_gradients()
                if grad_norm is not None:
                    outputs = {**outputs, "grad_norm": grad_norm}
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.outputs = outputs
        self._accumulate(outputs)
        self.samples_in_epoch += self.global_batch_size

    def inner_update(self, loss: torch.Tensor) -> torch.Tensor | None:
        """An extra optimizer update from inside a step function, for X-modaler's trainers that
        update twice per batch (TDEN's two stages, VCR's alternating sub-tasks): backward, clip
        as the Engine clips, step, zero. Returns the gradient norm when clipping by norm. The
        Engine still makes the step's own update on the loss the step returns.
        """
        if self.accelerator.gradient_accumulation_steps > 1:
            raise ValueError("an update inside a step function needs train.grad_accum=1")
        self.accelerator.backward(loss)
        grad_norm = self._clip_gradients()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _clip_gradients(self) -> torch.Tensor | None:
        params = self.model.parameters()
        if self.clip_grad == "value":
            self.accelerator.clip_grad_value_(params, self.clip_grad_max)
        elif self.clip_grad == "norm":
            return self.accelerator.clip_grad_norm_(params, self.clip_grad_max)
        return None

    def _finish_step(self) -> None:
        if self.scheduler is not None and not self.accelerator.optimizer_step_was_skipped:
            self.scheduler.step()
        self.step += 1
        self._device_step += 1
        self.fire(Event.STEP_END)
        if self.step % self.sync_every == 0:
            self.check_finite()
        if self._stop_requested():
            self._stop_for_signal()

    # ------------------------------------------------------------------ metrics (on device)
    def _accumulate(self, outputs: dict[str, torch.Tensor]) -> None:
        """Keep this micro-step's outputs on the device: one `stack` kernel, no sync.

        Each row also holds the step number, so that a later check can name the first
        non-finite step; rows are summed at sync points (`_Accumulator.fold`).
        """
        names = tuple(n for n, v in outputs.items() if torch.is_tensor(v))
        row = torch.stack([*(_as_scalar(outputs[n]) for n in names), self._device_step])
        acc = self._accumulators.get(names)
        if acc is None:
            acc = self._accumulators[names] = _Accumulator(names)
        acc.add(row)

    def _per_name(self) -> dict[str, list[tuple[_Accumulator, int]]]:
        by_name: dict[str, list[tuple[_Accumulator, int]]] = {}
        for acc in self._accumulators.values():
            acc.fold()
            for i, name in enumerate(acc.names):
                by_name.setdefault(name, []).append((acc, i))
        return dict(sorted(by_name.items()))

    def collect_metrics(self) -> dict[str, float]:
        """Mean of each step output since the last call, averaged over processes (collective).

        This is a sync point: the only place where training metrics reach the host.
        """
        if self._metrics_cache is not None and self._metrics_cache[0] == self.step:
            return self._metrics_cache[1]
        self.check_finite()
        by_name = self._per_name()
        metrics: dict[str, float] = {}
        if by_name:
            means = torch.stack(
                [
                    sum(a.sum[i] for a, i in accs) / sum(a.count for a, _ in accs)
                    for accs in by_name.values()
                ]
            )
            values = self.accelerator.reduce(means, reduction="mean").tolist()
            metrics = dict(zip(by_name, values))
        self._accumulators = {}
        self._metrics_cache = (self.step, metrics)
        return metrics

    def check_finite(self) -> None:
        """Raise NonFiniteLossError naming the first step and terms that were NaN/inf (collective).

        The same exchange tells every process whether any of them was asked to stop.
        """
        by_name = self._per_name()
        firsts = [torch.stack([a.first_bad[i] for a, i in accs]).min() for accs in by_name.values()]
        stop = torch.tensor(float(self._signal is not None), device=self.device)
        table = self.accelerator.gather(torch.stack([*firsts, stop])).view(self.world_size, -1)
        first_bad = table[:, :-1].min(dim=0).values.tolist()
        self._stop_agreed = bool(table[:, -1].max().item())
        bad = {n: int(s) for n, s in zip(by_name, first_bad) if s != float("inf")}
        if bad:
            step = min(bad.values())
            terms = ", ".join(n for n, s in bad.items() if s == step)
            raise NonFiniteLossError(
                f"non-finite loss at step {step} in: {terms} (detected at step {self.step}); "
                "no checkpoint was written after it. Lower the learning rate, enable gradient "
                "clipping, or check the batch at that step."
            )

    # ------------------------------------------------------------------ stop on signal
    @contextmanager
    def _signals_caught(self):
        def handler(signum, _frame):
            if self._signal is not None:  # second signal: stop now
                raise KeyboardInterrupt
            self._signal = signum
            logger.warning(
                "received %s: finishing the current step, then saving", signal.Signals(signum).name
            )

        previous = {}
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: leave signals alone
            previous = {}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def _stop_requested(self) -> bool:
        if self.world_size == 1:
            return self._signal is not None
        # Processes must agree before saving; they compare at sync points only (no extra syncs).
        if self.step % self.sync_every == 0:
            return self._stop_agreed
        return False

    def _stop_for_signal(self) -> None:
        name = signal.Signals(self._signal).name if self._signal else "a stop request"
        path = self.save_checkpoint()
        message = (
            f"stopped by {name} after step {self.step}; checkpoint saved to {path}. "
            "Run the same command with --resume to continue."
        )
        logger.warning(message)
        raise TrainingInterrupted(message)

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    def trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "samples_in_epoch": self.samples_in_epoch,
            "sampler_seed": self.sampler.seed,
            "global_batch_size": self.global_batch_size,
        }

    def save_checkpoint(self, prefix: str | None = None, keep: int | None = None) -> Path:
        """Write `checkpoints/<prefix>_<step>` atomically (collective); never with NaN weights."""
        self.check_finite()
        prefix = prefix or self.checkpoint_prefix
        hooks = {name: obj.state_dict() for name, obj in self.events.stateful().items()}
        path = write_checkpoint(
            self.accelerator,
            self.checkpoint_dir,
            f"{prefix}_{self.step}",
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            trainer_state=self.trainer_state(),
            hook_states=hooks,
        )
        if self.is_main_process:
            prune_checkpoints(
                self.checkpoint_dir, self.checkpoint_keep if keep is None else keep, prefix
            )
        self.accelerator.wait_for_everyone()
        self.fire(Event.CHECKPOINT)
        return path

    def resume(self, path: str | Path | None = None, *, evaluate_only: bool = False) -> bool:
        """Continue from `path` or the newest complete checkpoint; False when there is none.

        `evaluate_only` (`--eval-only --resume`): a missing checkpoint is an error rather than a
        fresh start, and the batch size or process count may differ from the training run's.
        """
        path = (
            Path(path) if path else latest_checkpoint(self.checkpoint_dir, self.checkpoint_prefix)
        )
        if path is None and evaluate_only:
            raise FileNotFoundError(
                f"--eval-only --resume: no complete checkpoint under {self.checkpoint_dir}"
            )
        if path is None:
            logger.info("no checkpoint under %s: starting from scratch", self.checkpoint_dir)
            return False
        state, hooks = read_checkpoint(
            self.accelerator,
            path,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
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
        self._device_step.fill_(self.step)
        self._pending_hook_states = hooks
        self._apply_pending_hook_states()
        logger.info("resumed from %s at step %d (epoch %d)", path, self.step, self.epoch)
        return True

    def _apply_pending_hook_states(self) -> None:
        """Give saved hook states to hooks subscribed by now; later subscribers get theirs at run()."""
        stateful = self.events.stateful()
        for name in list(self._pending_hook_states):
            if name in stateful:
                stateful[name].load_state_dict(self._pending_hook_states.pop(name))

    def _warn_unused_hook_states(self) -> None:
        for name in self._pending_hook_states:
            logger.warning("checkpoint holds state for hook %r, which is not subscribed", name)


def _as_scalar(value: torch.Tensor) -> torch.Tensor:
    value = value.detach()
    return (value.mean() if value.dim() else value).float()


class _Accumulator:
    """Rows of one set of step outputs (plus the step number), folded into sums on demand."""

    MAX_PENDING = 256  # fold at least this often, whatever the sync period

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self.pending: list[torch.Tensor] = []
        self.sum: torch.Tensor | None = None
        self.first_bad: torch.Tensor | None = None  # step numbers (1-based); inf = never
        self.count = 0

    def add(self, row: torch.Tensor) -> None:
        self.pending.append(row)
        self.count += 1
        if len(self.pending) >= self.MAX_PENDING:
            self.fold()

    def fold(self) -> None:
        if not self.pending:
            return
        rows = torch.stack(self.pending)
        self.pending = []
        values, steps = rows[:, :-1], rows[:, -1:]
        total = values.sum(dim=0)
        bad = torch.where(torch.isfinite(values), float("inf"), steps + 1).amin(dim=0)
        self.sum = total if self.sum is None else self.sum + total
        self.first_bad = bad if self.first_bad is None else torch.minimum(self.first_bad, bad)
