"""Unconditional eps-prediction UNet of the latent diffusion model (diffusers UNet2DModel)."""

from __future__ import annotations

from diffusers import UNet2DModel


def unet_kwargs(unet_cfg, sample_size: int, channels: int) -> dict:
    levels = list(zip(unet_cfg.block_out_channels, unet_cfg.attention_levels))
    down = tuple("AttnDownBlock2D" if attn else "DownBlock2D" for _, attn in levels)
    up = tuple("AttnUpBlock2D" if attn else "UpBlock2D" for _, attn in reversed(levels))
    return dict(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=tuple(unet_cfg.block_out_channels),
        layers_per_block=unet_cfg.layers_per_block,
        # diffusers sets heads = channels // head_dim; num_heads fixes the count at the first level
        attention_head_dim=unet_cfg.block_out_channels[0] // unet_cfg.num_heads,
        norm_num_groups=unet_cfg.norm_num_groups,
        resnet_time_scale_shift="scale_shift" if unet_cfg.time_scale_shift == "scale_shift" else "default",
        dropout=unet_cfg.dropout,
        downsample_type="resnet" if unet_cfg.resblock_updown else "conv",
        upsample_type="resnet" if unet_cfg.resblock_updown else "conv",
        add_attention=True,  # the middle block
    )


def build_unet(cfg) -> UNet2DModel:
    """The DM UNet for the latents of ``cfg.lae`` at ``cfg.tiles.image_size``."""
    from histodiff.autoencoder.kl_autoencoder import downsample_factor

    latent_size = cfg.tiles.image_size // downsample_factor(cfg.lae)
    return UNet2DModel(**unet_kwargs(cfg.dm.unet, latent_size, cfg.lae.latent_channels))
