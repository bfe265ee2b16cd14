"""Privacy in the federation, in-process (real ClientApp handlers, no networking): local DP-SGD epsilon per site
per round in the ledger, metrics and report; exhausted sites are refused and no longer scheduled; central DP
adds server noise to the clipped, equally weighted mean."""

import json

import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity

from client.client_app import app
from client.task import site_from_context
from histodiff.privacy import SiteAccountant
from wire.codec import from_record
from strategies.checkpoint import read_metrics
from strategies.federation import Federation
from tests.inprocess_grid import InProcessGrid
from strategies.privacy_ledger import LEDGER_FILE
from strategies.schedule import load_state
from wire.settings import Settings

BASE = "weights.perceptual=random lae.perceptual_weight=0 tiles.batch_size=4 tiles.image_size=32"
# latent_clip=1: the DP noise of the latent statistics (drawn from the OS, not the seed) stays well below the
# moments of 9 tiles per site, so the noised variance is positive in every run
LOCAL = f"{BASE} privacy.dp=true privacy.noise_multiplier=0.8 privacy.target_epsilon=1000 privacy.latent_clip=1"


@pytest.fixture(autouse=True)
def _identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def _run_config(tmp_path, overrides, **extra):
    rc = {"profile": "tiny", "overrides": overrides, "lae-rounds": 2, "dm-rounds": 0, "local-steps": 1,
          "min-sites": 2, "round-timeout": 300.0, "wait-timeout": 1.0, "poll": 0.05, "run-dir": str(tmp_path / "run"),
          "work-root": str(tmp_path / "run" / "sites"), "phantom-per-class": 1, "labeled-partitions": "", "augment": False,
          "deliver": False}
    rc.update(extra)
    return rc


def _federation(grid, rc, emit=None):
    return Federation.from_run_config(grid, rc, emit=emit or (lambda line: None))


def _grid(rc, n, cls=InProcessGrid):
    return cls(app, {10 + i: {"partition-id": i, "num-partitions": n} for i in range(n)}, rc)


def _spend_budget(rc, node_config):
    """Make a site's persisted accountant hold far more than its budget (what many earlier rounds would leave)."""
    state = site_from_context(node_config, rc).state
    acc = SiteAccountant.load_or_create(state, 1000.0, 1e-5)
    acc.noise_multiplier = acc.noise_multiplier or 0.8
    acc.sample_rate = acc.sample_rate or 0.5
    acc.history.append([0.05, 1.0, 50])
    acc.save()
    assert acc.epsilon() > 1000


def test_settings_plan_steps_and_guard_central_dtype():
    s = Settings(overrides="privacy.dp=true privacy.target_epsilon=8", lae_rounds=3, dm_rounds=2, local_steps=5)
    assert "privacy.planned_steps=26" in s.config_overrides()
    assert Settings(overrides="privacy.dp=true privacy.planned_steps=7").privacy_overrides() == []
    site = Settings.from_run_config({"overrides": "privacy.dp=true", "lae-rounds": 1, "dm-rounds": 1, "local-steps": 4})
    assert site.compose().privacy.planned_steps == 9  # what every site composes: the whole schedule's steps
    own = Settings.from_run_config({"overrides": "privacy.dp=true", "lae-rounds": 1, "dm-rounds": 1,
                                    "lae-local-steps": 2, "dm-local-steps": 5})
    assert own.planned_dp_steps() == 1 * 2 + 1 * 5 + 1
    with pytest.raises(ValueError, match="transfer-dtype fp32"):
        Settings(overrides="privacy.dp=true privacy.mode=central privacy.noise_multiplier=1.0",
                 transfer_dtype="bf16").compose()
    with pytest.raises(ValueError, match="fedprox"):
        Settings(overrides="privacy.dp=true", strategy="fedprox", proximal_mu=0.1).compose()


def test_local_dp_epsilon_per_site_per_round_and_report(tmp_path):
    rc = _run_config(tmp_path, LOCAL)
    lines = []
    state = _federation(_grid(rc, 2), rc, lines.append).run()
    assert state.status == "done"
    run = tmp_path / "run"
    ledger = json.loads((run / LEDGER_FILE).read_text())["sites"]
    assert set(ledger) == {"10", "11"}
    for node, site in ledger.items():
        assert [r["phase"] for r in site["rounds"]] == ["lae", "lae", "latent-stats"]
        eps = [r["epsilon"] for r in site["rounds"]]
        assert 0 < eps[0] < eps[1] < eps[2] < 1000, (node, eps)
        assert site["rounds"][0]["arrays"] > 0 and site["rounds"][0]["bytes"] > 0
        assert not site["exhausted"]
    metrics = read_metrics(run)
    assert [m["phase"] for m in metrics] == ["lae", "lae", "latent-stats"]
    for node in ("10", "11"):
        per_round = [m["privacy"][node]["epsilon"] for m in metrics]
        assert per_round == sorted(per_round) and per_round[0] < per_round[-1]
    assert not any(k.startswith("dp-") for m in metrics for k in m["losses"])  # epsilon is never averaged
    assert any("max-site-epsilon=" in line for line in lines)
    report = json.loads((run / "privacy.json").read_text())
    assert report["mechanism"].startswith("local DP-SGD") and set(report["server_ledger"]) == {"10", "11"}
    assert set(report["sites"]) == {"site0", "site1"}  # the sites' own accountants under run/sites
    md = (run / "privacy.md").read_text()
    assert "## Privacy" in md and "Epsilon per round" in md and "lae1" in md


