"""Measurements behind ``configs/profile/small.yaml``: train-step times of candidate sizes, and whether a trained
LAE keeps class identity (an image classifier phi on real vs reconstructed held-out tiles, PSNR, LPIPS, and the
noise-aware latent classifier's accuracy by t).

``python -m benchmarks.small_profile_probe time [--lae ...] [--dm ...]``: seconds per train step of each candidate.
``python -m benchmarks.small_profile_probe eval RUN_DIR --labeled DIR --test DIR [overrides]``: metrics of
RUN_DIR/lae/autoencoder (or another folder with --autoencoder), written to RUN_DIR/probe.json.

Findings: docs/small_profile_measurements.md. Pin it to one core, e.g.
``taskset -c 1 env OMP_NUM_THREADS=1 python -m benchmarks.small_profile_probe time``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from histodiff.autoencoder.kl_autoencoder import build_autoencoder
from histodiff.autoencoder.lae_loss import build_lae_loss
from histodiff.autoencoder.lpips_vgg import build_lpips
from histodiff.config import compose
from histodiff.data.tile_dataset import TileFolder, TileOptions
from histodiff.diffusion.noise_schedule import build_ddim, build_noise_scheduler
from histodiff.diffusion.unet import build_unet
from histodiff.evaluation.downstream import carve_validation, loader, train_classifier
from histodiff.evaluation.image_classifier import build_image_classifier
from histodiff.evaluation.reconstruction import reconstruction_metrics
from histodiff.guidance.latent_classifier_net import build_latent_classifier
from histodiff.guidance.latent_classifier_training import accuracy_by_timestep, encode_latents, train_latent_classifier


# ------------------------------------------------------------------------------------------- step times


def _lae_step_time(cfg, steps: int, skip: int, disc: bool) -> float:
    ae, loss_fn = build_autoencoder(cfg.lae), build_lae_loss(cfg)
    opt_g = torch.optim.Adam(ae.parameters(), lr=cfg.lae.lr, betas=tuple(cfg.lae.betas))
    opt_d = torch.optim.Adam(loss_fn.discriminator.parameters(), lr=cfg.lae.lr, betas=tuple(cfg.lae.betas))
    b, s = cfg.tiles.batch_size, cfg.tiles.image_size
    t0 = 0.0
    for step in range(steps + skip):
        if step == skip:
            t0 = time.perf_counter()
        x = torch.rand(b, 3, s, s) * 2 - 1
        post = ae.encode(x).latent_dist
        x_hat = ae.decode(post.sample()).sample
        # a step far past (or before) any disc_start: the adversarial term on (or off) from the first step
        g, _ = loss_fn.generator_loss(x, x_hat, post, 10**9 if disc else -1, last_layer=ae.decoder.conv_out.weight)
        opt_g.zero_grad(set_to_none=True)
        g.backward()
        opt_g.step()
        if disc:
            d, _ = loss_fn.discriminator_loss(x, x_hat.detach(), 10**9)
            opt_d.zero_grad(set_to_none=True)
            d.backward()
            opt_d.step()
    return (time.perf_counter() - t0) / steps


def _dm_step_time(cfg, steps: int, skip: int) -> float:
    from diffusers.training_utils import EMAModel

    ae = build_autoencoder(cfg.lae).eval().requires_grad_(False)
    unet, sched = build_unet(cfg), build_noise_scheduler(cfg.dm)
    ema = EMAModel(unet.parameters(), decay=cfg.dm.ema_decay)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.dm.lr, weight_decay=cfg.dm.weight_decay)
    b, s = cfg.tiles.batch_size, cfg.tiles.image_size
    t0 = 0.0
    for step in range(steps + skip):
        if step == skip:
            t0 = time.perf_counter()
        with torch.no_grad():
            z0 = ae.encode(torch.rand(b, 3, s, s) * 2 - 1).latent_dist.sample()
        noise = torch.randn_like(z0)
        t = torch.randint(0, sched.config.num_train_timesteps, (b,))
        loss = F.mse_loss(unet(sched.add_noise(z0, noise, t), t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.step(unet.parameters())
    return (time.perf_counter() - t0) / steps


def _params(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def cmd_time(args) -> None:
    torch.set_num_threads(args.threads)
    rows = []
    for spec in args.lae:
        # "32,64,64/1/8[/disc]": channels / layers_per_block / batch
        parts = spec.split("/")
        ch, lpb, batch = parts[0], parts[1], parts[2]
        disc = len(parts) > 3 and parts[3] == "disc"
        groups = min(32, min(int(c) for c in ch.split(",")) // 2)
        cfg = compose([f"profile={args.profile}", f"lae.block_out_channels=[{ch}]", f"lae.layers_per_block={lpb}",
                       f"lae.norm_num_groups={groups}", f"tiles.batch_size={batch}", *args.overrides])
        sec = _lae_step_time(cfg, args.steps, args.skip, disc)
        n = _params(build_autoencoder(cfg.lae))
        rows.append({"model": "lae", "spec": spec, "params_m": round(n, 3), "sec_per_step": round(sec, 4),
                     "tiles_per_s": round(int(batch) / sec, 1), "threads": args.threads})
        print(json.dumps(rows[-1]), flush=True)
    for spec in args.dm:
        # "64,128,128/0,1,1/1/16": channels / attention per level / layers_per_block / batch
        ch, attn, lpb, batch = spec.split("/")
        levels = "[" + ",".join("true" if a == "1" else "false" for a in attn.split(",")) + "]"
        first = int(ch.split(",")[0])
        cfg = compose([f"profile={args.profile}", f"dm.unet.block_out_channels=[{ch}]",
                       f"dm.unet.attention_levels={levels}", f"dm.unet.layers_per_block={lpb}",
                       f"dm.unet.num_heads={max(1, first // 32)}", f"dm.unet.norm_num_groups={min(32, first // 2)}",
                       f"tiles.batch_size={batch}", *args.overrides])
        sec = _dm_step_time(cfg, args.steps, args.skip)
        n = _params(build_unet(cfg))
        rows.append({"model": "dm", "spec": spec, "params_m": round(n, 3), "sec_per_step": round(sec, 4),
                     "tiles_per_s": round(int(batch) / sec, 1), "threads": args.threads})
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "a") as fh:
            for r in rows:
                fh.write(json.dumps(r) + "\n")


# ------------------------------------------------------------------------------------------- class identity


def open_tiles(root, size: int, work_dir) -> TileFolder:
    """A labeled tile folder as it is, without augmentation."""
    return TileFolder.open(str(root), TileOptions(size), work_dir=str(work_dir))


def subset_tiles(folder: TileFolder, size: int, subset: list[int], augment: bool) -> TileFolder:
    return TileFolder(folder.index, TileOptions(size, augment=augment), subset=subset)


def _phi(cfg, labeled: Path, cache: Path, seed: int):
    """phi trained on the labeled site's real tiles (train split), picked on its validation split; cached."""
    full = open_tiles(labeled, cfg.tiles.image_size, cache)
    labels = [y for _, y in full.index.entries]
    train_idx, val_idx = carve_validation(labels, cfg.augment.val_fraction, cfg.augment.min_val_per_class, seed,
                                          full.classes)
    train = subset_tiles(full, cfg.tiles.image_size, train_idx, True)
    val = subset_tiles(full, cfg.tiles.image_size, val_idx, False)
    weights = cache / "phi.pt"
    meta_path = cache / "phi.json"
    key = {"classifier": {k: cfg.aux_classifier[k] for k in ("model", "img_size", "lr", "weight_decay", "epochs")},
           "batch": cfg.tiles.batch_size, "seed": seed, "labeled": str(labeled.resolve())}
    if weights.is_file() and meta_path.is_file() and json.loads(meta_path.read_text()).get("key") == key:
        model = build_image_classifier(cfg.aux_classifier, len(full.classes))
        model.load_state_dict(torch.load(weights, weights_only=True))
        meta = json.loads(meta_path.read_text())
        return model.eval(), val, full.classes, meta
    started = time.perf_counter()
    trained = train_classifier(cfg.aux_classifier, cfg.train, train, val, len(full.classes), seed,
                               cfg.tiles.batch_size, "probe phi")
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(trained.model.state_dict(), weights)
    meta = {"key": key, "best_val_accuracy": trained.best_val_accuracy, "seconds": time.perf_counter() - started,
            "train_tiles": len(train), "val_tiles": len(val)}
    meta_path.write_text(json.dumps(meta, indent=1))
    return trained.model.eval(), val, full.classes, meta


