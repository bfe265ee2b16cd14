"""Pure site-side functions of a federated round: site settings, data, local LAE/DM steps, latent stats, delivery.

Everything a site keeps between rounds lives under ``<work>/<run-name>/``, never in memory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
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


def process_started() -> float:
    """When this process was created (epoch seconds, from ``/proc``; 0.0 where there is none)."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(float(x.split()[1]) for x in Path("/proc/stat").read_text().splitlines() if x.startswith("btime"))
        return boot + float(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, StopIteration):
        return 0.0


@dataclass
class StageClock:
    """Seconds per stage of one message at a site (receive, train, encode, ...), for one progress line and the
    reply's ``seconds-<stage>`` metrics; ``clock-*`` metrics are wall-clock times (epoch seconds) of the handler's
    start and of this process's creation, so a benchmark can split the round trip (``benchmarks.paper_round``)."""

    label: str
    start: float = field(default_factory=time.time)
    seconds: dict = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t

    def metrics(self) -> dict[str, float]:
        created = process_started()
        out = {f"seconds-{k}": float(v) for k, v in self.seconds.items()}
        out.update({"clock-handler-start": self.start, "clock-reply": time.time()})
        if created:
            out["clock-process-created"] = created
        log.info("%s: %s (process start %.1f s before the handler)", self.label,
                 ", ".join(f"{k} {v:.2f} s" for k, v in self.seconds.items()), self.start - created if created else 0.0)
        return out


class StartingPoint:
    """The global weights a round starts from, on disk while the site trains: the module holds its own copy, and
    the round's update ``w - g`` reads ``g`` back one array at a time (``pop``), so a site never holds the model
    twice besides its training state. ``weights``: the decoded arrays (emptied when training starts, see
    ``release_callback``); ``path``: a safetensors file holding exactly them (written here unless ``written``)."""

    def __init__(self, weights: dict[str, torch.Tensor], path: Path, written: bool = False):
        from histodiff.model_files import save_state_dict_file

        self.weights, self.path, self._file, self._own = weights, Path(path), None, not written
        if not written:
            save_state_dict_file(weights, self.path)

    def _reader(self):
        if self._file is None:
            from safetensors import safe_open

            self._file = safe_open(str(self.path), framework="pt")
        return self._file

    def __contains__(self, name: str) -> bool:
        return name in self.weights or name in self._reader().keys()

    def pop(self, name: str) -> torch.Tensor:
        if name in self.weights:
            return self.weights.pop(name)
        return self._reader().get_tensor(name)

    def clear(self) -> None:
        """Done with it: the arrays go, and the file too when this object wrote it (a lossy dtype's copy stays)."""
        self.weights.clear()
        self._file = None
        if self._own:
            self.path.unlink(missing_ok=True)


