"""Cost of DP-SGD at the tiny profile: a DP-SGD step vs the same non-private step (SecAgg+: privacy_secagg).

    HF_HUB_OFFLINE=1 python -m benchmarks.privacy_dp_cost [--steps 5] [overrides...]

The two training steps share model, batch and loss; only opacus differs (per-sample gradients in hooks
mode, clipping, noise). Steps are interleaved (plain, DP, plain, DP, ...) so a noisy shared machine hurts
both alike; the median is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _pair(plain_step, dp_step, steps: int) -> dict:
    plain_step(), dp_step()  # warm-up (allocations, hooks)
    plain, dp = [], []
    for _ in range(steps):
        plain.append(_time(plain_step))
        dp.append(_time(dp_step))
    p, d = statistics.median(plain), statistics.median(dp)
    return {"plain_s": round(p, 4), "dp_s": round(d, 4), "ratio": round(d / p, 2), "steps": steps}


def bench_dm(cfg, steps: int) -> dict:
    from histodiff.diffusion.noise_schedule import build_noise_scheduler
    from histodiff.diffusion.unet import build_unet
    from histodiff.privacy.dp_train import _dp_step, _finish, _make_private, _UNetForward
    from histodiff.diffusion.dm_module import diffusion_loss

    B, s = cfg.tiles.batch_size, cfg.tiles.image_size // 2 ** (len(cfg.lae.block_out_channels) - 1)
    c = cfg.lae.latent_channels
    sched = build_noise_scheduler(cfg.dm)
    z0 = torch.randn(B, c, s, s)

    def make_loss(model):  # the encoder is frozen and outside both steps: random latents stand in
        def eps_model(zt, t):
            pred = model(zt, t)
            return pred.sample if hasattr(pred, "sample") else pred

        return lambda _x: (diffusion_loss(eps_model, sched, z0, cfg.dm.loss), {})

    unet = build_unet(cfg)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.dm.lr)
    plain_loss = make_loss(unet)

    def plain_step():
        opt.zero_grad(set_to_none=True)
        plain_loss(None)[0].backward()
        opt.step()

    dp_unet = build_unet(cfg)
    gsm, dpo = _make_private(_UNetForward(dp_unet), torch.optim.AdamW(dp_unet.parameters(), lr=cfg.dm.lr),
                             1.0, 1.0, B)
    dp_loss = make_loss(gsm)
    out = _pair(plain_step, lambda: _dp_step(gsm, dpo, z0, dp_loss), steps)
    _finish(gsm, dpo)
    out["params"] = sum(p.numel() for p in unet.parameters())
    return out


def bench_lae(cfg, steps: int) -> dict:
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from histodiff.autoencoder.lae_loss import build_lae_loss
    from histodiff.autoencoder.kl_autoencoder import build_autoencoder
    from histodiff.privacy.dp_train import _AutoencoderForward, _dp_step, _finish, _make_private

    B, S = cfg.tiles.batch_size, cfg.tiles.image_size
    x = torch.rand(B, 3, S, S) * 2 - 1
    loss_mod = build_lae_loss(cfg)

    def make_loss(forward):
        def loss_fn(batch):
            x_hat, moments = forward(batch)
            # the generator step without the adversarial term, as under DP
            return loss_mod.generator_loss(batch, x_hat, DiagonalGaussianDistribution(moments), 0, None,
                                           adversarial=False)
        return loss_fn

    ae = build_autoencoder(cfg.lae).train()
    opt = torch.optim.Adam(ae.parameters(), lr=cfg.lae.lr)
    plain_loss = make_loss(_AutoencoderForward(ae))

    def plain_step():
        opt.zero_grad(set_to_none=True)
        plain_loss(x)[0].backward()
        opt.step()

    dp_ae = build_autoencoder(cfg.lae).train()
    gsm, dpo = _make_private(_AutoencoderForward(dp_ae), torch.optim.Adam(dp_ae.parameters(), lr=cfg.lae.lr),
                             1.0, 1.0, B)
    out = _pair(plain_step, lambda: _dp_step(gsm, dpo, x, make_loss(gsm)), steps)
    _finish(gsm, dpo)
    out["params"] = sum(p.numel() for p in ae.parameters())
    return out


def main(argv: list[str] | None = None) -> int:
    from histodiff.config import compose
    from histodiff.local_training.trainer_setup import quiet_libraries

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    quiet_libraries()
    cfg = compose(["profile=tiny", "weights.perceptual=random", *args.overrides])
    result = {"profile": "tiny", "image_size": cfg.tiles.image_size, "batch_size": cfg.tiles.batch_size,
              "threads": torch.get_num_threads()}
    result["dm"] = bench_dm(cfg, args.steps)
    result["lae"] = bench_lae(cfg, args.steps)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
