"""LAE training: generator (AutoencoderKL) and PatchGAN discriminator with manual optimisation."""

from __future__ import annotations

import lightning as L
import torch
from torchmetrics.aggregation import MeanMetric

from histodiff.autoencoder.lae_loss import build_lae_loss
from histodiff.autoencoder.kl_autoencoder import build_autoencoder
from histodiff.diffusion.dm_module import cuda_fused, keep_fused


class LAEModule(L.LightningModule):
    """Paper eq. 4: L1 + LPIPS + hinge PatchGAN (adaptive weight after ``disc_start``) + KL."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.automatic_optimization = False
        self.autoencoder = build_autoencoder(cfg.lae)
        self.loss = build_lae_loss(cfg)  # holds the frozen LPIPS net and the discriminator
        self.step = 0  # global LAE step across calls, restarts and federated rounds
        self.optimizer_state: list | None = None
        self.round_means: dict[str, MeanMetric] = {}  # this call's (round's) mean of every logged loss term

    @property
    def discriminator(self) -> torch.nn.Module:
        return self.loss.discriminator

    def configure_optimizers(self):
        lae = self.cfg.lae
        opts = []
        for i, module in enumerate((self.autoencoder, self.discriminator)):
            params = list(module.parameters())
            fused = cuda_fused(params)  # the fused Adam kernel on CUDA
            opt = torch.optim.Adam(params, lr=lae.lr, betas=tuple(lae.betas), fused=fused)
            if self.optimizer_state:
                opt.load_state_dict(self.optimizer_state[i])
                keep_fused(opt, fused)
            opts.append(opt)
        return opts

    def _common_step(self, x: torch.Tensor, sample: bool = True, keys: torch.Tensor | None = None):
        posterior = self.autoencoder.encode(x).latent_dist
        if sample and keys is not None:  # each tile's draw from its key (local_training.sample_keys)
            from histodiff.local_training.sample_keys import POSTERIOR, keyed_normal

            eps = keyed_normal(keys, POSTERIOR, posterior.mean.shape[1:], posterior.mean.device, posterior.mean.dtype)
            z = posterior.mean + posterior.std * eps
        else:
            z = posterior.sample() if sample else posterior.mode()
        return self.autoencoder.decode(z).sample, posterior

    def generator_step(self, x: torch.Tensor, opt_g, keys: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        x_hat, posterior = self._common_step(x, keys=keys)
        last_layer = self.autoencoder.decoder.conv_out.weight
        loss, logs = self.loss.generator_loss(x, x_hat, posterior, self.step, last_layer=last_layer)
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        self._clip(self.autoencoder)
        opt_g.step()
        return x_hat.detach(), logs

    def discriminator_step(self, x: torch.Tensor, x_hat: torch.Tensor, opt_d) -> dict:
        if self.step < self.cfg.lae.disc_start:
            return {}  # the discriminator has no effect yet: skip its forward/backward entirely
        loss, logs = self.loss.discriminator_loss(x, x_hat, self.step)
        opt_d.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        self._clip(self.discriminator)
        opt_d.step()
        return logs

    def _clip(self, module: torch.nn.Module) -> None:
        if self.cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(module.parameters(), self.cfg.train.grad_clip)

    def training_step(self, batch, batch_idx):
        from histodiff.local_training.sample_keys import batch_keys

        x = batch[0]
        opt_g, opt_d = self.optimizers()
        x_hat, logs = self.generator_step(x, opt_g, batch_keys(batch))
        logs.update(self.discriminator_step(x, x_hat, opt_d))
        self.step += 1
        self.record(logs)

    def record(self, logs: dict) -> None:
        logs = {k: float(v) for k, v in logs.items()}
        for k, v in logs.items():
            self.round_means.setdefault(k, MeanMetric()).update(v)
        # "step" sets the loggers' x axis to the global LAE step (across restarts and rounds)
        self.log("rec", logs.get("rec", 0.0), prog_bar=True, logger=False)
        to_loggers = bool(self.loggers)  # federated rounds run without loggers
        self.log("step", float(self.step), prog_bar=True, on_step=True, on_epoch=False, logger=to_loggers)
        if to_loggers:
            self.log_dict({f"lae/{k}": v for k, v in logs.items()}, on_step=True, on_epoch=False)

    def mean_metrics(self) -> dict[str, float]:
        """The mean of each loss term over this call's steps (what a federated round reports)."""
        return {k: float(m.compute()) for k, m in self.round_means.items()}

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self._common_step(x, sample=False)[0].clamp(-1, 1)
