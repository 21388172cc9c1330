"""The learning-rate schedule, the EMA average and the run's clock."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch


def ema_avg(decay: float):
    """The EMA update of `torch.optim.swa_utils.AveragedModel`, warmed up: early EMA follows the weights closely."""
    def avg(ema_p: torch.Tensor, p: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        d = min(decay, (1 + int(n)) / (10 + int(n)))
        return d * ema_p + (1 - d) * p
    return avg


def lr_lambda(cfg, time_fraction: Callable[[], float] | None = None) -> Callable[[int], float]:
    """Linear warmup, then cosine decay to ``min_lr_ratio`` at max_steps (the `TrainConfig` of ``cfg``).

    With ``time_fraction`` (a callable giving the used fraction of ``train.max_time``) the decay
    follows whichever budget is further along, so a wall-clock-limited run still ends at the
    floor learning rate: what equal-compute comparisons between families need.
    """
    tc = cfg.train

    def f(step: int) -> float:
        if step < tc.warmup_steps:
            return (step + 1) / tc.warmup_steps
        progress = min(1.0, (step - tc.warmup_steps) / max(1, tc.max_steps - tc.warmup_steps))
        if time_fraction is not None:
            progress = max(progress, min(1.0, time_fraction()))
        return tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


class Clock:
    """Training time of a run across its sessions: ``before`` (seconds of earlier sessions), this session's
    time since `restart`, and ``now``, the time at the last step (rank 0's, on every rank)."""

    def __init__(self, before: float = 0.0):
        self.before = self.now = before
        self.start = time.perf_counter()

    def used(self) -> float:
        """Seconds used so far, earlier sessions included."""
        return self.before + time.perf_counter() - self.start

    def restart(self) -> None:
        """Count this session from now (setup and the first validation are not training time)."""
        self.start = time.perf_counter()
