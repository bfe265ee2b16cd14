"""Paper stage 1: the KL latent autoencoder (LAE), pre-trained on unlabeled tiles.

- ``kl_autoencoder``: the diffusers ``AutoencoderKL`` factory and its downsampling factor
- ``discriminator``: the PatchGAN discriminator
- ``lpips_vgg``: the perceptual network (LPIPS on the located ImageNet VGG16)
- ``lae_loss``: eq. 4, L1 + LPIPS + KL + the adaptive hinge GAN term
- ``lae_module``: the Lightning training step (generator and discriminator, manual optimisation)
"""
