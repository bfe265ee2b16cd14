"""Server-side privacy: each site's epsilon per round, no scheduling of exhausted sites, central DP, SecAgg+.

- ``PrivacyLedger``: records the ``dp-*`` metrics every site reports (local DP-SGD), notices budget refusals,
  filters exhausted sites out of the next rounds; persisted in the run directory, so it survives a resume.
- ``CentralDP``: Flower's central DP with client-side fixed clipping, written for our streaming federation
  with Flower's own primitives (``compute_stdv``, ``add_gaussian_noise_inplace``) and Flower's ``RdpAccountant``
  (``flwr[dp]``), persisted in the run directory.
- SecAgg+ runs in the federation's own message loop: ``wire/secagg.py`` (stages: ``strategies/secure_rounds.py``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch

log = logging.getLogger("histodiff.fed.privacy")
LEDGER_FILE = "privacy_ledger.json"
DP_PREFIX = "dp-"
EXHAUSTED_MARK = "privacy budget exhausted"


def without_privacy_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Metrics to average across sites: a site's epsilon is per site and never averaged."""
    return {k: v for k, v in metrics.items() if not str(k).startswith(DP_PREFIX)}


class PrivacyLedger:
    """Per-site epsilon per round, as the sites report it, and the sites that are out of budget."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LEDGER_FILE
        self.sites: dict[str, dict[str, Any]] = {}
        self.central: dict[str, Any] = {}
        if self.path.exists():
            data = json.loads(self.path.read_text())
            self.sites, self.central = data.get("sites", {}), data.get("central", {})

    def record(self, node: int | str, phase: str, global_round: int, metrics: Mapping[str, Any],
               sent_arrays: int | None = None, sent_bytes: int | None = None) -> None:
        """Keep a site's reported ``dp-*`` metrics for this round (no-op when it reports none)."""
        dp = {k[len(DP_PREFIX):]: float(v) for k, v in metrics.items() if str(k).startswith(DP_PREFIX)}
        site = self.sites.setdefault(str(node), {"rounds": [], "exhausted": False})
        entry: dict[str, Any] = {"phase": phase, "round": int(global_round), **dp}
        if sent_arrays is not None:
            entry["arrays"] = int(sent_arrays)
        if sent_bytes is not None:
            entry["bytes"] = int(sent_bytes)
        site["rounds"].append(entry)
        if "epsilon" in dp:  # local DP; central DP's per-site metrics (update norm, clipped) carry none
            site["epsilon"], site["delta"] = dp["epsilon"], dp.get("delta")
            site["target_epsilon"] = dp.get("target-epsilon")
            if dp.get("exhausted", 0.0) >= 1.0:
                self._exhaust(site, node, f"spent epsilon {site['epsilon']:.3f} of {site['target_epsilon']:g}")

    def record_refusal(self, node: int | str, phase: str, global_round: int, reason: str) -> bool:
        """A site's error; when it is a budget refusal the site is not scheduled again. True if so."""
        if EXHAUSTED_MARK not in reason:
            return False
        site = self.sites.setdefault(str(node), {"rounds": [], "exhausted": False})
        site["rounds"].append({"phase": phase, "round": int(global_round), "refused": reason})
        self._exhaust(site, node, reason)
        return True

    def _exhaust(self, site: dict, node, reason: str) -> None:
        if not site.get("exhausted"):
            log.warning("site %s is out of privacy budget and will not be scheduled again: %s", node, reason)
        site["exhausted"], site["reason"] = True, reason

    def is_exhausted(self, node: int | str) -> bool:
        return bool(self.sites.get(str(node), {}).get("exhausted"))

    def schedulable(self, nodes: Iterable[int]) -> list[int]:
        """The nodes that still have budget (exhausted ones are left out, and logged once per call)."""
        nodes = list(nodes)
        out = [n for n in nodes if not self.is_exhausted(n)]
        if len(out) < len(nodes):
            log.info("not scheduling %d exhausted site(s): %s", len(nodes) - len(out),
                     ", ".join(str(n) for n in nodes if n not in out))
        return out

    def summary(self) -> dict[str, Any]:
        return {node: {"epsilon": s.get("epsilon"), "delta": s.get("delta"), "exhausted": s.get("exhausted", False)}
                for node, s in self.sites.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"sites": self.sites, "central": self.central, "time": time.time()}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2))
        os.replace(tmp, self.path)


# ---------------------------------------------------------------------------------------------- central DP


def build_rdp_accountant(delta: float, population_size: int, max_epsilon: float | None):
    """Flower's RDP accountant (client-level releases, no amplification by sampling)."""
    from flwr.serverapp import NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod

    config = PrivacyConfig(target_delta=float(delta), population_size=int(population_size),
                           neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                           sampling_method=SamplingMethod.NO_AMPLIFICATION, max_epsilon=max_epsilon)
    return RdpAccountant(config)


