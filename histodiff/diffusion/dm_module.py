"""DM training: eps-prediction UNet on scaled latents of the frozen LAE encoder, warm-up and EMA."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from diffusers.training_utils import EMAModel
from torchmetrics.aggregation import MeanMetric

from histodiff.diffusion.noise_schedule import build_noise_scheduler
from histodiff.diffusion.unet import build_unet


def eps_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """Mean noise-prediction loss: ``l2`` (paper eq. 3) or ``l1`` (the reference release)."""
    if kind == "l2":
        return F.mse_loss(pred, target)
    if kind == "l1":
        return F.l1_loss(pred, target)
    raise ValueError(f"eps loss kind {kind!r}; expected l2 or l1")


def build_dm_optimizer(unet, dm_cfg, saved: dict | None = None):
    """AdamW with a linear warm-up (per step), restored from ``saved`` when the site has trained before.

    On CUDA the fused AdamW kernel is used (one launch for all parameters); elsewhere torch's default."""
    params = list(unet.parameters())
    fused = cuda_fused(params)
    opt = torch.optim.AdamW(params, lr=dm_cfg.lr, weight_decay=dm_cfg.weight_decay, fused=fused)
    warmup = max(1, dm_cfg.warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    if saved:
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        keep_fused(opt, fused)
    return opt, sched


def cuda_fused(params) -> bool | None:
    """``fused=True`` for torch's Adam/AdamW when every parameter is on a CUDA device, else the default."""
    params = list(params)
    return True if params and all(p.is_cuda for p in params) else None


def keep_fused(opt: torch.optim.Optimizer, fused: bool | None) -> None:
    """A loaded optimizer state carries the saving run's ``fused`` flag: use this device's choice instead."""
    for group in opt.param_groups:
        group["fused"] = fused
        if fused:
            group["foreach"] = None


def diffusion_loss(eps_model, noise_scheduler, z0: torch.Tensor, kind: str, keys: torch.Tensor | None = None) -> torch.Tensor:
    """Paper eq. 3: the noise-prediction loss at t ~ U{0..T-1}; ``eps_model(z_t, t)`` returns the predicted noise.

    ``keys``: one per latent (``local_training.sample_keys``): noise and timestep drawn from the latent's key
    instead of the process's random stream (the same draws on one device or several)."""
    if keys is None:
        noise = torch.randn_like(z0)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (z0.shape[0],), device=z0.device)
    else:
        from histodiff.local_training.sample_keys import NOISE, TIMESTEP, keyed_normal, keyed_randint

        noise = keyed_normal(keys, NOISE, z0.shape[1:], z0.device, z0.dtype)
        t = keyed_randint(keys, TIMESTEP, noise_scheduler.config.num_train_timesteps, z0.device)
    return eps_loss(eps_model(noise_scheduler.add_noise(z0, noise, t), t).float(), noise.float(), kind)


class DMModule(L.LightningModule):
    """Paper eq. 3 on z_0 = scale_factor * E(x); the encoder is frozen and not part of the module's state."""

    def __init__(self, cfg, autoencoder, scale_factor: float, ema: bool = True):
        super().__init__()
        self.cfg = cfg
        self.unet = build_unet(cfg)
        # single-site runs keep the EMA here; in a federated round the server keeps it (of the global model)
        self.ema = EMAModel(self.unet.parameters(), decay=cfg.dm.ema_decay) if ema else None
        # kept out of the module's parameters: frozen, never optimised, never sent by the DM phase
        self._autoencoder = [autoencoder.eval().requires_grad_(False)]
        self.scale_factor = float(scale_factor)
        self.noise_scheduler = build_noise_scheduler(cfg.dm)
        self.step = 0
        self.optimizer_state: dict | None = None
        self.round_means = {"loss": MeanMetric(), "lr": MeanMetric()}  # this call's (round's) means

    @property
    def autoencoder(self):
        return self._autoencoder[0]

    def on_fit_start(self) -> None:
        self.autoencoder.to(self.device)
        if self.ema is not None:
            self.ema.to(self.device)

    def configure_optimizers(self):
        opt, sched = build_dm_optimizer(self.unet, self.cfg.dm, self.optimizer_state)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    @torch.no_grad()
    def encode(self, x: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        posterior = self.autoencoder.encode(x).latent_dist
        if keys is None:
            return posterior.sample() * self.scale_factor
        from histodiff.local_training.sample_keys import POSTERIOR, keyed_normal

        eps = keyed_normal(keys, POSTERIOR, posterior.mean.shape[1:], posterior.mean.device, posterior.mean.dtype)
        return (posterior.mean + posterior.std * eps) * self.scale_factor

    def _common_step(self, x: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        return diffusion_loss(lambda zt, t: self.unet(zt, t).sample, self.noise_scheduler, self.encode(x, keys),
                              self.cfg.dm.loss, keys)

    def training_step(self, batch, batch_idx):
        from histodiff.local_training.sample_keys import batch_keys

        loss = self._common_step(batch[0], batch_keys(batch))
        self.log("loss", loss, prog_bar=True, logger=False)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.ema is not None:
            self.ema.step(self.unet.parameters())
        self.step += 1
        logs = {"loss": float(outputs["loss"]), "lr": self.optimizers().param_groups[0]["lr"]}
        for k, v in logs.items():
            self.round_means[k].update(v)
        # "step" sets the loggers' x axis to the global DM step (across restarts and rounds)
        if self.loggers:  # federated rounds run without loggers
            self.log_dict({**{f"dm/{k}": v for k, v in logs.items()}, "step": float(self.step)}, on_step=True,
                          on_epoch=False)

    def mean_metrics(self) -> dict[str, float]:
        """Mean loss and learning rate over this call's steps (what a federated round reports)."""
        return {k: float(m.compute()) for k, m in self.round_means.items() if m.update_count}
