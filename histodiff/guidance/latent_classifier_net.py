"""Time-dependent latent classifier p(y | z_t, t): half-UNet encoder, timestep embedding, attention pooling.

Built from diffusers blocks and saved with ``save_pretrained`` like the other models, so guidance can
differentiate log p(y | z_t) with respect to noised latents at any t.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D, get_down_block
from torch import nn
from torch.nn import functional as F

from histodiff.diffusion.unet import use_sdpa_attention


class AttentionPool2d(nn.Module):
    """Pool a feature map to one vector: the mean token attends over all positions (CLIP-style)."""

    def __init__(self, channels: int, spatial: int, heads: int):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(spatial * spatial + 1, channels) / channels**0.5)
        self.attn = nn.MultiheadAttention(channels, heads, batch_first=True)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        tokens = h.flatten(2).transpose(1, 2)  # B, HW, C
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1) + self.pos[None]  # contiguous
        # nn.MultiheadAttention's own computation (its parameters, one query), written out on the batch-first
        # tokens: its forward transposes them to sequence-first, and under autograd (guidance) the projections
        # of those non-contiguous views run as batched GEMMs over an expanded weight, forward and backward
        attn = self.attn
        b, n, c = tokens.shape
        heads = attn.num_heads
        w_q, w_kv = attn.in_proj_weight.split([c, 2 * c])
        b_q, b_kv = attn.in_proj_bias.split([c, 2 * c])
        q = F.linear(tokens[:, :1], w_q, b_q).view(b, 1, heads, c // heads).transpose(1, 2)
        k, v = (y.reshape(b, n, heads, c // heads).transpose(1, 2) for y in F.linear(tokens, w_kv, b_kv).chunk(2, -1))
        out = F.scaled_dot_product_attention(q, k, v)  # B, heads, 1, C / heads
        return attn.out_proj(out.transpose(1, 2).reshape(b, c))


class TimeLatentClassifier(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(
        self,
        sample_size: int = 16,
        in_channels: int = 3,
        num_classes: int = 9,
        block_out_channels: tuple[int, ...] = (32, 64),
        attention_levels: tuple[bool, ...] = (False, True),
        layers_per_block: int = 1,
        attention_head_dim: int = 8,
        norm_num_groups: int = 8,
        pool_heads: int = 2,
        resnet_time_scale_shift: str = "scale_shift",
    ):
        super().__init__()
        base = block_out_channels[0]
        temb_dim = base * 4
        self.time_proj = Timesteps(base, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(base, temb_dim)
        self.conv_in = nn.Conv2d(in_channels, base, 3, padding=1)
        self.down_blocks = nn.ModuleList()
        out_ch = base
        for i, (ch, attn) in enumerate(zip(block_out_channels, attention_levels)):
            in_ch, out_ch = out_ch, ch
            final = i == len(block_out_channels) - 1
            self.down_blocks.append(
                get_down_block(
                    "AttnDownBlock2D" if attn else "DownBlock2D",
                    num_layers=layers_per_block,
                    in_channels=in_ch,
                    out_channels=out_ch,
                    temb_channels=temb_dim,
                    add_downsample=not final,
                    resnet_eps=1e-5,
                    resnet_act_fn="silu",
                    resnet_groups=norm_num_groups,
                    attention_head_dim=attention_head_dim,
                    downsample_padding=1,
                    resnet_time_scale_shift=resnet_time_scale_shift,
                )
            )
        self.mid_block = UNetMidBlock2D(
            in_channels=out_ch,
            temb_channels=temb_dim,
            resnet_eps=1e-5,
            resnet_act_fn="silu",
            attention_head_dim=attention_head_dim,
            resnet_groups=norm_num_groups,
            resnet_time_scale_shift="default" if resnet_time_scale_shift == "scale_shift" else resnet_time_scale_shift,
        )
        self.norm_out = nn.GroupNorm(norm_num_groups, out_ch)
        spatial = sample_size // 2 ** (len(block_out_channels) - 1)
        self.pool = AttentionPool2d(out_ch, spatial, pool_heads)
        self.head = nn.Linear(out_ch, num_classes)
        use_sdpa_attention(self)  # SDPA with contiguous tokens: guidance differentiates through these blocks

    def forward(self, z: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Class logits for latents ``z`` noised to ``timesteps`` (one per sample, or a scalar)."""
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(z.shape[0])
        temb = self.time_embedding(self.time_proj(timesteps.to(z.device)).to(z.dtype))
        h = self.conv_in(z)
        for block in self.down_blocks:
            h, _ = block(h, temb)
        h = self.mid_block(h, temb)
        h = nn.functional.silu(self.norm_out(h))
        return self.head(self.pool(h))


def build_latent_classifier(cfg, num_classes: int | None = None) -> TimeLatentClassifier:
    from histodiff.autoencoder.kl_autoencoder import downsample_factor

    lc = cfg.latent_classifier
    return TimeLatentClassifier(
        sample_size=cfg.tiles.image_size // downsample_factor(cfg.lae),
        in_channels=cfg.lae.latent_channels,
        num_classes=num_classes or lc.num_classes,
        block_out_channels=tuple(lc.block_out_channels),
        attention_levels=tuple(lc.attention_levels),
        layers_per_block=lc.layers_per_block,
        attention_head_dim=lc.block_out_channels[0] // lc.num_heads,
        norm_num_groups=lc.norm_num_groups,
        pool_heads=lc.pool_heads,
    )