@torch.no_grad()
def _recon_grid(autoencoder, dataset, path: Path, per_class: int = 2) -> None:
    """Two held-out tiles per class (top row) and their reconstructions (bottom row)."""
    from torchvision.utils import save_image

    labels = [dataset[i][1] for i in range(len(dataset))]
    picks = [i for c in sorted(set(labels)) for i in [j for j, y in enumerate(labels) if y == c][:per_class]]
    x = torch.stack([dataset[i][0] for i in picks])
    x_hat = autoencoder.decode(autoencoder.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    save_image(torch.cat([x, x_hat]) * 0.5 + 0.5, str(path), nrow=len(picks))


def _latent_accuracy(cfg, autoencoder, train_set, test_set, scale: float, seed: int) -> dict:
    z_tr, y_tr = encode_latents(autoencoder, train_set, scale, cfg.tiles.batch_size, True)
    z_te, y_te = encode_latents(autoencoder, test_set, scale, cfg.tiles.batch_size, False)
    alphas = build_ddim(cfg.dm).alphas_cumprod.clone()
    clf = build_latent_classifier(cfg, len(set(y_tr.tolist())))
    started = time.perf_counter()
    loss = train_latent_classifier(cfg, clf, alphas, z_tr, y_tr)
    seconds = time.perf_counter() - started
    acc = accuracy_by_timestep(clf.cpu(), alphas, z_te, y_te, cfg.augment.latent_eval_timesteps, seed=seed)
    return {"steps": cfg.latent_classifier.steps, "final_loss": loss, "seconds": seconds,
            "train_latents": len(z_tr), "accuracy_by_t": {str(t): v for t, v in acc.items()}}


def cmd_eval(args) -> None:
    from diffusers import AutoencoderKL

    torch.set_num_threads(args.threads)
    cfg = compose([f"profile={args.profile}", *args.overrides])
    run_dir = Path(args.run_dir)
    ae_dir = Path(args.autoencoder) if args.autoencoder else run_dir / "lae" / "autoencoder"
    autoencoder = AutoencoderKL.from_pretrained(str(ae_dir)).eval().requires_grad_(False)
    cache = Path(args.cache or Path(args.labeled).parent / "probe-phi")
    phi, val, classes, phi_meta = _phi(cfg, Path(args.labeled), cache, args.seed)
    test = open_tiles(args.test, cfg.tiles.image_size, cache / "test")
    lpips_net = build_lpips(cfg.weights).eval()
    out = {"run_dir": str(run_dir), "autoencoder": str(ae_dir), "phi": {"model": cfg.aux_classifier.model,
           "best_val_accuracy": phi_meta["best_val_accuracy"], "seconds": phi_meta.get("seconds")}}
    state = run_dir / "lae" / "training_state.pt"
    if state.is_file():
        out["lae_step"] = int(torch.load(state, map_location="cpu", weights_only=True)["step"])
    out["test"] = reconstruction_metrics(autoencoder, phi, cfg.aux_classifier.img_size, test, lpips_net, 32)
    out["val"] = reconstruction_metrics(autoencoder, phi, cfg.aux_classifier.img_size, val, lpips_net, 32)
    print(json.dumps({k: out[k] for k in ("test", "val")}, indent=1), flush=True)
    name = args.name or "probe"
    _recon_grid(autoencoder, test, run_dir / f"{name}-reconstructions.png")
    if args.latent:
        stats = run_dir / "latent_stats.json"
        if stats.is_file():
            scale = float(json.loads(stats.read_text())["scale_factor"])
        else:  # the labeled site's own latents: close to the pre-training sites' value, enough for a probe
            z = torch.cat([autoencoder.encode(x).latent_dist.mode() for x, _ in loader(test, 32, False)])
            scale = 1.0 / float(z.std())
        full = open_tiles(args.labeled, cfg.tiles.image_size, cache)
        out["latent_classifier"] = _latent_accuracy(cfg, autoencoder, full, test, scale, args.seed)
        out["latent_classifier"]["scale_factor"] = scale
        print(json.dumps(out["latent_classifier"], indent=1), flush=True)
    (run_dir / f"{name}.json").write_text(json.dumps(out, indent=1))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("time", help="seconds per train step of candidate LAE / DM sizes (random tiles)")
    t.add_argument("--lae", nargs="*", default=[], help="CHANNELS/LAYERS/BATCH[/disc], e.g. 64,128,128/1/16/disc")
    t.add_argument("--dm", nargs="*", default=[], help="CHANNELS/ATTN/LAYERS/BATCH, e.g. 64,128,128/0,1,1/1/32")
    t.add_argument("--steps", type=int, default=6)
    t.add_argument("--skip", type=int, default=2)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--profile", default="small")
    t.add_argument("--out", default=None, help="append the rows (JSON lines) to this file")
    t.add_argument("overrides", nargs="*")
    e = sub.add_parser("eval", help="class identity of a trained LAE: phi on real vs reconstructed tiles")
    e.add_argument("run_dir")
    e.add_argument("--labeled", required=True, help="the labeled site's tiles (class sub-folders)")
    e.add_argument("--test", required=True, help="held-out tiles of the same site (class sub-folders)")
    e.add_argument("--autoencoder", default=None, help="default RUN_DIR/lae/autoencoder")
    e.add_argument("--cache", default=None, help="where phi is cached (default: beside --labeled)")
    e.add_argument("--latent", action="store_true", help="also train the latent classifier and report acc by t")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--threads", type=int, default=1)
    e.add_argument("--profile", default="small")
    e.add_argument("--name", default=None, help="output RUN_DIR/NAME.json (default probe)")
    e.add_argument("overrides", nargs="*")
    args, extra = ap.parse_known_args(argv)  # key=value overrides may also come after the options
    unknown = [e for e in extra if e.startswith("-") or "=" not in e]
    if unknown:
        ap.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides += extra
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    {"time": cmd_time, "eval": cmd_eval}[args.cmd](args)


if __name__ == "__main__":
    main()
