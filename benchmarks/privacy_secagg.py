"""Cost of SecAgg+ (wire/secagg.py): per federated round, and the protocol's compute at the paper profile.

    HF_HUB_OFFLINE=1 python -m benchmarks.privacy_secagg [--sites 3] [--steps 5] [--skip-federation] [--skip-paper]

Federation: the same run (tiny profile, ``--sites`` sites in Flower's simulation runtime through
``python -m server.run --simulation``, 2 LAE + latent-stats + 2 DM rounds of ``--steps`` local steps) without
and with ``privacy.secagg=true``; prints each round's seconds, ratio and bytes, and the protocol stages' seconds
(round 2 of a phase runs warm). Paper: the masking work of one round on arrays shaped like the paper profile's
DM UNet (built on the meta device, random updates): one site's quantise + mask, the server's streaming sum of
``--sites`` uploads and the unmasking with one site dropped after sharing, in this process on CPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

from benchmarks import TINY_OVERRIDES, simulate

def federation(sites: int, steps: int, secagg: bool, root: Path) -> list[dict]:
    run_dir = root / ("secagg" if secagg else "plain")
    overrides = TINY_OVERRIDES + (" privacy.secagg=true" if secagg else "")
    config = (f'overrides="{overrides}" lae-rounds=2 dm-rounds=2 deliver=false labeled-partitions="" '
              f'local-steps={steps} min-sites={min(sites, 2)} work-root="{root / "sites"}" run-name="{run_dir.name}"')
    return simulate(run_dir, sites, config)


def bench_federation(sites: int, steps: int) -> dict:
    root = Path(tempfile.mkdtemp(prefix="secagg-bench"))
    plain, secure = federation(sites, steps, False, root), federation(sites, steps, True, root)
    rows = []
    for p, s in zip(plain, secure):
        rows.append({"phase": p["phase"], "round": p["round"], "plain_s": p["seconds"], "secagg_s": s["seconds"],
                     "ratio": round(s["seconds"] / p["seconds"], 2),
                     "plain_MB_received": round(p["bytes_received"] / 1e6, 3),
                     "secagg_MB_received": round(s["bytes_received"] / 1e6, 3),
                     "protocol_s": s.get("secagg", {}).get("seconds"),
                     "quantisation_bound": s.get("secagg", {}).get("quantisation_bound")})
    return {"sites": sites, "local_steps": steps, "rounds": rows}


def bench_paper(sites: int) -> dict:
    """One secure round's masking work on paper-profile DM UNet shapes (no training; random updates)."""
    import torch
    from flwr.app import RecordDict

    from histodiff.config import compose
    from histodiff.diffusion.unet import build_unet
    from wire.secagg import SecAggParams, SecureSum, SiteSecAgg

    cfg = compose(["profile=paper"])
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in build_unet(cfg).state_dict().items() if v.is_floating_point()}
    params = SecAggParams.from_config(cfg)
    nodes = list(range(1, sites + 1))
    server = SecureSum(params, "bench", shapes)
    site = {n: SiteSecAgg(RecordDict(), n, "bench") for n in nodes}
    t = time.perf_counter()
    for n in nodes:
        server.add_keys(n, site[n].keys(1000 + n))
    request = server.share_request()
    for n in nodes:
        server.add_shares(n, site[n].shares(request))
    for n in nodes:
        site[n].receive(server.forward(n, equal_weights=False))
    keys_s = time.perf_counter() - t
    gen = torch.Generator().manual_seed(0)
    mask_s, add_s = [], []
    for n in nodes[:-1]:  # the last site drops after sharing its secrets
        update = {k: torch.randn(s, generator=gen) * 1e-3 for k, s in shapes.items()}
        t = time.perf_counter()
        record, _ = site[n].mask(update, params)
        mask_s.append(time.perf_counter() - t)
        del update
        t = time.perf_counter()
        server.add_masked(n, record)
        add_s.append(time.perf_counter() - t)
        del record
    request = server.unmask_request()
    replies = {n: site[n].unmask(request) for n in server.masked}
    t = time.perf_counter()
    server.unmask(replies)
    unmask_s = time.perf_counter() - t
    n_params = sum(torch.Size(s).numel() for s in shapes.values())
    return {"model": "paper DM UNet", "params": n_params, "upload_MB": round(4 * (n_params + 1) / 1e6, 1),
            "sites": sites, "dropped_after_sharing": 1, "keys_and_shares_s": round(keys_s, 3),
            "site_mask_s": round(min(mask_s), 2), "server_add_per_upload_s": round(min(add_s), 2),
            "server_unmask_s": round(unmask_s, 2),
            "peak_rss_GB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--skip-federation", action="store_true")
    ap.add_argument("--skip-paper", action="store_true")
    args = ap.parse_args(argv)
    result = {}
    if not args.skip_federation:
        result["federation"] = bench_federation(args.sites, args.steps)
    if not args.skip_paper:
        result["paper_masking"] = bench_paper(args.sites)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
