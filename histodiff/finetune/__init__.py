"""Paper stage 3: decoder fine-tuning at the labeled site.

- ``decoder_finetune``: eq. 5, D -> D' with L1 + LPIPS + lambda_CE * CE(phi(D'(z)), y); the encoder E, the DM
  and the auxiliary classifier phi stay frozen; phi's accuracy on reconstructions before and after
"""
