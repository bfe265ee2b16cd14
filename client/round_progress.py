"""A site's progress inside a round: every ``every`` seconds (and once at the end) one line on the logger
``histodiff.site``: steps done of the round's total, tiles per second, and the time left.

    site0 lae round 3: step 120/500 (24%), 41.2 tiles/s, 30 s elapsed, ETA 1 min 32 s

A Lightning callback; hand it to the trainer with the round's step count (``RoundProgress(total=steps, ...)``).
Steps are training batches (one optimiser step each for the DM; the LAE's generator and discriminator updates of one
batch count as one step); tiles are the batch sizes summed over all processes (DDP). Only global rank 0 logs.
"""

from __future__ import annotations

import logging
import time

import lightning as L

log = logging.getLogger("histodiff.site")
EVERY = 30.0  # seconds between progress lines


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def _batch_size(batch) -> int:
    """Tiles in a batch: the first dimension of its first tensor (``(images, labels)`` or a bare tensor)."""
    first = batch
    while isinstance(first, (list, tuple)) and first:
        first = first[0]
    if isinstance(first, dict) and first:
        first = next(iter(first.values()))
    shape = getattr(first, "shape", None)
    return int(shape[0]) if shape else 0


class RoundProgress(L.Callback):
    """Log steps done / total, tiles/s and ETA every ``every`` seconds and when the fit ends.

    ``total``: the round's steps (default: what the trainer will run, ``num_training_batches``); ``label``: what
    the lines start with (e.g. ``"site0 lae round 3"``); ``every``: seconds between lines (``EVERY``)."""

    def __init__(self, total: int | None = None, label: str = "local training", every: float = EVERY,
                 logger: logging.Logger | None = None):
        self.total, self.label, self.every = total, label, float(every)
        self._log = logger or log
        self.steps = self.tiles = 0
        self.start = self.next = 0.0
        self.seconds = 0.0  # the fit's wall time, from its start to its end

    def _total(self, trainer) -> int | None:
        if self.total:
            return int(self.total)
        n = getattr(trainer, "num_training_batches", None)
        return int(n) if isinstance(n, (int, float)) and n != float("inf") and n > 0 else None

    def on_train_start(self, trainer, pl_module) -> None:
        self.steps = self.tiles = 0
        self.start = time.monotonic()
        self.next = self.start + self.every

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps += 1
        self.tiles += _batch_size(batch) * max(1, int(getattr(trainer, "world_size", 1) or 1))
        now = time.monotonic()
        if now >= self.next:
            self.next = now + self.every
            self._say(trainer, now)

    def on_train_end(self, trainer, pl_module) -> None:
        now = time.monotonic()
        self.seconds = now - self.start
        self._say(trainer, now, done=True)

    def line(self, trainer, now: float, done: bool = False) -> str:
        elapsed = max(now - self.start, 1e-9)
        total = self._total(trainer)
        rate = self.tiles / elapsed
        if total:
            head = f"{self.label}: step {self.steps}/{total} ({100.0 * self.steps / total:.0f}%)"
        else:
            head = f"{self.label}: step {self.steps}"
        tail = f"{rate:.1f} tiles/s, {_duration(elapsed)} elapsed"
        if done:
            return f"{head} done, {tail}"
        if total and self.steps:
            tail += f", ETA {_duration((total - self.steps) * elapsed / self.steps)}"
        return f"{head}, {tail}"

    def _say(self, trainer, now: float, done: bool = False) -> None:
        if getattr(trainer, "is_global_zero", True):
            self._log.info("%s", self.line(trainer, now, done))
