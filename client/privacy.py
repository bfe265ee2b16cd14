"""Site-side privacy for the federated rounds: DP-SGD local rounds, update clipping for central DP, budget status.

``lae_round`` / ``dm_round`` have the signatures of ``client.task.lae_round`` / ``dm_round`` and fall through to
them when DP is off or in central mode, so a handler can call these unconditionally.
"""

from __future__ import annotations

import logging

import numpy as np
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


def lae_round(cfg, dataset, site, steps: int, global_weights, mu: float = 0.0, clipping_norm: float | None = None):
    """One LAE round at ``site``: DP-SGD when privacy.dp and mode=local (accountant in ``site.state``); under
    central DP the update is clipped to ``clipping_norm``, the norm the server calibrates its noise to."""
    if not local_dp(cfg):
        from client import task

        result = task.lae_round(cfg, dataset, site, steps, global_weights, mu)
        return clip_result(cfg, result, global_weights, clipping_norm)
    from histodiff.privacy.dp_train import dp_train_lae_steps

    _no_prox(mu)
    return dp_train_lae_steps(cfg, dataset, site.state / "lae", steps, init_weights=global_weights,
                              accountant_dir=site.state, site=site.name)


def dm_round(cfg, dataset, site, steps: int, global_weights, autoencoder, scale_factor: float, mu: float = 0.0,
             clipping_norm: float | None = None):
    if not local_dp(cfg):
        from client import task

        result = task.dm_round(cfg, dataset, site, steps, global_weights, autoencoder, scale_factor, mu)
        return clip_result(cfg, result, global_weights, clipping_norm)
    from histodiff.privacy.dp_train import dp_train_dm_steps

    _no_prox(mu)
    return dp_train_dm_steps(cfg, dataset, site.state / "dm", steps, autoencoder, scale_factor,
                             init_weights=global_weights, accountant_dir=site.state, site=site.name)


def latent_stats(cfg, dataset, autoencoder, site):
    """The latent-stats round: clipped, noised and accounted under local DP (histodiff.privacy.stats), else exact.

    Returns (LatentStats, privacy metrics to add to the reply; empty without local DP).
    """
    if not local_dp(cfg):
        from client import task

        return task.latent_stats(cfg, dataset, autoencoder), {}
    from histodiff.privacy.stats import dp_latent_stats

    return dp_latent_stats(cfg, autoencoder, dataset, site.state, site=site.name, seed=int(cfg.seed))


# ------------------------------------------------------------------ central DP: clip the update at the site


def clip_update(weights: dict[str, torch.Tensor], global_weights: dict[str, torch.Tensor],
                clipping_norm: float) -> tuple[dict[str, torch.Tensor], float]:
    """Flower's ``compute_clip_model_update`` on the floating arrays: w <- g + (w - g) * min(1, C / ||w - g||).

    Integer buffers (e.g. BatchNorm's step counter) are sent as the global value: they are no part of the
    clipped update. Returns the clipped weights and the update's norm before clipping.
    """
    from flwr.supercore.differential_privacy import compute_clip_model_update, get_norm

    keys = [k for k, v in weights.items() if v.is_floating_point()]
    new = [weights[k].detach().cpu().numpy().astype(np.float32, copy=True) for k in keys]
    old = [global_weights[k].detach().cpu().numpy().astype(np.float32) for k in keys]
    norm = float(get_norm([a - b for a, b in zip(new, old)]))
    compute_clip_model_update(new, old, clipping_norm)
    out = {k: (global_weights[k].clone() if k in global_weights else v) for k, v in weights.items()}
    out.update({k: torch.from_numpy(a) for k, a in zip(keys, new)})
    return out, norm


def clip_result(cfg, result, global_weights, clipping_norm: float | None = None):
    """In central mode, the result with its update clipped to ``clipping_norm`` (the round config's, Flower's key;
    ``privacy.max_grad_norm`` when the round names none); else unchanged."""
    if not central_dp(cfg) or not global_weights:
        return result
    c = float(cfg.privacy.max_grad_norm if clipping_norm is None else clipping_norm)
    result.weights, norm = clip_update(result.weights, global_weights, c)
    result.metrics = {**result.metrics, "dp-update-norm": norm, "dp-clipping-norm": c, "dp-clipped": float(norm > c)}
    return result


__all__ = ["PrivacyBudgetExhausted", "lae_round", "dm_round", "latent_stats", "clip_update", "clip_result",
           "local_dp", "central_dp"]
