"""The federated pre-training run: phases, rounds with deadlines and min-sites, streaming aggregation, checkpoints."""

from __future__ import annotations

import logging
import secrets
import time
from pathlib import Path
from typing import Callable

import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.exception import PrivacyBudgetExhausted as CentralBudgetExhausted

from histodiff.training.latent_stats import LatentStats
from strategies import checkpoint as ckpt
from strategies.aggregate import MetricMean, ReplyMismatch, StreamingMean
from strategies.arrays import to_record, transfer_dtype, weights_digest
from strategies.privacy import CentralDP, PrivacyLedger, without_privacy_metrics
from strategies.rounds import RoundTrip
from strategies.secagg import RECORD_KEY, STATS_SHAPES, SecAggError, SecAggParams, SecureSum
from strategies.schedule import Plan, ServerState, advance, load_state, save_state, start_state
from strategies.server_opt import ServerEMA, build_server_optimizer
from strategies.settings import Settings

log = logging.getLogger("histodiff.fed")
PHASE_PREFIXES = {"lae": ("autoencoder.", "discriminator."), "dm": ("unet.",)}
MB = 1e6


class RoundFailed(RuntimeError):
    """Fewer than min-sites answered (or were connected); the round is retried until the wait timeout."""


class FederationStopped(RuntimeError):
    """The run stopped before its end; the last checkpoint is intact."""


