"""Paper stage 2: the latent diffusion model (noise schedule, UNet, DM training, latent statistics, DDIM sampling)."""
