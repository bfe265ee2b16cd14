"""Delivery: the delivered UNet is the server's EMA; the labeled-site pipeline runs as the site's own job, slower
than a round's deadline, survives the loss of its process and still brings Table 1 to metrics.jsonl."""

import json
import os
import signal

import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity

from client.client_app import app
from client.pipeline_job import read_status
from histodiff.model_files import flat
from strategies.checkpoint import read_metrics
from strategies.federation import Federation
from strategies.server_opt import ServerEMA
from tests.inprocess_grid import InProcessGrid

OVERRIDES = "weights.perceptual=random lae.perceptual_weight=0 tiles.batch_size=4 tiles.image_size=32"
PIPELINE = ("weights.inception=random train.progress=false aux_classifier.epochs=1 downstream.epochs=1 "
            "aux_classifier.img_size=32 downstream.img_size=32 latent_classifier.steps=4 augment.decoder_steps=2 "
            "dm.ddim_steps=2 augment.ratios=[0.5] augment.random_ratios=[] augment.tau=0.0 "
            "augment.candidates_factor=1.5 augment.latent_eval_timesteps=[0,999] augment.grid_tiles=2 "
            "augment.sample_batch_size=32")


@pytest.fixture(autouse=True)
def _identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def _run_config(tmp_path, **extra):
    rc = {"profile": "tiny", "overrides": OVERRIDES, "lae-rounds": 1, "dm-rounds": 2, "local-steps": 1,
          "min-sites": 2, "round-timeout": 300.0, "wait-timeout": 1.0, "poll": 0.05, "run-dir": str(tmp_path / "run"),
          "work-root": str(tmp_path / "sites"), "phantom-per-class": 1, "labeled-partitions": "last", "augment": False,
          "memorisation-samples": 4, "memorisation-ddim-steps": 4}
    rc.update(extra)
    return rc


def test_the_delivered_unet_is_the_server_ema_not_the_last_average(tmp_path, monkeypatch):
    raw = []
    original = ServerEMA.update

    def spy(self, weights):
        raw.append({k: v.clone() for k, v in weights.items()})
        return original(self, weights)

    monkeypatch.setattr(ServerEMA, "update", spy)
    rc = _run_config(tmp_path, **{"server-ema": 0.5})
    grid = InProcessGrid(app, {10 + i: {"partition-id": i, "num-partitions": 3} for i in range(3)}, rc)
    fed = Federation.from_run_config(grid, rc, emit=lambda line: None)
    assert fed.run().status == "done"
    from diffusers import UNet2DModel

    delivered = flat("unet", UNet2DModel.from_pretrained(str(tmp_path / "sites" / "site2" / "run" / "global_model" / "unet")))
    exported = flat("unet", UNet2DModel.from_pretrained(str(tmp_path / "run" / "global_model" / "unet")))
    last, before = raw[-1], raw[-2]  # the raw averages of DM rounds 2 and 1
    name = "unet.conv_in.weight"
    ema = 0.5 * before[name] + 0.5 * last[name]  # decay 0.5 over two rounds, started at round 1's average
    assert torch.allclose(delivered[name], ema, atol=1e-6) and torch.equal(delivered[name], exported[name])
    assert not torch.allclose(delivered[name], last[name], atol=1e-6)


def test_auto_ema_decay_means_the_per_step_decay_whatever_the_local_steps():
    from wire.settings import Settings

    assert Settings(dm_local_steps=100).ema_decay(0.9999) == pytest.approx(0.9999 ** 100)
    assert Settings(local_steps=7).ema_decay(0.99) == pytest.approx(0.99 ** 7)
    assert Settings(server_ema="off").ema_decay(0.9999) == 0.0
    # auto also keeps the single-site EMA's warm-up: round r decays by the product of its steps' decays
    ema = ServerEMA(*Settings(dm_local_steps=100).ema_rule(0.9999))
    steps = [min(0.9999, (1 + s) / (10 + s)) for s in range(101, 201)]
    assert ema.round_decay(2) == pytest.approx(torch.tensor(steps, dtype=torch.float64).prod().item())
    assert ema.round_decay(10_000) == pytest.approx(0.9999 ** 100, rel=1e-3)


@pytest.mark.timeout(600)
def test_a_pipeline_slower_than_the_round_deadline_finishes_and_resumes_after_a_kill(tmp_path):
    rc = _run_config(tmp_path, **{"overrides": f"{OVERRIDES} {PIPELINE}", "dm-rounds": 1, "augment": True,
                                  "round-timeout": 2.0, "deliver-poll": 0.5, "phantom-per-class": 3})
    grid = InProcessGrid(app, {10 + i: {"partition-id": i, "num-partitions": 3} for i in range(3)}, rc)
    out = tmp_path / "sites" / "site2" / "run" / "augment"
    killed, lines = [], []

    def emit(line):
        lines.append(line)
        if "stages done" in line and "(0 stages" not in line and not killed:
            pid = int(read_status(out)["pid"])
            os.kill(pid, signal.SIGKILL)  # the site's job dies mid-pipeline
            killed.append(pid)

    state = Federation.from_run_config(grid, rc, emit=emit).run()
    assert state.status == "done", lines
    deliver = read_metrics(tmp_path / "run")[-1]
    assert deliver["phase"] == "deliver" and deliver["seconds"] > 2.0  # longer than any one message may take
    result = deliver["labeled_sites"]["12"]
    assert result["status"] == "done" and 0.0 <= result["baseline/accuracy"] <= 1.0, result
    assert killed and read_status(out)["starts"] == 2
    stages = json.loads((out / "results.json").read_text())["stages"]
    assert stages["skipped"] and set(stages["skipped"]).isdisjoint(stages["ran"])  # resumed, not redone
