"""The labeled-site pipeline (paper stages 3-5): decoder fine-tuning, latent classifier, guided generation,
selection, downstream evaluation and the Table 1 report. Entry point: :func:`run_augment`."""

from histodiff.labeled.pipeline import run_augment

__all__ = ["run_augment"]
