"""Paper-profile throughput on a GPU: LAE and DM train steps and DDIM sampling, in tiles/s.

One command on a GPU machine: ``python -m benchmarks.paper_gpu``. Train steps use the config's precision (bf16
autocast on GPUs that support it) through the Lightning modules, as ``benchmarks.train_step`` times them; DDIM
sampling runs under bf16 autocast with channels_last (the best case, not what ``histodiff.train`` samples with).
``--profile tiny`` runs the same measurement on a CPU in seconds.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import TensorDataset

from benchmarks.train_step import _sync, lightning_dm, lightning_lae
from histodiff.config import compose
from histodiff.diffusion.noise_schedule import build_ddim
from histodiff.diffusion.unet import build_unet
from histodiff.diffusion.ddim_sampling import ddim_sample
from histodiff.local_training.trainer_setup import resolve_precision


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", default="paper")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--skip", type=int, default=3)
    parser.add_argument("--sample-batch", type=int, default=16)
    parser.add_argument("--ddim-steps", type=int, default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = compose([f"profile={args.profile}", "lae.disc_start=0", "train.devices=1", *args.overrides])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    size, batch = cfg.tiles.image_size, cfg.tiles.batch_size
    n = batch * 4
    data = TensorDataset(torch.rand(n, 3, size, size) * 2 - 1, torch.zeros(n, dtype=torch.long))
    print(f"profile {args.profile} on {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}; "
          f"precision {resolve_precision(cfg.train.precision, cfg.train.accelerator)}; batch {batch}; {size}x{size}")

    tiles = args.steps * batch
    lae = tiles / lightning_lae(cfg, data, args.steps, args.skip)
    print(f"LAE train step (G + D + LPIPS): {lae:.1f} tiles/s")
    if device == "cuda":
        print(f"  peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
        torch.cuda.reset_peak_memory_stats()

    dm = tiles / lightning_dm(cfg, data, args.steps, args.skip)
    print(f"DM train step (encode + UNet + EMA): {dm:.1f} tiles/s")
    if device == "cuda":
        print(f"  peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")

    unet = build_unet(cfg).to(device).eval()
    if device == "cuda":
        unet = unet.to(memory_format=torch.channels_last)
    steps = args.ddim_steps or cfg.dm.ddim_steps
    dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32):
        ddim_sample(unet, build_ddim(cfg.dm), 2, 2, generator=gen)  # warm-up
        _sync()
        t0 = time.perf_counter()
        ddim_sample(unet, build_ddim(cfg.dm), args.sample_batch, steps, generator=gen)
        _sync()
    elapsed = time.perf_counter() - t0
    print(f"DDIM sampling ({steps} steps, batch {args.sample_batch}): {args.sample_batch / elapsed:.2f} tiles/s")


if __name__ == "__main__":
    main()
