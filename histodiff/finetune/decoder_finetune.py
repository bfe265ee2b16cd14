"""Decoder fine-tuning at the labeled site (paper eq. 5): D -> D' with L_rec + lambda_CE * CE(phi(D(E(x))), y);
encoder, DM and phi stay frozen."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.aggregation import MeanMetric
from torch.utils.data import Dataset

from histodiff.evaluation.downstream import fit_input

log = logging.getLogger("histodiff.augment")


class DecoderFinetune(L.LightningModule):
    def __init__(self, autoencoder, phi: torch.nn.Module, phi_img_size: int, perceptual: torch.nn.Module | None,
                 perceptual_weight: float, lambda_ce: float, lr: float, steps: int) -> None:
        super().__init__()
        self.autoencoder, self.phi, self.perceptual = autoencoder, phi, perceptual
        self.phi_img_size, self.perceptual_weight, self.lambda_ce, self.lr = phi_img_size, perceptual_weight, lambda_ce, lr
        self.steps = steps
        autoencoder.requires_grad_(False)
        phi.requires_grad_(False)
        # only D (and the 1x1 conv in front of it) learns; E is frozen so the DM's latent space is unchanged
        self.trainable = [*autoencoder.decoder.parameters(), *autoencoder.post_quant_conv.parameters()]
        for p in self.trainable:
            p.requires_grad_(True)
        self.round_means: dict[str, MeanMetric] = {}  # mean of each term over the fine-tuning steps

    def train(self, mode: bool = True) -> "DecoderFinetune":
        super().train(mode)
        # frozen parts keep eval behaviour (phi's BatchNorm statistics must not drift)
        self.phi.eval()
        self.autoencoder.encoder.eval()
        if self.perceptual is not None:
            self.perceptual.eval()
        return self

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            z = self.autoencoder.encode(x).latent_dist.mode()
        x_hat = self.autoencoder.decode(z).sample
        rec = (x - x_hat).abs().mean()
        if self.perceptual is not None and self.perceptual_weight > 0:
            rec = rec + self.perceptual_weight * self.perceptual(x.contiguous(), x_hat.contiguous()).mean()
        logits = self.phi(fit_input(x_hat, self.phi_img_size))
        ce = F.cross_entropy(logits, y)
        acc = (logits.argmax(1) == y).float().mean()
        return {"loss": rec + self.lambda_ce * ce, "rec": rec, "ce": ce, "phi_acc": acc}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        out = self.losses(*batch)
        for k, v in out.items():
            self.round_means.setdefault(k, MeanMetric()).update(float(v.detach()))
        self.log_dict({f"decoder/{k}": v.detach() for k, v in out.items()}, on_step=True, on_epoch=False,
                      logger=bool(self.loggers))
        if (batch_idx + 1) % max(1, self.steps // 5) == 0 or batch_idx + 1 == self.steps:
            log.info("decoder fine-tuning: step %d/%d rec %.4f ce %.4f", batch_idx + 1, self.steps,
                     float(out["rec"].detach()), float(out["ce"].detach()))
        return out["loss"]

    def configure_optimizers(self):
        return torch.optim.Adam(self.trainable, lr=self.lr, betas=(0.5, 0.9))


@torch.no_grad()
def phi_on_reconstructions(autoencoder, phi, phi_img_size: int, dataset: Dataset, batch_size: int,
                           device: str | torch.device = "cpu") -> dict[str, float]:
    """How well phi recognises D(E(x)) of held-out tiles, and the L1 of the reconstructions."""
    from histodiff.evaluation.downstream import loader

    correct, l1, n = 0, 0.0, 0
    autoencoder, phi = autoencoder.to(device).eval(), phi.to(device).eval()
    for x, y in loader(dataset, batch_size, False):
        x, y = x.to(device), torch.as_tensor(y, device=device)
        x_hat = autoencoder.decode(autoencoder.encode(x).latent_dist.mode()).sample
        correct += int((phi(fit_input(x_hat, phi_img_size)).argmax(1) == y).sum())
        l1 += float((x - x_hat).abs().mean(dim=(1, 2, 3)).sum())
        n += len(x)
    return {"phi_accuracy": correct / max(1, n), "l1": l1 / max(1, n)}


def finetune_decoder(cfg, autoencoder, phi, phi_img_size: int, train_set: Dataset) -> dict[str, float]:
    """Fine-tune ``autoencoder``'s decoder in place for ``cfg.augment.decoder_steps`` steps."""
    from histodiff.local_training.trainer_setup import make_trainer, seed_everything, step_loader
    from histodiff.autoencoder.lpips_vgg import build_lpips

    a = cfg.augment
    seed_everything(cfg.seed)
    perceptual = build_lpips(cfg.weights) if cfg.lae.perceptual_weight > 0 else None
    module = DecoderFinetune(autoencoder, phi, phi_img_size, perceptual, cfg.lae.perceptual_weight, a.lambda_ce,
                             a.decoder_lr, a.decoder_steps)
    batch = min(cfg.tiles.batch_size, len(train_set))
    trainer = make_trainer(cfg.train, a.decoder_steps, progress=False)
    trainer.fit(module, step_loader(train_set, batch, a.decoder_steps, cfg.seed, cfg.tiles.num_workers))
    autoencoder.requires_grad_(False).eval()
    return {k: float(m.compute()) for k, m in module.round_means.items()}
