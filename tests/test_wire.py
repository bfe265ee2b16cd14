"""The wire contract: updates in every transfer dtype, error feedback, the delta downlink, package boundaries."""

import ast
from pathlib import Path

import pytest
import torch

from wire.codec import ErrorFeedback, INT8_BLOCK, apply_update, bytes_per_value, decode_tensor, difference, \
    from_record, to_record
from wire.downlink import Broadcast, OutOfSync, receive

REPO = Path(__file__).resolve().parent.parent


def _paper_like(seed=0, n=4096):
    """Tiny weights and one round's change at a paper-like learning rate (1e-5 per step, 10 steps)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=g) * 0.05
    return w, torch.randn(n, generator=g) * 1e-5 * 10


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("dtype,bound", [("bf16", 0.01), ("fp16", 0.01), ("int8", 0.01)])
def test_an_update_round_trip_applies_the_fp32_update(dtype, bound):
    w, u = _paper_like()
    sent = from_record(to_record({"x": u}, dtype))["x"]
    assert _rel(sent, u) < bound  # the update itself survives the dtype
    applied = (w + sent) - w
    assert _rel(applied, u) < bound + 1e-3


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_whole_weights_in_a_reduced_dtype_lose_the_update(dtype):
    """The design this replaces: sending w + u in the dtype and taking the difference at the server."""
    w, u = _paper_like()
    if dtype == "int8":  # absmax blocks of the weights themselves
        applied = from_record(to_record({"x": w + u}, dtype))["x"] - from_record(to_record({"x": w}, dtype))["x"]
    else:
        applied = from_record(to_record({"x": w + u}, dtype))["x"] - w
    assert _rel(applied, u) > 0.5


def test_int8_costs_under_0_3_of_fp32_and_bounds_each_value():
    u = torch.randn(3, 1000)
    rec32, rec8 = to_record({"u": u}), to_record({"u": u}, "int8")
    assert rec8.count_bytes() <= 0.3 * rec32.count_bytes() and bytes_per_value("int8") < 0.3 * 4
    back = decode_tensor(rec8["u"])
    flat, err = u.reshape(-1), (back - u).reshape(-1).abs()
    for start in range(0, flat.numel(), INT8_BLOCK):  # at most half a step of its block's scale
        block = slice(start, start + INT8_BLOCK)
        assert float(err[block].max()) <= float(flat[block].abs().max()) / 254 + 1e-7
    assert to_record({"n": torch.tensor(7)}, "int8")["n"].dtype == "int64"  # integer buffers as they are


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_error_feedback_keeps_20_rounds_within_one_rounds_error(dtype, tmp_path):
    g = torch.Generator().manual_seed(1)
    ef = ErrorFeedback(dtype, tmp_path / "residual.safetensors")
    meant = torch.zeros(2048)
    arrived = torch.zeros(2048)
    one_round = None
    for r in range(20):
        u = torch.randn(2048, generator=g) * 1e-4
        record, sent = ef.encode({"x": u})
        assert torch.equal(sent["x"], from_record(record)["x"])
        meant += u
        arrived += sent["x"]
        if one_round is None:
            one_round = float((sent["x"] - u).norm())
        ef = ErrorFeedback(dtype, tmp_path / "residual.safetensors")  # every round a fresh process: from disk
    assert float((arrived - meant).norm()) <= one_round * 1.5


def test_difference_and_apply_update_are_inverse_with_integer_buffers():
    base = {"w": torch.randn(4), "n": torch.tensor(3)}
    new = {"w": base["w"] + 1.0, "n": torch.tensor(5)}
    update = difference(new, base)
    assert torch.allclose(update["w"], torch.ones(4)) and int(update["n"]) == 5
    back = apply_update(base, update)
    assert torch.allclose(back["w"], new["w"]) and int(back["n"]) == 5


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_downlink_start_points_agree_with_the_server_and_do_not_drift(dtype, tmp_path):
    """The server's global G moves by small updates; a site follows by deltas; its starting point stays within
    one round's rounding of G, over many rounds, and a site that rejoins gets the whole copy."""
    g = torch.Generator().manual_seed(2)
    G = {"w": torch.randn(4096, generator=g) * 0.05, "n": torch.tensor(1)}
    down = Broadcast(dtype)
    held = tmp_path / "global_lae.safetensors" if dtype != "fp32" else None
    worst = 0.0
    for r in range(15):
        start = down.prepare(G)
        record, config = down.record_for(1)
        site = receive(record, config, held)
        assert torch.equal(site["w"], start["w"])  # the site starts exactly where the server thinks it does
        worst = max(worst, float((site["w"] - G["w"]).abs().max()))
        down.confirm([1])
        G = {"w": G["w"] + torch.randn(4096, generator=g) * 1e-5, "n": torch.tensor(r + 2)}
        if r == 0 and dtype != "fp32":
            assert config["downlink"] == "full"
    if dtype == "fp32":
        assert worst == 0.0
    else:
        assert worst < 2e-5 * 3  # bounded by a round's delta, not growing with the rounds
        assert config["downlink"] == "delta"
        stale = Broadcast(dtype)  # a site holding another copy refuses a delta
        stale.prepare(G)
        stale.confirm([1])
        stale.prepare({"w": G["w"] + 1e-5, "n": G["n"]})
        bad_record, bad_config = stale.record_for(1)
        with pytest.raises(OutOfSync):
            receive(bad_record, {**bad_config, "base-digest": "0" * 16}, held)
        rec, cfg = down.record_for(99)  # never synced: the whole model, in fp32
        assert cfg["downlink"] == "full" and rec.count_bytes() >= 4 * 4096


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("package,forbidden", [
    ("histodiff", {"client", "server", "strategies", "wire", "flwr"}),
    ("client", {"server", "strategies"}),
    ("wire", {"client", "server", "strategies"}),
    ("strategies", {"client"}),
])
def test_package_boundaries(package, forbidden):
    bad = {str(p.relative_to(REPO)): sorted(_imports(p) & forbidden) for p in (REPO / package).rglob("*.py")}
    assert not {k: v for k, v in bad.items() if v}


def test_test_doubles_live_in_tests():
    assert not (REPO / "strategies" / "inprocess.py").exists() and (REPO / "tests" / "inprocess_grid.py").is_file()
