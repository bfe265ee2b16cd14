"""Streaming weighted averaging of the sites' updates: each reply is added into a running fp32 sum as it arrives,
then dropped.

Peak memory is the fp32 sum plus one reply, whatever the number of sites.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord

from wire.codec import array_shape, decode_tensor


class ReplyMismatch(ValueError):
    """A reply whose arrays do not match the others (names or shapes); the site is left out of the round."""


class StreamingMean:
    """Weighted mean of updates (or state dicts), fed one reply at a time (weights: the sites' tile counts)."""

    def __init__(self, expected: dict[str, tuple[int, ...]] | None = None):
        self.expected = expected  # names and shapes every reply must have (the global model's)
        self.sums: dict[str, torch.Tensor] = {}
        self.total = 0.0
        self.count = 0
        self._int_weight = -1.0

    def check(self, record: ArrayRecord) -> None:
        shapes = {name: array_shape(a) for name, a in record.items()}
        expected = self.expected
        if expected is None and self.sums:
            expected = {k: tuple(v.shape) for k, v in self.sums.items()}
        if expected is None:
            return
        if set(shapes) != set(expected):
            extra, missing = sorted(set(shapes) - set(expected)), sorted(set(expected) - set(shapes))
            raise ReplyMismatch(f"arrays differ from the global model's (extra {extra[:3]}, missing {missing[:3]})")
        bad = [k for k, s in shapes.items() if tuple(expected[k]) != s]
        if bad:
            raise ReplyMismatch(f"array {bad[0]} has shape {shapes[bad[0]]}, expected {tuple(expected[bad[0]])}")

    def add(self, record: ArrayRecord, weight: float) -> None:
        """Check the whole reply first (a bad one must not leave half of itself in the sum), then add it."""
        if not weight > 0:
            raise ReplyMismatch(f"reply weight must be positive, got {weight}")
        self.check(record)
        self.add_tensors({name: decode_tensor(record[name]) for name in record.keys()}, weight)

    def add_tensors(self, update: dict[str, torch.Tensor], weight: float) -> None:
        """Add a reply already decoded and checked (``strategies.validate.update_of``); the tensors are consumed."""
        take_ints = weight > self._int_weight
        for name in list(update):
            t = update.pop(name)
            if t.is_floating_point():
                if name in self.sums:
                    self.sums[name].add_(t, alpha=weight)
                else:
                    self.sums[name] = t.mul_(weight)
            elif take_ints or name not in self.sums:
                # integer buffers (BatchNorm's num_batches_tracked) cannot be averaged: keep the largest site's
                self.sums[name] = t
            del t
        if take_ints:
            self._int_weight = weight
        self.total += weight
        self.count += 1

    def mean(self, in_place: bool = False) -> dict[str, torch.Tensor]:
        """The weighted mean; ``in_place``: divided in the sums' own memory (this accumulator is done then)."""
        if self.count == 0:
            raise ValueError("no replies to average")
        if in_place:
            out = {k: (v.div_(self.total) if v.is_floating_point() else v) for k, v in self.sums.items()}
            self.sums, self.count = {}, 0
            return out
        return {k: (v / self.total if v.is_floating_point() else v.clone()) for k, v in self.sums.items()}


class MetricMean:
    """Weighted mean of the sites' scalar metrics."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.weights: dict[str, float] = {}

    def add(self, metrics: dict, weight: float) -> None:
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.sums[k] = self.sums.get(k, 0.0) + float(v) * weight
                self.weights[k] = self.weights.get(k, 0.0) + weight

    def mean(self) -> dict[str, float]:
        return {k: self.sums[k] / self.weights[k] for k in sorted(self.sums)}


class RobustAggregate:
    """Coordinate-wise median, or trimmed mean (``trim``: the fraction cut at each end), of the sites' updates,
    unweighted: one site, one vote, so no site buys influence with a large ``num-examples``. It holds every
    reply of the round (memory: one update per site), unlike the streaming mean."""

    def __init__(self, kind: str, trim: float = 0.2):
        if kind not in ("median", "trimmed-mean") or not 0 <= trim < 0.5:
            raise ValueError(f"robust aggregator {kind!r} with trim {trim}")
        self.kind, self.trim = kind, trim
        self.updates: list[dict[str, torch.Tensor]] = []
        self.count = 0

    def add_tensors(self, update: dict[str, torch.Tensor], weight: float) -> None:
        self.updates.append(update)
        self.count += 1

    def mean(self, in_place: bool = False) -> dict[str, torch.Tensor]:
        if not self.updates:
            raise ValueError("no replies to aggregate")
        out = {}
        n = len(self.updates)
        cut = int(self.trim * n)
        for name, first in self.updates[0].items():
            if not first.is_floating_point():
                out[name] = max((u[name] for u in self.updates), key=lambda t: int(t.max()) if t.numel() else 0).clone()
                continue
            stacked = torch.stack([u[name] for u in self.updates])
            if self.kind == "median":
                out[name] = stacked.median(dim=0).values if n % 2 else stacked.sort(dim=0).values[n // 2 - 1:n // 2 + 1].mean(0)
            else:
                out[name] = stacked.sort(dim=0).values[cut:n - cut].mean(0)
            del stacked
        return out


def build_aggregator(kind: str, expected: dict[str, tuple[int, ...]], trim: float = 0.2):
    """``mean`` (streaming, tile-weighted), ``median`` or ``trimmed-mean`` (robust, unweighted)."""
    return StreamingMean(expected) if kind == "mean" else RobustAggregate(kind, trim)
