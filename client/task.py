"""Pure site-side functions of a federated round: site settings, data, local LAE/DM steps, latent stats, delivery.

Everything a site keeps between rounds lives under ``<work>/<run-name>/``, never in memory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from wire.codec import weights_digest

log = logging.getLogger(__name__)
ROLES = ("unlabeled", "labeled")


@dataclass
class Site:
    name: str
    role: str
    data: Path
    work: Path  # the site's work directory (tile index, run state)
    state: Path  # <work>/<run-name>: this federated run's local state
    test: Path | None = None
    phantom: int | None = None  # phantom stain style to generate when no data folder is given


def _labeled_partitions(text, num_partitions) -> set[int]:
    """Partition ids of ``labeled-partitions``: ids and/or ``last`` (= num-partitions - 1); empty: none."""
    ids = set()
    for token in str(text).replace(",", " ").split():
        if token.lower() == "last":
            if num_partitions is None:
                raise ValueError('labeled-partitions "last" needs num-partitions in the node config (Flower\'s '
                                 "simulation sets it); name the partition ids instead, e.g. labeled-partitions=\"3\"")
            ids.add(int(num_partitions) - 1)
        elif token.isdigit():
            ids.add(int(token))
        else:
            raise ValueError(f"labeled-partitions {text!r}: expected partition ids and/or 'last', got {token!r}")
    return ids


def run_name(settings) -> str:
    """The folder of this run's state at each site: ``run-name``, else the run directory's name."""
    settings = _settings(settings)
    return settings.run_name or Path(settings.run_dir).name or "federated"


def _settings(run_config):
    """The run's typed settings (``wire.settings.Settings``), parsed from a raw run config when given one."""
    from wire.settings import Settings

    return run_config if isinstance(run_config, Settings) else Settings.from_run_config(run_config)


def site_from_context(node_config, settings) -> Site:
    """Deployment: the node config names data-path, site-name, role, work-dir.

    Simulation (no data-path): Flower sets partition-id and num-partitions; the run config's labeled-partitions
    (ids and/or ``last``; the project default is ``last``) picks the labeled site(s). Data: ``<sites-root>/site<id>/``
    (a labeled site's test tiles in ``site<id>-test/`` beside it) or, without sites-root, phantom tiles in the
    site's own stain style, generated once under ``<work-root>/site<id>/``. ``settings``: the run's
    ``wire.settings.Settings`` (or its raw run config).
    """
    s = _settings(settings)
    if "data-path" in node_config:
        work = Path(str(node_config.get("work-dir", "") or Path(str(node_config["data-path"])).parent / "work"))
        role = str(node_config.get("role", "unlabeled"))
        name = str(node_config.get("site-name", "") or Path(str(node_config["data-path"])).name)
        test = node_config.get("test-path")
        site = Site(name, role, Path(str(node_config["data-path"])), work, work / run_name(s),
                    Path(str(test)) if test else None)
    else:
        pid = int(node_config.get("partition-id", 0))
        root = Path(s.work_root or Path(s.run_dir) / "sites")
        work = root / f"site{pid}"
        labeled = _labeled_partitions(s.labeled_partitions, node_config.get("num-partitions"))
        role = "labeled" if pid in labeled else "unlabeled"
        sites_root = s.sites_root
        data = Path(sites_root) / f"site{pid}" if sites_root else work / "phantom-tiles"
        test = None
        if role == "labeled":  # a sites-root holds siteN-test/ beside siteN/; a phantom site makes its own
            test = Path(sites_root) / f"site{pid}-test" if sites_root else work / "phantom-test"
            test = test if not sites_root or test.is_dir() else None
        site = Site(f"site{pid}", role, data, work, work / run_name(s), test, None if sites_root else pid)
    if site.role not in ROLES:
        raise ValueError(f"site role {site.role!r}; expected one of {', '.join(ROLES)}")
    return site


def site_config(settings, site: Site):
    """The site's model config: the run's overrides (``wire.settings.Settings``) and the site's own paths."""
    return settings.compose([f"data={site.data}", f"work_dir={site.work}", f"run_dir={site.state}"])


def ensure_phantom(cfg, site: Site, per_class: int, seed: int) -> None:
    """Write this virtual site's phantom tiles once (its own stain style: site = partition id)."""
    if site.phantom is None:
        return
    done = site.data / ".complete"
    if done.exists():
        return
    from histodiff.data.phantom_tissue import write_phantom_site

    write_phantom_site(site.data, per_class=per_class, size=cfg.tiles.image_size, site=site.phantom, seed=seed,
                       labeled=site.role == "labeled")
    if site.test is not None:  # the labeled site's held-out test tiles: same stain, other draws
        write_phantom_site(site.test, per_class=per_class, size=cfg.tiles.image_size, site=site.phantom,
                           seed=seed + 10_000, labeled=True)
    done.write_text("ok")


def load_dataset(cfg, train: bool = True):
    from histodiff.data.tile_dataset import tile_dataset_from_config

    return tile_dataset_from_config(cfg, train=train)


def lae_round(cfg, dataset, site: Site, steps: int, global_weights, mu: float = 0.0):
    from client.proximal import proximal_callbacks
    from client.round_progress import RoundProgress
    from histodiff.local_training.local_steps import train_lae_steps

    return train_lae_steps(cfg, dataset, site.state / "lae", steps, init_weights=global_weights, progress=False,
                           callbacks=[*proximal_callbacks(mu, "lae", cfg.lae.share_discriminator),
                                      RoundProgress(total=steps, label=f"{site.name} lae")])


