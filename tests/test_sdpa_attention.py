"""The UNet's and latent classifier's attention processor (SDPA on token-major tensors) computes exactly what
diffusers' AttnProcessor2_0 computes, forward and backward; the optimisers pick fused kernels only on CUDA."""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from histodiff.config import compose
from histodiff.diffusion.dm_module import build_dm_optimizer, cuda_fused, keep_fused
from histodiff.diffusion.unet import TokenMajorSDPAProcessor, build_unet, use_sdpa_attention
from histodiff.guidance.latent_classifier_net import build_latent_classifier


def _cfg():
    return compose(["profile=tiny", "tiles.image_size=32"])


def _processors(model):
    return {type(m.processor) for m in model.modules() if isinstance(m, Attention)}


def _with(model, processor):
    for m in model.modules():
        if isinstance(m, Attention):
            m.set_processor(processor())
    return model


def test_factories_install_the_sdpa_processor():
    cfg = _cfg()
    assert _processors(build_unet(cfg)) == {TokenMajorSDPAProcessor}
    assert _processors(build_latent_classifier(cfg)) == {TokenMajorSDPAProcessor}


def test_same_outputs_and_input_gradients_as_diffusers_processor():
    torch.manual_seed(0)
    cfg = _cfg()
    unet, clf = build_unet(cfg).eval(), build_latent_classifier(cfg).eval()
    z = torch.randn(3, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    t = torch.tensor([10, 500, 900])

    def run():
        zz = z.clone().requires_grad_(True)
        logits = clf(zz, t)
        grad = torch.autograd.grad(logits.log_softmax(-1)[:, 1].sum(), zz)[0]
        with torch.no_grad():
            eps = unet(z, t).sample
        return logits.detach(), grad, eps

    ours = run()
    _with(clf, AttnProcessor2_0)
    _with(unet, AttnProcessor2_0)
    stock = run()
    for a, b in zip(ours, stock):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_non_plain_calls_fall_back_to_diffusers():
    torch.manual_seed(0)
    attn = use_sdpa_attention(torch.nn.ModuleList([Attention(16, heads=2, dim_head=8)]))[0]
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    ours = attn(x, encoder_hidden_states=ctx)  # 3-D input with cross-attention: not the plain case
    attn.set_processor(AttnProcessor2_0())
    torch.testing.assert_close(ours, attn(x, encoder_hidden_states=ctx))


def test_fused_optimisers_only_for_cuda_parameters():
    unet = build_unet(_cfg())
    assert cuda_fused(unet.parameters()) is None  # CPU: torch's default implementation
    opt, _ = build_dm_optimizer(unet, _cfg().dm)
    assert opt.param_groups[0]["fused"] is None
    opt.param_groups[0]["fused"] = True  # as if saved by a CUDA site ...
    keep_fused(opt, cuda_fused(unet.parameters()))  # ... and loaded on a CPU one
    assert opt.param_groups[0]["fused"] is None
