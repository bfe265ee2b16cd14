"""Latent autoencoder (LAE): a diffusers AutoencoderKL with f = 2^(levels-1) and 3 latent channels."""

from __future__ import annotations

from diffusers import AutoencoderKL


def autoencoder_kwargs(lae_cfg) -> dict:
    """Plain keyword arguments of the AutoencoderKL (also what `save_pretrained` writes)."""
    levels = len(lae_cfg.block_out_channels)
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(lae_cfg.block_out_channels),
        layers_per_block=lae_cfg.layers_per_block,
        latent_channels=lae_cfg.latent_channels,
        norm_num_groups=lae_cfg.norm_num_groups,
        mid_block_add_attention=True,
    )


def build_autoencoder(lae_cfg) -> AutoencoderKL:
    return AutoencoderKL(**autoencoder_kwargs(lae_cfg))


def downsample_factor(lae_cfg) -> int:
    return 2 ** (len(lae_cfg.block_out_channels) - 1)
