"""Throughput of the LAE and DM train steps at a profile: Lightning modules vs the same step as a bare loop.

``python -m benchmarks.train_step [--profile tiny] [--steps 40]`` prints tiles/s of both and their
ratio (Lightning / bare; the framework should cost at most 10%). Both run in this one process on the
same in-memory tiles, alternately, so machine noise hits them alike.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import TensorDataset

from histodiff.config import compose
from histodiff.diffusion.noise_schedule import build_noise_scheduler
from histodiff.autoencoder.lae_loss import build_lae_loss
from histodiff.diffusion.dm_module import eps_loss
from histodiff.autoencoder.kl_autoencoder import build_autoencoder
from histodiff.diffusion.unet import build_unet
from histodiff.local_training.trainer_setup import make_trainer, step_loader
from histodiff.diffusion.dm_module import DMModule, build_dm_optimizer
from histodiff.autoencoder.lae_module import LAEModule


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class BatchWindow:
    """Lightning callback: wall time from the first timed batch's start to the last batch's end.

    Everything between batches (data fetch, logging, progress, hooks) is inside the window; CUDA work is
    synchronised at both ends so a GPU run times finished work.
    """

    def __init__(self, skip: int):
        import lightning as L

        outer = self

        class Callback(L.Callback):
            def on_train_batch_start(self, trainer, module, batch, idx):
                if idx == skip:
                    _sync()
                    outer.t0 = time.perf_counter()

            def on_train_batch_end(self, trainer, module, outputs, batch, idx):
                _sync()
                outer.elapsed = time.perf_counter() - outer.t0

        self.callback, self.elapsed, self.t0 = Callback(), 0.0, 0.0


def lightning_lae(cfg, data, steps, skip):
    timer = BatchWindow(skip)
    module = LAEModule(cfg)
    trainer = make_trainer(cfg.train, steps + skip, False, [timer.callback], progress=False)
    trainer.fit(module, step_loader(data, cfg.tiles.batch_size, steps + skip, 0))
    return timer.elapsed


def bare_lae(cfg, data, steps, skip):
    ae, loss_fn = build_autoencoder(cfg.lae), build_lae_loss(cfg)
    opt_g = torch.optim.Adam(ae.parameters(), lr=cfg.lae.lr, betas=tuple(cfg.lae.betas))
    opt_d = torch.optim.Adam(loss_fn.discriminator.parameters(), lr=cfg.lae.lr, betas=tuple(cfg.lae.betas))
    t0 = 0.0
    for step, (x, _) in enumerate(step_loader(data, cfg.tiles.batch_size, steps + skip, 0)):
        if step == skip:
            t0 = time.perf_counter()
        post = ae.encode(x).latent_dist
        x_hat = ae.decode(post.sample()).sample
        g, _ = loss_fn.generator_loss(x, x_hat, post, step, last_layer=ae.decoder.conv_out.weight)
        opt_g.zero_grad(set_to_none=True)
        g.backward()
        opt_g.step()
        if step >= cfg.lae.disc_start:
            d, _ = loss_fn.discriminator_loss(x, x_hat.detach(), step)
            opt_d.zero_grad(set_to_none=True)
            d.backward()
            opt_d.step()
    return time.perf_counter() - t0


def lightning_dm(cfg, data, steps, skip):
    timer = BatchWindow(skip)
    module = DMModule(cfg, build_autoencoder(cfg.lae), 1.0)
    trainer = make_trainer(cfg.train, steps + skip, False, [timer.callback], progress=False)
    trainer.fit(module, step_loader(data, cfg.tiles.batch_size, steps + skip, 0))
    return timer.elapsed


def bare_dm(cfg, data, steps, skip):
    from diffusers.training_utils import EMAModel

    ae, unet = build_autoencoder(cfg.lae).eval().requires_grad_(False), build_unet(cfg)
    sched = build_noise_scheduler(cfg.dm)
    ema = EMAModel(unet.parameters(), decay=cfg.dm.ema_decay)
    opt, lr = build_dm_optimizer(unet, cfg.dm)
    t0 = 0.0
    for step, (x, _) in enumerate(step_loader(data, cfg.tiles.batch_size, steps + skip, 0)):
        if step == skip:
            t0 = time.perf_counter()
        with torch.no_grad():
            z0 = ae.encode(x).latent_dist.sample()
        noise = torch.randn_like(z0)
        t = torch.randint(0, sched.config.num_train_timesteps, (z0.shape[0],))
        loss = eps_loss(unet(sched.add_noise(z0, noise, t), t).sample, noise, cfg.dm.loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr.step()
        ema.step(unet.parameters())
    return time.perf_counter() - t0


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--skip", type=int, default=3, help="warm-up steps left out of the timing")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    # disc_start=0: time the full generator + discriminator step (the expensive regime)
    cfg = compose([f"profile={args.profile}", "lae.disc_start=0", *args.overrides])
    torch.manual_seed(0)
    n = cfg.tiles.batch_size * 8
    size = cfg.tiles.image_size
    data = TensorDataset(torch.rand(n, 3, size, size) * 2 - 1, torch.zeros(n, dtype=torch.long))
    tiles = args.steps * cfg.tiles.batch_size
    print(f"profile {args.profile}: batch {cfg.tiles.batch_size}, {size}x{size} tiles, {args.steps} timed steps, "
          f"perceptual {cfg.weights.perceptual}, torch threads {torch.get_num_threads()}")
    for name, lit, bare in (("LAE", lightning_lae, bare_lae), ("DM", lightning_dm, bare_dm)):
        t_lit = t_bare = 0.0
        for _ in range(args.repeats):  # alternate so drift in machine load hits both
            t_bare += bare(cfg, data, args.steps, args.skip)
            t_lit += lit(cfg, data, args.steps, args.skip)
        r_lit, r_bare = args.repeats * tiles / t_lit, args.repeats * tiles / t_bare
        print(f"{name} train step: Lightning {r_lit:.1f} tiles/s, bare PyTorch {r_bare:.1f} tiles/s, "
              f"ratio {r_lit / r_bare:.3f}")


if __name__ == "__main__":
    main()
