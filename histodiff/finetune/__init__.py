"""Paper stage 3: decoder fine-tuning at the labeled site (eq. 5), D -> D' with the encoder, DM and phi frozen."""
