"""DP-SGD local steps of a site (opacus, hooks grad-sample mode), mirroring ``train_lae_steps`` / ``train_dm_steps``.

Same state-directory layout as histodiff.local_training.local_steps (diffusers folders + ``training_state.pt``), so a site
can switch between private and non-private calls; the accountant lives beside the phase folders.

Why a plain PyTorch loop and not Lightning: opacus owns the optimizer step (per-sample clipping, noise,
accounting hook) and needs Poisson-sampled batches of variable, sometimes zero, size; Lightning's manual
optimisation and its loader/sampler handling would each have to be bypassed, leaving only indirection.

LAE under DP: the adversarial term is off. Its adaptive weight takes ``autograd.grad`` through hooked layers
(which would pollute opacus' per-sample gradient buffers), and a discriminator trained on real tiles is a
second release of the data that would need its own DP-SGD and accounting. The private LAE is therefore
trained with L1 + LPIPS + KL; the discriminator is not touched (what a site returns for it is what it got).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from histodiff.model_files import flat, load_part
from histodiff.privacy.accountant import SiteAccountant, secret_generator
from histodiff.local_training.trainer_setup import on_gpu, seed_everything
from histodiff.local_training.local_steps import (
    LocalResult,
    lae_shared_weights,
    load_dm_state,
    load_lae_state,
    save_dm_state,
    save_lae_state,
)

log = logging.getLogger(__name__)


class _AutoencoderForward(nn.Module):
    """Encode, sample and decode in one forward: after wrapping, opacus exposes only ``forward``."""

    def __init__(self, autoencoder: nn.Module):
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.autoencoder.encode(x).latent_dist
        x_hat = self.autoencoder.decode(posterior.sample()).sample
        return x_hat, posterior.parameters  # the moments (mean, logvar) rebuild the posterior outside


class _UNetForward(nn.Module):
    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, zt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(zt, t).sample


def _device(cfg) -> torch.device:
    """The GPU when the config's accelerator allows one (fp32: opacus' per-sample grads under autocast are not used)."""
    return torch.device("cuda" if on_gpu(cfg.train) else "cpu")


def sample_rate(cfg, dataset) -> float:
    """Poisson sampling rate q = expected batch / tiles at the site."""
    return min(1.0, cfg.tiles.batch_size / max(1, len(dataset)))


def poisson_batches(dataset, q: float, steps: int) -> Iterator[torch.Tensor | None]:
    """Each tile joins each batch independently with probability q (what the RDP analysis assumes); None: empty."""
    generator = secret_generator()
    n = len(dataset)
    for _ in range(steps):
        idx = (torch.rand(n, generator=generator) < q).nonzero().flatten().tolist()
        yield torch.stack([dataset[i][0] for i in idx]) if idx else None


def open_accountant(cfg, state_dir: Path, accountant_dir: Path | None) -> SiteAccountant:
    """The site's accountant: one per site (shared by the LAE and DM phases), beside the phase folders."""
    p = cfg.privacy
    return SiteAccountant.load_or_create(Path(accountant_dir or Path(state_dir).parent), p.target_epsilon, p.delta)


def _make_private(module: nn.Module, optimizer, noise: float, max_grad_norm: float, expected_batch: int,
                  device: torch.device | str = "cpu"):
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(module, strict=False)
    if errors:
        raise ValueError(f"model cannot be trained with DP-SGD: {errors[0]}")
    gsm = GradSampleModule(module, batch_first=True, loss_reduction="mean")  # hooks mode
    dpo = DPOptimizer(optimizer, noise_multiplier=noise, max_grad_norm=max_grad_norm,
                      expected_batch_size=max(1, expected_batch), loss_reduction="mean",
                      generator=secret_generator(device))
    return gsm, dpo


def _dp_step(gsm, dpo, batch: torch.Tensor | None, loss_fn: Callable[[torch.Tensor], tuple[torch.Tensor, dict]]) -> dict:
    """One DP-SGD step; an empty Poisson batch still takes a noise-only step, as the analysis assumes."""
    dpo.zero_grad(set_to_none=True)
    if batch is None:
        for p in dpo.params:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        dpo.step()
        return {}
    loss, logs = loss_fn(batch)
    with warnings.catch_warnings():
        # opacus' hooks fire on module outputs when the input needs no grad (the images): expected here
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        loss.backward()
    dpo.step()
    return logs


def _finish(gsm, dpo) -> None:
    dpo.zero_grad(set_to_none=True)
    gsm.remove_hooks()  # the inner module is saved and reused without opacus


def _run(cfg, dataset, state_dir, steps, accountant_dir, site, phase):
    """Accountant, budget check and the noise multiplier for ``steps`` DP steps; the steps are charged (and saved)
    before any training, so a crash can only over-count the spend, never under-count it."""
    acc = open_accountant(cfg, state_dir, accountant_dir)
    p = cfg.privacy
    q = sample_rate(cfg, dataset)
    noise = acc.fix_mechanism(q, p.max_grad_norm, p.noise_multiplier, p.planned_steps)
    acc.check_budget(steps, site)  # raises PrivacyBudgetExhausted before touching the state
    acc.record_steps(phase, steps)
    acc.save()
    log.info("DP %s: sigma=%.4g C=%g q=%.4g, epsilon %.3f of %g before %d steps", phase, noise, p.max_grad_norm,
             q, acc.epsilon(), p.target_epsilon, steps)
    return acc, noise, q, poisson_batches(dataset, q, steps)


