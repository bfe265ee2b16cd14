"""Server-side privacy: each site's epsilon per round, no scheduling of exhausted sites, central DP, SecAgg+.

- ``PrivacyLedger``: records the ``dp-*`` metrics every site reports (local DP-SGD), notices budget refusals,
  filters exhausted sites out of the next rounds; persisted in the run directory, so it survives a resume.
- ``CentralDP``: Flower's central DP with client-side fixed clipping, written for our streaming federation
  with Flower's own primitives (``compute_stdv``, ``add_gaussian_noise_inplace``) and an RDP accountant
  (Flower's ``RdpAccountant`` when its ``dp-accounting`` backend is installed, else the same RDP analysis
  from opacus behind Flower's ``PrivacyAccountant`` protocol). ``flower_dp_strategy`` wraps a Flower
  ``Strategy`` with ``DifferentialPrivacyClientSideFixedClipping`` for Strategy-API code paths.
- SecAgg+: ``secaggplus_workflow`` builds Flower's legacy ``SecAggPlusWorkflow``; ``secagg_sum`` runs the
  exact masking arithmetic of that protocol in-process (tests, benchmark).
"""

from __future__ import annotations

import json
import logging
import math
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


class OpacusRdpAccountant:
    """Flower's ``PrivacyAccountant`` protocol on opacus' RDP analysis (no amplification: sample rate 1).

    Used when Flower's ``RdpAccountant`` cannot load its backend (``flwr[dp]`` / dp-accounting, which pins
    an older ``attrs`` than this project's environment holds). Same analysis: Gaussian mechanism, RDP orders,
    conversion to (epsilon, delta).
    """

    def __init__(self, config):
        self._config = config
        self._releases: list[list[float]] = []  # [noise multiplier, count]

    @property
    def config(self):
        return self._config

    @property
    def num_releases(self) -> int:
        return int(sum(c for _, c in self._releases))

    def _epsilon(self, releases, delta: float) -> tuple[float, float | None]:
        from opacus.accountants import RDPAccountant

        if not releases:
            return 0.0, None
        acc = RDPAccountant()
        acc.history = [(float(s), 1.0, int(c)) for s, c in releases]
        eps, order = acc.get_privacy_spent(delta=delta)
        return float(eps), float(order)

    def compose(self, event, count: int = 1) -> None:
        self._releases.append([float(event.noise_multiplier), int(count)])

    def get_epsilon(self, delta: float) -> float:
        return self._epsilon(self._releases, delta)[0]

    def get_delta(self, epsilon: float) -> float:
        raise NotImplementedError("delta for a given epsilon is not needed here")

    def get_privacy_spent(self, delta: float | None = None):
        from flwr.serverapp import PrivacySpent

        delta = self._config.target_delta if delta is None else delta
        eps, order = self._epsilon(self._releases, delta)
        return PrivacySpent(eps, delta, self.num_releases, "rdp (opacus)", order)

    def would_exceed(self, event, max_epsilon: float | None = None, count: int = 1) -> bool:
        limit = self._config.max_epsilon if max_epsilon is None else max_epsilon
        if limit is None:
            return False
        eps, _ = self._epsilon(self._releases + [[float(event.noise_multiplier), int(count)]], self._config.target_delta)
        return eps > limit

    def state_dict(self) -> dict[str, object]:
        return {"releases": [list(r) for r in self._releases]}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self._releases = [list(r) for r in state.get("releases", [])]  # type: ignore[union-attr]


def build_rdp_accountant(delta: float, population_size: int, max_epsilon: float | None):
    """Flower's RDP accountant (client-level, no amplification); opacus' RDP analysis if its backend is absent."""
    from flwr.serverapp import NeighboringRelation, PrivacyConfig, SamplingMethod

    config = PrivacyConfig(target_delta=float(delta), population_size=int(population_size),
                           neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                           sampling_method=SamplingMethod.NO_AMPLIFICATION, max_epsilon=max_epsilon)
    try:
        from flwr.serverapp import RdpAccountant

        return RdpAccountant(config)
    except ImportError as exc:  # flwr[dp] not installed
        log.warning("Flower's RdpAccountant is unavailable (%s); using the opacus RDP analysis", exc)
        return OpacusRdpAccountant(config)


