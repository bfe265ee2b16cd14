"""Noise schedules of the latent diffusion model (diffusers schedulers built from config)."""

from __future__ import annotations

from diffusers import DDIMScheduler, DDPMScheduler


def scheduler_kwargs(dm_cfg) -> dict:
    return dict(
        num_train_timesteps=dm_cfg.num_train_timesteps,
        beta_schedule=dm_cfg.beta_schedule,
        beta_start=dm_cfg.beta_start,
        beta_end=dm_cfg.beta_end,
        prediction_type="epsilon",
        clip_sample=False,
    )


def build_noise_scheduler(dm_cfg) -> DDPMScheduler:
    """The forward process q(z_t | z_0) used in training (and saved beside the UNet)."""
    return DDPMScheduler(**scheduler_kwargs(dm_cfg))


def build_ddim(dm_cfg) -> DDIMScheduler:
    # "leading" spacing with offset 1 gives LDM's uniform DDIM timesteps (1, 1+c, 1+2c, ...)
    return DDIMScheduler(**scheduler_kwargs(dm_cfg), timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False)
