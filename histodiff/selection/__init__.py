"""Paper stage 5: selective augmentation, keeping only convincing synthetic tiles.

- ``candidate_features``: baseline-classifier and Inception features of real tiles and candidates
- ``centroid_filter``: class centroids, candidate scores, quotas, nearest-neighbour distances, selective and
  random picks
- ``augment_sets``: the settings per ratio, the memorisation guard, the manifest
"""
