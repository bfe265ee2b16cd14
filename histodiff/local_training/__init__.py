""""Train N steps from this state on this data": a site's local LAE and DM steps, shared by single-site runs
and federated rounds (``local_steps``), and the Lightning trainer, loaders and state files they use
(``trainer_setup``); ``site_ddp`` runs them over several devices (one process per device, from inside a
ClientApp), with ``sample_keys`` making every random draw of a tile independent of how the batch is split."""
