"""Unconditional eps-prediction UNet of the latent diffusion model (diffusers UNet2DModel), with PyTorch SDPA
attention (``TokenMajorSDPAProcessor``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0


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
    """The DM UNet for the latents of ``cfg.lae`` at ``cfg.tiles.image_size`` (SDPA attention)."""
    from histodiff.autoencoder.kl_autoencoder import downsample_factor

    latent_size = cfg.tiles.image_size // downsample_factor(cfg.lae)
    return use_sdpa_attention(UNet2DModel(**unet_kwargs(cfg.dm.unet, latent_size, cfg.lae.latent_channels)))


class TokenMajorSDPAProcessor(AttnProcessor2_0):
    """diffusers' ``AttnProcessor2_0`` (PyTorch SDPA) for the spatial self-attention of our UNet and latent
    classifier, with the tokens made contiguous once before the q/k/v projections.

    diffusers hands the projections a transposed (B, HW, C) view; under autograd ``torch.matmul`` does not fold
    a non-contiguous batched input into one GEMM but expands each weight to (B, C, C) and runs batched GEMMs
    forward and backward. That is the guidance gradient (``classifier_guidance``) and every training step.
    The arithmetic is the same as ``AttnProcessor2_0`` (the outputs are equal bit for bit on the CPU); calls
    that are not plain 4-D self-attention go to ``AttnProcessor2_0`` unchanged.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        plain = (hidden_states.ndim == 4 and encoder_hidden_states is None and attention_mask is None
                 and attn.spatial_norm is None and attn.norm_q is None and attn.norm_k is None and not args
                 and not kwargs)
        if not plain:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        b, c, h, w = hidden_states.shape
        x = hidden_states.view(b, c, h * w)
        if attn.group_norm is not None:
            x = attn.group_norm(x)
        x = x.transpose(1, 2).contiguous()  # (B, HW, C), token-major
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        head_dim = k.shape[-1] // attn.heads
        q, k, v = (y.view(b, -1, attn.heads, head_dim).transpose(1, 2) for y in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * head_dim).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))  # projection, dropout
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def use_sdpa_attention(model: torch.nn.Module) -> torch.nn.Module:
    """Give every diffusers ``Attention`` in ``model`` the ``TokenMajorSDPAProcessor``; returns ``model``."""
    for module in model.modules():
        if isinstance(module, Attention):
            module.set_processor(TokenMajorSDPAProcessor())
    return model