class Federation:
    def __init__(self, grid: Grid, settings: Settings, cfg, emit: Callable[[str], None] | None = None):
        self.grid, self.s, self.cfg = grid, settings, cfg
        self.run_dir = Path(settings.run_dir)
        self.plan = Plan(settings.lae_rounds, settings.dm_rounds, settings.deliver)
        self.emit = emit or (lambda line: log.info(line))
        self.weights: dict[str, torch.Tensor] = {}
        self.state: ServerState = start_state(self.plan)
        self.opt = build_server_optimizer("fedavg")
        self.ema = ServerEMA(0.0)
        # each site's reported epsilon per round, refusals, exhausted sites; central DP's server-side accountant
        self.privacy = PrivacyLedger(self.run_dir)
        self.central = (CentralDP.from_config(cfg, population_size=1000)
                        if cfg.privacy.dp and cfg.privacy.mode == "central" else None)

    @classmethod
    def from_run_config(cls, grid: Grid, run_config, emit: Callable[[str], None] | None = None) -> "Federation":
        """The federation a run config describes (validated settings, composed model config): the ServerApp's."""
        from histodiff.config import compose

        settings = Settings.from_run_config(run_config)
        return cls(grid, settings, compose(settings.config_overrides()), emit)

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> ServerState:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._load_or_init()
        failing_since: float | None = None
        while self.state.phase != "done":
            try:
                line = self._round()
            except CentralBudgetExhausted as exc:
                return self._stop(str(exc))
            except RoundFailed as exc:
                now = time.monotonic()
                failing_since = failing_since or now
                if now - failing_since >= self.s.wait_timeout:
                    return self._stop(f"{exc}; waited {self.s.wait_timeout:.0f} s for min-sites={self.s.min_sites}")
                self.emit(f"{self.state.phase} round {self.state.phase_round + 1}: {exc}; retrying")
                time.sleep(min(2.0, self.s.wait_timeout))
                continue
            failing_since = None
            self._commit(line)
        self._privacy_report()
        self.emit(f"federated run done: {self.run_dir}")
        return self.state

    def _privacy_report(self) -> None:
        from histodiff.privacy.report import write_privacy_report

        try:
            json_path, md_path = write_privacy_report(self.run_dir, self.cfg)
        except Exception as exc:  # noqa: BLE001 - the report never breaks a finished run
            log.warning("privacy report not written: %s", exc)
            return
        self.emit(f"privacy report: {json_path} {md_path}")

    def _stop(self, reason: str) -> ServerState:
        self.state.status, self.state.message = "stopped", reason
        save_state(self.run_dir, self.state)  # same checkpoint pointer: the last round stays intact
        self.privacy.save()  # refusals and spend of the failed round too: the sites did spend it
        self._privacy_report()
        msg = (f"FEDERATION STOPPED in phase {self.state.phase} after {self.state.global_round} rounds: {reason}. "
               f"Last checkpoint: {self.run_dir / (self.state.checkpoint or '-')}; "
               f"continue with `python -m server.run --resume {self.run_dir}`")
        self.emit(msg)
        return self.state

    def _load_or_init(self) -> None:
        previous = load_state(self.run_dir)
        if self.s.resume and previous is not None:
            self.state = previous
            self.state.status, self.state.message = ("running", "") if previous.phase != "done" else ("done", "")
            strategy_state = {}
            if previous.checkpoint:
                self.weights, strategy_state = ckpt.load_round(self.run_dir, previous.checkpoint)
            if "rng/torch" in strategy_state:
                torch.set_rng_state(strategy_state.pop("rng/torch").to(torch.uint8))
            self._new_phase_strategy()
            self.opt.load_state_dict(strategy_state)
            self.ema.load_state_dict(strategy_state)
            if self.central and self.privacy.central:
                self.central.load_state_dict(self.privacy.central.get("state", {}))
            self.emit(f"resumed {self.run_dir} at {self.state.phase} round {self.state.phase_round + 1} "
                      f"(global round {self.state.global_round + 1})")
        else:
            if previous is not None and previous.global_round > 0:
                raise FederationStopped(f"{self.run_dir} already holds a run; pass resume=true or use a new run-dir")
            self.state = start_state(self.plan)
            self.privacy.sites, self.privacy.central = {}, {}  # a leftover ledger of a run that never committed
            self.weights = ckpt.init_lae_weights(self.cfg, self.s.seed)
            self._new_phase_strategy()

    def _new_phase_strategy(self) -> None:
        s = self.s
        self.opt = build_server_optimizer(s.strategy, s.server_lr, s.server_beta1, s.server_beta2, s.server_tau)
        self.ema = ServerEMA(s.server_ema)

    def _commit(self, line: dict) -> None:
        finished_phase = self.state.phase
        advance(self.state, self.plan)
        if self.state.phase != finished_phase:
            if finished_phase in PHASE_PREFIXES:
                # the phase's final global model is its EMA when the server keeps one
                self.weights.update(self.ema.weights(self._phase_weights(finished_phase)))
            self._new_phase_strategy()
        rel = ckpt.save_round(self.run_dir, f"round-{self.state.global_round:04d}", self.cfg, self.weights,
                              {**self.opt.state_dict(), **self.ema.state_dict(), "rng/torch": torch.get_rng_state()})
        if finished_phase == "dm":
            ckpt.export_model(self.run_dir, self.cfg, self.ema.weights(self.weights), self.state.scale_factor)
        if self.central:
            self.privacy.central = {**self.central.summary(), "state": self.central.state_dict()}
        # the ledger before the state pointer: after a crash in between, the round is redone and its spend is
        # counted twice (conservative), never lost
        self.privacy.save()
        if self.cfg.privacy.dp:
            line["privacy"] = self.privacy.summary()
        if self.central:
            line["privacy_central"] = {k: v for k, v in self.privacy.central.items() if k != "state"}
        self.state.checkpoint = rel
        save_state(self.run_dir, self.state)
        ckpt.prune(self.run_dir, rel)
        ckpt.append_metrics(self.run_dir, line)
        self.emit(progress_line(line))

    # ------------------------------------------------------------------ sites

    def _sites(self, role: str, needed: int) -> list[int]:
        """Connected nodes with ``role``; asks new nodes for their role first. Raises RoundFailed below ``needed``."""
        nodes = sorted(int(n) for n in self.grid.get_node_ids())
        unknown = [n for n in nodes if str(n) not in self.state.roles]
        if unknown:
            msgs = [Message(RecordDict({"config": ConfigRecord({"phase": "role"})}), n, "query.role",
                            ttl=self.s.round_timeout + 60) for n in unknown]
            trip = RoundTrip(self.grid, msgs, min(self.s.round_timeout, 120.0), self.s.poll)
            for node, reply in trip:
                if not reply.has_error() and "metrics" in reply.content:
                    labeled = int(reply.content["metrics"].get("labeled", 0))
                    self.state.roles[str(node)] = "labeled" if labeled else "unlabeled"
                else:
                    log.warning("node %s did not tell its role: %s", node, _reason(reply))
        chosen = [n for n in nodes if self.state.roles.get(str(n)) == role]
        if len(chosen) < needed:
            raise RoundFailed(f"only {len(chosen)} {role} site(s) connected, {needed} needed")
        return chosen

    # ------------------------------------------------------------------ rounds

    def _round(self) -> dict:
        phase = self.state.phase
        if phase in ("lae", "dm"):
            return self._train_round(phase)
        if phase == "latent-stats":
            return self._stats_round()
        if phase == "deliver":
            return self._deliver_round()
        raise RuntimeError(f"unknown phase {phase}")

    def _config(self, phase: str) -> ConfigRecord:
        values = {"phase": phase, "server-round": self.state.global_round + 1, "local-steps": self.s.local_steps,
                  "transfer-dtype": self.s.transfer_dtype,
                  "proximal-mu": self.s.proximal_mu if self.s.strategy == "fedprox" else 0.0}
        if self.state.scale_factor is not None:
            values["scale-factor"] = float(self.state.scale_factor)
        if self.state.lae_digest:
            values["lae-digest"] = self.state.lae_digest
        if self.central and phase in PHASE_PREFIXES:
            values.update(self.central.config_values())  # the clipping norm, under Flower's key
        return ConfigRecord(values)

    def _phase_weights(self, phase: str) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.weights.items() if k.startswith(PHASE_PREFIXES[phase])}

    def _message(self, content: RecordDict, node: int, kind: str) -> Message:
        return Message(content, node, kind, ttl=self.s.round_timeout + 60, group_id=str(self.state.global_round + 1))

    def _train_round(self, phase: str) -> dict:
        start = time.time()
        if phase == "dm" and not any(k.startswith("unet.") for k in self.weights):
            self.weights.update(ckpt.init_unet_weights(self.cfg, self.s.seed))
        nodes = self._schedulable(self._sites("unlabeled", self.s.min_sites))
        if self.central:
            self.central.check_budget(len(nodes))  # raises CentralBudgetExhausted: the run stops, checkpoint intact
        current = self._phase_weights(phase)
        dropped: dict = {}
        secure = None
        if self.cfg.privacy.secagg:  # stages 1-2: keys and encrypted shares; the sites that finish them train
            floating = {k: tuple(v.shape) for k, v in current.items() if v.is_floating_point()}
            secure = self._secagg_open(phase, nodes, floating, dropped)
        record = to_record(current, transfer_dtype(self.s.transfer_dtype))
        config = self._config(phase)
        ae_record = to_record(self._part("autoencoder.")) if phase == "dm" else None
        messages, sent = [], {}
        for node in (secure.sharers if secure else nodes):
            content = RecordDict({"arrays": record, "config": config})
            if ae_record is not None and node not in self.state.has_lae:
                content["autoencoder"] = ae_record  # the frozen encoder, once per site
            if secure:
                content[RECORD_KEY] = secure.forward(node, equal_weights=self.central is not None)
            sent[node] = sum(r.count_bytes() for r in content.array_records.values())
            messages.append(self._message(content, node, f"train.{phase}"))
        del record, ae_record
        acc = None if secure else StreamingMean({k: tuple(v.shape) for k, v in current.items()})
        metrics, answered, received = MetricMean(), [], {}
        clipped: dict[int, float] = {}
        trip = RoundTrip(self.grid, messages, self.s.round_timeout, self.s.poll)
        del messages
        for node, reply in trip:
            try:
                if reply.has_error():
                    raise RuntimeError(_reason(reply))
                arrays, m = reply.content["arrays"], reply.content["metrics"]
                n = float(m["num-examples"])
                if secure:
                    secure.add_masked(node, arrays)  # only the masked upload; its weight is inside it
                    clipped[node] = float(m.get("secagg-clipped", 0.0))
                else:
                    acc.add(arrays, 1.0 if self.central else n)  # central DP: equal weights bound the sensitivity
                metrics.add({k: v for k, v in without_privacy_metrics(m).items()
                             if k not in ("num-examples", "step", "secagg-clipped")}, n)
                self.privacy.record(node, phase, self.state.global_round + 1, m, len(arrays), arrays.count_bytes())
                received[node] = arrays.count_bytes()
                answered.append(node)
                if phase == "dm" and node not in self.state.has_lae:
                    self.state.has_lae.append(node)
            except (RuntimeError, KeyError, ReplyMismatch) as exc:
                dropped[node] = str(exc)
                self.privacy.record_refusal(node, phase, self.state.global_round + 1, str(exc))
                if phase == "dm" and node in self.state.has_lae and "global autoencoder" in str(exc):
                    self.state.has_lae.remove(node)  # resend the encoder next time
        for node in trip.missing:
            dropped[node] = "missed the round deadline"
        if secure:  # stage 4: the survivors' shares remove the masks; only the weighted mean appears
            delta = self._secagg_close(phase, secure, answered, dropped)
            mean = {k: (v + delta[k] if k in delta else v.clone()) for k, v in current.items()}
        else:
            self._log_dropped(phase, dropped)
            if len(answered) < self.s.min_sites:
                raise RoundFailed(f"{len(answered)} of {len(nodes)} sites answered, min-sites={self.s.min_sites}")
            mean = acc.mean()
            del acc
        if self.central:
            # SecAgg+ rounds each clipped update value stochastically (< 1 step): its L2 norm may pass C by
            # step * sqrt(values); the noise is scaled to cover that
            slack = secure.params.step * sum(v.numel() for v in delta.values()) ** 0.5 if secure else 0.0
            mean = self.central.privatize(mean, [1.0] * len(answered), sensitivity_slack=slack)
        new = self.opt.step(current, mean)
        self.weights.update(new)
        self.ema.update(new)
        line = self._line(phase, start, nodes, answered, dropped, sent, received, metrics.mean())
        if secure:
            line["secagg"] = self._secagg_summary(secure, clipped)
        return line

    # ------------------------------------------------------------------ SecAgg+ (strategies/secagg.py)

    def _exchange(self, nodes: list[int], kind: str, content: Callable[[int], RecordDict]):
        """One protocol stage: ``{node: protocol record}`` of the replies, ``{node: reason}`` of the silent/failed."""
        messages = [self._message(content(n), n, kind) for n in nodes]
        replies, lost = {}, {}
        # the sites answer these in milliseconds (no training): poll faster than a training round does
        trip = RoundTrip(self.grid, messages, self.s.round_timeout, min(self.s.poll, 0.05))
        for node, reply in trip:
            if reply.has_error() or RECORD_KEY not in reply.content:
                lost[node] = _reason(reply)
            else:
                replies[node] = reply.content[RECORD_KEY]
        for node in trip.missing:
            lost[node] = "missed the round deadline"
        return replies, lost

    def _secagg_open(self, phase: str, nodes: list[int], shapes: dict, dropped: dict) -> SecureSum:
        """Stages 1 and 2 of a secure round: public keys, then encrypted Shamir shares routed between the sites."""
        t0 = time.time()
        round_id = f"{phase}-{self.state.global_round + 1}-{secrets.token_hex(6)}"
        secure = SecureSum(SecAggParams.from_config(self.cfg, stats=phase == "latent-stats"), round_id, shapes)
        config = ConfigRecord({"phase": phase, "server-round": self.state.global_round + 1})
        request = secure.key_request()
        replies, lost = self._exchange(nodes, "query.secagg_keys",
                                       lambda n: RecordDict({"config": config, RECORD_KEY: request}))
        _take(replies, secure.add_keys, lost, dropped, "keys")
        self._secagg_enough(phase, len(secure.keys), len(nodes), 2, "sent public keys")
        try:
            request = secure.share_request()
        except SecAggError as exc:  # too many sites for the quantisation levels: fails every retry, then stops
            raise RoundFailed(str(exc)) from None
        replies, lost = self._exchange(sorted(secure.keys), "query.secagg_shares",
                                       lambda n: RecordDict({"config": config, RECORD_KEY: request}))
        _take(replies, secure.add_shares, lost, dropped, "shares")
        self._secagg_enough(phase, len(secure.sharers), len(nodes), secure.threshold, "shared their secrets")
        secure.seconds["keys+shares"] = round(time.time() - t0, 3)
        return secure

    def _secagg_close(self, phase: str, secure: SecureSum, answered: list[int], dropped: dict):
        """Stage 4: unmask the sum with the survivors' shares; the weighted mean of the updates."""
        self._log_dropped(phase, dropped)
        self._secagg_enough(phase, len(answered), len(secure.sharers), secure.threshold, "sent a masked update")
        t0 = time.time()
        request = secure.unmask_request()
        config = ConfigRecord({"phase": phase})
        replies, lost = self._exchange(secure.masked, "query.secagg_unmask",
                                       lambda n: RecordDict({"config": config, RECORD_KEY: request}))
        for node, reason in lost.items():
            self.emit(f"{phase} round {self.state.phase_round + 1}: site {node} sent no shares to unmask: {reason}")
        try:
            mean = secure.unmask(replies)
        except (SecAggError, KeyError, ValueError) as exc:
            raise RoundFailed(f"secure aggregation could not unmask the sum: {exc}") from None
        secure.seconds["unmask"] = round(time.time() - t0, 3)
        log.info("secure aggregation: sum of %d masked updates unmasked (%d dropout(s) unmasked, threshold %d, "
                 "quantisation error <= %.3g)", len(secure.masked), len(secure.unmasked_dropouts), secure.threshold,
                 secure.bound)
        return mean

    def _secagg_enough(self, phase: str, have: int, asked: int, threshold: int, what: str) -> None:
        need = max(self.s.min_sites, threshold, 2)  # a "sum" of one site is that site's update
        if have < need:
            raise RoundFailed(f"secure aggregation: {have} of {asked} sites {what}, {need} needed "
                              f"(min-sites={self.s.min_sites}, threshold={threshold})")

    @staticmethod
    def _secagg_summary(secure: SecureSum, clipped: dict[int, float]) -> dict:
        return {"round_id": secure.round_id, "threshold": secure.threshold, "sites_keyed": len(secure.keys),
                "sites_shared": len(secure.sharers), "sites_masked": len(secure.masked),
                "dropouts_unmasked": secure.unmasked_dropouts, "quantisation_bound": secure.bound,
                "clipped_fraction_max": max(clipped.values(), default=0.0), "seconds": secure.seconds}

    def _part(self, prefix: str) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.weights.items() if k.startswith(prefix)}

    def _schedulable(self, nodes: list[int]) -> list[int]:
        """Sites with privacy budget left; RoundFailed below min-sites."""
        nodes = self.privacy.schedulable(nodes)
        if len(nodes) < self.s.min_sites:
            raise RoundFailed(f"{len(nodes)} site(s) left with privacy budget, min-sites={self.s.min_sites}")
        return nodes

    def _stats_round(self) -> dict:
        start = time.time()
        nodes = self._schedulable(self._sites("unlabeled", self.s.min_sites))
        ae = self._part("autoencoder.")
        self.state.lae_digest = weights_digest(ae)
        dropped: dict = {}
        secure = self._secagg_open("latent-stats", nodes, STATS_SHAPES, dropped) if self.cfg.privacy.secagg else None
        record = to_record(ae)  # fp32: every site must hold the identical frozen encoder
        config = self._config("latent-stats")
        targets = secure.sharers if secure else nodes
        messages = []
        for n in targets:
            content = RecordDict({"autoencoder": record, "config": config})
            if secure:
                content[RECORD_KEY] = secure.forward(n, equal_weights=False)  # weighted by tiles, no central noise
            messages.append(self._message(content, n, "query.latent_stats"))
        sent = {n: record.count_bytes() for n in targets}
        del record
        parts, answered = [], []
        trip = RoundTrip(self.grid, messages, self.s.round_timeout, self.s.poll)
        del messages
        for node, reply in trip:
            try:
                if reply.has_error() or "metrics" not in reply.content:
                    raise RuntimeError(_reason(reply))
                m = reply.content["metrics"]
                if secure:
                    secure.add_masked(node, reply.content["arrays"])
                else:
                    parts.append(LatentStats(float(m["latent-sum"]), float(m["latent-sum-sq"]), int(m["latent-count"])))
            except (RuntimeError, KeyError) as exc:
                dropped[node] = str(exc)
                self.privacy.record_refusal(node, "latent-stats", self.state.global_round + 1, dropped[node])
                continue
            self.privacy.record(node, "latent-stats", self.state.global_round + 1, m)
            answered.append(node)
        for node in trip.missing:
            dropped[node] = "missed the round deadline"
        if secure:  # only the tile-weighted mean of the sites' latent moments is unmasked
            moments = self._secagg_close("latent-stats", secure, answered, dropped)
            tiles = sum(secure.weights[n] for n in secure.masked)
            parts = [LatentStats(float(moments["latent.mean"][0]) * tiles, float(moments["latent.meansq"][0]) * tiles,
                                 int(tiles))]
        else:
            self._log_dropped("latent-stats", dropped)
            if len(answered) < self.s.min_sites:
                raise RoundFailed(f"{len(answered)} of {len(nodes)} sites answered, min-sites={self.s.min_sites}")
        total = LatentStats.combine(parts)
        self.state.scale_factor = float(total.scale_factor)
        self.state.latent_stats = total.to_dict()
        self.state.has_lae = sorted(answered)
        line = self._line("latent-stats", start, nodes, answered, dropped, sent, {n: 0 for n in answered}, {})
        line.update(scale_factor=self.state.scale_factor, latent_mean=total.mean, latent_std=total.std)
        if secure:
            line["secagg"] = self._secagg_summary(secure, {})
        return line

    def _deliver_round(self) -> dict:
        start = time.time()
        nodes = self._sites("labeled", 1)
        ae = to_record(self._part("autoencoder."))
        unet = to_record(self._part("unet."))
        config = self._config("deliver")
        messages = [self._message(RecordDict({"autoencoder": ae, "unet": unet, "config": config}), n,
                                  "train.deliver") for n in nodes]
        sent = {n: ae.count_bytes() + unet.count_bytes() for n in nodes}
        del ae, unet
        answered, dropped, results = [], {}, {}
        trip = RoundTrip(self.grid, messages, self.s.round_timeout, self.s.poll)
        del messages
        for node, reply in trip:
            if reply.has_error() or "metrics" not in reply.content:
                dropped[node] = _reason(reply)
                continue
            results[str(node)] = dict(reply.content["metrics"])
            answered.append(node)
        for node in trip.missing:
            dropped[node] = "missed the round deadline"
        self._log_dropped("deliver", dropped)
        if not answered:
            raise RoundFailed(f"none of {len(nodes)} labeled site(s) took the global model")
        line = self._line("deliver", start, nodes, answered, dropped, sent, {n: 0 for n in answered}, {})
        line["labeled_sites"] = results
        return line

    # ------------------------------------------------------------------ reporting

    def _log_dropped(self, phase: str, dropped: dict) -> None:
        for node, reason in dropped.items():
            self.emit(f"{phase} round {self.state.phase_round + 1}: site {node} left out: {reason}")

    def _line(self, phase, start, nodes, answered, dropped, sent, received, losses) -> dict:
        return {
            "phase": phase, "round": self.state.phase_round + 1, "rounds": self.plan.rounds(phase),
            "global_round": self.state.global_round + 1, "sites_asked": len(nodes), "sites_answered": len(answered),
            "dropped": {str(k): v for k, v in dropped.items()}, "losses": losses,
            "bytes_sent": int(sum(sent.values())), "bytes_received": int(sum(received.values())),
            "bytes_sent_per_site": {str(k): int(v) for k, v in sent.items()},
            "bytes_received_per_site": {str(k): int(v) for k, v in received.items()},
            "seconds": round(time.time() - start, 3), "time": time.time(),
        }


