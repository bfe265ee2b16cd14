"""Paper stage 4: the noise-aware latent classifier (eq. 6) and classifier-guided generation of candidates."""
