"""Step outputs kept on the device between sync points, and the first step that was non-finite.

The Engine adds every micro-step's outputs here without a host sync (one `stack` kernel); they
reach the host only when `collect` or `first_non_finite` is called, both collectives.
"""

from __future__ import annotations

from typing import Any

import torch


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or inf; raised before any checkpoint of the damaged weights."""

    @classmethod
    def at(cls, first_bad: dict[str, int], detected_at: int) -> NonFiniteLossError:
        """The error for `first_bad` ({term: its first non-finite step}), found at `detected_at`."""
        step = min(first_bad.values())
        terms = ", ".join(n for n, s in first_bad.items() if s == step)
        return cls(
            f"non-finite loss at step {step} in: {terms} (detected at step {detected_at}); "
            "no checkpoint was written after it. Lower the learning rate, enable gradient "
            "clipping, or check the batch at that step."
        )


class StepMetrics:
    """Sums of the step outputs since the last `collect`, with the step each row came from."""

    def __init__(self, device: torch.device) -> None:
        self._groups: dict[tuple[str, ...], _Accumulator] = {}
        # Float so that it stacks with the step outputs; exact up to 2**24 steps.
        self._step = torch.zeros((), dtype=torch.float32, device=device)

    def start_at(self, step: int) -> None:
        """Number the rows from `step` on (after a resume)."""
        self._step.fill_(step)

    def end_step(self) -> None:
        self._step += 1  # on the device: no sync

    def add(self, outputs: dict[str, torch.Tensor]) -> None:
        """Keep one micro-step's tensor outputs (means of non-scalars) on the device."""
        names = tuple(n for n, v in outputs.items() if torch.is_tensor(v))
        row = torch.stack([*(_as_scalar(outputs[n]) for n in names), self._step])
        group = self._groups.get(names)
        if group is None:
            group = self._groups[names] = _Accumulator(names)
        group.add(row)

    def collect(self, accelerator: Any) -> dict[str, float]:
        """Mean of each output since the last call, averaged over processes (collective)."""
        by_name = self._by_name()
        self._groups = {}
        if not by_name:
            return {}
        means = torch.stack(
            [
                sum(a.sum[i] for a, i in accs) / sum(a.count for a, _ in accs)
                for accs in by_name.values()
            ]
        )
        return dict(zip(by_name, accelerator.reduce(means, reduction="mean").tolist()))

    def first_non_finite(self, accelerator: Any, flag: bool) -> tuple[dict[str, int], bool]:
        """{output: the first step (1-based) where it was NaN/inf on any process}, and whether
        `flag` was set on any process (collective). The flag rides in the same gather, so that
        a stop request is agreed on without a collective of its own."""
        by_name = self._by_name()
        firsts = [torch.stack([a.first_bad[i] for a, i in accs]).min() for accs in by_name.values()]
        local = torch.stack([*firsts, torch.tensor(float(flag), device=self._step.device)])
        table = accelerator.gather(local).view(accelerator.num_processes, -1)
        first_bad = table[:, :-1].min(dim=0).values.tolist()
        bad = {n: int(s) for n, s in zip(by_name, first_bad) if s != float("inf")}
        return bad, bool(table[:, -1].max().item())

    def _by_name(self) -> dict[str, list[tuple[_Accumulator, int]]]:
        """Where each output name's sums live: (accumulator, column), names sorted."""
        by_name: dict[str, list[tuple[_Accumulator, int]]] = {}
        for group in self._groups.values():
            group.fold()
            for i, name in enumerate(group.names):
                by_name.setdefault(name, []).append((group, i))
        return dict(sorted(by_name.items()))


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
