"""Paper-profile throughput on one GPU: LAE and DM train steps, guided and unguided DDIM sampling, FLOP floor.

One prepared command with a time limit (GPU time is short)::

    python -m benchmarks.paper_gpu --out "$OUT" --time-limit 480

For each part (``lae``: generator + discriminator step with LPIPS; ``dm``: frozen encoder + UNet step + EMA;
``sample``: ``cfg.dm.ddim_steps`` classifier-guided DDIM steps, and the same unguided) and each ``--compile``
setting (``off``, ``on``: ``nn.Module.compile`` of the networks) it records tiles/s, peak memory, the FLOPs
per tile counted by ``torch.utils.flop_counter`` (on the meta device: no device time) and the fraction of the
FLOP floor reached (counted FLOP/s over the device's dense bf16 peak; ``--peak-tflops`` when the GPU is not in
``PEAK_TFLOPS``). Train steps run through the project's Lightning modules and ``make_trainer``, as real training
does: ``train.precision`` (bf16 autocast on GPUs that support it), fused Adam/AdamW on CUDA (the modules'
``configure_optimizers``), channels_last (``train.channels_last``) and PyTorch SDPA attention in the UNet. Results
are written after every measurement to ``paper_gpu.json`` and ``paper_gpu.md`` in ``--out``, so a run stopped
by the time limit keeps what it measured. ``--profile tiny --device cpu`` runs the same code on a CPU in seconds.

LPIPS uses ``weights.perceptual=random`` by default (same network and FLOPs as the ImageNet VGG16, whose file a
GPU machine without the project's weight cache does not have); pass ``weights.perceptual=imagenet`` to use it.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import signal
import time
from contextlib import contextmanager, nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable
from unittest import mock

import torch
from torch.utils.data import TensorDataset
from torch.utils.flop_counter import FlopCounterMode

# dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets; first match wins
PEAK_TFLOPS = (
    ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("GH200", 989.0),
    ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0),
    ("RTX 6000 Ada", 364.0), ("B200", 2250.0),
)
PARTS = ("lae", "dm", "sample")


class TimeLimit(Exception):
    """The whole run's ``--time-limit`` was reached (raised by SIGALRM)."""


class _GlobalFlopCounter(FlopCounterMode):
    """FlopCounterMode without its per-module tracker, whose backward hooks refuse ``torch.autograd.grad``
    (used by guidance and by the LAE's adaptive weight); only the total is needed here."""

    def __enter__(self):
        from torch.utils.flop_counter import _FlopCounterMode

        self.flop_counts.clear()
        self.mode = _FlopCounterMode(self)
        self.mode.__enter__()
        return self

    def __exit__(self, *args):
        out = self.mode.__exit__(*args)
        self.mode = None
        return out


def count_flops(fn: Callable[[], Any]) -> int:
    with _GlobalFlopCounter(display=False) as counter:
        fn()
    return counter.get_total_flops()


def peak_tflops(device: str, override: float | None) -> float | None:
    if override:
        return override
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS if k in name), None)


# ---------------------------------------------------------------- the models (shared by counting and timing)

def build_sampler_models(cfg):
    from histodiff.diffusion.unet import build_unet
    from histodiff.guidance.latent_classifier_net import build_latent_classifier

    return (build_unet(cfg).eval().requires_grad_(False),
            build_latent_classifier(cfg).eval().requires_grad_(False))


def attention_processors(model: torch.nn.Module) -> list[str]:
    from diffusers.models.attention_processor import Attention

    return sorted({type(m.processor).__name__ for m in model.modules() if isinstance(m, Attention)})


@contextmanager
def _meta_build():
    with torch.device("meta"):
        yield


