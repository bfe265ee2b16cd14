"""Paper stage 6: the downstream classifier on real + synthetic tiles, Table 1, and FID/KID."""
