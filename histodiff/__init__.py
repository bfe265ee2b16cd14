"""HistoDiffusion: latent diffusion pre-training and synthetic augmentation for H&E tiles.

One sub-package per stage of the method (see README.md, "Layout"):

- ``data``          stage 0, tiles: decoding, the verified index, the Dataset, whole slides, phantom tiles
- ``autoencoder``   stage 1, the KL latent autoencoder: factory, discriminator, LPIPS, loss (eq. 4), training step
- ``diffusion``     stage 2, the latent DM: UNet, noise schedule, loss (eq. 3) and training step, latent
                    statistics, DDIM sampling
- ``finetune``      stage 3, decoder fine-tuning (eq. 5)
- ``guidance``      stage 4, the noise-aware latent classifier (eq. 6) and classifier-guided generation
- ``selection``     stage 5, selective augmentation: features, centroid filter, quotas, augmentation sets
- ``evaluation``    stage 6, downstream classifiers, Table 1, FID/KID
- ``labeled_site``  stages 3-6 in order at the labeled site (the declared stage plan and its walk)
- ``local_training``  a site's local steps, shared by single-site runs and federated rounds
- ``privacy``       local differential privacy (DP-SGD, the accountant)
- ``weights``       offline pretrained weights (locate, fetch)
- ``cli``           the command-line entry points (``python -m histodiff.train|demo|phantom|slides|weights``)
"""

__version__ = "0.1.0"