class CentralDP:
    """Central DP for the streaming federation: sites clip their update (``client.site_privacy.clip_update``),
    the server averages, adds Gaussian noise of std ``sigma * C * max_share`` and composes one release.

    With equal weights ``max_share = 1/n`` and the noise is Flower's ``compute_stdv(sigma, C, n)``, exactly
    what ``DifferentialPrivacyClientSideFixedClipping`` adds. Weighted FedAvg (by tile count) raises the
    sensitivity to the largest site's share, and the noise with it.
    """

    def __init__(self, noise_multiplier: float, clipping_norm: float, delta: float, target_epsilon: float | None,
                 population_size: int):
        if noise_multiplier <= 0 or clipping_norm <= 0:
            raise ValueError("central DP needs noise_multiplier > 0 and max_grad_norm (clipping norm) > 0")
        self.noise_multiplier, self.clipping_norm = float(noise_multiplier), float(clipping_norm)
        self.delta, self.target_epsilon = float(delta), target_epsilon
        self.accountant = build_rdp_accountant(delta, max(1, population_size), target_epsilon)

    @classmethod
    def from_config(cls, cfg, population_size: int) -> "CentralDP":
        p = cfg.privacy
        if p.noise_multiplier is None:
            raise ValueError("privacy.mode=central needs privacy.noise_multiplier")
        return cls(p.noise_multiplier, p.max_grad_norm, p.delta, p.target_epsilon, population_size)

    def config_values(self) -> dict[str, float]:
        """Add to the round's ConfigRecord: sites read the clipping norm from it (Flower's key)."""
        from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

        return {KEY_CLIPPING_NORM: self.clipping_norm}

    def _event(self, n: int):
        from flwr.serverapp import GaussianPrivacyEvent

        n = max(1, min(int(n), self.accountant.config.population_size))
        return GaussianPrivacyEvent(self.noise_multiplier, n, self.accountant.config.population_size)

    def check_budget(self, n_sites: int) -> None:
        """Before a round: stop the run (one line) when the next release would pass the target epsilon."""
        from flwr.serverapp.exception import PrivacyBudgetExhausted

        if self.accountant.would_exceed(self._event(n_sites)):
            spent = self.accountant.get_privacy_spent()
            raise PrivacyBudgetExhausted(f"central DP: privacy budget exhausted: epsilon {spent.epsilon:.3f} of "
                                         f"{self.target_epsilon:g} at delta {spent.delta:g}; the next round would pass it")

    def privatize(self, mean: dict[str, torch.Tensor], weights: list[float],
                  sensitivity_slack: float = 0.0) -> dict[str, torch.Tensor]:
        """Noise on the aggregated model (floating arrays) and one composed release; ``weights``: those used.

        ``sensitivity_slack``: how far past the clipping norm (L2) a site's contribution can reach after the
        site's own processing, e.g. SecAgg+'s stochastic rounding (under one step per value); the noise covers it.
        """
        from flwr.supercore.differential_privacy import add_gaussian_noise_inplace, compute_stdv

        share = max(weights) / sum(weights)
        stdv = compute_stdv(self.noise_multiplier, self.clipping_norm + sensitivity_slack, 1) * share
        keys = [k for k, v in mean.items() if v.is_floating_point()]
        arrays = [mean[k].detach().cpu().numpy().astype(np.float32, copy=True) for k in keys]
        add_gaussian_noise_inplace(arrays, stdv)
        out = dict(mean)
        out.update({k: torch.from_numpy(np.asarray(a, dtype=np.float32)) for k, a in zip(keys, arrays)})
        self.accountant.compose(self._event(len(weights)))
        spent = self.accountant.get_privacy_spent()
        log.info("central DP: noise std %.4g added; epsilon %.4f at delta %g after %d releases", stdv, spent.epsilon,
                 spent.delta, spent.num_releases)
        return out

    def summary(self) -> dict[str, Any]:
        spent = self.accountant.get_privacy_spent()
        return {"mechanism": "central DP: client-side fixed clipping + server Gaussian noise (Flower)",
                "noise_multiplier": self.noise_multiplier, "clipping_norm": self.clipping_norm,
                "epsilon": spent.epsilon, "delta": spent.delta, "releases": spent.num_releases,
                "accountant": spent.accounting_method, "target_epsilon": self.target_epsilon}

    def state_dict(self) -> dict[str, Any]:
        return {"accountant": self.accountant.state_dict(), "class": type(self.accountant).__name__}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state and "accountant" in state:
            self.accountant.load_state_dict(dict(state["accountant"]))
