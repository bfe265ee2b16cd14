"""The federated pre-training run: phases lae -> latent-stats -> dm -> memorisation -> deliver, each round with a
deadline and min-sites, streaming aggregation of the sites' updates, a checkpoint after every round, resume.

Helpers: ``collect`` (send, collect, note dropped sites), ``secure_rounds`` (SecAgg+ stages), ``memorisation``
(the check at the sites that trained the DM), ``delivery`` (the labeled sites' pipelines), ``report`` (metrics
lines), ``board`` (TensorBoard event files), ``wire.downlink`` (what the sites hold).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Callable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.exception import PrivacyBudgetExhausted as CentralBudgetExhausted

from histodiff.diffusion.latent_stats import LatentStats
from strategies import checkpoint as ckpt
from strategies import validate
from strategies.aggregate import MetricMean, build_aggregator
from strategies.board import RunBoard
from strategies.collect import Collected, RoundFailed, collect
from strategies.privacy_ledger import CentralDP, PrivacyLedger, without_privacy_metrics
from strategies.report import progress_line, round_line
from strategies.rounds import Later
from strategies.schedule import Plan, ServerState, advance, load_state, save_state, start_state
from strategies.secure_rounds import SecureRounds, summary
from strategies.server_opt import ServerEMA, build_server_optimizer
from wire import contract
from wire.codec import to_record, weights_digest
from wire.contract import ARRAYS_KEY, AUTOENCODER_KEY, CONFIG_KEY
from wire.downlink import Broadcast
from wire.secagg import RECORD_KEY, STATS_SHAPES
from wire.settings import Settings

log = logging.getLogger("histodiff.fed")
__all__ = ["Federation", "FederationStopped", "RoundFailed", "progress_line"]


class FederationStopped(RuntimeError):
    """The run stopped before its end; the last checkpoint is intact."""


class Federation:
    def __init__(self, grid: Grid, settings: Settings, cfg, emit: Callable[[str], None] | None = None):
        self.grid, self.s, self.cfg = grid, settings, cfg
        self.run_dir = Path(settings.run_dir)
        self.plan = Plan(settings.lae_rounds, settings.dm_rounds, settings.deliver, settings.memorisation_samples > 0)
        self.emit = emit or (lambda line: log.info(line))
        self.weights: dict[str, torch.Tensor] = {}  # the exact fp32 global model, every phase's arrays
        self.broadcast = {phase: Broadcast(settings.transfer_dtype) for phase in contract.TRAINING_PHASES}
        self.state: ServerState = start_state(self.plan)
        self.ema_rule = settings.ema_rule(cfg.dm.ema_decay)
        self.opt, self.ema = build_server_optimizer("fedavg"), ServerEMA(0.0)
        # each site's reported epsilon per round, refusals, exhausted sites; central DP's server-side accountant
        self.privacy = PrivacyLedger(self.run_dir)
        self.central = (CentralDP.from_config(cfg, population_size=settings.dp_population)
                        if cfg.privacy.dp and cfg.privacy.mode == "central" else None)
        self.secure = SecureRounds(grid, settings, cfg, self._message, self.emit)
        self.board = RunBoard(self.run_dir)  # TensorBoard, <run_dir>/tensorboard/: one step per committed round

    @classmethod
    def from_run_config(cls, grid: Grid, run_config, emit: Callable[[str], None] | None = None) -> "Federation":
        """The federation a run config describes (typed settings, composed and checked model config)."""
        settings = Settings.from_run_config(run_config)
        return cls(grid, settings, settings.compose(), emit)

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> ServerState:
        try:
            return self._run()
        finally:
            self.board.close()

    def _run(self) -> ServerState:
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
        flagged = self.state.memorisation.get("flagged_sites") or []
        self.emit(f"federated run done: {self.run_dir}" + (f" (MEMORISATION FLAGGED at site(s) {', '.join(flagged)}: "
                                                         "see privacy.md)" if flagged else ""))
        return self.state

    def _privacy_report(self) -> None:
        from server.privacy_report import write_privacy_report

        try:
            json_path, md_path = write_privacy_report(self.run_dir, self.cfg)
        except Exception as exc:  # noqa: BLE001 - the report never breaks a finished run
            log.warning("privacy report not written: %s", exc)
            return
        self.emit(f"privacy report: {json_path} {md_path}")

    def _stop(self, reason_text: str) -> ServerState:
        self.state.status, self.state.message = "stopped", reason_text
        save_state(self.run_dir, self.state)  # same checkpoint pointer: the last round stays intact
        self.privacy.save()  # refusals and spend of the failed round too: the sites did spend it
        self._privacy_report()
        self.emit(f"FEDERATION STOPPED in phase {self.state.phase} after {self.state.global_round} rounds: "
                  f"{reason_text}. Last checkpoint: {self.run_dir / (self.state.checkpoint or '-')}; "
                  f"continue with `python -m server.run --resume {self.run_dir}`")
        return self.state

    def _load_or_init(self) -> None:
        previous = load_state(self.run_dir)
        if self.s.resume and previous is not None and previous.checkpoint:
            self.state = previous
            self.state.status, self.state.message = ("running", "") if previous.phase != "done" else ("done", "")
            self.weights, strategy_state = ckpt.load_round(self.run_dir, previous.checkpoint)
            self._new_phase_strategy()
            self.opt.load_state_dict(strategy_state)
            self.ema.load_state_dict(strategy_state)
            for phase, down in self.broadcast.items():
                down.load_state_dict(strategy_state, f"held/{phase}/")
            if self.central and self.privacy.central:
                self.central.load_state_dict(self.privacy.central.get("state", {}))
            self.emit(f"resumed {self.run_dir} at {self.state.phase} round {self.state.phase_round + 1} "
                      f"(global round {self.state.global_round + 1})")
            return
        if previous is not None and previous.global_round > 0 and not self.s.resume:
            raise FederationStopped(f"{self.run_dir} already holds a run; pass resume=true or use a new run-dir")
        self.state = start_state(self.plan)  # also a resume of a run that stopped before its first checkpoint
        self.privacy.sites, self.privacy.central = {}, {}  # a leftover ledger of a run that never committed
        self.weights = contract.init_phase(self.cfg, "lae", self.s.seed)
        self._new_phase_strategy()

    def _new_phase_strategy(self) -> None:
        s = self.s
        self.opt = build_server_optimizer(s.strategy, s.server_lr, s.server_beta1, s.server_beta2, s.server_tau)
        # the delivered and exported UNet is an EMA (as in the paper and the single-site path); the LAE is not
        self.ema = ServerEMA(*self.ema_rule) if self.state.phase == "dm" else ServerEMA(0.0)

    def _commit(self, line: dict) -> None:
        saving = time.time()
        finished_phase = self.state.phase
        advance(self.state, self.plan)
        if self.state.phase != finished_phase:
            if finished_phase in contract.PHASE_PARTS:  # the phase's final global model is its EMA when kept
                self.weights.update(self.ema.weights(contract.pick(self.weights, finished_phase)))
            self._new_phase_strategy()
        strategy_state = {**self.opt.state_dict(), **self.ema.state_dict()}
        for phase, down in self.broadcast.items():
            strategy_state.update(down.state_dict(f"held/{phase}/"))
        rel = ckpt.save_round(self.run_dir, f"round-{self.state.global_round:04d}", self.cfg, self.weights,
                              strategy_state)
        if finished_phase == "dm":
            ckpt.export_model(self.run_dir, self.cfg, self.weights, self.state.scale_factor)
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
        line.setdefault("stages", {})["checkpoint"] = round(time.time() - saving, 3)
        ckpt.append_metrics(self.run_dir, line)
        self.board.round(line)  # after the line: a crash in between is caught up on resume
        self.emit(progress_line(line))

    # ------------------------------------------------------------------ sites and messages

    def _sites(self, role: str, needed: int) -> list[int]:
        """Connected nodes with ``role``; asks new nodes for their role first. Raises RoundFailed below ``needed``."""
        nodes = sorted(int(n) for n in self.grid.get_node_ids())
        unknown = [n for n in nodes if str(n) not in self.state.roles]
        if unknown:
            def take(node, reply):
                m = validate.metrics_of(reply.content)
                self.state.roles[str(node)] = "labeled" if int(m["labeled"]) else "unlabeled"
                if "tiles" in m:  # the most num-examples this site may ever claim
                    self.state.declared[str(node)] = int(validate.num_examples({"num-examples": m["tiles"]}, None,
                                                                                self.s.max_examples))

            got = collect(self.grid, [Message(RecordDict({CONFIG_KEY: ConfigRecord({"phase": "role"})}), n,
                                              "query.role", ttl=self.s.round_timeout + 60) for n in unknown],
                          min(self.s.round_timeout, 120.0), self.s.poll, take, say=self.emit)
            for node, why in got.dropped.items():
                log.warning("node %s did not tell its role: %s", node, why)
        chosen = [n for n in nodes if self.state.roles.get(str(n)) == role]
        if len(chosen) < needed:
            raise RoundFailed(f"only {len(chosen)} {role} site(s) connected, {needed} needed")
        return chosen

    def _schedulable(self, nodes: list[int]) -> list[int]:
        """Sites with privacy budget left; RoundFailed below min-sites."""
        nodes = self.privacy.schedulable(nodes)
        if len(nodes) < self.s.min_sites:
            raise RoundFailed(f"{len(nodes)} site(s) left with privacy budget, min-sites={self.s.min_sites}")
        return nodes

    def _message(self, content: RecordDict, node: int, kind: str) -> Message:
        return Message(content, node, kind, ttl=self.s.round_timeout + 60, group_id=str(self.state.global_round + 1))

    def _config(self, phase: str, **extra) -> ConfigRecord:
        values = {"phase": phase, "server-round": self.state.global_round + 1,
                  "transfer-dtype": self.s.transfer_dtype, **extra}
        if phase in contract.PHASE_PARTS:
            values["local-steps"] = self.s.steps(phase)
            values["proximal-mu"] = self.s.proximal_mu if self.s.strategy == "fedprox" else 0.0
            if self.central:
                values.update(self.central.config_values())  # the clipping norm, under Flower's key
        if self.state.scale_factor is not None:
            values["scale-factor"] = float(self.state.scale_factor)
        if self.state.lae_digest:
            values["lae-digest"] = self.state.lae_digest
        return ConfigRecord(values)

    def _autoencoder(self) -> dict[str, torch.Tensor]:
        """The global autoencoder's flat arrays (without the discriminator): frozen after the LAE phase."""
        return {k: v for k, v in self.weights.items() if k.startswith("autoencoder.")}

    def _line(self, phase: str, start: float, got: Collected, losses: dict, stages: dict | None = None,
              per_site: dict | None = None) -> dict:
        return round_line(phase, self.state.phase_round + 1, self.plan.rounds(phase), self.state.global_round + 1,
                          start, got, losses, stages=stages, per_site=per_site)

    @staticmethod
    def _stages(start: float, collecting: float, aggregating: float) -> dict:
        """Seconds per stage of a round: building the messages (SecAgg+ keys and shares included), the sites
        (push to last reply: their training and the transfers), aggregation (SecAgg+ unmasking included)."""
        return {"prepare": collecting - start, "sites": aggregating - collecting, "aggregate": time.time() - aggregating}

    def _log_dropped(self, phase: str, dropped: dict) -> None:
        for node, why in dropped.items():
            self.emit(f"{phase} round {self.state.phase_round + 1}: site {node} left out: {why}")

    # ------------------------------------------------------------------ rounds

    def _round(self) -> dict:
        phase = self.state.phase
        if phase in contract.PHASE_PARTS:
            return self._train_round(phase)
        if phase == "latent-stats":
            return self._stats_round()
        if phase == "memorisation":
            from strategies.memorisation_round import memorisation_round

            return memorisation_round(self)
        if phase == "deliver":
            from strategies.delivery import deliver_round

            return deliver_round(self)
        raise RuntimeError(f"unknown phase {phase}")

    def _train_round(self, phase: str) -> dict:
        start = time.time()
        if not contract.pick(self.weights, phase):
            self.weights.update(contract.init_phase(self.cfg, phase, self.s.seed))
        nodes = self._schedulable(self._sites("unlabeled", self.s.min_sites))
        if self.central:
            self.central.check_budget(len(nodes))  # raises CentralBudgetExhausted: the run stops, checkpoint intact
        current = contract.pick(self.weights, phase)
        down = self.broadcast[phase]
        base = down.prepare(current)  # what every site will start from
        dropped: dict = {}
        secure = None
        if self.cfg.privacy.secagg:  # stages 1-2: keys and encrypted shares; the sites that finish them train
            floating = {k: tuple(v.shape) for k, v in base.items() if v.is_floating_point()}
            secure = self.secure.open(phase, self.state.global_round + 1, nodes, floating, dropped)
        kind, parallel = f"train.{phase}", 0 if secure else self.s.max_parallel_sites

        def build(node: int, ae: ArrayRecord | None = None) -> Message:
            arrays, downlink = down.record_for(node)
            content = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: self._config(phase, **downlink)})
            if phase == "dm" and node not in self.state.has_lae:  # the frozen encoder, once per site
                content[AUTOENCODER_KEY] = ae if ae is not None else to_record(self._autoencoder())
            if secure:
                content[RECORD_KEY] = secure.forward(node, equal_weights=self.central is not None)
            return self._message(content, node, kind)

        def build_later(node: int) -> Message:
            message = build(node)
            down.release()  # this site's encoded copy lives until it is pushed
            return message

        ae_record = to_record(self._autoencoder()) if phase == "dm" else None  # one, shared by the messages built now
        messages: list = []
        for i, node in enumerate(secure.sharers if secure else nodes):
            if parallel and i >= parallel and not down.lossy:
                # sites in waves with the whole fp32 model: a queued site's message is encoded at its turn, not
                # held through the earlier waves (a lossy dtype's delta is one record shared by all: built now)
                messages.append(Later(node, kind, str(self.state.global_round + 1), lambda n=node: build_later(n)))
            else:
                messages.append(build(node, ae_record))
        del ae_record
        down.release()  # the messages hold the encoded model now; it is gone once they are pushed
        acc = None if secure else build_aggregator(self.s.aggregator, {k: tuple(v.shape) for k, v in base.items()},
                                                   self.s.trim_fraction)
        expected = {k: (tuple(v.shape), v.is_floating_point()) for k, v in base.items()}
        guard = validate.NormGuard(self.s.norm_bound, self.s.norm_action, self.state.norm_reference.get(phase))
        metrics, clipped, per_site = MetricMean(), {}, {}

        def take(node: int, reply: Message) -> int:
            # the whole reply is checked before any of it reaches the aggregate
            m = validate.metrics_of(reply.content)
            n = validate.num_examples(m, self.state.declared.get(str(node)), self.s.max_examples)
            arrays = reply.content[ARRAYS_KEY]
            count, nbytes = len(arrays), arrays.count_bytes()
            if secure:
                secure.add_masked(node, arrays)  # only the masked upload; its weight is inside it
                clipped[node] = float(m.get("secagg-clipped", 0.0))
            else:
                # each received array is dropped as it is decoded: the reply is never whole twice in memory
                update, _ = guard.check(validate.update_of(reply.content, expected, consume=True))
                acc.add_tensors(update, 1.0 if self.central else n)  # central DP: equal weights bound the sensitivity
            shown = {k: v for k, v in without_privacy_metrics(m).items()
                     if k not in ("num-examples", "step", "secagg-clipped")}
            metrics.add({k: v for k, v in shown.items() if not k.startswith("clock-")}, n)  # clock times: per site only
            per_site[node] = {k: float(v) for k, v in shown.items()}
            self.privacy.record(node, phase, self.state.global_round + 1, m, count, nbytes)
            if phase == "dm" and node not in self.state.has_lae:
                self.state.has_lae.append(node)
            return nbytes

        def refused(node: int, why: str) -> None:
            self.privacy.record_refusal(node, phase, self.state.global_round + 1, why)
            if phase == "dm" and node in self.state.has_lae and "global autoencoder" in why:
                self.state.has_lae.remove(node)  # resend the encoder next time

        collecting = time.time()
        got = collect(self.grid, messages, self.s.round_timeout, self.s.poll, take, refused, say=self.emit,
                      parallel=parallel)
        aggregating = time.time()
        got.dropped.update(dropped)
        self._log_dropped(phase, got.dropped)
        if secure:  # stage 4: the survivors' shares remove the masks; only the weighted mean update appears
            update = self.secure.close(phase, secure, got.answered)
        else:
            got.require(self.s.min_sites)
            update = acc.mean(in_place=True)
            del acc
        if self.central:
            # SecAgg+ rounds each clipped update value stochastically (< 1 step): its L2 norm may pass C by
            # step * sqrt(values); the noise is scaled to cover that
            slack = secure.params.step * sum(v.numel() for v in update.values()) ** 0.5 if secure else 0.0
            update = self.central.privatize(update, [1.0] * len(got.answered), sensitivity_slack=slack)
        new = self.opt.step_consuming(current, update)
        self.weights.update(new)
        self.ema.update(new)
        down.confirm(got.answered)
        if guard.norms:
            self.state.norm_reference[phase] = guard.next_reference()
        per_site = {n: v for n, v in per_site.items() if n in got.answered}
        line = self._line(phase, start, got, metrics.mean(), self._stages(start, collecting, aggregating), per_site)
        if secure:
            line["secagg"] = summary(secure, clipped)
        return line

    def _stats_round(self) -> dict:
        start = time.time()
        nodes = self._schedulable(self._sites("unlabeled", self.s.min_sites))
        ae = self._autoencoder()
        self.state.lae_digest = weights_digest(ae)
        dropped: dict = {}
        secure = (self.secure.open("latent-stats", self.state.global_round + 1, nodes, STATS_SHAPES, dropped)
                  if self.cfg.privacy.secagg else None)
        record = to_record(ae)  # fp32: every site must hold the identical frozen encoder
        messages = []
        for n in (secure.sharers if secure else nodes):
            content = RecordDict({AUTOENCODER_KEY: record, CONFIG_KEY: self._config("latent-stats")})
            if secure:
                content[RECORD_KEY] = secure.forward(n, equal_weights=False)  # weighted by tiles, no central noise
            messages.append(self._message(content, n, "query.latent_stats"))
        del record
        parts = []

        lae = self.cfg.lae
        latent_values = lae.latent_channels * (self.cfg.tiles.image_size // 2 ** (len(lae.block_out_channels) - 1)) ** 2

        def take(node: int, reply: Message) -> int:
            m = validate.metrics_of(reply.content)
            if secure:
                validate.num_examples(m, self.state.declared.get(str(node)), self.s.max_examples)
                secure.add_masked(node, reply.content[ARRAYS_KEY])
            else:
                parts.append(LatentStats(*validate.latent_stats(m, self.state.declared.get(str(node)),
                                                                self.s.max_examples, latent_values)))
            self.privacy.record(node, "latent-stats", self.state.global_round + 1, m)
            return 0

        collecting = time.time()
        got = collect(self.grid, messages, self.s.round_timeout, self.s.poll, take,
                      lambda node, why: self.privacy.record_refusal(node, "latent-stats",
                                                                    self.state.global_round + 1, why), say=self.emit,
                      parallel=0 if secure else self.s.max_parallel_sites)
        aggregating = time.time()
        got.dropped.update(dropped)
        self._log_dropped("latent-stats", got.dropped)
        if secure:  # only the tile-weighted mean of the sites' latent moments is unmasked
            moments = self.secure.close("latent-stats", secure, got.answered)
            tiles = sum(secure.weights[n] for n in secure.masked)
            parts = [LatentStats(float(moments["latent.mean"][0]) * tiles, float(moments["latent.meansq"][0]) * tiles,
                                 int(tiles))]
        else:
            got.require(self.s.min_sites)
        total = LatentStats.combine(parts)
        try:
            scale = total.scale_factor
        except ValueError as exc:
            raise RoundFailed(str(exc)) from None
        if not (math.isfinite(scale) and scale > 0):
            raise RoundFailed(f"the latent statistics give scale_factor {scale}; not used")
        self.state.scale_factor = float(total.scale_factor)
        self.state.latent_stats = total.to_dict()
        self.state.has_lae = sorted(got.answered)
        line = self._line("latent-stats", start, got, {}, self._stages(start, collecting, aggregating))
        line.update(scale_factor=self.state.scale_factor, latent_mean=total.mean, latent_std=total.std)
        if secure:
            line["secagg"] = summary(secure, {})
        return line

