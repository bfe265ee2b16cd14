"""SecAgg+ (wire/secagg.py): the protocol's arithmetic and refusals, then through the federation's own message
loop with real ClientApp handlers: the unmasked aggregate equals the plain weighted mean within quantisation error,
with and without a site dropping out after it shared its secrets, and the server never receives an unmasked array."""

import json

import numpy as np
import pytest
import torch
from flwr.app import Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.client_app import app
from histodiff.config import ConfigError, compose
from strategies.checkpoint import read_metrics
from strategies.federation import Federation
from wire.codec import to_record
from tests.inprocess_grid import InProcessGrid
from wire.secagg import WEIGHT_KEY, SecAggError, SecAggParams, SecureSum, SiteSecAgg
from wire.settings import Settings

SHAPES = {"conv.weight": (8, 3, 3, 3), "conv.bias": (8,), "fc.weight": (4, 8)}
BASE = "weights.perceptual=random lae.perceptual_weight=0 tiles.batch_size=4 tiles.image_size=32"


def _protocol(updates, weights, drop_after_shares=(), params=SecAggParams(), equal=False):
    """Run the four stages with SiteSecAgg / SecureSum objects (no messages); returns (server, mean, masked uploads)."""
    server = SecureSum(params, "r1", SHAPES)
    sites = {n: SiteSecAgg(RecordDict(), n, "r1") for n in updates}
    for n, site in sites.items():
        server.add_keys(n, site.keys(weights[n]))
    request = server.share_request()
    for n, site in sites.items():
        server.add_shares(n, site.shares(request))
    uploads = {}
    for n in server.sharers:
        forward = server.forward(n, equal_weights=equal)
        sites[n].receive(forward)
        if n in drop_after_shares:
            continue
        uploads[n], _ = sites[n].mask(updates[n], params)
        server.add_masked(n, uploads[n])
    unmask = server.unmask_request()
    mean = server.unmask({n: sites[n].unmask(unmask) for n in server.masked})
    return server, sites, mean, uploads


def _updates(nodes, scale=0.05):
    gen = torch.Generator().manual_seed(0)
    return {n: {k: torch.randn(s, generator=gen) * scale for k, s in SHAPES.items()} for n in nodes}


@pytest.mark.parametrize("dropped", [(), (12,)])
def test_unmasked_sum_is_weighted_mean_within_quantisation(dropped):
    updates, weights = _updates([11, 12, 13, 14]), {11: 36, 12: 20, 13: 50, 14: 8}
    server, _, mean, uploads = _protocol(updates, weights, dropped)
    alive = [n for n in updates if n not in dropped]
    assert server.masked == alive and server.unmasked_dropouts == list(dropped) and server.threshold == 3
    total = sum(weights[n] for n in alive)
    for k in SHAPES:
        plain = sum(weights[n] * updates[n][k] for n in alive) / total
        # one quantisation step per survivor, plus the weights' rounding to 1/65536 of the largest
        assert (mean[k] - plain).abs().max().item() <= server.bound + 1e-4 * plain.abs().max().item()
    # an upload alone is uniform noise over uint32: nothing of its update shows
    masked = np.concatenate([a.numpy().ravel() for a in uploads[alive[0]].values()]).astype(np.float64)
    assert all(a.dtype == "uint32" for a in uploads[alive[0]].values())
    assert abs(masked.mean() / 2**32 - 0.5) < 0.05 and masked.std() / 2**32 > 0.25


def test_equal_weights_and_clipping_range():
    updates = _updates([1, 2, 3], scale=1.0)
    updates[1]["conv.bias"][0] = 50.0  # beyond the clipping range: clipped, not wrapped around the modulus
    server, _, mean, _ = _protocol(updates, {1: 5, 2: 500, 3: 50}, equal=True)
    plain = {k: sum(updates[n][k].clamp(-8, 8) for n in updates) / 3 for k in SHAPES}
    assert all((mean[k] - plain[k]).abs().max() <= server.bound for k in SHAPES)
    assert mean["conv.bias"][0].item() == pytest.approx((8.0 + updates[2]["conv.bias"][0].item()
                                                         + updates[3]["conv.bias"][0].item()) / 3, abs=1e-4)