def test_exhausted_site_is_refused_then_not_scheduled_and_run_stops_intact(tmp_path):
    rc = _run_config(tmp_path, LOCAL, **{"lae-rounds": 3})
    grid = _grid(rc, 3)
    _spend_budget(rc, grid.contexts[12].node_config)  # site 12 arrives with its budget already spent
    lines = []

    def emit(line):
        lines.append(line)
        if line.startswith("[fed] lae round 2/3"):
            _spend_budget(rc, grid.contexts[11].node_config)  # site 11 runs out after round 2

    state = _federation(grid, rc, emit).run()
    # round 1: 12 refuses (error reply, one line), 10 and 11 go on; round 2: 12 is not asked any more;
    # round 3: 11 refuses, 1 site left < min-sites=2: the run stops with the round-2 checkpoint intact
    trains = [(m.metadata.group_id, m.metadata.dst_node_id) for m in grid.sent if m.metadata.message_type == "train.lae"]
    assert ("1", 12) in trains and ("2", 12) not in trains and ("3", 12) not in trains
    assert state.status == "stopped" and "left with privacy budget" in state.message
    assert any("site 12 left out" in line and "privacy budget exhausted" in line for line in lines)
    saved = load_state(tmp_path / "run")
    assert saved.checkpoint == "checkpoints/round-0002" and saved.global_round == 2
    assert (tmp_path / "run" / saved.checkpoint / "autoencoder" / "config.json").is_file()
    ledger = json.loads((tmp_path / "run" / LEDGER_FILE).read_text())["sites"]
    assert ledger["12"]["exhausted"] and ledger["11"]["exhausted"] and not ledger["10"]["exhausted"]
    assert "refused" in ledger["12"]["rounds"][0]
    assert [m["sites_answered"] for m in read_metrics(tmp_path / "run")] == [2, 2]
    assert (tmp_path / "run" / "privacy.json").is_file()


class RecordingGrid(InProcessGrid):
    """Keeps every reply, to recompute the plain mean of what the sites sent."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.replies = []

    def pull_messages(self, message_ids):
        replies = list(super().pull_messages(message_ids))
        for r in replies:  # decoded now: the server consumes a reply's arrays as it decodes them
            arrays = from_record(r.content["arrays"]) if not r.has_error() and "arrays" in r.content else None
            self.replies.append((r, arrays))
        return replies


def test_central_dp_clips_at_sites_and_noises_the_mean(tmp_path):
    overrides = f"{BASE} privacy.dp=true privacy.mode=central privacy.noise_multiplier=1.0 privacy.max_grad_norm=1.0"
    rc = _run_config(tmp_path, overrides, **{"lae-rounds": 1})
    grid = _grid(rc, 2, RecordingGrid)
    fed = _federation(grid, rc)
    assert fed.run().status == "done"
    recorded = [(r, a) for r, a in grid.replies if r.metadata.message_type == "train.lae"]
    replies = [r for r, _ in recorded]
    assert len(replies) == 2 and not any(r.has_error() for r in replies)
    sent = [a for _, a in recorded]
    for r in replies:
        m = r.content["metrics"]
        assert m["dp-clipping-norm"] == 1.0 and "dp-update-norm" in m
    plain = {k: (sent[0][k].float() + sent[1][k].float()) / 2 for k in sent[0] if sent[0][k].is_floating_point()}
    diff = torch.cat([(fed.weights[k].float() - v).flatten() for k, v in plain.items()])
    # Gaussian noise of std sigma * C / n = 0.5 on every floating value of the equally weighted mean
    assert diff.std().item() == pytest.approx(0.5, rel=0.05) and abs(diff.mean().item()) < 0.01
    central = json.loads((tmp_path / "run" / LEDGER_FILE).read_text())["central"]
    assert central["releases"] == 1 and central["epsilon"] > 0 and central["state"]
    assert json.loads((tmp_path / "run" / "privacy.json").read_text())["central"]["epsilon"] == central["epsilon"]
