"""Peak memory of the server's aggregation, streaming vs holding every reply: ``python -m benchmarks.fed_memory``.

Each configuration runs in a fresh process (peak RSS is per process); the model is ~100 MB of fp32.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch


def _site_weights(seed: int, mb: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = mb * 250_000 // 25  # 25 tensors, 4 bytes each
    return {f"unet.block{i}.weight": torch.randn(n, generator=g) for i in range(25)}


def measure(sites: int, mode: str, mb: int) -> dict:
    from strategies.aggregate import StreamingMean
    from wire.codec import to_record

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    acc, held = StreamingMean(), []
    for s in range(sites):
        record = to_record(_site_weights(s, mb))  # what arrives from one site
        if mode == "stream":
            acc.add(record, 100 + s)
            del record  # dropped as soon as it is in the running sum
        else:
            held.append(record)
    for s, record in enumerate(held):  # the non-streaming baseline: all replies in memory, then average
        acc.add(record, 100 + s)
    mean = acc.mean()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"sites": sites, "mode": mode, "model_mb": mb, "peak_rss_mb": peak / 1024, "baseline_rss_mb": base / 1024,
            "aggregation_peak_mb": (peak - base) / 1024, "params": sum(v.numel() for v in mean.values())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--sites", type=int, default=0)
    p.add_argument("--mode", default="stream")
    p.add_argument("--mb", type=int, default=100)
    a = p.parse_args(argv)
    if a.sites:
        print(json.dumps(measure(a.sites, a.mode, a.mb)))
        return 0
    print(f"{'mode':8} {'sites':>5} {'model MB':>8} {'aggregation peak MB':>20}")
    for mode in ("stream", "hold-all"):
        for sites in (3, 8):
            out = subprocess.run([sys.executable, "-m", "benchmarks.fed_memory", "--sites", str(sites), "--mode", mode,
                                  "--mb", str(a.mb)], capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"{mode:8} {sites:>5} {a.mb:>8} {r['aggregation_peak_mb']:>20.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