def _meta(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    try:
        with _meta_build():
            model = build()
    except Exception:  # a factory that cannot be built on the meta device: build on the CPU
        model = build()
    return model.to("meta")  # also the buffers made with legacy constructors (lpips' scaling layer)


# ---------------------------------------------------------------- FLOPs per tile (meta device)

def flops_lae(cfg, batch: int) -> int:
    from histodiff.autoencoder import lae_loss
    from histodiff.autoencoder.lae_module import LAEModule

    module = _meta(lambda: LAEModule(cfg)).train()
    size = cfg.tiles.image_size
    x = torch.rand(batch, 3, size, size, device="meta")
    step = max(int(cfg.lae.disc_start), 0)

    def one_step():
        x_hat, posterior = module._common_step(x)
        loss, _ = module.loss.generator_loss(x, x_hat, posterior, step, module.autoencoder.decoder.conv_out.weight)
        loss.backward()
        d_loss, _ = module.loss.discriminator_loss(x, x_hat.detach(), step)
        d_loss.backward()

    # the logged scalars are copied to the host, which meta tensors cannot do; the FLOPs are unchanged
    with mock.patch.object(lae_loss, "_floats", lambda **values: {k: 0.0 for k in values}):
        return count_flops(one_step)


def flops_dm(cfg, batch: int) -> int:
    from histodiff.autoencoder.kl_autoencoder import build_autoencoder
    from histodiff.diffusion.dm_module import DMModule

    module = _meta(lambda: DMModule(cfg, build_autoencoder(cfg.lae), 1.0, ema=False)).train()
    size = cfg.tiles.image_size
    x = torch.rand(batch, 3, size, size, device="meta")
    return count_flops(lambda: module._common_step(x).backward())


def flops_sampling(cfg, batch: int, steps: int) -> tuple[int, int]:
    """(unguided, guided) FLOPs of ``steps`` DDIM steps over ``batch`` latents: UNet forward, + classifier
    forward and backward to the latents for the guided step."""
    from histodiff.diffusion.noise_schedule import build_ddim
    from histodiff.guidance.classifier_guidance import classifier_guidance

    unet, clf = _meta(lambda: build_sampler_models(cfg)[0]), _meta(lambda: build_sampler_models(cfg)[1])
    c, s = unet.config.in_channels, unet.config.sample_size
    z = torch.randn(batch, c, s, s, device="meta")
    t = torch.tensor(500)
    labels = torch.arange(batch) % cfg.latent_classifier.num_classes
    guide = classifier_guidance(clf, build_ddim(cfg.dm).alphas_cumprod, labels, cfg.dm.guidance_scale)
    with torch.no_grad():
        unet_flops = count_flops(lambda: unet(z, t))
        eps = torch.randn_like(z)
        guide_flops = count_flops(lambda: guide(z, t, eps))
    return steps * unet_flops, steps * (unet_flops + guide_flops)


# ---------------------------------------------------------------- timing on the device

def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> tuple[float, str]:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30, "CUDA max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process max RSS (whole run so far)"


def _compile(modules: list[torch.nn.Module], on: bool) -> None:
    if on:
        for m in modules:
            m.compile()  # in place: parameter names (and saved states) unchanged


def time_lae(cfg, data, steps: int, skip: int, compiled: bool, device: str) -> float:
    from benchmarks.train_step import BatchWindow
    from histodiff.autoencoder.lae_module import LAEModule
    from histodiff.local_training.trainer_setup import make_trainer, step_loader

    timer = BatchWindow(skip)
    module = LAEModule(cfg)
    if device == "cuda" and cfg.train.channels_last:  # what histodiff.local_training.local_steps does
        module = module.to(memory_format=torch.channels_last)
    loss = module.loss
    _compile([module.autoencoder.encoder, module.autoencoder.decoder, loss.discriminator,
              *([loss.perceptual] if loss.perceptual is not None else [])], compiled)
    trainer = make_trainer(cfg.train, steps + skip, False, [timer.callback], progress=False)
    trainer.fit(module, step_loader(data, cfg.tiles.batch_size, steps + skip, 0))
    return timer.elapsed


def time_dm(cfg, data, steps: int, skip: int, compiled: bool, device: str) -> float:
    from benchmarks.train_step import BatchWindow
    from histodiff.autoencoder.kl_autoencoder import build_autoencoder
    from histodiff.diffusion.dm_module import DMModule
    from histodiff.local_training.trainer_setup import make_trainer, step_loader

    timer = BatchWindow(skip)
    module = DMModule(cfg, build_autoencoder(cfg.lae), 1.0)
    if device == "cuda" and cfg.train.channels_last:
        module.unet.to(memory_format=torch.channels_last)
        module.autoencoder.to(memory_format=torch.channels_last)
    _compile([module.unet, module.autoencoder.encoder], compiled)
    trainer = make_trainer(cfg.train, steps + skip, False, [timer.callback], progress=False)
    trainer.fit(module, step_loader(data, cfg.tiles.batch_size, steps + skip, 0))
    return timer.elapsed


def time_sampling(cfg, batch: int, steps: int, compiled: bool, device: str, precision: str) -> dict[str, float]:
    """Seconds for ``steps`` DDIM steps over ``batch`` latents, unguided and guided (after a 2-step warm-up)."""
    from histodiff.diffusion.noise_schedule import build_ddim
    from histodiff.guidance.classifier_guidance import classifier_guidance, ddim_sample_seeded

    unet, clf = build_sampler_models(cfg)
    unet, clf = unet.to(device), clf.to(device)
    if device == "cuda" and cfg.train.channels_last:
        unet, clf = unet.to(memory_format=torch.channels_last), clf.to(memory_format=torch.channels_last)
    _compile([unet, clf], compiled)
    scheduler = build_ddim(cfg.dm)
    labels = torch.arange(batch) % cfg.latent_classifier.num_classes
    guide = classifier_guidance(clf, scheduler.alphas_cumprod, labels, cfg.dm.guidance_scale)
    seeds = list(range(batch))
    autocast = (torch.autocast(device_type=device, dtype=torch.bfloat16) if precision.startswith("bf16")
                else nullcontext())
    out = {}
    with torch.no_grad(), autocast:
        for name, g in (("unguided", None), ("guided", guide)):
            ddim_sample_seeded(unet, scheduler, seeds, 2, cfg.dm.eta, g)  # warm-up (and compilation)
            _sync(device)
            start = time.perf_counter()
            ddim_sample_seeded(unet, scheduler, seeds, steps, cfg.dm.eta, g)
            _sync(device)
            out[name] = time.perf_counter() - start
    return out


# ---------------------------------------------------------------- the run

def write_report(out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "paper_gpu.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "paper_gpu.md").write_text(markdown(report))


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"Paper-profile throughput: profile `{report['profile']}` on {env['device_name']} "
             f"({env['when']}), torch {env['torch']}, precision {env['precision']}, batch {report['batch']}, "
             f"{report['image_size']}x{report['image_size']} tiles, sampling batch {report['sample_batch']} x "
             f"{report['ddim_steps']} DDIM steps; UNet attention: {', '.join(env['unet_attention'])}; "
             f"peak used for the floor: {env['peak_tflops'] or 'unknown'} TFLOP/s.", "",
             "| part | compile | tiles/s | peak memory (GiB) | counted GFLOP/tile | TFLOP/s | fraction of floor |",
             "|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['part']} | {r['compile']} | failed: {r['error'][:120]} | | | | |")
            continue
        frac = f"{r['floor_fraction']:.1%}" if r.get("floor_fraction") is not None else "-"
        lines.append(f"| {r['part']} | {r['compile']} | {r['tiles_per_s']:.3g} | {r['peak_mem_gib']:.2f} | "
                     f"{r['gflop_per_tile']:.4g} | {r['tflop_per_s']:.3g} | {frac} |")
    if report.get("stopped"):
        lines += ["", f"Stopped early: {report['stopped']}."]
    lines += ["", f"Peak memory is the {env['peak_mem_kind']}. The floor is counted FLOPs / peak FLOP/s; "
                  "the fraction is that floor over the measured time."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="paper")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--out", default="runs/paper_gpu")
    parser.add_argument("--time-limit", type=float, default=480.0, help="seconds for the whole run")
    parser.add_argument("--steps", type=int, default=20, help="timed train steps per part")
    parser.add_argument("--skip", type=int, default=3, help="warm-up train steps left out of the timing")
    parser.add_argument("--sample-batch", type=int, default=16)
    parser.add_argument("--ddim-steps", type=int, default=None, help="default: the profile's dm.ddim_steps")
    parser.add_argument("--compile", default="off,on", help="off, on, or both (off,on)")
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. tiles.batch_size=32")
    args = parser.parse_args(argv)
    started = time.monotonic()

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    from histodiff.config import compose
    from histodiff.diffusion.unet import build_unet
    from histodiff.local_training.trainer_setup import resolve_precision

    accel = "gpu" if device == "cuda" else "cpu"
    cfg = compose([f"profile={args.profile}", "lae.disc_start=0", "train.devices=1", f"train.accelerator={accel}",
                   "weights.perceptual=random", *args.overrides])
    precision = resolve_precision(cfg.train.precision, cfg.train.accelerator)
    size, batch = cfg.tiles.image_size, cfg.tiles.batch_size
    steps = args.ddim_steps or cfg.dm.ddim_steps
    peak = peak_tflops(device, args.peak_tflops)
    compiles = [c.strip() for c in args.compile.split(",") if c.strip()]
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    for value, allowed, what in ((compiles, ("off", "on"), "--compile"), (parts, PARTS, "--parts")):
        if not value or set(value) - set(allowed):
            parser.error(f"{what}: expected some of {', '.join(allowed)}")
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    report: dict[str, Any] = {
        "profile": args.profile, "batch": batch, "image_size": size, "sample_batch": args.sample_batch,
        "ddim_steps": steps, "train_steps": args.steps, "warmup_steps": args.skip, "overrides": args.overrides,
        "environment": {
            "when": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "host": platform.node(),
            "device": device, "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "precision": precision, "channels_last": bool(cfg.train.channels_last and device == "cuda"),
            "fused_optimizers": device == "cuda", "peak_tflops": peak,
            "unet_attention": attention_processors(_meta(lambda: build_unet(cfg))),
            "peak_mem_kind": _peak_gib(device)[1], "cpu_threads": torch.get_num_threads(),
        },
        "flops_per_tile": {}, "results": [],
    }
    out = Path(args.out)
    print(f"paper_gpu: profile {args.profile} on {report['environment']['device_name']}, precision {precision}, "
          f"batch {batch}, {size}x{size}, time limit {args.time_limit:.0f} s -> {out}", flush=True)

    # FLOPs per tile, counted once on the meta device
    flops: dict[str, float] = {}
    if "lae" in parts:
        flops["lae"] = flops_lae(cfg, batch) / batch
    if "dm" in parts:
        flops["dm"] = flops_dm(cfg, batch) / batch
    if "sample" in parts:
        unguided, guided = flops_sampling(cfg, args.sample_batch, steps)
        flops["sample_unguided"], flops["sample_guided"] = unguided / args.sample_batch, guided / args.sample_batch
    report["flops_per_tile"] = {k: v / 1e9 for k, v in flops.items()}
    print("counted GFLOP per tile: " + ", ".join(f"{k} {v / 1e9:.4g}" for k, v in flops.items()), flush=True)
    write_report(out, report)

    def on_alarm(signum, frame):
        raise TimeLimit(f"time limit of {args.time_limit:.0f} s reached")

    remaining = args.time_limit - (time.monotonic() - started)
    if remaining <= 1:
        report["stopped"] = f"time limit of {args.time_limit:.0f} s reached before timing"
        write_report(out, report)
        return report
    use_alarm = hasattr(signal, "SIGALRM")
    if use_alarm:
        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, remaining)

    n = batch * 4
    data = TensorDataset(torch.rand(n, 3, size, size) * 2 - 1, torch.zeros(n, dtype=torch.long))
    tiles = args.steps * batch

    def record(part: str, compile_: str, seconds: float, n_tiles: int, flop_key: str) -> None:
        rate = n_tiles / seconds
        mem, _ = _peak_gib(device)
        achieved = rate * flops[flop_key] / 1e12
        row = {"part": part, "compile": compile_, "tiles_per_s": rate, "seconds": seconds, "tiles": n_tiles,
               "peak_mem_gib": mem, "gflop_per_tile": flops[flop_key] / 1e9, "tflop_per_s": achieved,
               "floor_fraction": achieved / peak if peak else None}
        report["results"].append(row)
        frac = f", {row['floor_fraction']:.1%} of the floor" if peak else ""
        print(f"{part:<16} compile {compile_:<3}: {rate:8.3g} tiles/s, peak {mem:.2f} GiB, "
              f"{achieved:.3g} TFLOP/s{frac}", flush=True)
        write_report(out, report)

    try:
        for compile_ in compiles:
            on = compile_ == "on"
            for part in parts:
                _reset_peak(device)
                try:
                    if part == "lae":
                        record("lae", compile_, time_lae(cfg, data, args.steps, args.skip, on, device), tiles, "lae")
                    elif part == "dm":
                        record("dm", compile_, time_dm(cfg, data, args.steps, args.skip, on, device), tiles, "dm")
                    else:
                        sec = time_sampling(cfg, args.sample_batch, steps, on, device, precision)
                        record("sample_unguided", compile_, sec["unguided"], args.sample_batch, "sample_unguided")
                        record("sample_guided", compile_, sec["guided"], args.sample_batch, "sample_guided")
                except TimeLimit:
                    raise
                except Exception as exc:  # e.g. a compile failure: keep it in the table, go on
                    report["results"].append({"part": part, "compile": compile_, "error": f"{type(exc).__name__}: {exc}"})
                    print(f"{part} compile {compile_}: failed: {type(exc).__name__}: {exc}", flush=True)
                    write_report(out, report)
    except TimeLimit as exc:
        report["stopped"] = str(exc)
        print(f"stopped: {exc}", flush=True)
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    report["wall_s"] = time.monotonic() - started
    write_report(out, report)
    print(f"wrote {out / 'paper_gpu.json'} and {out / 'paper_gpu.md'} ({report['wall_s']:.0f} s)", flush=True)
    return report


if __name__ == "__main__":
    main()
