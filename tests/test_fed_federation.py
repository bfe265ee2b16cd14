"""The whole phase schedule in-process (real ClientApp handlers, no networking): dropouts, min-sites, resume,
and a 1-site federated run against the single-site run with the same seed and steps."""

import json

import numpy as np
import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity

from client import proximal
from client.client_app import app
from histodiff.config import compose
from strategies.checkpoint import read_metrics
from wire.contract import init_phase
from strategies.federation import Federation
from tests.inprocess_grid import InProcessGrid
from strategies.schedule import load_state

OVERRIDES = "weights.perceptual=random lae.perceptual_weight=0 tiles.batch_size=4 tiles.image_size=32"


@pytest.fixture(autouse=True)
def _identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def _run_config(tmp_path, **extra):
    rc = {"profile": "tiny", "overrides": OVERRIDES, "lae-rounds": 1, "dm-rounds": 1, "local-steps": 1,
          "min-sites": 2, "round-timeout": 300.0, "wait-timeout": 1.0, "poll": 0.05, "run-dir": str(tmp_path / "run"),
          "work-root": str(tmp_path / "sites"), "phantom-per-class": 1, "labeled-partitions": "3", "augment": False,
          "memorisation-samples": 4, "memorisation-ddim-steps": 4}
    rc.update(extra)
    return rc


def _federation(grid, rc, lines=None):
    return Federation.from_run_config(grid, rc, emit=(lines.append if lines is not None else print))


def test_full_schedule_with_a_failing_site(tmp_path):
    rc = _run_config(tmp_path, **{"transfer-dtype": "bf16", "server-ema": 0.5})
    grid = InProcessGrid(app, {10 + i: {"partition-id": i, "num-partitions": 4} for i in range(4)}, rc)
    grid.failing.add(12)  # errors on every message: left out, logged, the run goes on with the other two
    lines = []
    state = _federation(grid, rc, lines).run()
    assert state.status == "done" and state.scale_factor > 0
    metrics = read_metrics(tmp_path / "run")
    assert [m["phase"] for m in metrics] == ["lae", "latent-stats", "dm", "memorisation", "deliver"]
    assert all(m["sites_answered"] == 2 for m in metrics[:4]) and metrics[4]["sites_answered"] == 1
    assert metrics[3]["memorisation"]["verdict"] == "ok" and metrics[3]["memorisation"]["checked"] == 2
    # bf16 transfer: what a site sends is about half the fp32 model
    assert metrics[0]["bytes_received_per_site"]["10"] < 0.6 * metrics[1]["bytes_sent_per_site"]["10"] * 2
    info = json.loads((tmp_path / "run" / "global_model" / "model_info.json").read_text())
    assert info["scale_factor"] == pytest.approx(state.scale_factor)
    assert (tmp_path / "sites" / "site3" / "run" / "global_model" / "unet" / "config.json").is_file()
    assert any(line.startswith("[fed] dm round 1/1") for line in lines)
    # no message ever asked a labeled site to pre-train
    assert not any(m.metadata.dst_node_id == 13 and m.metadata.message_type.startswith("train.l") for m in grid.sent)


def test_below_min_sites_stops_cleanly_then_resumes(tmp_path):
    rc = _run_config(tmp_path, **{"lae-rounds": 2, "dm-rounds": 0, "deliver": False})
    grid = InProcessGrid(app, {10 + i: {"partition-id": i, "num-partitions": 3} for i in range(3)}, rc)
    lines = []

    def emit(line):
        lines.append(line)
        if line.startswith("[fed] lae round 1/2"):
            grid.offline.update({11, 12})  # two sites go away after the first round

    state = Federation.from_run_config(grid, rc, emit=emit).run()
    assert state.status == "stopped" and "1 unlabeled site(s) connected, 2 needed" in state.message
    assert any("FEDERATION STOPPED" in line and "--resume" in line for line in lines)
    saved = load_state(tmp_path / "run")
    assert saved.checkpoint == "checkpoints/round-0001" and saved.global_round == 1
    assert (tmp_path / "run" / saved.checkpoint / "autoencoder" / "config.json").is_file()

    grid.offline.clear()
    state = _federation(grid, dict(rc, resume=True), lines).run()
    assert state.status == "done"
    assert [m["phase"] for m in read_metrics(tmp_path / "run")] == ["lae", "lae", "latent-stats"]
    assert any(line.startswith("resumed") and "lae round 2" in line for line in lines)