class CentralDP:
    """Central DP for the streaming federation: sites clip their update (``client.privacy.clip_update``),
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

    def privatize(self, mean: dict[str, torch.Tensor], weights: list[float]) -> dict[str, torch.Tensor]:
        """Noise on the aggregated model (floating arrays) and one composed release; ``weights``: those used."""
        from flwr.supercore.differential_privacy import add_gaussian_noise_inplace, compute_stdv

        share = max(weights) / sum(weights)
        stdv = compute_stdv(self.noise_multiplier, self.clipping_norm, 1) * share
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


def flower_dp_strategy(strategy, cfg, num_sampled_clients: int, population_size: int):
    """Flower's ``DifferentialPrivacyClientSideFixedClipping`` around a Flower ``Strategy`` (Strategy-API runs;
    sites then add ``flwr.clientapp.mod.fixedclipping_mod`` to their ClientApp mods)."""
    from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping

    p = cfg.privacy
    accountant = build_rdp_accountant(p.delta, population_size, p.target_epsilon)
    return DifferentialPrivacyClientSideFixedClipping(strategy, float(p.noise_multiplier), float(p.max_grad_norm),
                                                      num_sampled_clients, accountant=accountant)


# ---------------------------------------------------------------------------------------------- SecAgg+


def secaggplus_workflow(cfg, num_sites: int):
    """Flower's legacy ``SecAggPlusWorkflow`` (LegacyContext ServerApp only; sites add ``secaggplus_mod``)."""
    from flwr.server.workflow import SecAggPlusWorkflow

    p = cfg.privacy
    return SecAggPlusWorkflow(num_shares=max(3, num_sites), reconstruction_threshold=max(2, (2 * num_sites) // 3),
                              clipping_range=float(p.secagg_clipping_range),
                              quantization_range=int(p.secagg_quantization_range))


def secagg_sum(site_arrays: list[list[np.ndarray]], weights: list[float], *, clipping_range: float = 8.0,
               quantization_range: int = 4194304, modulus_range: int = 4294967296, max_weight: float = 1000.0,
               threshold: int | None = None, dropped: Iterable[int] = ()) -> list[np.ndarray]:
    """The SecAgg+ arithmetic of Flower's ``secaggplus_mod`` (stage 2) and ``SecAggPlusWorkflow`` (unmask).

    Every site scales by its weight, quantises, adds a private mask (seed shared with Shamir) and pairwise
    masks (ECDH keys) and reduces mod ``modulus_range``; the server sums what it received, removes the
    survivors' private masks and the dropped sites' pairwise masks from reconstructed secrets, dequantises
    and divides by the total weight: the weighted mean, seen only as a sum. Complete graph (all neighbours).
    """
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
    from flwr.common.secure_aggregation.ndarrays_arithmetic import (
        factor_combine, factor_extract, get_parameters_shape, parameters_addition, parameters_mod,
        parameters_multiply, parameters_subtraction)
    from flwr.common.secure_aggregation.quantization import dequantize, quantize
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
    from flwr.supercore.primitives.asymmetric import generate_key_pairs

    n = len(site_arrays)
    nids = list(range(1, n + 1))
    threshold = threshold or max(2, (2 * n) // 3)
    dropped = set(dropped)
    keys = {nid: generate_key_pairs() for nid in nids}  # (sk1, pk1) per site
    seeds = {nid: os.urandom(32) for nid in nids}
    seed_shares = {nid: create_shares(seeds[nid], threshold, n) for nid in nids}
    sk_shares = {}
    from flwr.supercore.primitives.asymmetric import private_key_to_bytes, bytes_to_private_key

    for nid in nids:
        sk_shares[nid] = create_shares(private_key_to_bytes(keys[nid][0]), threshold, n)

    masked: dict[int, list[np.ndarray]] = {}
    for nid, arrays, weight in zip(nids, site_arrays, weights):
        q_ratio = round(weight / max_weight * quantization_range)
        params = parameters_multiply([np.asarray(a, dtype=np.float64) for a in arrays], q_ratio / quantization_range)
        vec = factor_combine(q_ratio, quantize(params, clipping_range, quantization_range))
        dims = [a.shape for a in vec]
        vec = parameters_addition(vec, pseudo_rand_gen(seeds[nid], modulus_range, dims))
        for other in nids:
            if other == nid:
                continue
            mask = pseudo_rand_gen(generate_shared_key(keys[nid][0], keys[other][1]), modulus_range, dims)
            vec = parameters_addition(vec, mask) if nid > other else parameters_subtraction(vec, mask)
        masked[nid] = parameters_mod(vec, modulus_range)

    active = [nid for nid in nids if nid not in dropped]
    total = masked[active[0]]
    for nid in active[1:]:
        total = parameters_mod(parameters_addition(total, masked[nid]), modulus_range)
    shapes = get_parameters_shape(total)
    for nid in nids:  # shares come from the first `threshold` survivors
        holders = active[:threshold]
        if nid in active:
            secret = combine_shares([seed_shares[nid][h - 1] for h in holders])
            total = parameters_subtraction(total, pseudo_rand_gen(secret, modulus_range, shapes))
        else:
            sk = bytes_to_private_key(combine_shares([sk_shares[nid][h - 1] for h in holders]))
            for other in active:
                mask = pseudo_rand_gen(generate_shared_key(sk, keys[other][1]), modulus_range, shapes)
                total = parameters_addition(total, mask) if nid > other else parameters_subtraction(total, mask)
    q_total, recon = factor_extract(parameters_mod(total, modulus_range))
    out = dequantize(recon, clipping_range, quantization_range)
    offset = -(len(active) - 1) * clipping_range
    return [(v + offset) * (quantization_range / q_total) for v in out]


def legacy_secagg_apps(site_update, initial: list[np.ndarray], num_sites: int, record: dict, *, secagg: bool = True,
                       rounds: int = 1, clipping_range: float = 8.0, quantization_range: int = 4194304):
    """A legacy-API ServerApp/ClientApp pair running Flower's real ``SecAggPlusWorkflow`` + ``secaggplus_mod``.

    ``site_update(partition_id) -> (arrays, num_examples)`` is what each site would send. The aggregate of
    every round and the seconds from configure to aggregate land in ``record``. This is how SecAgg+ runs in
    Flower 1.42 (LegacyContext + DefaultWorkflow); our Message-API federation does not run on it.
    """
    from flwr.client import ClientApp, NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server import LegacyContext, ServerApp, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    class Site(NumPyClient):
        def __init__(self, pid: int):
            self.pid = pid

        def fit(self, parameters, config):
            arrays, n = site_update(self.pid)
            return arrays, int(n), {}

    def client_fn(context):
        return Site(int(context.node_config["partition-id"])).to_client()

    class Recording(FedAvg):
        def configure_fit(self, server_round, parameters, client_manager):
            record.setdefault("start", {})[server_round] = time.perf_counter()
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round, results, failures):
            params, metrics = super().aggregate_fit(server_round, results, failures)
            record.setdefault("seconds", {})[server_round] = time.perf_counter() - record["start"][server_round]
            record.setdefault("aggregate", {})[server_round] = parameters_to_ndarrays(params) if params else None
            record.setdefault("failures", {})[server_round] = len(failures)
            return params, metrics

    server = ServerApp()

    @server.main()
    def main(grid, context):
        strategy = Recording(fraction_fit=1.0, min_fit_clients=num_sites, min_available_clients=num_sites,
                             fraction_evaluate=0.0, initial_parameters=ndarrays_to_parameters(initial))
        ctx = LegacyContext(context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy)
        fit = (SecAggPlusWorkflow(num_shares=num_sites, reconstruction_threshold=max(2, (2 * num_sites) // 3),
                                  clipping_range=clipping_range, quantization_range=quantization_range)
               if secagg else None)
        DefaultWorkflow(fit_workflow=fit)(grid, ctx)

    return server, ClientApp(client_fn=client_fn, mods=[secaggplus_mod] if secagg else [])
