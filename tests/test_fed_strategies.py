"""Server-side federation logic without networking: streaming averaging, server optimisers, EMA, phases, stats."""

import math

import numpy as np
import pytest
import torch

from histodiff.diffusion.latent_stats import LatentStats, latent_moments
from strategies.aggregate import MetricMean, ReplyMismatch, StreamingMean
from wire.codec import decode_tensor, from_record, to_record
from strategies.schedule import Plan, ServerState, advance, load_state, save_state, start_state
from strategies.server_opt import FedAdam, FedYogi, ServerEMA, build_server_optimizer
from wire.settings import Settings


def _sites(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"a.w": torch.randn(4, 5, generator=g), "a.b": torch.randn(5, generator=g),
             "a.n": torch.tensor(7 + i)} for i in range(n)]


@pytest.mark.parametrize("dtype,tol", [("fp32", 1e-6), ("bf16", 2e-2), ("fp16", 2e-3)])
def test_weighted_average_in_fp32_from_any_transfer_dtype(dtype, tol):
    sites, counts = _sites(), [10, 30, 60]
    acc = StreamingMean()
    for w, n in zip(sites, counts):
        record = to_record(w, dtype)
        acc.add(record, n)
        del record  # dropped as soon as it is added
    mean = acc.mean()
    expected = sum(w["a.w"].double() * n for w, n in zip(sites, counts)) / sum(counts)
    assert mean["a.w"].dtype == torch.float32 and acc.sums["a.w"].dtype == torch.float32
    assert torch.allclose(mean["a.w"].double(), expected, atol=tol)
    assert int(mean["a.n"]) == 9  # integer buffers: the largest site's value, never averaged


def test_bf16_roundtrip_keeps_shape_and_halves_bytes():
    w = {"x": torch.randn(3, 8), "s": torch.tensor(1.5)}
    rec32, rec16 = to_record(w), to_record(w, "bf16")
    assert rec16.count_bytes() < 0.7 * rec32.count_bytes()
    back = from_record(rec16)
    assert back["x"].shape == (3, 8) and back["s"].shape == () and back["x"].dtype == torch.float32


def test_mismatching_reply_is_refused_and_leaves_the_sum_untouched():
    a, b = _sites(2)
    acc = StreamingMean({k: tuple(v.shape) for k, v in a.items()})
    acc.add(to_record(a), 1.0)
    before = acc.sums["a.w"].clone()
    bad_shape = dict(b, **{"a.b": torch.zeros(6)})
    with pytest.raises(ReplyMismatch, match="shape"):
        acc.add(to_record(bad_shape), 1.0)
    with pytest.raises(ReplyMismatch, match="extra"):
        acc.add(to_record(dict(b, extra=torch.zeros(1))), 1.0)
    assert torch.equal(acc.sums["a.w"], before) and acc.count == 1


def test_metric_mean_is_weighted():
    m = MetricMean()
    m.add({"loss": 1.0}, 1)
    m.add({"loss": 4.0}, 3)
    assert m.mean() == {"loss": pytest.approx(3.25)}


def test_fedavg_and_fedprox_add_the_mean_update():
    cur, update = {"w": torch.full((3,), 2.0), "n": torch.tensor(3)}, {"w": torch.ones(3), "n": torch.tensor(5)}
    for name in ("fedavg", "fedprox"):
        new = build_server_optimizer(name).step(cur, update)
        assert torch.equal(new["w"], torch.full((3,), 3.0))
        assert int(new["n"]) == 5  # an integer buffer takes the sites' value


@pytest.mark.parametrize("cls", [FedAdam, FedYogi])
def test_fedadam_fedyogi_match_the_formula(cls):
    eta, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    opt = cls(eta, b1, b2, tau)
    x, m, v = np.zeros(4), np.zeros(4), np.zeros(4)
    cur = {"w": torch.zeros(4)}
    for target in (np.array([1.0, -2.0, 0.5, 0.0]), np.array([0.5, 0.5, 0.5, 0.5])):
        d = target - x
        m = b1 * m + (1 - b1) * d
        v = b2 * v + (1 - b2) * d * d if cls is FedAdam else v - (1 - b2) * d * d * np.sign(v - d * d)
        x = x + eta * m / (np.sqrt(v) + tau)
        cur = opt.step(cur, {"w": torch.tensor(d, dtype=torch.float32)})  # the mean update is the pseudo-gradient
        assert np.allclose(cur["w"].numpy(), x, atol=1e-5)
    state = opt.state_dict()
    again = cls(eta, b1, b2, tau)
    again.load_state_dict(state)
    assert torch.equal(again.m["w"], opt.m["w"]) and torch.equal(again.v["w"], opt.v["w"])


def test_server_ema():
    ema = ServerEMA(0.5)
    ema.update({"w": torch.zeros(2)})
    ema.update({"w": torch.ones(2)})
    assert torch.allclose(ema.weights({"w": torch.ones(2)})["w"], torch.full((2,), 0.5))
    off = ServerEMA(0.0)
    off.update({"w": torch.zeros(2)})
    assert torch.equal(off.weights({"w": torch.ones(2)})["w"], torch.ones(2))


