"""The LAE loss (paper eq. 4): L1 + LPIPS + KL + the adaptive PatchGAN hinge term."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from histodiff.autoencoder.discriminator import build_discriminator
from histodiff.autoencoder.lpips_vgg import build_lpips


def _floats(**values: Tensor) -> dict[str, float]:
    # one device-to-host copy for all logged scalars instead of one sync per value
    stacked = torch.stack([v.detach().float().reshape(()) for v in values.values()]).cpu().tolist()
    return dict(zip(values, stacked))


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    return F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean()


class LAELoss(nn.Module):
    """The LDM "LPIPSWithDiscriminator" loss, without its learned log-variance.

    Reduction: LDM sums the reconstruction term over pixels (mean over the batch). Here every term is a
    mean per pixel and the KL term is divided by the pixels too, so the whole generator loss is LDM's
    divided by C*H*W: the relative weights (kl_weight 1e-6, the adaptive d_weight) keep their paper
    meaning, while the loss stays O(1) at any tile size, so learning rates and logs are comparable.
    """

    def __init__(self, discriminator: nn.Module, perceptual: Optional[nn.Module], *, kl_weight: float = 1e-6,
                 perceptual_weight: float = 1.0, disc_start: int = 50001, disc_weight: float = 0.5,
                 disc_factor: float = 1.0) -> None:
        super().__init__()
        self.discriminator = discriminator
        self.perceptual = perceptual  # frozen LPIPS; None only when perceptual_weight is 0
        if perceptual is None and perceptual_weight > 0:
            raise ValueError("perceptual_weight > 0 needs an LPIPS module")
        self.kl_weight = kl_weight
        self.perceptual_weight = perceptual_weight
        self.disc_start = disc_start
        self.disc_weight = disc_weight
        self.disc_factor = disc_factor

    def train(self, mode: bool = True) -> "LAELoss":
        super().train(mode)
        if self.perceptual is not None:
            self.perceptual.eval()  # lpips' heads hold Dropout layers: train mode would make LPIPS random
        return self

    def active_disc_factor(self, global_step: int) -> float:
        return self.disc_factor if global_step >= self.disc_start else 0.0

    def adaptive_weight(self, nll: Tensor, g_loss: Tensor, last_layer: nn.Parameter) -> Tensor:
        """Balance the adversarial gradient against the reconstruction gradient at the decoder's last layer."""
        nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        d_weight = nll_grad.norm() / (g_grad.norm() + 1e-4)
        return torch.clamp(d_weight, 0.0, 1e4).detach() * self.disc_weight

    def generator_loss(self, x: Tensor, x_hat: Tensor, posterior: Any, global_step: int,
                       last_layer: nn.Parameter | None, adversarial: bool = True) -> tuple[Tensor, dict[str, float]]:
        """Loss for the autoencoder; x and x_hat in [-1, 1]; posterior a diffusers DiagonalGaussianDistribution.

        ``adversarial=False`` leaves the discriminator out whatever the step (DP-SGD: see histodiff.privacy.dp_train)."""
        l1 = (x - x_hat).abs().mean()
        if self.perceptual_weight > 0:
            perceptual = self.perceptual(x.contiguous(), x_hat.contiguous()).mean()  # type: ignore[misc]
        else:
            perceptual = torch.zeros((), device=x.device)
        nll = l1 + self.perceptual_weight * perceptual
        kl_sum = posterior.kl().mean()  # diffusers sums the KL over latent elements per sample
        kl = kl_sum / x[0].numel()  # per image element, matching the reduction of nll (see class doc)

        factor = self.active_disc_factor(global_step) if adversarial else 0.0
        zero = torch.zeros((), device=x.device)
        if factor > 0:
            g_loss = -self.discriminator(x_hat.contiguous()).mean()
            # validation runs under no_grad: no gradient to balance, so the adversarial term is left out
            can_grad = torch.is_grad_enabled() and nll.requires_grad and g_loss.requires_grad
            d_weight = self.adaptive_weight(nll, g_loss, last_layer) if can_grad else zero
        else:
            # before disc_start the discriminator is not consulted at all (and no autograd.grad is needed)
            g_loss, d_weight = zero, zero
        loss = nll + self.kl_weight * kl + d_weight * factor * g_loss
        logs = _floats(rec=l1, perceptual=perceptual, kl=kl_sum, g=g_loss, d_weight=d_weight, total=loss)
        logs["disc_factor"] = float(factor)
        return loss, logs

    def discriminator_loss(self, x: Tensor, x_hat: Tensor, global_step: int) -> tuple[Tensor, dict[str, float]]:
        """Hinge loss for the discriminator; x_hat is detached so no gradient reaches the autoencoder."""
        logits_real = self.discriminator(x.detach().contiguous())
        logits_fake = self.discriminator(x_hat.detach().contiguous())
        # computed (times 0) even before disc_start, as in LDM, so a caller can always call backward
        d_loss = self.active_disc_factor(global_step) * hinge_d_loss(logits_real, logits_fake)
        return d_loss, _floats(d_loss=d_loss, logits_real=logits_real.mean(), logits_fake=logits_fake.mean())


def build_lae_loss(cfg: Any) -> LAELoss:
    """From the full config: the discriminator from ``cfg.lae``, LPIPS from ``cfg.weights``."""
    lae = cfg.lae
    perceptual = build_lpips(cfg.weights) if lae.perceptual_weight > 0 else None
    return LAELoss(build_discriminator(lae), perceptual, kl_weight=float(lae.kl_weight),
                   perceptual_weight=float(lae.perceptual_weight), disc_start=int(lae.disc_start),
                   disc_weight=float(lae.disc_weight), disc_factor=float(lae.disc_factor))
