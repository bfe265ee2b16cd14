"""Time-dependent latent classifier p(y | z_t, t) trained on noised latents z_t ~ q(z_t | z_0), t ~ U over all
T timesteps (paper eq. 6; the original release trained at t = 0 only), with held-out accuracy per t."""

from __future__ import annotations

import logging
from typing import Any, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

log = logging.getLogger("histodiff.augment")


@torch.no_grad()
def encode_latents(autoencoder, dataset: Dataset, scale_factor: float, batch_size: int,
                   dihedral: bool = False, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled latents (the DM's space) and labels; ``dihedral`` adds the 8 flips/rotations of each tile."""
    from histodiff.evaluation.downstream import loader

    zs, ys = [], []
    autoencoder = autoencoder.to(device)
    for x, y in loader(dataset, batch_size, False):
        x = x.to(device)
        views = [torch.rot90(v, k, dims=(2, 3)) for v in (x, x.flip(3)) for k in range(4)] if dihedral else [x]
        for v in views:
            zs.append((autoencoder.encode(v).latent_dist.mode() * scale_factor).cpu())
            ys.append(torch.as_tensor(y))
    return torch.cat(zs), torch.cat(ys)


class LatentClassifierModule(L.LightningModule):
    def __init__(self, classifier, alphas_cumprod: torch.Tensor, lr: float, steps: int) -> None:
        super().__init__()
        self.classifier, self.lr, self.steps = classifier, lr, steps
        self.register_buffer("alphas_cumprod", alphas_cumprod.float())
        self.last: dict[str, float] = {}

    def noised(self, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        abar = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return abar.sqrt() * z0 + (1 - abar).sqrt() * noise

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        z0, y = batch
        # diffusers indexes timesteps 0..T-1: the paper's t = 1..T, all of them equally likely
        t = torch.randint(0, len(self.alphas_cumprod), (z0.shape[0],), device=z0.device)
        loss = F.cross_entropy(self.classifier(self.noised(z0, t, torch.randn_like(z0)), t), y)
        self.log("latent_classifier/loss", loss.detach(), on_step=True, on_epoch=False, logger=bool(self.loggers))
        value = float(loss.detach())
        self.last["loss"] = 0.9 * self.last.get("loss", value) + 0.1 * value
        if (batch_idx + 1) % max(1, self.steps // 5) == 0:
            log.info("latent classifier: step %d/%d loss %.4f (running)", batch_idx + 1, self.steps, self.last["loss"])
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.classifier.parameters(), lr=self.lr, weight_decay=0.0)


def train_latent_classifier(cfg, classifier, alphas_cumprod: torch.Tensor, z: torch.Tensor, y: torch.Tensor) -> float:
    from histodiff.local_training.trainer_setup import make_trainer, seed_everything, step_loader

    lc = cfg.latent_classifier
    seed_everything(cfg.seed)
    module = LatentClassifierModule(classifier, alphas_cumprod, lc.lr, lc.steps)
    batch = min(cfg.tiles.batch_size * 2, len(z))
    make_trainer(cfg.train, lc.steps, progress=False).fit(module, step_loader(TensorDataset(z, y), batch, lc.steps, cfg.seed))
    classifier.eval().requires_grad_(False)
    return module.last.get("loss", float("nan"))


@torch.no_grad()
def accuracy_by_timestep(classifier, alphas_cumprod: torch.Tensor, z: torch.Tensor, y: torch.Tensor,
                         timesteps: Sequence[int], draws: int = 4, seed: int = 0) -> dict[int, float]:
    """Held-out accuracy at fixed t, averaged over ``draws`` noise draws per latent."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for t in timesteps:
        t = min(int(t), len(alphas_cumprod) - 1)
        abar = alphas_cumprod[t].float()
        correct = 0
        for _ in range(draws):
            zt = abar.sqrt() * z + (1 - abar).sqrt() * torch.randn(z.shape, generator=gen)
            correct += int((classifier(zt, torch.full((len(z),), t)).argmax(1) == y).sum())
        out[t] = correct / (draws * len(z))
    return out
