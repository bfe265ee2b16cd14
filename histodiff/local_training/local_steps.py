""""Train N steps from this state on this data": the local-step functions of a site.

A single-site run and a federated round call the same functions. Everything a site needs between
calls (weights, optimiser state, step counter, EMA, RNG) lives in its state directory, because a
federated client runs every round in a fresh process.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch

from histodiff.model_files import flat, load_part, load_state_dict_file, save_pretrained_atomic, save_state_dict_file
from histodiff.local_training.trainer_setup import (
    load_state_file,
    make_trainer,
    on_gpu,
    save_state_file,
    seed_everything,
    step_loader,
)
from histodiff.diffusion.dm_module import DMModule
from histodiff.local_training import site_ddp
from histodiff.autoencoder.lae_module import LAEModule

log = logging.getLogger(__name__)


@dataclass
class LocalResult:
    weights: dict[str, torch.Tensor]  # what may leave the site in this phase, flat and prefixed
    metrics: dict[str, float]
    num_examples: int  # tiles at this site (FedAvg weight)
    step: int = 0


# ---------------------------------------------------------------- state directories

# seconds spent loading and saving site state since the caller last cleared it (a federated round reports them)
STATE_SECONDS: dict[str, float] = {}


def _timed(stage: str):
    def wrap(fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                took = time.perf_counter() - t
                STATE_SECONDS[stage] = STATE_SECONDS.get(stage, 0.0) + took
                log.info("%s (%s) took %.2f s", fn.__name__, args[1] if len(args) > 1 else "", took)
        return timed
    return wrap



@_timed("state-save")
def save_lae_state(module: LAEModule, state_dir: Path, optimizers=None, weights: bool = True) -> None:
    """Step and optimiser state, and the models unless ``weights`` is false (a federated round: the server holds
    the shared ones and sends them each round; a discriminator that is not shared stays and is saved)."""
    state_dir = Path(state_dir)
    if weights:
        save_pretrained_atomic(module.autoencoder, state_dir / "autoencoder")
    if weights or not module.cfg.lae.share_discriminator:
        save_state_dict_file(module.discriminator.state_dict(), state_dir / "discriminator.safetensors")
    opts = optimizers if optimizers is not None else module.optimizer_state
    save_state_file(state_dir, {
        "step": module.step,
        "optimizers": [o.state_dict() if hasattr(o, "state_dict") else o for o in (opts or [])],
    })


@_timed("state-load")
def load_lae_state(module: LAEModule, state_dir: Path, weights: bool = True) -> bool:
    """The state ``save_lae_state`` wrote; with ``weights`` false, what it wrote without them."""
    state = load_state_file(Path(state_dir))
    if state is None:
        return False
    if weights:
        from diffusers import AutoencoderKL

        ae = AutoencoderKL.from_pretrained(str(Path(state_dir) / "autoencoder"))
        module.autoencoder.load_state_dict(ae.state_dict())
    disc = Path(state_dir) / "discriminator.safetensors"
    if (weights or not module.cfg.lae.share_discriminator) and disc.is_file():
        module.discriminator.load_state_dict(load_state_dict_file(disc))
    module.step = int(state["step"])
    module.optimizer_state = state["optimizers"] or None
    return True


@_timed("state-save")
def save_dm_state(module: DMModule, state_dir: Path, optimizer=None, scheduler=None, weights: bool = True) -> None:
    """Step, optimiser and (single-site) EMA state, and the UNet unless ``weights`` is false (a federated round)."""
    state_dir = Path(state_dir)
    if weights:
        save_pretrained_atomic(module.unet, state_dir / "unet")
    opt_state = module.optimizer_state
    if optimizer is not None:
        opt_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    state = {"step": module.step, "optimizer": opt_state, "scale_factor": module.scale_factor}
    if module.ema is not None:
        state["ema"] = module.ema.state_dict()
    save_state_file(state_dir, state)


@_timed("state-load")
def load_dm_state(module: DMModule, state_dir: Path, weights: bool = True) -> bool:
    state = load_state_file(Path(state_dir))
    if state is None:
        return False
    if weights:
        from diffusers import UNet2DModel

        module.unet.load_state_dict(UNet2DModel.from_pretrained(str(Path(state_dir) / "unet")).state_dict())
    module.step = int(state["step"])
    module.optimizer_state = state["optimizer"]
    if module.ema is not None and "ema" in state:
        module.ema.load_state_dict(state["ema"])
    return True


def ema_unet_from_state(cfg, state_dir: Path):
    """The UNet with the EMA weights of the site state in ``state_dir`` (for sampling and export)."""
    from histodiff.diffusion.unet import build_unet

    state = load_state_file(Path(state_dir))
    if state is None:
        raise FileNotFoundError(f"no DM state in {state_dir}")
    unet = build_unet(cfg)
    ema = _ema_for(cfg, unet)
    ema.load_state_dict(state["ema"])
    ema.copy_to(unet.parameters())
    return unet.eval()


def _ema_for(cfg, unet):
    from diffusers.training_utils import EMAModel

    return EMAModel(unet.parameters(), decay=cfg.dm.ema_decay)


class StateCheckpoint(L.Callback):
    """Save the site state every ``every`` steps (rank 0 only) so a crash loses at most that much."""

    def __init__(self, state_dir: Path, every: int, save_fn):
        self.state_dir, self.every, self.save_fn = Path(state_dir), every, save_fn

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.every > 0 and pl_module.step % self.every == 0 and trainer.is_global_zero:
            self.save_fn(trainer, pl_module)
            log.info("checkpoint at step %d -> %s", pl_module.step, self.state_dir)


# ---------------------------------------------------------------- shared weights


def lae_shared_weights(module: LAEModule, include_discriminator: bool) -> dict[str, torch.Tensor]:
    weights = flat("autoencoder", module.autoencoder)
    if include_discriminator:
        weights.update(flat("discriminator", module.discriminator))
    return weights


# ---------------------------------------------------------------- local steps


def dm_batch_size(cfg) -> int:
    """Tiles per DM step: ``dm.batch_size``, or ``tiles.batch_size`` when it is null."""
    return int(cfg.dm.batch_size or cfg.tiles.batch_size)


def train_lae_steps(
    cfg,
    dataset,
    state_dir: Path,
    steps: int,
    init_weights: dict[str, torch.Tensor] | None = None,
    loggers: list | bool = False,
    ckpt_every: int = 0,
    progress: bool | None = None,
    callbacks: list | None = None,
) -> LocalResult:
    """Run ``steps`` LAE steps from the state in ``state_dir`` (fresh when empty) and save it back.

    Several ``train.devices``: one process per device (``site_ddp``), the same result as one device."""
    if site_ddp.wants_ranks(cfg.train):
        return site_ddp.launch(train_lae_steps, (cfg, dataset, state_dir, steps),
                               dict(init_weights=init_weights, loggers=loggers, ckpt_every=ckpt_every, progress=progress,
                                    callbacks=callbacks), cfg.train, state_dir)
    seed_everything(cfg.seed)  # what a new module draws (fresh weights, a random LPIPS backbone): the same on every rank
    module = LAEModule(cfg)
    from_global = init_weights is not None  # a federated round: the weights come from the server, not the disk
    resumed = load_lae_state(module, state_dir, weights=not from_global)
    if from_global:
        load_part(module.autoencoder, init_weights, "autoencoder")
        load_part(module.discriminator, init_weights, "discriminator")
    seed_everything(cfg.seed + module.step)
    if on_gpu(cfg.train) and cfg.train.channels_last:
        module = module.to(memory_format=torch.channels_last)
    log.info("LAE: %s at step %d, %d steps on %d tiles", "resumed" if resumed else "new", module.step, steps, len(dataset))

    def save(trainer, pl_module):
        save_lae_state(pl_module, state_dir, trainer.optimizers, weights=not from_global)

    # the discriminator's step does not reach the autoencoder (nor, before disc_start, the generator's the discriminator)
    trainer = make_trainer(cfg.train, steps, loggers, [StateCheckpoint(state_dir, ckpt_every, save), *(callbacks or [])],
                           progress, find_unused=True)
    loader = step_loader(dataset, cfg.tiles.batch_size, steps, cfg.seed + module.step, cfg.tiles.num_workers,
                         *site_ddp.current(), keyed=True)
    trainer.fit(module, loader)
    module = module.cpu()
    if trainer.is_global_zero:
        save_lae_state(module, state_dir, trainer.optimizers, weights=not from_global)
    return LocalResult(
        weights=lae_shared_weights(module, cfg.lae.share_discriminator),
        metrics=module.mean_metrics(),
        num_examples=len(dataset),
        step=module.step,
    )


def train_dm_steps(
    cfg,
    dataset,
    state_dir: Path,
    steps: int,
    autoencoder,
    scale_factor: float,
    init_weights: dict[str, torch.Tensor] | None = None,
    loggers: list | bool = False,
    ckpt_every: int = 0,
    progress: bool | None = None,
    callbacks: list | None = None,
) -> LocalResult:
    """Run ``steps`` DM steps (encoder frozen, latents scaled by the global ``scale_factor``).

    Several ``train.devices``: one process per device (``site_ddp``), the same result as one device."""
    if site_ddp.wants_ranks(cfg.train):
        return site_ddp.launch(train_dm_steps, (cfg, dataset, state_dir, steps, autoencoder, scale_factor),
                               dict(init_weights=init_weights, loggers=loggers, ckpt_every=ckpt_every, progress=progress,
                                    callbacks=callbacks), cfg.train, state_dir)
    from_global = init_weights is not None  # a federated round: the server keeps the EMA (of the global model)
    seed_everything(cfg.seed)  # what a new module draws (fresh weights): the same on every rank
    module = DMModule(cfg, autoencoder, scale_factor, ema=not from_global)
    resumed = load_dm_state(module, state_dir, weights=not from_global)
    if from_global:
        load_part(module.unet, init_weights, "unet")
    seed_everything(cfg.seed + module.step)
    if on_gpu(cfg.train) and cfg.train.channels_last:
        module.unet.to(memory_format=torch.channels_last)
    log.info("DM: %s at step %d, %d steps on %d tiles", "resumed" if resumed else "new", module.step, steps, len(dataset))

    def save(trainer, pl_module):
        save_dm_state(pl_module, state_dir, trainer.optimizers[0], trainer.lr_scheduler_configs[0].scheduler,
                      weights=not from_global)

    trainer = make_trainer(cfg.train, steps, loggers, [StateCheckpoint(state_dir, ckpt_every, save), *(callbacks or [])], progress)
    loader = step_loader(dataset, dm_batch_size(cfg), steps, cfg.seed + module.step, cfg.tiles.num_workers,
                         *site_ddp.current(), keyed=True)
    trainer.fit(module, loader)
    module = module.cpu()
    if module.ema is not None:
        module.ema.to("cpu")
    if trainer.is_global_zero:
        save_dm_state(module, state_dir, trainer.optimizers[0], trainer.lr_scheduler_configs[0].scheduler,
                      weights=not from_global)
    return LocalResult(
        weights=flat("unet", module.unet),
        metrics=module.mean_metrics(),
        num_examples=len(dataset),
        step=module.step,
    )
