"""The FID feature network: InceptionV3 pool3 (2048-d) from the located weights, with TF1's bilinear resize."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from histodiff.errors import WeightsNotFoundError
from histodiff.weights.locate import locate_inception

log = logging.getLogger("histodiff.weights")


def resize_tf1_bilinear(x: torch.Tensor, size: int = 299) -> torch.Tensor:
    """Bilinear resize as TensorFlow 1 did it for the reference FID (output pixel i samples input i * in/out)."""
    b, _, h, w = x.shape
    theta = torch.zeros(b, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    # grid_sample's half-pixel convention shifted by half an input pixel minus half an output pixel
    theta[:, 0, 2] = 1.0 / w - 1.0 / size
    theta[:, 1, 2] = 1.0 / h - 1.0 / size
    grid = F.affine_grid(theta, [b, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionFeatures(nn.Module):
    """2048-d FID features from images in [0, 255] (float or uint8), B x 3 x H x W; resizes to 299 inside.

    Usable as torchmetrics ``FrechetInceptionDistance(feature=...)`` (it reads ``num_features``).
    """

    num_features = 2048

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "InceptionFeatures":
        return super().train(False)  # a frozen metric network: never switch to training behaviour

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected B x 3 x H x W images, got shape {tuple(images.shape)}")
        x = images.float().clamp(0, 255)
        if x.shape[-2:] != (299, 299):
            x = resize_tf1_bilinear(x, 299)
        x = (x - 128.0) / 128.0  # the input scaling of the TF 2015-12-05 graph
        return self.backbone(x).reshape(x.shape[0], -1)


class _PytorchFidAdapter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from pytorch_fid.inception import InceptionV3  # optional; only when its hub file is present

        # it loads pt_inception-...pth from the torch hub cache, where locate_inception found it
        self.net = InceptionV3([3], resize_input=False, normalize_input=False, use_fid_inception=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[0]


def _random_inception_backbone() -> nn.Module:
    # small and seeded: tests need the interface and deterministic features, not Inception's cost
    gen = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 32, 3, stride=4), nn.ReLU(), nn.Conv2d(32, 64, 3, stride=4), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 2048), nn.ReLU())
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / max(1, p[0].numel()) ** 0.5))
    return net


def _load_torchscript(path: Path) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        try:
            return torch.jit.load(str(path), map_location="cpu")
        except (RuntimeError, ValueError) as exc:
            raise WeightsNotFoundError(f"{path} is not a loadable TorchScript file ({str(exc).splitlines()[0]})") from None


def load_inception(wcfg: Any) -> nn.Module:
    """The FID InceptionV3 (pool3, 2048-d) wrapped as :class:`InceptionFeatures`, frozen and in eval mode."""
    if getattr(wcfg, "inception", "pretrained") == "random":
        log.warning("weights.inception=random: FID features come from a random network (tests only)")
        return InceptionFeatures(_random_inception_backbone())
    found = locate_inception(wcfg)
    backbone = _PytorchFidAdapter() if found.origin == "torch-hub" else _load_torchscript(found.path)
    return InceptionFeatures(backbone)
