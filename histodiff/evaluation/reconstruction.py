"""Does the autoencoder keep what a classifier needs? An image classifier phi on real vs reconstructed tiles.

Used by the evidence experiment (``benchmarks/evidence.py``) and the small-profile probe
(``benchmarks/small_profile_probe.py``); the pipeline's own decoder fine-tuning reports the same accuracy on its
validation split.
"""

from __future__ import annotations

import torch
from torch import nn

from histodiff.evaluation.downstream import fit_input, loader


@torch.no_grad()
def reconstruction_metrics(autoencoder, phi: nn.Module, img_size: int, dataset, lpips_net: nn.Module | None,
                           batch: int) -> dict[str, float | None]:
    """phi's accuracy on the real and the reconstructed tiles of a labeled ``dataset``, PSNR, LPIPS and L1.

    ``colour_matched_accuracy`` is a diagnosis: the reconstructions with each tile's per-channel mean and std set
    to the real tile's. A large rise over ``reconstruction_accuracy`` means the gap is colour (stain), not
    structure.
    """
    real_ok = rec_ok = matched_ok = n = 0
    psnr = lp = l1 = 0.0
    for x, y in loader(dataset, batch, False):
        y = torch.as_tensor(y)
        x_hat = autoencoder.decode(autoencoder.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        real_ok += int((phi(fit_input(x, img_size)).argmax(1) == y).sum())
        rec_ok += int((phi(fit_input(x_hat, img_size)).argmax(1) == y).sum())
        mu, sd = x.mean((2, 3), keepdim=True), x.std((2, 3), keepdim=True)
        mu_h, sd_h = x_hat.mean((2, 3), keepdim=True), x_hat.std((2, 3), keepdim=True).clamp_min(1e-4)
        matched = ((x_hat - mu_h) / sd_h * sd + mu).clamp(-1, 1)
        matched_ok += int((phi(fit_input(matched, img_size)).argmax(1) == y).sum())
        mse = ((x - x_hat) / 2).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-10)  # on [0, 1] pixels
        psnr += float((10 * torch.log10(1 / mse)).sum())
        l1 += float((x - x_hat).abs().mean(dim=(1, 2, 3)).sum())
        if lpips_net is not None:
            lp += float(lpips_net(x.contiguous(), x_hat.contiguous()).flatten().sum())
        n += len(x)
    if n == 0:
        raise ValueError("reconstruction_metrics: the dataset holds no tiles")
    return {"real_accuracy": real_ok / n, "reconstruction_accuracy": rec_ok / n,
            "gap_points": 100 * (real_ok - rec_ok) / n, "colour_matched_accuracy": matched_ok / n,
            "psnr": psnr / n, "lpips": lp / n if lpips_net is not None else None, "l1": l1 / n, "tiles": n}
