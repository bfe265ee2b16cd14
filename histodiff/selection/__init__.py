"""Paper stage 5: selective augmentation (candidate features, centroid filter, quotas, augmentation sets)."""
