"""Lightning callbacks shared by every trainer: per-step wall time and progress lines, and an estimate of
the whole run's duration after its first steps."""
from __future__ import annotations

import logging
import time

from lightning.pytorch.callbacks import Callback

log = logging.getLogger("train")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


class _BatchTimes(Callback):
    """Records the wall time of every training batch in ``times``, then calls ``after_batch``."""

    def __init__(self):
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._t0)
        self.after_batch(trainer, pl_module, batch)

    def after_batch(self, trainer, pl_module, batch) -> None:
        raise NotImplementedError


class StepTimer(_BatchTimes):
    """Logs the wall time of every training batch (``train/step_s``, validation excluded) and, every
    ``every`` steps, one progress line (step, s/step, loss terms), so a background run's log shows where it
    is even when the progress bar is buffered."""

    def __init__(self, every: int = 10):
        super().__init__()
        self.every = every

    def after_batch(self, trainer, pl_module, batch):
        pl_module.log("train/step_s", self.times[-1], batch_size=len(batch))
        step = trainer.global_step
        if self.every and step % self.every == 0 and trainer.is_global_zero:
            m = {k.split("/", 1)[1]: float(v) for k, v in trainer.callback_metrics.items()
                 if k.startswith("train/") and k != "train/step_s"}
            log.info("step %d/%d  %.2f s/step  %s", step, trainer.max_steps, _mean(self.times[-self.every:]),
                     "  ".join(f"{k} {v:.3f}" for k, v in sorted(m.items())))

    def on_train_end(self, trainer, pl_module):
        if self.times and trainer.is_global_zero:
            log.info("%.2f s/step (mean of %d training steps, validation excluded)", _mean(self.times), len(self.times))


class DurationEstimate(_BatchTimes):
    """After ``after`` training steps (the first one, which warms caches up, not counted), logs seconds per
    step × the run's steps: ``estimated duration ... in all, ... left``; validations come on top."""

    def __init__(self, after: int = 3):
        super().__init__()
        self.after = after

    def after_batch(self, trainer, pl_module, batch):
        if len(self.times) != min(self.after, trainer.max_steps) or not trainer.is_global_zero:
            return
        per_step = _mean(self.times[1:] or self.times)
        left = max(0, trainer.max_steps - trainer.global_step)
        log.info("estimated duration: %.2f s/step x %d steps = %s in all, %s left (validation excluded)",
                 per_step, trainer.max_steps, _duration(per_step * trainer.max_steps), _duration(per_step * left))


def _duration(seconds: float) -> str:
    """``3h 05m``, ``4m 10s`` or ``12.3s``."""
    if seconds >= 3600:
        return f"{int(seconds // 3600)}h {int(seconds % 3600 // 60):02d}m"
    if seconds >= 60:
        return f"{int(seconds // 60)}m {int(seconds % 60):02d}s"
    return f"{seconds:.1f}s"
