"""The LAE's perceptual loss network: lpips' VGG16 LPIPS with the located ImageNet backbone (never downloaded)."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from torch import nn

from histodiff.weights.locate import VGG16_CONV_INDICES, resolve_vgg16

log = logging.getLogger("histodiff.weights")


def lpips_vgg16_state(features: dict[str, torch.Tensor], lpips_net: nn.Module) -> dict[str, torch.Tensor]:
    """Map ``features.N.*`` onto lpips' ``sliceK.N.*`` (lpips keeps torchvision's indices as child names)."""
    out: dict[str, torch.Tensor] = {}
    for k in range(1, 6):
        for name, _ in getattr(lpips_net, f"slice{k}").named_children():
            for kind in ("weight", "bias"):
                key = f"features.{name}.{kind}"
                if key in features:
                    out[f"slice{k}.{name}.{kind}"] = features[key]
    if len(out) != 2 * len(VGG16_CONV_INDICES):
        raise RuntimeError(f"lpips VGG16 layout changed: matched {len(out)} of {2 * len(VGG16_CONV_INDICES)} tensors")
    return out


def build_lpips(wcfg: Any) -> nn.Module:
    """lpips.LPIPS (VGG) with the resolved ImageNet backbone; frozen, eval mode. Inputs in [-1, 1]."""
    import lpips

    random_backbone = getattr(wcfg, "perceptual", "imagenet") == "random"
    features = None if random_backbone else resolve_vgg16(wcfg)  # fail before the slow build
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's `pretrained=` deprecation inside lpips
        # pnet_rand avoids lpips' own download; the linear layers still load from the lpips wheel
        model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    if features is None:
        log.warning("weights.perceptual=random: LPIPS uses a random VGG16 backbone (tiny test profile only)")
    else:
        model.net.load_state_dict(lpips_vgg16_state(features, model.net), strict=True)
    model.requires_grad_(False)
    return model.eval()
