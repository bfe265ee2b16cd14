"""The paper-size round benchmark's pure helpers (benchmarks/paper_round.py) and the memory/time savings it measures:
one-copy codec, consumed replies, in-place aggregation, weights written without building models, no random init of
models loaded right after, the site's starting point kept on disk."""

import json
import time

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, RecordDict

from benchmarks import paper_round as pr


# ------------------------------------------------------------------ /proc sampling and the report


def _fake_proc(root, procs):
    for pid, (ppid, cmd, rss_kb) in procs.items():
        d = root / str(pid)
        d.mkdir()
        (d / "stat").write_text(f"{pid} (py thon) S {ppid} 1 1 0")
        (d / "cmdline").write_bytes(cmd.replace(" ", "\0").encode() + b"\0")
        (d / "status").write_text(f"Name:\tx\nVmRSS:\t{rss_kb} kB\n")
    (root / "self").mkdir()  # not a pid: ignored


def test_proc_snapshot_groups_roles_by_process_tree(tmp_path):
    _fake_proc(tmp_path, {
        10: (1, "python -m server.run --run-dir r", 100),
        11: (10, "python /venv/bin/flower-superlink --port 1", 200),
        12: (11, "python /venv/bin/flwr-serverapp --token x --flwr-dir /root/.flwr", 300),
        20: (1, "python -m client.run --site site0", 50),
        21: (20, "python /venv/bin/flower-supernode --superlink a", 60),
        22: (21, "python -m client.trusted_clientapp run --token y", 1000),
        30: (1, "python something else", 999),  # not ours
    })
    procs = pr.read_procs(tmp_path)
    assert procs[12] == (11, "python /venv/bin/flwr-serverapp --token x --flwr-dir /root/.flwr", 300 * 1024)
    assert pr.descendants(procs, [20]) == {20, 21, 22}
    snap = pr.snapshot(procs, {"coordinator": [10], "site0": [20]})
    assert snap == {"coordinator/launcher": 100 * 1024, "coordinator/superlink": 200 * 1024,
                    "coordinator/serverapp": 300 * 1024, "site0/launcher": 50 * 1024,
                    "site0/supernode": 60 * 1024, "site0/clientapp": 1000 * 1024}


def test_the_superlink_is_recognised_with_or_without_a_database():
    assert pr.role_of("python /venv/bin/flower-superlink --insecure --simulation") == "superlink"
    assert pr.role_of("python -m server.superlink --port 1 --database run/superlink.db") == "superlink"


def test_peaks_are_per_instant_sums_within_the_window():
    samples = [(1.0, {"coordinator/superlink": 5, "coordinator/serverapp": 10, "site0/clientapp": 100}),
               (2.0, {"coordinator/superlink": 7, "coordinator/serverapp": 1, "site0/clientapp": 50}),
               (9.0, {"coordinator/superlink": 1000})]
    p = pr.peaks(samples, 0.0, 5.0)
    assert p["coordinator/superlink"] == 7 and p["coordinator/serverapp"] == 10
    assert p["coordinator"] == 15 and p["superlink+serverapp"] == 15  # 5 + 10 at t=1, not 7 + 10
    assert p["site0"] == 100 and p["total"] == 115
    assert pr.peaks(samples)["coordinator/superlink"] == 1000


def _line():
    return {"phase": "dm", "round": 1, "seconds": 50.0, "sites_answered": 2, "bytes_sent": 10, "bytes_received": 8,
            "stages": {"prepare": 1.0, "sites": 45.0, "aggregate": 4.0, "checkpoint": 6.0},
            "timeline": {"pushed": 100.0, "push_seconds": 3.0, "arrived": {"1": 140.0, "2": 145.0},
                         "take_seconds": {"1": 0.5, "2": 0.7}},
            "losses_per_site": {
                "1": {"loss": 0.1, "clock-process-created": 110.0, "clock-handler-start": 115.0, "clock-reply": 138.0,
                      "seconds-receive": 2.0, "seconds-train": 12.0, "seconds-state-save": 3.0, "seconds-encode": 1.0},
                "2": {"loss": 0.2, "clock-handler-start": 120.0, "clock-reply": 141.0, "seconds-train": 20.0}}}


