"""The labeled site's pipeline: paper stages 3-6 in order (decoder fine-tuning, latent classifier, guided
generation, selection, downstream evaluation and Table 1), resumable stage by stage.
Entry point: :func:`histodiff.labeled_site.pipeline.run_augment`."""
