"""Classifier-guided DDIM in latent space (paper eqs. 6-8): a guidance closure and a per-seed batched sampler.

eps_hat = eps - g * sqrt(1 - abar_t) * grad_z log p(y | z_t); the gradient flows through the latent
classifier only (never through the UNet), so guidance costs one classifier forward + backward per step.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from histodiff.diffusion.ddim_sampling import Guidance, ddim_loop


def classifier_guidance(classifier: torch.nn.Module, alphas_cumprod: torch.Tensor, labels: torch.Tensor,
                        scale: float) -> Guidance:
    """A ``guidance(z_t, t, eps) -> eps_hat`` closure steering every sample towards its own label."""

    def guide(z_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        abar = alphas_cumprod.to(z_t.device)[int(t)]
        with torch.enable_grad():
            z = z_t.detach().requires_grad_(True)
            logp = torch.log_softmax(classifier(z, torch.as_tensor(t, device=z.device)).float(), dim=-1)
            # summing over the batch keeps each sample's gradient its own (samples are independent)
            chosen = logp.gather(1, labels.to(z.device).view(-1, 1)).sum()
            grad = torch.autograd.grad(chosen, z)[0]
        return eps - scale * (1.0 - abar).sqrt() * grad.to(eps.dtype)

    return guide


def seeded_noise(seeds: Sequence[int], shape: tuple[int, ...], step: int, device: torch.device) -> torch.Tensor:
    """One noise tensor per seed, so a tile depends only on its own seed, not on its batch neighbours."""
    out = []
    for seed in seeds:
        gen = torch.Generator().manual_seed(int(seed) * 100_003 + step)  # step 0: z_T; step k: DDIM noise
        out.append(torch.randn(shape, generator=gen))
    return torch.stack(out).to(device)


def ddim_sample_seeded(unet, scheduler, seeds: Sequence[int], steps: int, eta: float = 0.0,
                       guidance: Optional[Guidance] = None, progress: bool = False) -> torch.Tensor:
    """DDIM over len(seeds) latents in one batch; returns scaled z_0. Same seeds -> same latents."""
    device = next(unet.parameters()).device
    cfg = unet.config
    shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
    return ddim_loop(unet, scheduler, seeded_noise(seeds, shape, 0, device), steps, eta, guidance=guidance,
                     progress=progress, step_noise=lambda k: seeded_noise(seeds, shape, k + 1, device))


def sample_classes(unet, scheduler, classifier, alphas_cumprod: torch.Tensor, labels: Sequence[int],
                   seeds: Sequence[int], steps: int, scale: float, eta: float = 0.0, batch_size: int = 16,
                   on_batch: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
    """Guided latents for (label, seed) pairs, in batches; ``on_batch(done, total)`` reports progress."""
    if len(labels) != len(seeds):
        raise ValueError("one seed per label is needed")
    out = []
    for start in range(0, len(labels), batch_size):
        y = torch.as_tensor(list(labels[start:start + batch_size]), dtype=torch.long)
        guide = classifier_guidance(classifier, alphas_cumprod, y, scale) if classifier is not None else None
        out.append(ddim_sample_seeded(unet, scheduler, seeds[start:start + batch_size], steps, eta, guide))
        if on_batch is not None:
            on_batch(min(start + batch_size, len(labels)), len(labels))
    return torch.cat(out) if out else torch.empty(0)
