"""fp32 vs bf16 vs int8 transfer on the same phantom federation: bytes each way, the error of the applied global
update per round, and the final LAE reconstruction loss, DM loss and FID of samples; SecAgg+ bytes per dtype.

``python -m benchmarks.transfer_codecs [--lae-rounds 4 --dm-rounds 4 --lae-steps 10 --dm-steps 20]``: one
in-process federation per dtype (real ClientApp handlers, 3 unlabeled phantom sites with their own stains, the
same seeds), then a 1-round SecAgg+ federation per dtype. The "update error" of a round is
``||applied - exact|| / ||exact||``: ``applied`` the mean update the server applied, ``exact`` the tile-weighted
mean of the updates the sites computed in fp32 before encoding (error feedback included: what one round keeps
back, a later one sends).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

OVERRIDES = "tiles.image_size=32 tiles.batch_size=8 weights.perceptual=random"
DTYPES = ("fp32", "bf16", "int8")


class Probe:
    """Records each site's exact update (before encoding) and the mean update the server applies, per round."""

    def __init__(self):
        self.exact: list[dict] = []  # each site's exact update this round
        self.errors: list[float] = []

    def install(self, monkey):
        from strategies.aggregate import StreamingMean
        from wire import codec

        probe, encode, mean = self, codec.ErrorFeedback.encode, StreamingMean.mean

        def spy_encode(ef, update):
            probe.exact.append({k: v.clone() for k, v in update.items() if v.is_floating_point()})
            return encode(ef, update)

        def spy_mean(acc):
            applied = mean(acc)
            if probe.exact:
                n = len(probe.exact)  # equal tile counts at every phantom site: the plain mean is the weighted one
                num = den = 0.0
                for k in probe.exact[0]:
                    exact = sum(u[k] for u in probe.exact) / n
                    num += float((applied[k] - exact).pow(2).sum())
                    den += float(exact.pow(2).sum())
                probe.errors.append((num / max(den, 1e-30)) ** 0.5)
            probe.exact = []
            return applied

        monkey.append((codec.ErrorFeedback, "encode", encode))
        monkey.append((StreamingMean, "mean", mean))
        codec.ErrorFeedback.encode, StreamingMean.mean = spy_encode, spy_mean


def federation(root: Path, dtype: str, args, secagg: bool = False) -> tuple[list[dict], list[float], object]:
    from flwr.supercore.task_identity import TaskIdentity

    from client.client_app import app
    from strategies.checkpoint import read_metrics
    from strategies.federation import Federation
    from tests.inprocess_grid import InProcessGrid

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    run = root / f"{dtype}{'-secagg' if secagg else ''}"
    overrides = OVERRIDES + (" privacy.secagg=true" if secagg else "")
    rc = {"profile": "tiny", "overrides": overrides, "lae-rounds": 1 if secagg else args.lae_rounds,
          "dm-rounds": 0 if secagg else args.dm_rounds, "lae-local-steps": args.lae_steps,
          "dm-local-steps": args.dm_steps, "min-sites": 3, "deliver": False, "run-dir": str(run),
          "work-root": str(run / "sites"), "phantom-per-class": args.per_class, "transfer-dtype": dtype,
          "labeled-partitions": "", "poll": 0.01}
    grid = InProcessGrid(app, {10 + i: {"partition-id": i, "num-partitions": 3} for i in range(3)}, rc)
    probe, restore = Probe(), []
    if not secagg:
        probe.install(restore)
    try:
        fed = Federation.from_run_config(grid, rc, emit=lambda line: print(f"  {dtype}: {line}", flush=True))
        fed.run()
    finally:
        for owner, name, original in restore:
            setattr(owner, name, original)
    return read_metrics(run), probe.errors, fed


