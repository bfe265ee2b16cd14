"""Paper stage 1: the KL latent autoencoder (LAE) with its patch discriminator, loss (eq. 4) and training module."""