def test_sites_refuse_unsafe_requests():
    updates, weights = _updates([1, 2, 3]), {1: 1, 2: 1, 3: 1}
    server = SecureSum(SecAggParams(), "r1", SHAPES)
    sites = {n: SiteSecAgg(RecordDict(), n, "r1") for n in updates}
    for n, site in sites.items():
        server.add_keys(n, site.keys(weights[n]))
    request = server.share_request()
    with pytest.raises(SecAggError, match="threshold 1"):  # a server that could unmask one site alone
        sites[1].shares({**dict(request), "threshold": 1})
    with pytest.raises(SecAggError, match="below this site's 3"):  # fewer colluders than the site agreed to
        sites[1].shares({**dict(request), "threshold": 2}, SecAggParams(threshold_fraction=1.0))
    with pytest.raises(SecAggError, match="own public keys"):  # keys swapped by the server
        sites[1].shares({**dict(request), "pk2": list(reversed(request["pk2"]))})
    with pytest.raises(SecAggError, match="no secure round r2"):
        SiteSecAgg(sites[1].state, 1, "r2").shares(request)
    for n, site in sites.items():
        server.add_shares(n, site.shares(request))
    for n in updates:
        forward = server.forward(n, equal_weights=True)
        sites[n].receive(forward)
        server.add_masked(n, sites[n].mask(updates[n], SecAggParams())[0])
    with pytest.raises(SecAggError, match="both survivor and dropout"):  # would hand out seed and key of site 2
        sites[1].unmask({"active": [1, 2, 3], "dead": [2]})
    with pytest.raises(SecAggError, match="partition"):
        sites[1].unmask({"active": [1, 3], "dead": []})
    reply = sites[1].unmask({"active": [1, 2, 3], "dead": []})
    assert list(reply["seed-nodes"]) == [1, 2, 3] and list(reply["sk-nodes"]) == []
    with pytest.raises(SecAggError, match="no secure round"):  # only once: the secrets are gone
        sites[1].unmask({"active": [1, 2], "dead": [3]})
    plain = to_record({**updates[1], WEIGHT_KEY: torch.ones(1)})  # an unmasked upload is refused whole
    with pytest.raises(SecAggError, match="expected uint32"):
        server.add_masked(9, plain)


def test_outbox_allows_only_masked_arrays_and_the_stage_fields():
    from flwr.app import ConfigRecord

    from client.outbox import OutboxViolation, check_outgoing

    allowed = {**SHAPES, WEIGHT_KEY: (1,)}
    plain = RecordDict({"arrays": to_record({k: torch.zeros(s) for k, s in SHAPES.items()})})
    check_outgoing(plain, allowed)
    with pytest.raises(OutboxViolation, match="not masked"):
        check_outgoing(plain, allowed, masked=True)
    keys = RecordDict({"secagg": ConfigRecord({"pk1": b"a", "pk2": b"b", "weight": 3.0})})
    check_outgoing(keys, {}, protocol=("pk1", "pk2", "weight"))
    with pytest.raises(OutboxViolation, match="'sk2'"):  # a secret key never leaves
        check_outgoing(RecordDict({"secagg": ConfigRecord({"sk2": b"x"})}), {}, protocol=("pk1", "pk2", "weight"))
    with pytest.raises(OutboxViolation, match="may not leave"):
        check_outgoing(keys, {})


def test_config_and_settings_guards():
    with pytest.raises(ConfigError, match="secagg_threshold"):
        compose(["profile=tiny", "privacy.secagg=true", "privacy.secagg_threshold=1.5"])
    with pytest.raises(ValueError, match="min-sites >= 2"):
        Settings(overrides="privacy.secagg=true", min_sites=1).compose()
    with pytest.raises(SecAggError, match="overflow"):
        SecAggParams(levels=2**30).check(8)


# ------------------------------------------------------------------------------------------------ the federation


@pytest.fixture(autouse=True)
def _identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


