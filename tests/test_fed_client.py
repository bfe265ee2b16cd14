"""Client handlers called directly with a fake Message and Context; the what-leaves-a-site check."""

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client import client_app, task
from client.outbox import OutboxViolation, check_outgoing
from client.proximal import ProximalTerm
from histodiff.config import compose
from histodiff.local_training.local_steps import LocalResult
from wire.codec import from_record, to_record
from wire.contract import init_phase, phase_shapes

OVERRIDES = "weights.perceptual=random lae.perceptual_weight=0 tiles.batch_size=4 tiles.image_size=32"


@pytest.fixture(autouse=True)
def _identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


@pytest.fixture(scope="module")
def cfg():
    return compose(["profile=tiny", *OVERRIDES.split()])


def _context(tmp_path, pid=0, **run):
    rc = {"profile": "tiny", "overrides": OVERRIDES, "run-dir": str(tmp_path / "run"),
          "work-root": str(tmp_path / "sites"), "phantom-per-class": 1, "labeled-partitions": "1", **run}
    return Context(run_id=1, node_id=7, node_config={"partition-id": pid, "num-partitions": 2}, state=RecordDict(),
                   run_config=rc)


def test_phase_shapes_are_the_phase_models_only(cfg):
    lae, dm = phase_shapes(cfg, "lae"), phase_shapes(cfg, "dm")
    assert lae and all(k.startswith(("autoencoder.", "discriminator.")) for k in lae)
    assert not any("lpips" in k or "perceptual" in k for k in lae)
    assert dm and all(k.startswith("unet.") for k in dm)
    assert phase_shapes(cfg, "latent-stats") == {}
    no_disc = compose(["profile=tiny", *OVERRIDES.split(), "lae.share_discriminator=false"])
    assert not any(k.startswith("discriminator.") for k in phase_shapes(no_disc, "lae"))


def test_check_outgoing_refuses_anything_beyond_the_phase_model(cfg):
    allowed = phase_shapes(cfg, "dm")
    good = {k: torch.zeros(s) for k, s in list(allowed.items())[:3]}
    check_outgoing(RecordDict({"arrays": to_record(good), "metrics": MetricRecord({"loss": 1.0, "n": 3})}), allowed)
    with pytest.raises(OutboxViolation, match="not part"):
        check_outgoing(RecordDict({"arrays": to_record({**good, "unet.extra": torch.zeros(2)})}), allowed)
    name = next(iter(good))
    with pytest.raises(OutboxViolation, match="shape"):
        check_outgoing(RecordDict({"arrays": to_record({name: torch.zeros(1, 2, 3, 4, 5)})}), allowed)
    with pytest.raises(OutboxViolation, match="not part"):  # an LAE array in the DM phase
        check_outgoing(RecordDict({"arrays": to_record({"autoencoder.x": torch.zeros(1)})}), allowed)
    with pytest.raises(OutboxViolation, match="may not leave"):
        check_outgoing(RecordDict({"config": ConfigRecord({"path": "/site/tiles"})}), allowed)
    with pytest.raises(OutboxViolation, match="scalar"):
        check_outgoing(RecordDict({"metrics": MetricRecord({"latents": [0.1, 0.2]})}), allowed)
    with pytest.raises(OutboxViolation, match="may not leave"):
        check_outgoing(RecordDict({"images": ArrayRecord()}), allowed)


def _lae_message(cfg, steps=1):
    content = RecordDict({"arrays": to_record(init_phase(cfg, "lae", 0)),
                          "config": ConfigRecord({"phase": "lae", "local-steps": steps, "transfer-dtype": "fp16",
                                                  "proximal-mu": 0.0})})
    return Message(content, 7, "train.lae")


def test_train_lae_handler_sends_only_the_lae_arrays(cfg, tmp_path):
    msg = _lae_message(cfg)
    reply = client_app.train_lae(msg, _context(tmp_path))
    arrays = reply.content["arrays"]
    allowed = phase_shapes(cfg, "lae")
    assert set(arrays.keys()) == set(allowed)
    assert {a.dtype for a in arrays.values()} <= {"float16", "int64"}
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == 9 and metrics["step"] == 1 and "rec" in metrics
    assert set(reply.content.keys()) == {"arrays", "metrics"}
    state = tmp_path / "sites" / "site0" / "run" / "lae"
    assert (state / "training_state.pt").is_file()  # optimiser state and step on disk
    # the server holds the weights and sends them every round: a site neither writes nor reads its own copy,
    # and keeps no RNG state (each round is seeded by its step)
    assert not (state / "autoencoder").exists() and not (state / "discriminator.safetensors").exists()
    assert set(torch.load(state / "training_state.pt", weights_only=True)) == {"step", "optimizers"}


