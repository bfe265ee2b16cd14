"""Lightning training of the LAE and the DM; local-step functions shared by single-site and federated runs."""

from histodiff.diffusion.latent_stats import LatentStats, compute_latent_stats
from histodiff.training.local import LocalResult, train_dm_steps, train_lae_steps

__all__ = ["LatentStats", "compute_latent_stats", "LocalResult", "train_lae_steps", "train_dm_steps"]