def test_one_site_federated_equals_single_site_training(tmp_path):
    from histodiff.data.phantom_tissue import write_phantom_site
    from histodiff.data.tile_dataset import tile_dataset_from_config
    from histodiff.local_training.local_steps import train_lae_steps

    write_phantom_site(tmp_path / "root" / "site0", per_class=1, size=32, site=0, seed=0, labeled=False)
    rc = _run_config(tmp_path, **{"lae-rounds": 2, "dm-rounds": 0, "deliver": False, "min-sites": 1,
                                  "local-steps": 2, "sites-root": str(tmp_path / "root")})
    grid = InProcessGrid(app, {1: {"partition-id": 0, "num-partitions": 1}}, rc)
    fed = _federation(grid, rc)
    assert fed.run().status == "done"

    cfg = compose(["profile=tiny", *OVERRIDES.split(), f"data={tmp_path / 'root' / 'site0'}",
                   f"work_dir={tmp_path / 'central'}"])
    dataset = tile_dataset_from_config(cfg)
    weights = init_phase(cfg, "lae", 0)
    for _ in range(2):  # the same steps in two calls, as two rounds do
        weights = train_lae_steps(cfg, dataset, tmp_path / "central" / "lae", 2, init_weights=weights,
                                  progress=False).weights
    for k, v in weights.items():
        assert torch.allclose(fed.weights[k].float(), v.float(), atol=1e-5), k


def test_fedprox_term_runs_inside_local_training(tmp_path, monkeypatch):
    calls = []
    original = proximal.ProximalTerm.on_before_optimizer_step

    def spy(self, trainer, pl_module, optimizer):
        calls.append(self.mu)
        return original(self, trainer, pl_module, optimizer)

    monkeypatch.setattr(proximal.ProximalTerm, "on_before_optimizer_step", spy)
    rc = _run_config(tmp_path, **{"strategy": "fedprox", "proximal-mu": 0.01, "dm-rounds": 0, "deliver": False,
                                  "min-sites": 1})
    grid = InProcessGrid(app, {1: {"partition-id": 0, "num-partitions": 1}}, rc)
    assert _federation(grid, rc).run().status == "done"
    assert calls and set(calls) == {0.01}


def _ping_app():
    """A ClientApp that answers ``query.ping`` at once."""
    from flwr.app import Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    ping = ClientApp()

    @ping.query("ping")
    def _ping(message, context):
        return Message(RecordDict({"metrics": MetricRecord({"ok": 1})}), reply_to=message)

    return ping


def test_collect_says_which_sites_it_still_waits_for(monkeypatch):
    from flwr.app import ConfigRecord, Message, RecordDict

    import strategies.collect as collect_module

    ping = _ping_app()
    monkeypatch.setattr(collect_module, "WAIT_LOG_EVERY", 0.25)
    grid = InProcessGrid(ping, {n: {} for n in (1, 2, 3, 4)}, {})
    grid.silent.update({3, 4})  # these two never answer
    lines = []
    messages = [Message(RecordDict({"config": ConfigRecord({"phase": "ping"})}), n, "query.ping", group_id="7")
                for n in (1, 2, 3, 4)]
    got = collect_module.collect(grid, messages, 1.2, 0.05, lambda node, reply: 0, say=lines.append)
    assert sorted(got.answered) == [1, 2] and set(got.dropped) == {3, 4}
    assert 3 <= len(lines) <= 5, lines  # about every 0.25 s over 1.2 s
    first = lines[0]
    assert first.startswith("[fed] query.ping (global round 7): waiting for 2 of 4 site(s): 3, 4; since ")
    assert "deadline" in first and "(in 1 s)" in first or "(in 0 s)" in first
    # the default interval is long: nothing is said during a short collection
    monkeypatch.undo()
    quiet = []
    collect_module.collect(grid, [Message(RecordDict({"config": ConfigRecord({})}), 3, "query.ping")], 0.3, 0.05,
                           lambda node, reply: 0, say=quiet.append)
    assert quiet == [] and collect_module.WAIT_LOG_EVERY == 30.0


def test_a_round_says_what_it_waits_for_and_writes_tensorboard(tmp_path, monkeypatch):
    import strategies.collect as collect_module

    class QuietInTraining(InProcessGrid):  # site 12 tells its role, then never sends its update
        def push_messages(self, messages):
            messages = list(messages)
            if any(m.metadata.message_type == "train.lae" for m in messages):
                self.silent.add(12)
            return super().push_messages(messages)

    monkeypatch.setattr(collect_module, "WAIT_LOG_EVERY", 0.2)
    rc = _run_config(tmp_path, **{"dm-rounds": 0, "deliver": False, "round-timeout": 1.0, "wait-timeout": 60.0})
    grid = QuietInTraining(app, {10 + i: {"partition-id": i, "num-partitions": 3} for i in range(3)}, rc)
    lines = []
    assert _federation(grid, rc, lines).run().status == "done", lines
    waiting = [x for x in lines if "waiting for" in x]
    assert waiting and waiting[0].startswith("[fed] train.lae (global round 1): waiting for 1 of 3 site(s): 12; since")
    lae = read_metrics(tmp_path / "run")[0]
    assert lae["dropped"] == {"12": "missed the round deadline"}
    assert set(lae["losses_per_site"]) == {"10", "11"} and "rec" in lae["losses_per_site"]["10"]
    assert set(lae["stages"]) == {"prepare", "sites", "aggregate", "checkpoint"}
    events = list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and json.loads((tmp_path / "run" / "tensorboard" / "rounds_written.json").read_text()) == \
        {"last_global_round": 2}  # the LAE round and the latent-statistics round


