"""FID and KID between synthetic and real tiles with the offline FID InceptionV3 (2048-d pool3), via torchmetrics.

Features are computed once per tile and reused: every table row and class is a subset of the same tiles.
"""

from __future__ import annotations

import warnings
from typing import Iterable

import torch
from torch import nn


@torch.no_grad()
def inception_features(inception: nn.Module, images: Iterable[torch.Tensor],
                       device: str | torch.device = "cpu") -> torch.Tensor:
    """2048-d features of batches of images in [-1, 1] (B x 3 x H x W)."""
    inception = inception.to(device)
    out = [inception(((x.to(device).float().clamp(-1, 1) + 1) * 127.5).round()).double().cpu() for x in images]
    return torch.cat(out) if out else torch.empty(0, 2048, dtype=torch.float64)


class _Precomputed(nn.Module):
    """Hands precomputed features to torchmetrics as if it were the feature network."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid(real: torch.Tensor, fake: torch.Tensor) -> float | None:
    """Frechet distance of two feature sets; None when either has fewer than 2 tiles (undefined)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if len(real) < 2 or len(fake) < 2:
        return None
    if min(len(real), len(fake)) <= real.shape[1]:
        return frechet_low_rank(real, fake)
    metric = FrechetInceptionDistance(feature=_Precomputed(real.shape[1]))
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return float(metric.compute())


def frechet_low_rank(real: torch.Tensor, fake: torch.Tensor) -> float:
    """The same Frechet distance, exactly, for fewer tiles than dimensions: with centred features A, B,
    tr sqrt(S_r S_f) is the sum of singular values of A B^T / sqrt((n_r - 1)(n_f - 1)), an n_r x n_f problem
    instead of torchmetrics' 2048 x 2048 eigendecomposition (seconds per call on a CPU)."""
    real, fake = real.double(), fake.double()
    a, b = real - real.mean(0), fake - fake.mean(0)
    n_r, n_f = len(real), len(fake)
    trace_sqrt = torch.linalg.svdvals(a @ b.T).sum() / ((n_r - 1) * (n_f - 1)) ** 0.5
    mean_term = (real.mean(0) - fake.mean(0)).pow(2).sum()
    return float(mean_term + a.pow(2).sum() / (n_r - 1) + b.pow(2).sum() / (n_f - 1) - 2 * trace_sqrt)


def kid(real: torch.Tensor, fake: torch.Tensor, seed: int = 0, subsets: int = 20) -> tuple[float, float] | None:
    """Kernel Inception Distance (mean, std over subsets); unbiased at small sample counts, unlike FID."""
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(len(real), len(fake), 1000)
    if size < 2:
        return None
    with warnings.catch_warnings():  # its memory warning is moot: features are already in memory here
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(feature=_Precomputed(real.shape[1]), subset_size=size, subsets=subsets)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    with torch.random.fork_rng():  # its subset draws use the global RNG
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def fid_report(real: torch.Tensor, real_labels: torch.Tensor, fake: torch.Tensor, fake_labels: torch.Tensor,
               class_names: list[str]) -> dict:
    """FID and KID overall and per class (a class with fewer than 2 tiles on either side gets None)."""
    overall_kid = kid(real, fake)
    report = {"fid": fid(real, fake), "kid": overall_kid[0] if overall_kid else None,
              "kid_std": overall_kid[1] if overall_kid else None, "n_real": len(real), "n_fake": len(fake),
              "per_class": {}}
    for c, name in enumerate(class_names):
        r, f = real[real_labels == c], fake[fake_labels == c]
        k = kid(r, f)
        report["per_class"][name] = {"fid": fid(r, f), "kid": k[0] if k else None, "n_real": len(r), "n_fake": len(f)}
    return report
