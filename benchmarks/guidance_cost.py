"""Cost per tile of classifier-guided vs unguided DDIM sampling at a profile, measured in one run.

``python -m benchmarks.guidance_cost [--profile tiny] [--tiles 32] [--steps 20] [--repeats 3] [--threads N]``
prints seconds per tile of both samplers and their ratio (guided / unguided; the target is <= 1.6x at tiny),
by wall clock and by the process's CPU time (the steadier figure on a machine shared with other jobs), and the
FLOPs of one step of each counted by ``torch.utils.flop_counter`` (their ratio is what the time ratio would be
if the classifier's forward + backward ran as efficiently as the UNet's forward). Guided and unguided runs
alternate on the same seeds, so machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import time

import torch

from histodiff.config import compose
from histodiff.diffusion.noise_schedule import build_ddim
from histodiff.guidance.classifier_guidance import classifier_guidance, ddim_sample_seeded
from histodiff.guidance.latent_classifier_net import build_latent_classifier
from histodiff.diffusion.unet import build_unet


def measure(profile: str, tiles: int, steps: int, repeats: int, overrides: list[str]) -> dict[str, float]:
    cfg = compose([f"profile={profile}", *overrides])
    torch.manual_seed(0)
    unet = build_unet(cfg).eval().requires_grad_(False)
    clf = build_latent_classifier(cfg).eval().requires_grad_(False)
    scheduler = build_ddim(cfg.dm)
    seeds = list(range(tiles))
    labels = torch.arange(tiles) % cfg.latent_classifier.num_classes
    guide = classifier_guidance(clf, scheduler.alphas_cumprod, labels, cfg.dm.guidance_scale)
    ddim_sample_seeded(unet, scheduler, seeds, 2, guidance=guide)  # warm-up (allocator, kernels)
    times = {"unguided": [], "guided": []}
    cpu = {"unguided": [], "guided": []}
    for _ in range(repeats):
        for name, g in (("unguided", None), ("guided", guide)):
            start, start_cpu = time.perf_counter(), time.process_time()
            ddim_sample_seeded(unet, scheduler, seeds, steps, cfg.dm.eta, g)
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    # the minimum over repeats is the least disturbed by other processes on a shared machine
    best = {k: min(v) / tiles for k, v in times.items()}
    best_cpu = {k: min(v) / tiles for k, v in cpu.items()}
    flops = step_flops(unet, clf, scheduler, labels)
    return {"unguided_s_per_tile": best["unguided"], "guided_s_per_tile": best["guided"],
            "ratio": best["guided"] / best["unguided"], "cpu_ratio": best_cpu["guided"] / best_cpu["unguided"],
            "unguided_cpu_s_per_tile": best_cpu["unguided"], "guided_cpu_s_per_tile": best_cpu["guided"],
            "flop_ratio": flops["guided"] / flops["unguided"], "unguided_gflop_per_step": flops["unguided"] / 1e9,
            "guided_gflop_per_step": flops["guided"] / 1e9, "threads": torch.get_num_threads(),
            "tiles": tiles, "steps": steps, "repeats": repeats,
            "latent": f"{unet.config.in_channels}x{unet.config.sample_size}x{unet.config.sample_size}",
            "unet_params": sum(p.numel() for p in unet.parameters()),
            "classifier_params": sum(p.numel() for p in clf.parameters())}


def step_flops(unet, clf, scheduler, labels: torch.Tensor) -> dict[str, int]:
    """FLOPs of one DDIM step over the batch: UNet forward (unguided), + the guidance gradient (guided)."""
    from benchmarks.paper_gpu import count_flops

    cfg = unet.config
    z = torch.randn(len(labels), cfg.in_channels, cfg.sample_size, cfg.sample_size)
    t = torch.tensor(500)
    guide = classifier_guidance(clf, scheduler.alphas_cumprod, labels, 1.0)
    with torch.no_grad():
        eps = unet(z, t).sample
        unet_flops = count_flops(lambda: unet(z, t))
        guide_flops = count_flops(lambda: guide(z, t, eps))
    return {"unguided": unet_flops, "guided": unet_flops + guide_flops}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--tiles", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    r = measure(args.profile, args.tiles, args.steps, args.repeats, args.overrides)
    print(f"profile {args.profile}, latents {r['latent']}, UNet {r['unet_params'] / 1e6:.2f} M, latent classifier "
          f"{r['classifier_params'] / 1e6:.2f} M params; {r['tiles']} tiles x {r['steps']} DDIM steps, best of "
          f"{r['repeats']}, {r['threads']} torch threads")
    print(f"wall: unguided {r['unguided_s_per_tile'] * 1e3:.1f} ms/tile, guided {r['guided_s_per_tile'] * 1e3:.1f} ms/tile, "
          f"ratio {r['ratio']:.2f}x")
    print(f"CPU time: unguided {r['unguided_cpu_s_per_tile'] * 1e3:.1f} ms/tile, guided "
          f"{r['guided_cpu_s_per_tile'] * 1e3:.1f} ms/tile, ratio {r['cpu_ratio']:.2f}x")
    print(f"counted FLOPs per step: unguided {r['unguided_gflop_per_step']:.3g} GFLOP, guided "
          f"{r['guided_gflop_per_step']:.3g} GFLOP, ratio {r['flop_ratio']:.2f}x")


if __name__ == "__main__":
    main()
