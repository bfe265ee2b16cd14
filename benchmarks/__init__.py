"""Benchmarks: one command per figure in docs/benchmarks.md."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# the tiny profile without the pretrained LPIPS backbone (no weights needed) and a small batch
TINY_OVERRIDES = "weights.perceptual=random tiles.batch_size=4"


def simulate(run_dir: Path, sites: int, config: str, timeout: float = 1500.0) -> list[dict]:
    """A federated run in Flower's simulation runtime through ``python -m server.run``; its metrics.jsonl lines."""
    from strategies.checkpoint import read_metrics

    proc = subprocess.run([sys.executable, "-m", "server.run", "--run-dir", str(run_dir), "--simulation", str(sites),
                           "--config", config, "--timeout", str(timeout)], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"federated run failed ({proc.returncode}): {proc.stdout[-2000:]} {proc.stderr[-2000:]}")
    return read_metrics(run_dir)