def _take(replies: dict, add: Callable, lost: dict, dropped: dict, stage: str) -> None:
    """Feed a protocol stage's replies to ``add``; malformed ones and the silent sites land in ``dropped``."""
    for node, rec in replies.items():
        try:
            add(node, rec)
        except (KeyError, TypeError, ValueError, SecAggError) as exc:
            lost[node] = f"malformed {stage} ({exc})"
    dropped.update({n: f"secure aggregation, {stage}: {r}" for n, r in lost.items()})


def _reason(reply: Message) -> str:
    if reply.has_error():
        return f"error {reply.error.code}: {str(reply.error.reason).strip().splitlines()[-1] if reply.error.reason else ''}"
    return "reply without the expected records"


def progress_line(line: dict) -> str:
    losses = " ".join(f"{k}={v:.4g}" for k, v in line.get("losses", {}).items() if "seconds" not in k and k != "lr")
    extra = f" scale_factor={line['scale_factor']:.5g}" if "scale_factor" in line else ""
    spent = [s["epsilon"] for s in (line.get("privacy") or {}).values() if s.get("epsilon") is not None]
    if spent:
        extra += f" max-site-epsilon={max(spent):.3g}"
    if line.get("privacy_central"):
        extra += f" central-epsilon={line['privacy_central'].get('epsilon', 0.0):.3g}"
    return (f"[fed] {line['phase']} round {line['round']}/{line['rounds']} (global {line['global_round']}): "
            f"{line['sites_answered']}/{line['sites_asked']} sites{extra} {losses} | "
            f"sent {line['bytes_sent'] / MB:.2f} MB received {line['bytes_received'] / MB:.2f} MB | "
            f"{line['seconds']:.1f} s").replace("  ", " ")