def test_peak_moment_and_what_the_server_did_before_it():
    samples = [(100.0, {"coordinator/serverapp": 3}), (140.2, {"coordinator/serverapp": 9}),
               (150.0, {"coordinator/serverapp": 4})]
    assert pr.peak_moment(samples, "coordinator/serverapp") == (9, 140.2)
    assert pr.peak_moment(samples, "coordinator/serverapp", 145.0) == (4, 150.0)
    line = _line()
    assert pr.server_event_before(line, 99.0) == "before the first push"
    assert pr.server_event_before(line, 120.0) == "20 s after the first push started"
    assert pr.server_event_before(line, 140.2) == "0 s after site 1's reply arrived"
    assert pr.server_event_before(line, 148.0) == "2 s after site 2's reply taken"


def test_site_stages_split_the_round_trip():
    stages = pr.site_stages(_line())
    assert stages["1"] == {"send": 10.0, "process-start": 5.0, "receive": 2.0, "train": 12.0,
                           "state-save": 3.0, "encode": 1.0, "reply": 2.0, "take": 0.5}
    assert stages["2"]["send"] == 20.0 and "process-start" not in stages["2"]  # no process clock: one stage
    assert stages["2"]["reply"] == 4.0


def test_round_summary_overhead_is_round_minus_longest_training():
    s = pr.round_summary(_line())
    assert s["seconds"] == 56.0 and s["train_seconds"] == 20.0 and s["overhead_seconds"] == 36.0
    text = pr.report({"dtype": "fp32", "sites": 2, "tiles_per_site": 9, "image_size": 256, "status": "done",
                      "seconds": 60.0, "load": (1.0, 1.0, 1.0), "rounds": [{**s, "peaks": {"total": 2 ** 30}}],
                      "peaks": {"total": 2 ** 30}},
                     {"dm": {"copy_s": 1.0, "write_s": 2.0, "read_s": 1.0}})
    assert "overhead 36.0 s" in text and "3 x sites x move-once = 24.0 s -> missed (1.5x the budget)" in text


def test_stage_clock_metrics(monkeypatch):
    from client.task import StageClock, process_started

    assert 0 < process_started() <= time.time()
    clock = StageClock("site0 dm", start=1000.0)
    with clock.stage("train"):
        pass
    with clock.stage("train"):
        pass
    m = clock.metrics()
    assert m["clock-handler-start"] == 1000.0 and m["clock-reply"] >= 1000.0 and "clock-process-created" in m
    assert set(k for k in m if k.startswith("seconds-")) == {"seconds-train"} and m["seconds-train"] >= 0


# ------------------------------------------------------------------ what the savings must keep exactly


def test_encode_is_byte_identical_to_flower_and_decode_owns_its_memory():
    from wire.codec import decode_tensor, encode_tensor

    for t in (torch.randn(3, 4), torch.tensor(2.5), torch.arange(7), torch.zeros(0, 3), torch.randn(4, 5).t(),
              torch.randn(2, 3, dtype=torch.float64)):
        t = t.float() if t.is_floating_point() else t  # what the fp32 transfer dtype sends
        a, ref = encode_tensor(t), Array(np.array(t.numpy(), copy=True, order="C"))
        assert (a.data, a.dtype, tuple(a.shape), a.stype) == (ref.data, ref.dtype, tuple(ref.shape), ref.stype)
        back = decode_tensor(a, float32=False)
        assert torch.equal(back, t)
        if back.numel():
            back.view(-1)[0] += 1  # writable, and not the message's bytes
            assert torch.equal(decode_tensor(a, float32=False), t)


def test_update_of_consume_empties_the_reply():
    from strategies.validate import update_of

    record = ArrayRecord({"w": Array(np.ones((2, 2), np.float32)), "n": Array(np.array(3))})
    content = RecordDict({"arrays": record})
    expected = {"w": ((2, 2), True), "n": ((), False)}
    assert set(update_of(content, expected)) == {"w", "n"} and len(record) == 2
    out = update_of(content, expected, consume=True)
    assert torch.equal(out["w"], torch.ones(2, 2)) and int(out["n"]) == 3 and len(record) == 0


