"""Single-site (centralised) stages: LAE, latent statistics + DM, sampling (``python -m histodiff.train``).

Progress bars, checkpoints in diffusers layout under ``run_dir``, CSV + TensorBoard logs, and resume:
rerunning the same command continues from the last checkpoint up to ``train.steps``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from histodiff.errors import InputError

log = logging.getLogger("histodiff.train")


def make_loggers(run_dir: Path, stage: str, start_step: int) -> list:
    """CSV + TensorBoard logs; a resumed run writes a new segment instead of overwriting the last one."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    logs, version = run_dir / "logs", f"from-step-{start_step:07d}"
    return [CSVLogger(str(logs), name=stage, version=version), TensorBoardLogger(str(logs), name=stage, version=version)]


def load_dataset(cfg):
    from histodiff.data import tile_dataset_from_config

    if not cfg.data:
        raise InputError("no tile folder given: pass data=/path/to/tiles")
    return tile_dataset_from_config(cfg, train=True)


def _done(state_dir: Path) -> int:
    from histodiff.local_training.trainer_setup import load_state_file

    state = load_state_file(state_dir)
    return int(state["step"]) if state else 0


def load_autoencoder(run_dir: Path):
    from diffusers import AutoencoderKL

    path = run_dir / "lae" / "autoencoder"
    if not (path / "config.json").is_file():
        raise InputError(f"no trained autoencoder in {path}: run stage=lae with run_dir={run_dir} first")
    return AutoencoderKL.from_pretrained(str(path)).eval()


def _watch(cfg, run_dir: Path, phase: str, dataset):
    """(training tiles, callbacks): with train.watch_every > 0, a WatchCallback writing to run_dir/watch/<phase>
    (the fixed watch tiles are held out of training unless train.watch_data names a folder of their own)."""
    from histodiff.evaluation.watch import WATCH_DIR, watch_callback

    dataset, callback = watch_callback(cfg, phase, dataset, run_dir / WATCH_DIR / phase)
    return dataset, [callback] if callback is not None else []


def run_lae(cfg, run_dir: Path) -> None:
    from histodiff.evaluation.watch import labelled_grid
    from histodiff.local_training.local_steps import train_lae_steps
    from histodiff.autoencoder.lae_module import LAEModule
    from histodiff.local_training.local_steps import load_lae_state

    dataset = load_dataset(cfg)
    state_dir = run_dir / "lae"
    done = _done(state_dir)
    if cfg.train.steps > done:
        train, callbacks = _watch(cfg, run_dir, "lae", dataset)
        result = train_lae_steps(cfg, train, state_dir, cfg.train.steps - done, loggers=make_loggers(run_dir, "lae", done),
                                 ckpt_every=cfg.train.ckpt_every, callbacks=callbacks)
        log.info("LAE at step %d: %s", result.step, _fmt(result.metrics))
    else:
        log.info("LAE already at %d steps in %s (raise train.steps to continue)", cfg.train.steps, state_dir)
    module = LAEModule(cfg)
    load_lae_state(module, state_dir)
    x = torch.stack([dataset[i][0] for i in range(min(8, len(dataset)))])
    grid = state_dir / "reconstructions.png"
    labelled_grid([("real", x), ("reconstructed", module.reconstruct(x))], grid)
    log.info("reconstructions (top: real, bottom: LAE) -> %s", grid)


def latent_stats(cfg, run_dir: Path, autoencoder, dataset):
    from histodiff.diffusion.latent_stats import LatentStats, compute_latent_stats

    path = run_dir / "latent_stats.json"
    if path.exists():
        saved = json.loads(path.read_text())
        return LatentStats(saved["sum"], saved["sum_sq"], saved["count"])
    stats = compute_latent_stats(autoencoder, dataset, batch_size=cfg.tiles.batch_size, seed=cfg.seed)
    path.write_text(json.dumps({**stats.to_dict(), "std": stats.std, "scale_factor": stats.scale_factor}, indent=2))
    log.info("latent statistics over %d values: std %.4f -> scale_factor %.4f", stats.count, stats.std, stats.scale_factor)
    return stats


def run_dm(cfg, run_dir: Path) -> None:
    from histodiff.model_files import export_global_model
    from histodiff.local_training.local_steps import train_dm_steps
    from histodiff.local_training.local_steps import ema_unet_from_state

    autoencoder = load_autoencoder(run_dir)
    dataset = load_dataset(cfg)
    scale = latent_stats(cfg, run_dir, autoencoder, dataset).scale_factor
    state_dir = run_dir / "dm"
    done = _done(state_dir)
    if cfg.train.steps > done:
        train, callbacks = _watch(cfg, run_dir, "dm", dataset)
        result = train_dm_steps(cfg, train, state_dir, cfg.train.steps - done, autoencoder, scale,
                                loggers=make_loggers(run_dir, "dm", done), ckpt_every=cfg.train.ckpt_every,
                                callbacks=callbacks)
        log.info("DM at step %d: %s", result.step, _fmt(result.metrics))
    else:
        log.info("DM already at %d steps in %s (raise train.steps to continue)", cfg.train.steps, state_dir)
    out = export_global_model(run_dir / "global", cfg, autoencoder, ema_unet_from_state(cfg, state_dir), scale)
    log.info("global model (autoencoder + EMA UNet + scheduler) -> %s", out)


def run_sample(cfg, run_dir: Path) -> None:
    from histodiff.model_files import load_global_model
    from histodiff.diffusion.noise_schedule import build_ddim
    from histodiff.diffusion.ddim_sampling import ddim_sample, decode_latents, save_grid, save_tiles

    autoencoder, unet, info = load_global_model(run_dir / "global", cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    images = []
    left = cfg.sample.num_samples
    while left > 0:
        n = min(left, cfg.sample.batch_size)
        z = ddim_sample(unet, build_ddim(cfg.dm), n, cfg.dm.ddim_steps, cfg.dm.eta, gen, progress=cfg.train.progress)
        images.append(decode_latents(autoencoder, z, info["scale_factor"]))
        left -= n
    images = torch.cat(images)
    out = run_dir / "samples"
    save_tiles(images, out / "tiles")
    grid = save_grid(images, out / "grid.png", nrow=cfg.sample.nrow)
    log.info("%d sampled tiles (%d DDIM steps, eta %.2f, seed %d) -> %s", len(images), cfg.dm.ddim_steps, cfg.dm.eta, cfg.seed, grid)


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items()))


STAGES = {"lae": run_lae, "dm": run_dm, "sample": run_sample}