def test_latent_stats_combine_equals_pooled_statistics():
    g = torch.Generator().manual_seed(1)
    parts = [torch.randn(5, 3, 4, 4, generator=g) * (i + 1) + i for i in range(3)]
    combined = LatentStats.combine([latent_moments([p]) for p in parts])
    pooled = torch.cat([p.flatten() for p in parts]).double()
    assert combined.count == pooled.numel()
    assert combined.scale_factor == pytest.approx(1.0 / pooled.std(unbiased=False).item(), rel=1e-9)


def test_phase_schedule_and_state_file(tmp_path):
    plan = Plan(lae_rounds=2, dm_rounds=1)
    state = start_state(plan)
    seen = []
    while state.phase != "done":
        seen.append((state.phase, state.phase_round))
        advance(state, plan)
    assert seen == [("lae", 0), ("lae", 1), ("latent-stats", 0), ("dm", 0), ("deliver", 0)]
    assert state.status == "done" and state.global_round == 5
    assert start_state(Plan(0, 1, deliver=False)).phase == "latent-stats"
    save_state(tmp_path, state)
    assert load_state(tmp_path) == state
    assert isinstance(ServerState.from_json(state.to_json()), ServerState)


def test_settings_from_run_config():
    s = Settings.from_run_config({"lae-rounds": 3, "transfer-dtype": "int8", "resume": "true", "server-ema": 0.9})
    assert (s.lae_rounds, s.transfer_dtype, s.resume, s.ema_decay(0.9999)) == (3, "int8", True, 0.9)
    with pytest.raises(ValueError, match="transfer-dtype"):
        Settings.from_run_config({"transfer-dtype": "int4"})
    with pytest.raises(ValueError, match="'lae-rounds'"):
        Settings.from_run_config({"lae-rounds": "three"})
    with pytest.raises(ValueError, match="proximal-mu"):
        Settings.from_run_config({"strategy": "fedprox"})
    assert math.isclose(decode_tensor(to_record({"x": torch.tensor(2.0)})["x"]).item(), 2.0)


# ------------------------------------------------------------------ TensorBoard (strategies/board.py)


def _board_line(global_round, phase="lae"):
    return {"phase": phase, "round": global_round, "rounds": 4, "global_round": global_round, "sites_asked": 2,
            "sites_answered": 1, "dropped": {"12": "missed the round deadline"}, "losses": {"rec": 0.5 / global_round},
            "losses_per_site": {"11": {"rec": 0.4 / global_round}}, "bytes_sent": 2_000_000, "bytes_received": 1_000_000,
            "bytes_sent_per_site": {"11": 2_000_000}, "bytes_received_per_site": {"11": 1_000_000}, "seconds": 3.0,
            "stages": {"prepare": 0.5, "sites": 2.0, "aggregate": 0.5, "checkpoint": 0.1},
            "privacy": {"11": {"epsilon": 0.5 * global_round, "delta": 1e-5, "exhausted": False}}}


def _events(folder):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    out = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, path.name))
    return out


def test_tensorboard_events_per_round_and_a_resume_appends_without_duplicates(tmp_path):
    from PIL import Image

    from strategies.board import RunBoard
    from strategies.checkpoint import append_metrics

    board = RunBoard(tmp_path)
    for r in (1, 2):
        append_metrics(tmp_path, _board_line(r))
        board.round(_board_line(r))
    board.close()
    append_metrics(tmp_path, _board_line(3))  # committed, then the coordinator died before its events
    Image.new("RGB", (8, 4), "red").save(tmp_path / "grid.png")
    resumed = RunBoard(tmp_path)  # a resumed run: a new event file, the missing round first
    line = {**_board_line(4, "deliver"), "images": {"grids/site2/ADI": "grid.png"},
            "labeled_sites": {"12": {"status": "done", "baseline/accuracy": 0.75}}}
    append_metrics(tmp_path, line)
    resumed.round(line)
    resumed.round(line)  # the same round twice is written once
    resumed.close()
    events = _events(tmp_path / "tensorboard")
    assert len({f for steps in events.values() for _, f in steps}) == 2  # two event files
    for tag in ("loss/lae/rec", "site/lae/rec/11", "bytes/sent_MB", "bytes_site/received_MB/11", "time/round_s",
                "time/stage/sites", "sites/answered", "sites/dropped", "privacy/epsilon/11"):
        assert tag in events, (tag, sorted(events))
    assert [s for s, _ in events["bytes/sent_MB"]] == [1, 2, 3, 4]  # every round once, across both files
    assert [s for s, _ in events["loss/lae/rec"]] == [1, 2, 3]
    assert events["table1/12/baseline/accuracy"][0][0] == 4 and events["grids/site2/ADI"][0][0] == 4
    assert any(tag.startswith("dropped") for tag in events)  # the reasons, as text


def test_a_tensorboard_failure_warns_once_and_never_raises(tmp_path, monkeypatch, caplog):
    import torch.utils.tensorboard

    from strategies.board import RunBoard

    class Broken:
        def __init__(self, *args, **kwargs):
            raise OSError("disk full")

    monkeypatch.setattr(torch.utils.tensorboard, "SummaryWriter", Broken)
    board = RunBoard(tmp_path)
    with caplog.at_level("WARNING", logger="histodiff.fed"):
        board.round(_board_line(1))
        board.round(_board_line(2))
        board.close()
    warnings = [r.getMessage() for r in caplog.records if "TensorBoard" in r.getMessage()]
    assert len(warnings) == 1 and "disk full" in warnings[0] and "the run goes on" in warnings[0]