def test_in_place_mean_and_consuming_step_match_the_plain_ones():
    from strategies.aggregate import StreamingMean
    from strategies.server_opt import build_server_optimizer

    def mean(in_place):
        acc = StreamingMean()
        acc.add_tensors({"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(1)}, 1.0)
        acc.add_tensors({"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(4)}, 3.0)
        return acc.mean(in_place=in_place)

    a, b = mean(False), mean(True)
    assert torch.allclose(a["w"], b["w"]) and int(a["n"]) == int(b["n"]) == 4
    current = {"w": torch.tensor([10.0, 20.0]), "n": torch.tensor(0)}
    for name in ("fedavg", "fedadam"):
        plain = build_server_optimizer(name).step(current, {k: v.clone() for k, v in a.items()})
        consumed = build_server_optimizer(name).step_consuming(current, {k: v.clone() for k, v in a.items()})
        assert all(torch.equal(plain[k], consumed[k]) for k in plain)
    assert torch.equal(current["w"], torch.tensor([10.0, 20.0]))  # the global is never written into


def test_no_weight_init_skips_and_restores_initialisation():
    from histodiff.model_files import no_weight_init

    init = torch.nn.init.kaiming_uniform_
    with no_weight_init():
        torch.manual_seed(0)
        skipped = torch.nn.Linear(64, 64)
        assert torch.nn.init.kaiming_uniform_ is not init
    assert torch.nn.init.kaiming_uniform_ is init
    torch.manual_seed(0)
    drawn = torch.nn.Linear(64, 64)
    skipped.load_state_dict(drawn.state_dict())  # strict: every weight comes from the load
    assert torch.equal(skipped.weight, drawn.weight)


def test_save_pretrained_state_matches_save_pretrained(tmp_path):
    from diffusers import UNet2DModel

    from histodiff.model_files import save_pretrained_atomic, save_pretrained_state

    torch.manual_seed(0)
    kw = dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
              down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
              norm_num_groups=4)
    model = UNet2DModel(**kw)
    save_pretrained_atomic(model, tmp_path / "ref")
    with torch.device("meta"):
        config_only = UNet2DModel(**kw)
    save_pretrained_state(config_only, model.state_dict(), tmp_path / "new")
    save_pretrained_state(config_only, model.state_dict(), tmp_path / "new")  # replaces an existing folder
    assert json.loads((tmp_path / "new" / "config.json").read_text()) == json.loads(
        (tmp_path / "ref" / "config.json").read_text())
    back = UNet2DModel.from_pretrained(str(tmp_path / "new"))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in back.state_dict().items())
    assert not (tmp_path / "new.tmp").exists() and not (tmp_path / "new.old").exists()


def test_checkpoint_refuses_arrays_that_do_not_fit(tmp_path):
    from histodiff.config import compose
    from strategies.checkpoint import load_round, save_round
    from wire.contract import init_phase

    cfg = compose(["profile=tiny", "weights.perceptual=random"])
    weights = {**init_phase(cfg, "lae", 0), **init_phase(cfg, "dm", 0)}
    rel = save_round(tmp_path, "round-0001", cfg, weights, {"ema/x": torch.ones(2)})
    back, strategy = load_round(tmp_path, rel)
    assert set(back) == set(weights) and all(torch.equal(back[k], weights[k]) for k in weights)
    bad = dict(weights)
    bad.pop(next(k for k in bad if k.startswith("unet.")))
    with pytest.raises(ValueError, match="unet arrays do not fit"):
        save_round(tmp_path, "round-0002", cfg, bad, {})


def test_starting_point_on_disk_gives_the_same_update(tmp_path):
    from client.client_app import _update_in_place
    from client.task import StartingPoint, release_callback
    from wire.codec import difference

    g = {"a": torch.randn(5), "b": torch.randn(2, 3), "n": torch.tensor(7)}
    w = {"a": g["a"] + 1, "b": g["b"] * 2, "n": torch.tensor(9)}
    expected = difference(w, g)
    weights = {k: v.clone() for k, v in g.items()}
    base = StartingPoint(weights, tmp_path / "start.safetensors")
    release_callback(weights).on_train_start(None, None)  # training started: the decoded copy goes
    assert weights == {} and "a" in base
    got = _update_in_place({k: v.clone() for k, v in w.items()}, base)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert not (tmp_path / "start.safetensors").exists()  # its own file is removed when done
    kept = tmp_path / "held.safetensors"
    StartingPoint(dict(g), kept)  # writes it ...
    StartingPoint({}, kept, written=True).clear()  # ... a file it did not write stays
    assert kept.exists()