def _close_round(acc: SiteAccountant, phase: str, steps: int, weights: dict[str, torch.Tensor], seconds: float,
                 metrics: dict[str, float]) -> dict[str, float]:
    acc.record_round(phase, steps, arrays=len(weights), bytes=int(sum(v.numel() * v.element_size()
                                                                   for v in weights.values())), seconds=seconds)
    acc.save()
    return {**metrics, **acc.metrics()}


def dp_train_lae_steps(cfg, dataset, state_dir: Path, steps: int, init_weights: dict[str, torch.Tensor] | None = None,
                       accountant_dir: Path | None = None, site: str = "site") -> LocalResult:
    """``steps`` DP-SGD steps of the autoencoder (L1 + LPIPS + KL; see the module doc for the GAN term)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from histodiff.autoencoder.lae_module import LAEModule

    state_dir = Path(state_dir)
    start = time.time()
    # a site past its budget refuses before it builds or loads anything
    acc, noise, q, batches = _run(cfg, dataset, state_dir, steps, accountant_dir, site, "lae")
    module = LAEModule(cfg)
    from_global = init_weights is not None  # a federated round: weights from the server, not the disk
    load_lae_state(module, state_dir, weights=not from_global)
    if from_global:
        load_part(module.autoencoder, init_weights, "autoencoder")
        load_part(module.discriminator, init_weights, "discriminator")
    seed_everything(cfg.seed + module.step)
    if module.step + steps > cfg.lae.disc_start:
        log.warning("DP LAE: the adversarial term stays off under DP (lae.disc_start=%d is ignored)", cfg.lae.disc_start)

    device = _device(cfg)
    module.to(device)
    opt_g, opt_d = module.configure_optimizers()  # the discriminator's, untouched under DP, is saved as it was
    module.train()
    gsm, dpo = _make_private(_AutoencoderForward(module.autoencoder), opt_g, noise, cfg.privacy.max_grad_norm,
                             round(q * len(dataset)), device)

    def loss_fn(x):
        x = x.to(device, non_blocking=True)
        x_hat, moments = gsm(x)
        # adversarial term off: no autograd.grad through hooked layers, no discriminator forward
        loss, logs = module.loss.generator_loss(x, x_hat, DiagonalGaussianDistribution(moments), module.step,
                                                last_layer=None, adversarial=False)
        return loss, logs

    sums, count = defaultdict(float), 0
    try:
        for batch in batches:
            logs = _dp_step(gsm, dpo, batch, loss_fn)
            module.step += 1
            if logs:
                for k, v in logs.items():
                    sums[k] += float(v)
                count += 1
    finally:
        _finish(gsm, dpo)
    module.optimizer_state = None
    module.cpu()
    save_lae_state(module, state_dir, [opt_g, opt_d], weights=not from_global)
    weights = lae_shared_weights(module, cfg.lae.share_discriminator)
    metrics = {k: v / max(1, count) for k, v in sums.items()}
    metrics = _close_round(acc, "lae", steps, weights, time.time() - start, metrics)
    return LocalResult(weights=weights, metrics=metrics, num_examples=len(dataset), step=module.step)


def dp_train_dm_steps(cfg, dataset, state_dir: Path, steps: int, autoencoder, scale_factor: float,
                      init_weights: dict[str, torch.Tensor] | None = None, accountant_dir: Path | None = None,
                      site: str = "site") -> LocalResult:
    """``steps`` DP-SGD steps of the UNet on frozen, globally scaled latents (same state as ``train_dm_steps``)."""
    from histodiff.diffusion.dm_module import DMModule, build_dm_optimizer, diffusion_loss

    state_dir = Path(state_dir)
    start = time.time()
    acc, noise, q, batches = _run(cfg, dataset, state_dir, steps, accountant_dir, site, "dm")
    from_global = init_weights is not None  # a federated round: the server keeps the EMA
    module = DMModule(cfg, autoencoder, scale_factor, ema=not from_global)
    load_dm_state(module, state_dir, weights=not from_global)
    if from_global:
        load_part(module.unet, init_weights, "unet")
    seed_everything(cfg.seed + module.step)

    dm = cfg.dm
    device = _device(cfg)
    module.to(device)
    module.autoencoder.to(device)
    if module.ema is not None:
        module.ema.to(device)
    opt, sched = build_dm_optimizer(module.unet, dm, module.optimizer_state)
    module.unet.train()
    gsm, dpo = _make_private(_UNetForward(module.unet), opt, noise, cfg.privacy.max_grad_norm, round(q * len(dataset)),
                             device)

    def loss_fn(x):
        loss = diffusion_loss(gsm, module.noise_scheduler, module.encode(x.to(device, non_blocking=True)), dm.loss)
        return loss, {"loss": loss.detach()}

    sums, count = defaultdict(float), 0
    try:
        for batch in batches:
            logs = _dp_step(gsm, dpo, batch, loss_fn)
            sched.step()
            if module.ema is not None:
                module.ema.step(module.unet.parameters())
            module.step += 1
            if logs:
                sums["loss"] += float(logs["loss"])
                count += 1
            sums["lr"] += opt.param_groups[0]["lr"]
    finally:
        _finish(gsm, dpo)
    module.cpu()
    if module.ema is not None:
        module.ema.to("cpu")
    save_dm_state(module, state_dir, opt, sched, weights=not from_global)
    weights = flat("unet", module.unet)
    metrics = {"loss": sums["loss"] / max(1, count), "lr": sums["lr"] / max(1, steps)}
    metrics = _close_round(acc, "dm", steps, weights, time.time() - start, metrics)
    return LocalResult(weights=weights, metrics=metrics, num_examples=len(dataset), step=module.step)