def release_callback(weights: dict | None):
    """A Lightning callback that empties ``weights`` when the fit starts (the module has loaded them by then), so
    the decoded global model is not held through training; None without weights."""
    if weights is None:
        return None
    import lightning as L

    class ReleaseStartingPoint(L.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            weights.clear()

    return ReleaseStartingPoint()


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


# what a site may set for itself (env HISTODIFF_SITE_OVERRIDES): its hardware, never what the federation learns
SITE_OVERRIDES_ENV = "HISTODIFF_SITE_OVERRIDES"
SITE_KEYS = ("train.devices", "train.strategy", "train.accelerator", "train.precision", "train.channels_last",
             "tiles.num_workers")


def site_overrides() -> list[str]:
    """The site's own overrides from ``HISTODIFF_SITE_OVERRIDES`` (e.g. ``train.devices=4 train.strategy=ddp`` on
    a node with 4 GPUs); only ``SITE_KEYS`` are allowed."""
    import shlex

    words = shlex.split(os.environ.get(SITE_OVERRIDES_ENV, ""))
    for word in words:
        key = word.split("=", 1)[0].strip()
        if "=" not in word or key not in SITE_KEYS:
            raise ValueError(f"{SITE_OVERRIDES_ENV}: {word!r} is not one of this site's own settings "
                             f"({', '.join(k + '=...' for k in SITE_KEYS)})")
    return words


def site_config(settings, site: Site):
    """The site's model config: the run's overrides (``wire.settings.Settings``), the site's own hardware settings
    (``site_overrides``) and its paths."""
    return settings.compose([*site_overrides(), f"data={site.data}", f"work_dir={site.work}", f"run_dir={site.state}"])


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


def _timed_round(clock, train, progress):
    """Run ``train()`` (a ``train_*_steps`` call); split its time into state load/save, the fit, and the rest
    (``build``: the module, the trainer, moving weights in and out) on ``clock`` (a ``StageClock``) when given."""
    from histodiff.local_training import local_steps

    local_steps.STATE_SECONDS.clear()
    t = time.perf_counter()
    result = train()
    total = time.perf_counter() - t
    if clock is not None:
        spent = dict(local_steps.STATE_SECONDS)
        for k, v in spent.items():
            clock.seconds[k] = clock.seconds.get(k, 0.0) + v
        clock.seconds["train"] = clock.seconds.get("train", 0.0) + progress.seconds
        clock.seconds["build"] = clock.seconds.get("build", 0.0) + max(0.0, total - progress.seconds - sum(spent.values()))
    return result


def _watch(cfg, dataset, site: Site, phase: str, steps: int):
    """(training tiles, [WatchCallback]) with train.watch_every > 0: after the round's local steps, labelled PNGs
    and FID/KID under ``<state>/watch/<phase>`` (the fixed watch tiles are held out of training there)."""
    from histodiff.evaluation.watch import WATCH_DIR, watch_callback

    dataset, callback = watch_callback(cfg, phase, dataset, site.state / WATCH_DIR / phase, round_steps=steps)
    return dataset, [callback] if callback is not None else []


def _with_watch(cfg, result, watch: list, clock=None):
    """The round's figures (FID, KID, PSNR: numbers only, never a tile or an image) join the reply's metrics,
    unless privacy is on (then they stay in the site's watch folder: no privacy accounting covers them); the
    watch's seconds move from ``build`` to ``watch`` on ``clock``."""
    if not watch or not watch[0].last:
        return result
    if not (cfg.privacy.dp or cfg.privacy.secagg):
        result.metrics.update(watch[0].figures())
    if clock is not None:
        spent = sum(line["seconds"] for line in watch[0].history)
        clock.seconds["watch"] = clock.seconds.get("watch", 0.0) + spent
        clock.seconds["build"] = max(0.0, clock.seconds.get("build", 0.0) - spent)
    return result


def lae_round(cfg, dataset, site: Site, steps: int, global_weights, mu: float = 0.0, clock=None, release=False):
    from client.proximal import proximal_callbacks
    from client.round_progress import RoundProgress
    from histodiff.local_training.local_steps import train_lae_steps

    progress = RoundProgress(total=steps, label=f"{site.name} lae")
    dataset, watch = _watch(cfg, dataset, site, "lae", steps)
    result = _timed_round(clock, lambda: train_lae_steps(
        cfg, dataset, site.state / "lae", steps, init_weights=global_weights, progress=False,
        callbacks=[*proximal_callbacks(mu, "lae", cfg.lae.share_discriminator), progress, *watch,
                   *_released(global_weights, release)]), progress)
    return _with_watch(cfg, result, watch, clock)


def _released(weights, release: bool) -> list:
    """``[release_callback(weights)]`` when ``release`` (the caller keeps the starting point on disk), else []."""
    return [release_callback(weights)] if release and weights is not None else []


def dm_round(cfg, dataset, site: Site, steps: int, global_weights, autoencoder, scale_factor: float, mu: float = 0.0,
             clock=None, release=False):
    from client.proximal import proximal_callbacks
    from client.round_progress import RoundProgress
    from histodiff.local_training.local_steps import train_dm_steps

    progress = RoundProgress(total=steps, label=f"{site.name} dm")
    dataset, watch = _watch(cfg, dataset, site, "dm", steps)
    from histodiff.model_files import no_weight_init

    def train():
        # the UNet is built, then loaded whole (strict) from the global weights: its random initialisation, many
        # seconds of CPU at the paper's size, is skipped (nothing else in the DM module is drawn; a watch callback
        # may build models of its own, so not with one)
        skip = global_weights is not None and not watch
        with no_weight_init() if skip else contextlib.nullcontext():
            return train_dm_steps(cfg, dataset, site.state / "dm", steps, autoencoder, scale_factor,
                                  init_weights=global_weights, progress=False,
                                  callbacks=[*proximal_callbacks(mu, "dm"), progress, *watch,
                                             *_released(global_weights, release)])

    result = _timed_round(clock, train, progress)
    return _with_watch(cfg, result, watch, clock)


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
