"""DP latent statistics for the global scale factor: clipped per-tile moments plus Gaussian noise, accounted.

Without DP the latent-stats round releases exact sums of a site's latents. Here every tile contributes its
mean latent value m_i and mean square m2_i, with latent values clipped to [-B, B] (``privacy.latent_clip``),
so adding or removing one tile moves the pair (sum m_i, sum m2_i) by at most sqrt(B^2 + B^4) in L2; Gaussian
noise of std sigma times that sensitivity is added and one release (sample rate 1) enters the site's
accountant. The tile count stays exact: it is the FedAvg weight that every round reveals anyway.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from histodiff.privacy.accountant import SiteAccountant, secret_generator
from histodiff.diffusion.latent_stats import LatentStats, encoded_latents


@torch.no_grad()
def dp_latent_stats(cfg, autoencoder, dataset, accountant_dir: Path, site: str = "site",
                    seed: int = 0) -> tuple[LatentStats, dict[str, float]]:
    """Noised (sum, sum_sq, count) of the site's latents and the site's privacy metrics after the release."""
    p = cfg.privacy
    acc = SiteAccountant.load_or_create(Path(accountant_dir), p.target_epsilon, p.delta)
    sigma = acc.noise_multiplier or p.noise_multiplier
    if sigma is None:
        raise ValueError("DP latent statistics need the site's noise multiplier (train the LAE with DP first "
                         "or set privacy.noise_multiplier)")
    acc.check_budget(1, site, release=(sigma, 1.0))
    bound = float(p.latent_clip)
    s = sq = 0.0
    n_tiles = numel = 0
    for z in encoded_latents(autoencoder, dataset, cfg.tiles.batch_size, seed=seed):
        flat = z.double().clamp(-bound, bound).flatten(1)
        s += float(flat.mean(1).sum())
        sq += float((flat * flat).mean(1).sum())
        n_tiles += flat.shape[0]
        numel = flat.shape[1]
    sensitivity = math.sqrt(bound**2 + bound**4)
    noise = torch.randn(2, generator=secret_generator(), dtype=torch.float64) * sigma * sensitivity  # not from `seed`
    s, sq = s + float(noise[0]), max(sq + float(noise[1]), 0.0)
    acc.record_release("latent-stats", sigma)
    acc.record_round("latent-stats", 1, statistics=3, bytes=24, latent_clip=bound, sensitivity=sensitivity)
    acc.save()
    return LatentStats(s * numel, sq * numel, n_tiles * numel), acc.metrics()
