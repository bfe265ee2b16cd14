"""HistoDiffusion: latent diffusion pre-training and synthetic augmentation for H&E tiles."""

__version__ = "0.1.0"
