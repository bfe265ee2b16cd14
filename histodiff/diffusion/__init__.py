"""Paper stage 2: the unconditional latent diffusion model.

- ``unet``: the diffusers ``UNet2DModel`` factory
- ``noise_schedule``: the DDPM training schedule and the DDIM sampler
- ``dm_module``: eq. 3, the eps-prediction loss, and the Lightning training step (warm-up, EMA)
- ``latent_stats``: the global latent scale factor (one std over all sites' latents)
- ``ddim_sampling``: DDIM loops, decoding latents, tiles and grids on disk
"""
