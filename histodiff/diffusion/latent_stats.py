"""Latent statistics for the global ``scale_factor``: sum, sum of squares and count of latent values.

Each site computes its moments over its own tiles; a coordinator adds them up and derives one
scale factor for everyone (1 / std), so no site's latents are ever scaled on their own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader


@dataclass
class LatentStats:
    sum: float
    sum_sq: float
    count: int

    def __add__(self, other: "LatentStats") -> "LatentStats":
        return LatentStats(self.sum + other.sum, self.sum_sq + other.sum_sq, self.count + other.count)

    @property
    def mean(self) -> float:
        return self.sum / self.count

    @property
    def std(self) -> float:
        # population variance from the moments, in float64 to avoid cancellation
        return math.sqrt(max(self.sum_sq / self.count - self.mean**2, 0.0))

    @property
    def scale_factor(self) -> float:
        if self.count == 0 or self.std == 0.0:
            raise ValueError("latent statistics are empty or constant: cannot derive a scale factor")
        return 1.0 / self.std

    def to_dict(self) -> dict:
        return {"sum": self.sum, "sum_sq": self.sum_sq, "count": self.count}

    @classmethod
    def combine(cls, parts) -> "LatentStats":
        total = cls(0.0, 0.0, 0)
        for part in parts:
            total = total + part
        return total


@torch.no_grad()
def latent_moments(latents) -> LatentStats:
    """Moments of a stream of latent batches (any iterable of tensors)."""
    s, sq, n = 0.0, 0.0, 0
    for z in latents:
        z = z.double()
        s += float(z.sum())
        sq += float((z * z).sum())
        n += z.numel()
    return LatentStats(s, sq, n)


@torch.no_grad()
def encoded_latents(autoencoder, dataset, batch_size: int = 16, device: str | torch.device = "cpu", seed: int = 0):
    """Every tile encoded once, batch by batch: posterior samples, as the DM sees them (unscaled)."""
    autoencoder = autoencoder.eval().to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for x, _ in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        yield autoencoder.encode(x.to(device)).latent_dist.sample(generator=gen)


def compute_latent_stats(autoencoder, dataset, batch_size: int = 16, device: str | torch.device = "cpu", seed: int = 0) -> LatentStats:
    """Encode every tile once and return the moments."""
    return latent_moments(encoded_latents(autoencoder, dataset, batch_size, device, seed))