class Grid(InProcessGrid):
    """Records every reply; ``drop`` = {(node, message type)} fails one kind of message at one node."""

    def __init__(self, *args, drop=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.replies: list[Message] = []
        self.drop = set(drop)

    def pull_messages(self, message_ids):
        for mid in message_ids:
            msg = self._pending.get(mid)
            if msg is not None and (msg.metadata.dst_node_id, msg.metadata.message_type) in self.drop:
                self.failing.add(msg.metadata.dst_node_id)
        replies = list(super().pull_messages(message_ids))
        self.failing.clear()
        self.replies.extend(replies)
        return replies


def _run(tmp_path, name, overrides, n=3, drop=(), status="done", **extra):
    rc = {"profile": "tiny", "overrides": overrides, "lae-rounds": 1, "dm-rounds": 0, "local-steps": 1,
          "min-sites": 2, "round-timeout": 300.0, "wait-timeout": 1.0, "poll": 0.05, "run-dir": str(tmp_path / name),
          "work-root": str(tmp_path / "sites"), "run-name": name, "phantom-per-class": 1, "labeled-partitions": "",
          "augment": False, "deliver": False, **extra}
    grid = Grid(app, {10 + i: {"partition-id": i, "num-partitions": n} for i in range(n)}, rc, drop=drop)
    lines = []
    fed = Federation.from_run_config(grid, rc, emit=lines.append)
    state = fed.run()
    assert state.status == status, (state.message, lines)
    return fed, grid, read_metrics(tmp_path / name)


def _max_diff(a, b, prefix):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a if k.startswith(prefix)
               and a[k].is_floating_point())


@pytest.fixture
def captured(monkeypatch):
    """(stats?, weight k, update) of every masked upload, taken at the site just before masking."""
    import client.client_app as client_app

    out = []
    original = client_app._masked

    def capture(cfg, secure, update, stats=False):
        out.append((stats, secure.weight, {k: v.clone() for k, v in update.items()}))
        return original(cfg, secure, update, stats)

    monkeypatch.setattr(client_app, "_masked", capture)
    return out


def test_federation_secure_rounds_unmask_the_weighted_mean(tmp_path, captured):
    """LAE, latent-stats and DM rounds with SecAgg+: the server's new model is the weighted mean of what the sites
    computed (captured at the sites before masking) within quantisation error; the server saw only masked arrays."""
    from wire.contract import init_phase

    fed, grid, lines = _run(tmp_path, "secure", f"{BASE} privacy.secagg=true", **{"dm-rounds": 1})
    # the memorisation check follows the DM phase; its figures are per site by design, never masked
    assert [m["phase"] for m in lines] == ["lae", "latent-stats", "dm", "memorisation"]
    assert lines[-1]["sites_answered"] == 3 and "secagg" not in lines[-1]
    secure = lines[:-1]
    for line in secure:
        assert line["secagg"]["sites_masked"] == 3 and line["secagg"]["threshold"] == 2, line["secagg"]
    assert len(captured) == 9
    init = {**init_phase(fed.cfg, "lae", 0), **init_phase(fed.cfg, "dm", 0)}
    for line, part in zip(secure, (captured[0:3], captured[3:6], captured[6:9])):
        total = sum(k for _, k, _ in part)
        mean = {name: sum(k * u[name].double() for _, k, u in part) / total for name in part[0][2]}
        if line["phase"] == "latent-stats":
            var = (mean["latent.meansq"] - mean["latent.mean"] ** 2).item()
            b = line["secagg"]["quantisation_bound"]  # on each moment; the variance moves by b (1 + 2|mean|) + b^2
            var_err = b * (1 + 2 * abs(mean["latent.mean"].item())) + b * b
            assert abs(fed.state.scale_factor - var ** -0.5) <= 0.5 * var ** -1.5 * var_err * 1.01
            continue
        err = max((fed.weights[k].double() - init[k].double() - v).abs().max().item() for k, v in mean.items())
        assert 0 < err <= line["secagg"]["quantisation_bound"] + 1e-6, (line["phase"], err)
    # what the server received: only uint32 masked arrays and no latent moments in the clear
    kinds = {}
    for reply in grid.replies:
        kinds.setdefault(reply.metadata.message_type, []).append(reply)
        assert not reply.has_error(), reply.error
    assert {k: len(v) for k, v in kinds.items() if k.startswith("query.secagg")} == {
        "query.secagg_keys": 9, "query.secagg_shares": 9, "query.secagg_unmask": 9}
    for kind in ("train.lae", "query.latent_stats", "train.dm"):
        for reply in kinds[kind]:
            assert {a.dtype for a in reply.content["arrays"].values()} == {"uint32"}
            assert not any(k.startswith("latent-") for k in reply.content["metrics"].keys())
    assert all(not ctx.state.config_records for ctx in grid.contexts.values())  # secrets gone after each round


