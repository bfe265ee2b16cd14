"""Paper stage 6: evaluation.

- ``image_classifier``: the timm image classifier factory
- ``trained_classifiers``: train, save and load the site's classifiers (phi, baseline, downstream)
- ``downstream``: the Lightning classifier, validation split, training and test metrics
- ``fid`` and ``inception``: FID/KID on InceptionV3 pool3 features
- ``table1``: Table 1 (mean +- std over seeds), confusion matrices, grids of real and synthetic tiles
- ``watch``: learning you can watch: labelled grids and FID/KID on fixed held-out tiles every N steps / rounds
"""
