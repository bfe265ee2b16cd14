"""Bytes each site sends and receives per round, per transfer dtype, against the fp32 model size.

``python -m benchmarks.fed_bytes``: a real federated run (in-process grid, real ClientApp handlers, tiny
profile, 2 sites, 1 LAE + 1 DM round) per dtype, plus the paper-profile sizes computed from the models.
"""

from __future__ import annotations

import sys
import tempfile

import torch


def paper_sizes() -> dict[str, int]:
    from wire.contract import phase_shapes
    from histodiff.config import compose

    cfg = compose(["profile=paper"])
    sizes = {}
    for phase in ("lae", "dm"):
        numel = 0
        for shape in phase_shapes(cfg, phase).values():
            n = 1
            for s in shape:
                n *= s
            numel += n
        sizes[phase] = numel
    return sizes


def run(dtype: str) -> list[dict]:
    from flwr.supercore.task_identity import TaskIdentity

    from client.client_app import app
    from strategies.checkpoint import read_metrics
    from strategies.federation import Federation
    from tests.inprocess_grid import InProcessGrid

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    d = tempfile.mkdtemp(prefix="fedbytes")
    rc = {"overrides": "weights.perceptual=random lae.perceptual_weight=0 tiles.batch_size=4", "lae-rounds": 1,
          "dm-rounds": 1, "local-steps": 1, "min-sites": 2, "deliver": False, "run-dir": f"{d}/run",
          "work-root": f"{d}/sites", "phantom-per-class": 1, "transfer-dtype": dtype}
    grid = InProcessGrid(app, {1: {"partition-id": 0}, 2: {"partition-id": 1}}, rc)
    Federation.from_run_config(grid, rc, emit=lambda line: None).run()
    return read_metrics(f"{d}/run")


def main() -> int:
    from wire.contract import phase_shapes
    from histodiff.config import compose

    cfg = compose(["profile=tiny"])
    fp32 = {p: sum(4 * torch.Size(s).numel() for s in phase_shapes(cfg, p).values()) for p in ("lae", "dm")}
    print("tiny profile (64 px), per site per round; fp32 model size: "
          + ", ".join(f"{p} {v / 1e6:.2f} MB" for p, v in fp32.items()))
    print(f"{'dtype':6} {'phase':13} {'sent/site MB':>13} {'received/site MB':>17} {'received / fp32':>16}")
    for dtype in ("fp32", "bf16", "fp16"):
        for m in run(dtype):
            sent = max(m["bytes_sent_per_site"].values())
            recv = max(m["bytes_received_per_site"].values())
            ratio = recv / fp32[m["phase"]] if m["phase"] in fp32 else 0.0
            print(f"{dtype:6} {m['phase']:13} {sent / 1e6:>13.3f} {recv / 1e6:>17.3f} {ratio:>16.3f}")
    sizes = paper_sizes()
    print("paper profile, computed: " + ", ".join(
        f"{p} {n / 1e6:.1f} M params = {4 * n / 2**20:.0f} MiB fp32 / {2 * n / 2**20:.0f} MiB bf16|fp16"
        for p, n in sizes.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