def test_federation_secure_round_survives_a_dropout(tmp_path):
    """Site 12 shares its secrets and then fails its training: its masks are rebuilt from the others' shares and the
    round's model is the plain mean of the two survivors."""
    drop = {(12, "train.lae")}
    plain, _, _ = _run(tmp_path, "plain", BASE, drop=drop)
    secure, grid, lines = _run(tmp_path, "secure", f"{BASE} privacy.secagg=true", drop=drop)
    sec = lines[0]["secagg"]
    assert sec["sites_shared"] == 3 and sec["sites_masked"] == 2 and sec["dropouts_unmasked"] == [12]
    assert lines[0]["sites_answered"] == 2 and "12" in lines[0]["dropped"]
    assert _max_diff(secure.weights, plain.weights, "autoencoder.") <= sec["quantisation_bound"] + 1e-6
    unmask = [r for r in grid.replies if r.metadata.message_type == "query.secagg_unmask"]
    assert sorted(r.metadata.src_node_id for r in unmask[:2]) == [10, 11]
    assert all(list(r.content["secagg"]["sk-nodes"]) == [12] for r in unmask[:2])
    report = json.loads((tmp_path / "secure" / "privacy.json").read_text())
    assert report["secure_aggregation"] is True
    assert report["secure_rounds"]["rounds"] == 2 and report["secure_rounds"]["dropouts_unmasked"] == 1
    assert "dropout(s) unmasked from shares" in (tmp_path / "secure" / "privacy.md").read_text()


def test_site_with_secagg_refuses_a_plain_round(tmp_path):
    from client.client_app import _secure_round

    cfg = compose(["profile=tiny", "privacy.secagg=true"])
    message = Message(RecordDict(), 10, "train.lae")
    with pytest.raises(RuntimeError, match="refusing to send an unmasked update"):
        _secure_round(message, None, cfg)


def test_central_dp_over_secure_aggregation(tmp_path, captured):
    """Central DP with SecAgg+: sites clip, mask with equal weights; the server noises the unmasked mean with std
    sigma * (C + rounding slack) / n and accounts one release."""
    from wire.contract import init_phase

    overrides = (f"{BASE} privacy.secagg=true privacy.dp=true privacy.mode=central privacy.noise_multiplier=1.0 "
                 "privacy.max_grad_norm=1.0")
    fed, _, lines = _run(tmp_path, "central", overrides)
    lae = [u for stats, _, u in captured if not stats]
    assert [k for stats, k, _ in captured if not stats] == [65536] * 3  # equal weights bound the sensitivity
    assert all(torch.cat([v.flatten() for v in u.values()]).norm() <= 1.0 + 1e-4 for u in lae)  # clipped at sites
    init = init_phase(fed.cfg, "lae", 0)
    noise = torch.cat([(fed.weights[k] - init[k] - sum(u[k] for u in lae) / 3).flatten() for k in lae[0]])
    assert noise.std().item() == pytest.approx(1.0 / 3, rel=0.05)
    assert json.loads((tmp_path / "central" / "privacy_ledger.json").read_text())["central"]["releases"] == 1
    assert lines[0]["secagg"]["sites_masked"] == 3


def test_one_survivor_is_never_unmasked_and_the_run_stops_intact(tmp_path):
    """Two of three sites fail after sharing: unmasking would reveal the survivor's own update, so the server
    asks for no shares; the round fails, is retried until wait-timeout, and the run stops before any checkpoint."""
    drop = {(11, "train.lae"), (12, "train.lae")}
    fed, grid, _ = _run(tmp_path, "stop", f"{BASE} privacy.secagg=true", drop=drop, status="stopped",
                        **{"wait-timeout": 0.5})
    assert "1 of 3 sites sent a masked update" in fed.state.message
    assert fed.state.checkpoint is None and fed.state.global_round == 0
    assert not [m for m in grid.sent if m.metadata.message_type == "query.secagg_unmask"]
