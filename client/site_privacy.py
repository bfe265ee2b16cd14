"""Site-side privacy for the federated rounds: DP-SGD local rounds, update clipping for central DP, budget status.

``lae_round`` / ``dm_round`` have the signatures of ``client.task.lae_round`` / ``dm_round`` and fall through to
them when DP is off or in central mode, so a handler can call these unconditionally.
"""

from __future__ import annotations

import logging

import torch

from histodiff.privacy import PrivacyBudgetExhausted

log = logging.getLogger(__name__)


def local_dp(cfg) -> bool:
    return bool(cfg.privacy.dp) and cfg.privacy.mode == "local"


def central_dp(cfg) -> bool:
    return bool(cfg.privacy.dp) and cfg.privacy.mode == "central"


def _no_prox(mu: float) -> None:
    if mu > 0:
        raise ValueError("FedProx (proximal-mu > 0) is not combined with local DP-SGD here; use strategy=fedavg")


def lae_round(cfg, dataset, site, steps: int, global_weights, mu: float = 0.0, clock=None, release=False):
    """One LAE round at ``site``: DP-SGD when privacy.dp and mode=local (accountant in ``site.state``)."""
    if not local_dp(cfg):
        from client import task

        return task.lae_round(cfg, dataset, site, steps, global_weights, mu, clock=clock, release=release)
    from histodiff.privacy.dp_train import dp_train_lae_steps

    _no_prox(mu)
    return dp_train_lae_steps(cfg, dataset, site.state / "lae", steps, init_weights=global_weights,
                              accountant_dir=site.state, site=site.name)


def dm_round(cfg, dataset, site, steps: int, global_weights, autoencoder, scale_factor: float, mu: float = 0.0,
             clock=None, release=False):
    if not local_dp(cfg):
        from client import task

        return task.dm_round(cfg, dataset, site, steps, global_weights, autoencoder, scale_factor, mu, clock=clock,
                             release=release)
    from histodiff.privacy.dp_train import dp_train_dm_steps

    _no_prox(mu)
    return dp_train_dm_steps(cfg, dataset, site.state / "dm", steps, autoencoder, scale_factor,
                             init_weights=global_weights, accountant_dir=site.state, site=site.name)


def latent_stats(cfg, dataset, autoencoder, site):
    """The latent-stats round: clipped, noised and accounted under local DP (histodiff.privacy.dp_latent_stats), else exact.

    Returns (LatentStats, privacy metrics to add to the reply; empty without local DP).
    """
    if not local_dp(cfg):
        from client import task

        return task.latent_stats(cfg, dataset, autoencoder), {}
    from histodiff.privacy.dp_latent_stats import dp_latent_stats

    return dp_latent_stats(cfg, autoencoder, dataset, site.state, site=site.name, seed=int(cfg.seed))


# ------------------------------------------------------------------ central DP: clip the update at the site


def clip_update(cfg, update: dict[str, torch.Tensor], clipping_norm: float | None = None
                ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """In central mode, ``update`` (``w - g``) scaled to L2 norm at most ``clipping_norm`` (the round config's,
    Flower's key; ``privacy.max_grad_norm`` when the round names none), as Flower's fixed clipping does; integer
    buffers are no part of the clipped update and travel as they are. Else unchanged, and no metrics."""
    if not central_dp(cfg):
        return update, {}
    c = float(cfg.privacy.max_grad_norm if clipping_norm is None else clipping_norm)
    floating = [k for k, v in update.items() if v.is_floating_point()]
    norm = float(torch.sqrt(sum(update[k].double().pow(2).sum() for k in floating))) if floating else 0.0
    if norm > c:
        update = {k: (v * (c / norm) if k in floating else v) for k, v in update.items()}
    return update, {"dp-update-norm": norm, "dp-clipping-norm": c, "dp-clipped": float(norm > c)}


__all__ = ["PrivacyBudgetExhausted", "lae_round", "dm_round", "latent_stats", "clip_update", "local_dp", "central_dp"]