def dm_round(cfg, dataset, site: Site, steps: int, global_weights, autoencoder, scale_factor: float, mu: float = 0.0):
    from client.proximal import proximal_callbacks
    from client.round_progress import RoundProgress
    from histodiff.local_training.local_steps import train_dm_steps

    return train_dm_steps(cfg, dataset, site.state / "dm", steps, autoencoder, scale_factor,
                          init_weights=global_weights, progress=False,
                          callbacks=[*proximal_callbacks(mu, "dm"), RoundProgress(total=steps, label=f"{site.name} dm")])


def latent_stats(cfg, dataset, autoencoder):
    from histodiff.diffusion.latent_stats import compute_latent_stats

    return compute_latent_stats(autoencoder, dataset, batch_size=cfg.tiles.batch_size, seed=cfg.seed)


# ------------------------------------------------------------------ the frozen global autoencoder of the DM phase


def cache_global_autoencoder(site: Site, weights: dict[str, torch.Tensor]) -> str:
    from histodiff.model_files import save_state_dict_file

    digest = weights_digest(weights)
    save_state_dict_file(weights, site.state / "global_autoencoder.safetensors")
    (site.state / "global_autoencoder.digest").write_text(digest)
    return digest


def cached_global_autoencoder(site: Site, digest: str) -> dict[str, torch.Tensor]:
    from histodiff.model_files import load_state_dict_file

    path = site.state / "global_autoencoder.safetensors"
    have = (site.state / "global_autoencoder.digest").read_text().strip() if path.exists() else None
    if have != digest:
        raise RuntimeError(f"site {site.name} lacks the global autoencoder {digest} of the DM phase (has {have})")
    return load_state_dict_file(path)


# ------------------------------------------------------------------ the memorisation check after the DM phase


def memorisation_check(cfg, site: Site, unet, autoencoder, scale_factor: float, samples: int, ddim_steps: int,
                       alpha: float, seed: int) -> dict[str, float]:
    """Samples of the global model against this site's own tiles (``histodiff.privacy.memorisation``): the counts
    and quantiles for the server; per-sample details and a grid of any near-copies stay in ``<state>/memorisation``."""
    from histodiff.diffusion.noise_schedule import build_ddim
    from histodiff.local_training.trainer_setup import on_gpu
    from histodiff.privacy.memorisation import LOCAL_REPORT, check_memorisation, write_local_report

    tiles = load_dataset(cfg, train=False)  # no flips: each tile once, as it is on disk
    result = check_memorisation(unet, build_ddim(cfg.dm), autoencoder, scale_factor, tiles, samples, ddim_steps,
                                alpha, seed, batch_size=cfg.tiles.batch_size,
                                device="cuda" if on_gpu(cfg.train) else "cpu",
                                sample_batch_size=cfg.augment.sample_batch_size)
    path = write_local_report(result, site.state / LOCAL_REPORT, lambda i: _tile_name(tiles, i),
                              lambda i: tiles[i][0])
    f = result.figures
    log.info("memorisation check at %s: %d of %d samples are near-copies of its %d tiles (feature %d, pixel %d); "
             "details stay here: %s", site.name, f["near-copies"], f["samples"], f["tiles"], f["near-copies-feature"],
             f["near-copies-pixel"], path.parent)
    return f


def _tile_name(tiles, position: int) -> str:
    """A tile's path relative to its folder, for the site's own report (falls back to its position)."""
    try:
        return str(tiles.index.entries[tiles.positions[position]][0])
    except (AttributeError, IndexError, KeyError, TypeError):
        return str(position)


# ------------------------------------------------------------------ deliver


def deliver(cfg, settings, site: Site, ae_weights, unet_weights, scale_factor: float,
            run_pipeline: bool = True) -> dict[str, float]:
    """Store the global model at the labeled site and start its augmentation pipeline as the site's own job
    (``client.pipeline_job``) unless ``run_pipeline`` is false or the site has no test set; answers at once."""
    from client import pipeline_job
    from histodiff.model_files import export_global_model
    from wire.contract import autoencoder_from, unet_from

    model_dir = export_global_model(site.state / "global_model", cfg, autoencoder_from(cfg, ae_weights),
                                    unet_from(cfg, unet_weights), scale_factor)
    if not run_pipeline or site.test is None:
        why = "augment=false in the run config" if not run_pipeline else "no test-path in this site's node config"
        log.warning("global model stored in %s; the augmentation pipeline was not run (%s); python -m "
                    "client.augment --model %s runs it later", model_dir, why, model_dir)
        metrics = {"delivered": 1.0, "augment-ran": 0.0, "pipeline-state": pipeline_job.OFF}
        pipeline_job.write_status(site.state / "augment", {"state": "off", "metrics": metrics})
        return metrics
    job = {"overrides": [*settings.config_overrides(), f"data={site.data}", f"work_dir={site.work}",
                         f"run_dir={site.state}"],
           "data": str(Path(site.data).resolve()), "test": str(Path(site.test).resolve()),
           "model": str(Path(model_dir).resolve()), "out": str((site.state / "augment").resolve())}
    pipeline_job.start(job, restart=True)
    return {"delivered": 1.0, "pipeline-state": pipeline_job.RUNNING}


def pipeline_status(site: Site) -> dict[str, float]:
    """The labeled-site pipeline's state for the server (restarted where it stopped when its process died)."""
    from client import pipeline_job

    return pipeline_job.status(site.state / "augment")


def table_metrics(results: dict) -> dict[str, float]:
    """Only scalar metrics leave the labeled site: one per Table 1 row and column."""
    out: dict[str, float] = {}
    for row in results.get("table", []):
        for key in ("accuracy_mean", "f1_mean", "sensitivity_mean", "specificity_mean", "fid", "n_synthetic"):
            value = row.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"{row['setting']}/{key.removesuffix('_mean')}"] = float(value)
    return out