class _CountingGrid(InProcessGrid):
    """Records the most messages out (pushed, not yet answered) at any time, of the kinds ``counted`` starts with
    (the sites' role queries at the start are light and always go out at once)."""

    most_out = 0
    counted = ("train.", "query.latent_stats", "query.ping")

    def push_messages(self, messages):
        ids = super().push_messages(messages)
        out = sum(m.metadata.message_type.startswith(self.counted) for m in self._pending.values())
        self.most_out = max(self.most_out, out)
        return ids


def test_max_parallel_sites_trains_in_waves_to_the_same_global_model(tmp_path):
    results = {}
    for parallel in (0, 1):
        rc = _run_config(tmp_path / str(parallel), **{"dm-rounds": 0, "deliver": False, "min-sites": 3,
                                                      "memorisation-samples": 0, "max-parallel-sites": parallel})
        grid = _CountingGrid(app, {10 + i: {"partition-id": i, "num-partitions": 3} for i in range(3)}, rc)
        fed = _federation(grid, rc)
        assert fed.run().status == "done"
        results[parallel] = (grid.most_out, {k: v.clone() for k, v in fed.weights.items()},
                             read_metrics(tmp_path / str(parallel) / "run"))
    assert results[0][0] == 3 and results[1][0] == 1  # all at once, then one site at a time
    for k, v in results[0][1].items():
        assert torch.equal(v, results[1][1][k]), k  # the same updates, added in the same order
    assert [m["sites_answered"] for m in results[1][2]] == [3, 3]  # the LAE round and the latent statistics
    # the queued sites' messages were built at their turn (Later) and their bytes are counted the same
    assert results[0][2][0]["bytes_sent_per_site"] == results[1][2][0]["bytes_sent_per_site"]


def test_waves_build_a_queued_message_after_the_previous_reply_is_taken():
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

    import strategies.collect as collect_module
    from strategies.rounds import Later, array_bytes

    grid = _CountingGrid(_ping_app(), {n: {} for n in (1, 2, 3)}, {})
    events = []

    def message(node):
        content = RecordDict({"config": ConfigRecord({}), "arrays": ArrayRecord({"w": Array(np.zeros(10, np.float32))})})
        return Message(content, node, "query.ping")

    def later(node):
        def build():
            events.append(f"build {node}")
            return message(node)
        return Later(node, "query.ping", "", build)

    def take(node, reply):
        events.append(f"take {node}")
        return 0

    got = collect_module.collect(grid, [message(1), later(2), later(3)], 30.0, 0.01, take, parallel=1)
    assert got.answered == [1, 2, 3] and grid.most_out == 1
    assert events == ["take 1", "build 2", "take 2", "build 3", "take 3"]  # never a reply and a push together
    assert got.sent == {n: array_bytes(message(n)) for n in (1, 2, 3)} and got.sent[3] > 0  # built ones counted


def test_waves_keep_the_round_deadline_and_name_the_sites_never_sent(monkeypatch):
    from flwr.app import ConfigRecord, Message, RecordDict

    import strategies.collect as collect_module

    ping = _ping_app()
    monkeypatch.setattr(collect_module, "WAIT_LOG_EVERY", 0.2)
    grid = _CountingGrid(ping, {n: {} for n in (1, 2, 3, 4)}, {})
    grid.silent.add(2)  # holds its slot until the deadline: 3 and 4 are never sent
    lines = []
    messages = [Message(RecordDict({"config": ConfigRecord({})}), n, "query.ping") for n in (1, 2, 3, 4)]
    got = collect_module.collect(grid, messages, 0.8, 0.05, lambda node, reply: 0, say=lines.append, parallel=1)
    assert got.answered == [1] and set(got.dropped) == {2, 3, 4} and grid.most_out == 1
    assert [m.metadata.dst_node_id for m in grid.sent] == [1, 2]
    assert any("waiting for 1 of 4 site(s): 2 (and 2 not sent yet: max-parallel-sites)" in x for x in lines), lines
