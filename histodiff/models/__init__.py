"""Model factories keyed by config: LAE, diffusion UNet, discriminator, classifiers."""

from histodiff.models.autoencoder import build_autoencoder
from histodiff.models.classifier import build_image_classifier
from histodiff.models.latent_classifier import TimeLatentClassifier, build_latent_classifier
from histodiff.models.unet import build_unet

__all__ = [
    "build_autoencoder",
    "build_unet",
    "build_latent_classifier",
    "TimeLatentClassifier",
    "build_image_classifier",
]
