"""What travels in which phase: the arrays of each phase by prefix, packing and unpacking, phase initialisation,
flat (``prefix.name``) <-> diffusers models, and the record keys of every message and reply.

Both ends import this module (``client/`` and ``strategies/``); it imports the science (``histodiff``) and never
``client``, ``server`` or ``strategies``.
"""

from __future__ import annotations

import torch

from histodiff.model_files import flat, load_part, part
from histodiff.privacy.memorisation import FIGURES as MEMORISATION_FIGURES

__all__ = ["flat", "load_part", "part"]  # the flat layout, from the science package

# record keys of messages and replies
ARRAYS_KEY = "arrays"  # a training round's arrays: the global (or its delta) down, the site's update up
METRICS_KEY = "metrics"
CONFIG_KEY = "config"
AUTOENCODER_KEY = "autoencoder"  # the frozen global autoencoder (latent stats, DM rounds, delivery)
UNET_KEY = "unet"  # the delivered UNet

# the model parts (flat-name prefixes) each training phase trains and sends
PHASE_PARTS = {"lae": ("autoencoder", "discriminator"), "dm": ("unet",)}
TRAINING_PHASES = tuple(PHASE_PARTS)
# scalars a site sends besides arrays in each phase: name -> what it is (the privacy report lists them)
STATISTICS = {"latent-stats": ["latent-sum", "latent-sum-sq", "latent-count", "num-examples"],
              "memorisation": list(MEMORISATION_FIGURES)}
# the only metrics a memorisation-check reply may carry: counts and quantiles (never tiles, features or indices)
MEMORISATION_METRICS = (*MEMORISATION_FIGURES, "site-seconds")


def prefixes(phase: str) -> tuple[str, ...]:
    return tuple(f"{part}." for part in PHASE_PARTS[phase])


def pick(weights: dict[str, torch.Tensor], phase: str) -> dict[str, torch.Tensor]:
    """The arrays of ``phase`` in a flat state dict."""
    return {k: v for k, v in weights.items() if k.startswith(prefixes(phase))}


def _modules(cfg, phase: str) -> dict[str, torch.nn.Module]:
    from histodiff.autoencoder.kl_autoencoder import build_autoencoder
    from histodiff.autoencoder.discriminator import build_discriminator
    from histodiff.diffusion.unet import build_unet

    if phase == "lae":
        modules = {"autoencoder": build_autoencoder(cfg.lae)}
        if cfg.lae.share_discriminator:  # never the LPIPS network
            modules["discriminator"] = build_discriminator(cfg.lae)
        return modules
    if phase == "dm":
        return {"unet": build_unet(cfg)}
    return {}


def phase_shapes(cfg, phase: str) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the arrays of ``phase`` (built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        modules = _modules(cfg, phase)
    return {f"{name}.{k}": tuple(v.shape) for name, m in modules.items() for k, v in m.state_dict().items()}


def init_phase(cfg, phase: str, seed: int) -> dict[str, torch.Tensor]:
    """The starting global arrays of ``phase``, seeded (LAE: ``seed``; DM: ``seed + 1``)."""
    torch.manual_seed(seed + (1 if phase == "dm" else 0))
    out: dict[str, torch.Tensor] = {}
    for name, module in _modules(cfg, phase).items():
        out.update(flat(name, module))
    return out


def autoencoder_from(cfg, weights: dict[str, torch.Tensor]):
    """The global autoencoder (eval mode) from flat arrays."""
    from histodiff.autoencoder.kl_autoencoder import build_autoencoder

    ae = build_autoencoder(cfg.lae)
    ae.load_state_dict(part(weights, "autoencoder"), strict=True)
    return ae.eval()


def unet_from(cfg, weights: dict[str, torch.Tensor]):
    from histodiff.diffusion.unet import build_unet

    unet = build_unet(cfg)
    unet.load_state_dict(part(weights, "unet"), strict=True)
    return unet.eval()
