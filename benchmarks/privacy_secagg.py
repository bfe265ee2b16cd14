"""One Flower simulation round trip with or without SecAgg+ on a tiny-profile model (for privacy_dp_cost).

    HF_HUB_OFFLINE=1 python -m benchmarks.privacy_secagg --mode secagg --phase dm --sites 3 --rounds 2

Runs Flower's real legacy ``SecAggPlusWorkflow`` + ``secaggplus_mod`` (or the plain DefaultWorkflow) in the
in-process simulation runtime; prints the seconds from configure_fit to aggregate_fit of every round (round 1
includes starting the Ray actors) and the largest deviation of the aggregate from the plain weighted mean.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile

import numpy as np


def model_arrays(phase: str) -> list[np.ndarray]:
    from histodiff.config import compose
    from histodiff.models import build_autoencoder
    from histodiff.models.unet import build_unet

    cfg = compose(["profile=tiny"])
    model = build_autoencoder(cfg.lae) if phase == "lae" else build_unet(cfg)
    return [v.detach().numpy().astype(np.float32) for v in model.state_dict().values()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("secagg", "plain"), default="secagg")
    ap.add_argument("--phase", choices=("lae", "dm"), default="dm")
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths have a length limit
    os.environ["RAY_TMPDIR"] = ray_tmp
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from flwr.simulation import run_simulation

    from strategies.privacy import legacy_secagg_apps

    base = model_arrays(args.phase)

    def site_update(pid: int):
        rng = np.random.default_rng(pid)
        return [b + np.float32(0.01) * rng.standard_normal(b.shape, dtype=np.float32) for b in base], 36 + pid

    record: dict = {}
    server, client = legacy_secagg_apps(site_update, base, args.sites, record, secagg=args.mode == "secagg",
                                        rounds=args.rounds)
    try:
        run_simulation(server, client, num_supernodes=args.sites,
                       backend_config={"client_resources": {"num_cpus": 1}})
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    updates = [site_update(i) for i in range(args.sites)]
    total = sum(w for _, w in updates)
    plain = [sum(w * a[k] for a, w in updates) / total for k in range(len(base))]
    last = record["aggregate"][args.rounds]
    print("RESULT " + json.dumps({
        "mode": args.mode, "phase": args.phase, "sites": args.sites,
        "params": int(sum(b.size for b in base)), "fp32_bytes": int(sum(b.nbytes for b in base)),
        "round_seconds": {str(k): round(v, 3) for k, v in record["seconds"].items()},
        "max_abs_err": float(max(np.abs(a - p).max() for a, p in zip(last, plain))),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