def test_handler_refuses_to_send_an_extra_array(cfg, tmp_path, monkeypatch):
    def leaky(cfg_, dataset, site, steps, weights, mu=0.0, **_):  # clock=, release=: timing and memory only
        w = dict(weights)
        w["autoencoder.site_tiles"] = torch.zeros(9, 3, 32, 32)  # e.g. raw tiles smuggled out
        return LocalResult(w, {"rec": 0.1}, 9, 1)

    monkeypatch.setattr(task, "lae_round", leaky)
    with pytest.raises(OutboxViolation, match="site_tiles"):
        client_app.train_lae(_lae_message(cfg), _context(tmp_path))


def test_labeled_site_tells_its_role_and_refuses_pretraining(cfg, tmp_path):
    q = Message(RecordDict({"config": ConfigRecord({"phase": "role"})}), 7, "query.role")
    assert client_app.role(q, _context(tmp_path, pid=1)).content["metrics"]["labeled"] == 1
    assert client_app.role(q, _context(tmp_path, pid=0)).content["metrics"]["labeled"] == 0
    with pytest.raises(RuntimeError, match="labeled"):
        client_app.train_lae(_lae_message(cfg), _context(tmp_path, pid=1))


def test_latent_stats_handler_returns_moments_only(cfg, tmp_path):
    ae = {k: v for k, v in init_phase(cfg, "lae", 0).items() if k.startswith("autoencoder.")}
    msg = Message(RecordDict({"autoencoder": to_record(ae), "config": ConfigRecord({"phase": "latent-stats"})}), 7,
                  "query.latent_stats")
    reply = client_app.latent_stats(msg, _context(tmp_path))
    m = reply.content["metrics"]
    assert set(reply.content.keys()) == {"metrics"}
    assert m["latent-count"] == 9 * 3 * 8 * 8 and m["latent-sum-sq"] > 0
    site = task.site_from_context({"partition-id": 0}, _context(tmp_path).run_config)
    from wire.codec import weights_digest
    assert torch.equal(task.cached_global_autoencoder(site, weights_digest(ae))["autoencoder.encoder.conv_in.weight"],
                       ae["autoencoder.encoder.conv_in.weight"])


def test_proximal_term_pulls_gradients_towards_the_global_weights():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unet = torch.nn.Linear(2, 2)
            self.other = torch.nn.Linear(2, 2)

    m = M()
    cb = ProximalTerm(0.5, ("unet",))
    cb.on_train_start(None, m)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with torch.no_grad():
        m.unet.weight.add_(1.0)
        m.other.weight.add_(1.0)
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    cb.on_before_optimizer_step(None, m, opt)
    assert torch.allclose(m.unet.weight.grad, torch.full((2, 2), 0.5))
    assert torch.equal(m.other.weight.grad, torch.zeros(2, 2))  # not shared: no proximal pull
    assert from_record(to_record({"x": torch.ones(1)}))["x"].item() == 1.0


def test_labeled_site_sends_back_only_table_metrics(tmp_path):
    from client.task import site_from_context, table_metrics

    results = {"table": [
        {"setting": "baseline", "accuracy_mean": 0.5, "f1_mean": 0.4, "sensitivity_mean": 0.5,
         "specificity_mean": 0.9, "fid": None, "n_synthetic": 0},
        {"setting": "selective-1", "accuracy_mean": 0.6, "f1_mean": 0.5, "sensitivity_mean": 0.6,
         "specificity_mean": 0.95, "fid": 12.5, "n_synthetic": 40},
    ], "classes": ["A", "B"], "selection": {"paths": ["x.png"]}}
    metrics = table_metrics(results)
    assert metrics["selective-1/accuracy"] == 0.6 and metrics["selective-1/fid"] == 12.5
    assert "baseline/fid" not in metrics and all(isinstance(v, float) for v in metrics.values())
    site = site_from_context({"partition-id": 3}, {"labeled-partitions": "3", "work-root": str(tmp_path)})
    assert site.role == "labeled" and site.test == tmp_path / "site3" / "phantom-test"
    assert site_from_context({"partition-id": 0}, {"labeled-partitions": "3", "work-root": str(tmp_path)}).test is None
