"""benchmarks.paper_gpu runs end to end at tiny size on the CPU (the GPU run is one prepared command), its FLOP
counter counts what torch's counts (also through torch.autograd.grad), and the time limit stops it cleanly."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import paper_gpu

TINY = ["--profile", "tiny", "--device", "cpu", "--steps", "1", "--skip", "1", "--sample-batch", "2",
        "--ddim-steps", "2", "--compile", "off", "tiles.image_size=32", "tiles.batch_size=2"]


def test_tiny_cpu_run_writes_every_part(tmp_path):
    report = paper_gpu.main([*TINY, "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "paper_gpu.json").read_text())
    assert saved["results"] == json.loads(json.dumps(report["results"]))
    rows = {r["part"]: r for r in saved["results"]}
    assert set(rows) == {"lae", "dm", "sample_unguided", "sample_guided"}, saved["results"]
    for row in rows.values():
        assert row["compile"] == "off" and row["tiles_per_s"] > 0 and row["gflop_per_tile"] > 0
        assert row["floor_fraction"] is None  # no peak FLOP/s is known for a CPU unless --peak-tflops
    flops = saved["flops_per_tile"]
    # guidance adds the classifier's forward and backward to every UNet forward
    assert flops["sample_guided"] > flops["sample_unguided"] > 0
    env = saved["environment"]
    assert env["precision"] == "32-true" and env["unet_attention"] == ["TokenMajorSDPAProcessor"]
    table = (tmp_path / "paper_gpu.md").read_text()
    assert "| dm | off |" in table and "| sample_guided | off |" in table and "stopped" not in saved


def test_time_limit_stops_before_timing_and_keeps_the_counts(tmp_path):
    report = paper_gpu.main([*TINY, "--parts", "dm", "--time-limit", "0.001", "--out", str(tmp_path)])
    assert "time limit" in report["stopped"] and report["results"] == []
    saved = json.loads((tmp_path / "paper_gpu.json").read_text())
    assert saved["flops_per_tile"]["dm"] > 0 and "Stopped early" in (tmp_path / "paper_gpu.md").read_text()


def test_peak_fraction_uses_the_given_peak(tmp_path):
    report = paper_gpu.main([*TINY, "--parts", "dm", "--peak-tflops", "1", "--out", str(tmp_path)])
    row = report["results"][0]
    assert row["floor_fraction"] == pytest.approx(row["tflop_per_s"] / 1.0)
    assert row["tflop_per_s"] == pytest.approx(row["tiles_per_s"] * row["gflop_per_tile"] / 1e3)


def test_flop_counter_counts_matmuls_and_works_through_autograd_grad():
    lin = torch.nn.Linear(16, 8)
    x = torch.randn(4, 16, requires_grad=True)
    assert paper_gpu.count_flops(lambda: lin(x)) == 2 * 4 * 16 * 8

    def grad_of_input():  # what classifier guidance does; torch's FlopCounterMode refuses it
        return torch.autograd.grad(lin(x).sum(), x)[0]

    # forward plus the input-gradient matmul; the weight's gradient is not asked for, so not computed
    assert paper_gpu.count_flops(grad_of_input) == 2 * 2 * 4 * 16 * 8


def test_unknown_part_or_compile_value_is_refused():
    with pytest.raises(SystemExit):
        paper_gpu.main([*TINY, "--parts", "vae"])
    with pytest.raises(SystemExit):
        paper_gpu.main([*TINY, "--compile", "maybe"])


def test_peak_table_lookup():
    assert paper_gpu.peak_tflops("cpu", None) is None and paper_gpu.peak_tflops("cpu", 5.0) == 5.0


@pytest.mark.gpu
def test_gpu_run_uses_bf16_channels_last_fused_and_compile(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    report = paper_gpu.main(["--profile", "tiny", "--device", "cuda", "--steps", "2", "--skip", "2",
                             "--sample-batch", "4", "--ddim-steps", "4", "--compile", "off,on", "--out", str(tmp_path)])
    env = report["environment"]
    if torch.cuda.is_bf16_supported():
        assert env["precision"] == "bf16-mixed"
    assert env["channels_last"] and env["fused_optimizers"]
    assert [r for r in report["results"] if "error" in r] == []
    assert {(r["part"], r["compile"]) for r in report["results"]} >= {("dm", "off"), ("dm", "on")}
    assert all(r["peak_mem_gib"] > 0 for r in report["results"])
