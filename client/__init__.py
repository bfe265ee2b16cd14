"""Site-side federation: the ClientApp, its task functions, and ``python -m client.run`` (one SuperNode per site)."""
