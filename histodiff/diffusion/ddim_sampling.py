"""Unconditional (and, with a guidance hook, guided) DDIM sampling in latent space; decoding to tiles."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

# guidance(z_t, t, eps) -> eps_hat: a closure handed to the sampler (classifier guidance plugs in here)
Guidance = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def ddim_loop(
    unet,
    scheduler,
    z: torch.Tensor,
    steps: int,
    eta: float = 0.0,
    generator: Optional[torch.Generator] = None,
    guidance: Optional[Guidance] = None,
    progress: bool = False,
    step_noise: Optional[Callable[[int], torch.Tensor]] = None,
) -> torch.Tensor:
    """The DDIM reverse process from z_T; ``step_noise(k)`` supplies step k's noise when eta > 0 (else ``generator``)."""
    scheduler.set_timesteps(steps, device=z.device)
    for k, t in enumerate(tqdm(scheduler.timesteps, desc="ddim", disable=not progress, leave=False)):
        with torch.no_grad():
            eps = unet(z, t).sample
        if guidance is not None:
            eps = guidance(z, t, eps)
        noise = step_noise(k) if step_noise is not None and eta > 0 else None
        with torch.no_grad():
            z = scheduler.step(eps, t, z, eta=eta, generator=generator, variance_noise=noise).prev_sample
    return z


def ddim_sample(
    unet,
    scheduler,
    num: int,
    steps: int,
    eta: float = 0.0,
    generator: Optional[torch.Generator] = None,
    guidance: Optional[Guidance] = None,
    progress: bool = False,
) -> torch.Tensor:
    """Run the DDIM reverse process for ``num`` latents; returns scaled z_0 (divide by scale_factor to decode)."""
    device = next(unet.parameters()).device
    cfg = unet.config
    z = torch.randn((num, cfg.in_channels, cfg.sample_size, cfg.sample_size), generator=generator, device=device)
    return ddim_loop(unet, scheduler, z, steps, eta, generator, guidance, progress)


@torch.no_grad()
def decode_latents(autoencoder, z: torch.Tensor, scale_factor: float, batch_size: int = 16) -> torch.Tensor:
    """Images in [-1, 1] from scaled latents."""
    out = [autoencoder.decode(chunk / scale_factor).sample for chunk in z.split(batch_size)]
    return torch.cat(out).clamp(-1, 1)


def save_tiles(images: torch.Tensor, out_dir: Path, prefix: str = "tile") -> list[Path]:
    from PIL import Image

    from histodiff.data import to_uint8_image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        path = out_dir / f"{prefix}_{i:04d}.png"
        Image.fromarray(to_uint8_image(img)).save(path)
        paths.append(path)
    return paths


def save_grid(images: torch.Tensor, path: Path, nrow: int = 8) -> Path:
    from torchvision.utils import save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image((images + 1) / 2, str(path), nrow=nrow, padding=2, pad_value=1.0)
    return path

