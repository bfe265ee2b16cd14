"""PatchGAN discriminator (pix2pix NLayerDiscriminator) for the LAE's adversarial loss.

The norm is configurable: BatchNorm as in the reference, GroupNorm or none where per-sample gradients
are needed (DP-SGD: opacus cannot train BatchNorm).
"""

from __future__ import annotations

import math
from typing import Any, Callable

from torch import nn

NORMS = ("batch", "group", "none")


def _norm_layer(kind: str) -> Callable[[int], nn.Module]:
    if kind == "batch":
        return nn.BatchNorm2d
    if kind == "group":
        # 32 groups where the width allows it, else the largest divisor below (tiny test widths)
        return lambda c: nn.GroupNorm(math.gcd(32, c), c)
    if kind == "none":
        return lambda c: nn.Identity()
    raise ValueError(f"discriminator norm {kind!r}; expected one of {', '.join(NORMS)}")


class PatchDiscriminator(nn.Module):
    """Maps B x C x H x W images to B x 1 x h x w patch logits (70x70 receptive field with 3 layers)."""

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3, norm: str = "batch") -> None:
        super().__init__()
        make_norm = _norm_layer(norm)
        bias = norm == "none"  # a norm's affine shift makes a conv bias redundant
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1  # the last hidden layer keeps the resolution
            layers += [nn.Conv2d(channels * prev, channels * mult, 4, stride, 1, bias=bias),
                       make_norm(channels * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(channels * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x):
        return self.main(x)


def _init_weights(m: nn.Module) -> None:
    # pix2pix / taming initialisation
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def build_discriminator(lae_cfg: Any, norm: str | None = None) -> PatchDiscriminator:
    """From ``cfg.lae``: disc_channels, disc_layers and (when the config has it) disc_norm; ``norm`` overrides."""
    norm = norm or getattr(lae_cfg, "disc_norm", None) or "batch"
    return PatchDiscriminator(3, int(lae_cfg.disc_channels), int(lae_cfg.disc_layers), norm)