@torch.no_grad()
def sample_fid(run: Path, cfg, real_dir: Path, n: int) -> float:
    from histodiff.model_files import load_global_model
    from histodiff.data.tile_dataset import tile_dataset_from_config
    from histodiff.diffusion.noise_schedule import build_ddim
    from histodiff.evaluation.fid import fid, inception_features
    from histodiff.diffusion.ddim_sampling import ddim_sample, decode_latents
    from histodiff.evaluation.inception import load_inception

    ae, unet, info = load_global_model(run / "global_model")
    z = ddim_sample(unet, build_ddim(cfg.dm), n, cfg.dm.ddim_steps, 0.0, torch.Generator().manual_seed(0))
    fake = decode_latents(ae, z, info["scale_factor"])
    real_cfg = cfg.copy()
    real_cfg.data, real_cfg.work_dir = str(real_dir), str(real_dir.parent / "work-real")
    real = torch.stack([tile for tile, _ in tile_dataset_from_config(real_cfg, train=False)])[:n]
    inception = load_inception(cfg.weights)
    return fid(inception_features(inception, real.split(32)), inception_features(inception, fake.split(32)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.transfer_codecs", description=__doc__)
    p.add_argument("--lae-rounds", type=int, default=4)
    p.add_argument("--dm-rounds", type=int, default=4)
    p.add_argument("--lae-steps", type=int, default=10)
    p.add_argument("--dm-steps", type=int, default=20)
    p.add_argument("--per-class", type=int, default=4)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from histodiff.data.phantom_tissue import write_phantom_site
    from wire.settings import Settings

    root = Path(args.out or tempfile.mkdtemp(prefix="transfer-codecs-"))
    real = root / "real-heldout"
    if not real.is_dir():  # unseen draws of the three sites' stains, the FID reference
        for site in range(3):
            write_phantom_site(real / f"s{site}", per_class=args.per_class, size=32, site=site, seed=50_000 + site,
                               labeled=False)
    cfg = Settings(overrides=OVERRIDES).compose()
    rows, started = {}, time.time()
    for dtype in DTYPES:
        t0 = time.time()
        lines, errors, _ = federation(root, dtype, args)
        train = [m for m in lines if m["phase"] in ("lae", "dm")]
        last = {ph: [m for m in train if m["phase"] == ph][-1] for ph in ("lae", "dm")}
        steady = [m for m in train if m["round"] > 1]  # round 1 of a phase sends the whole model down
        rows[dtype] = {
            "down": sum(max(m["bytes_sent_per_site"].values()) for m in steady),
            "up": sum(max(m["bytes_received_per_site"].values()) for m in steady),
            "err_mean": sum(errors) / len(errors), "err_max": max(errors),
            "rec": last["lae"]["losses"].get("rec", float("nan")), "dm": last["dm"]["losses"]["loss"],
            "fid": sample_fid(root / dtype, cfg, real, args.samples), "seconds": time.time() - t0,
            "lae_up": max(train[0]["bytes_received_per_site"].values()),  # one LAE round's upload, for SecAgg+
        }
    secure = {}
    for dtype in DTYPES:
        lines, _, _ = federation(root, dtype, args, secagg=True)
        lae = [m for m in lines if m["phase"] == "lae"][0]
        secure[dtype] = (max(lae["bytes_sent_per_site"].values()), max(lae["bytes_received_per_site"].values()))

    base = rows["fp32"]
    print(f"\n{args.lae_rounds} LAE rounds x {args.lae_steps} steps + {args.dm_rounds} DM rounds x {args.dm_steps} "
          f"steps, 3 sites, tiny profile at 32 px; bytes per site over rounds 2+ of each phase "
          f"(round 1 sends the model down whole); {time.time() - started:.0f} s in all")
    print(f"| dtype | down / fp32 | up / fp32 | update error, mean (max) | LAE rec loss | DM loss | FID ({args.samples} samples) |")
    print("|---|---|---|---|---|---|---|")
    for dtype, r in rows.items():
        print(f"| {dtype} | {r['down'] / base['down']:.3f} | {r['up'] / base['up']:.3f} | "
              f"{r['err_mean']:.2e} ({r['err_max']:.2e}) | {r['rec']:.4f} ({r['rec'] / base['rec'] - 1:+.1%}) | "
              f"{r['dm']:.4f} ({r['dm'] / base['dm'] - 1:+.1%}) | {r['fid']:.1f} ({r['fid'] / base['fid'] - 1:+.1%}) |")
    print("\nSecAgg+ (one LAE round, 3 sites): bytes per site; the masked upload is uint32 whatever the dtype")
    print("| dtype | down (round 1: whole fp32 model) | up, masked | up / the same dtype's plain upload |")
    print("|---|---|---|---|")
    for dtype, (down, up) in secure.items():
        print(f"| {dtype} | {down / 1e6:.3f} MB | {up / 1e6:.3f} MB | {up / rows[dtype]['lae_up']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
