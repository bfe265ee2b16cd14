"""Server-side federation logic: phase schedule, streaming aggregation, server optimisers, checkpoints."""
