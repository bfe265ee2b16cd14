"""The site's ClientApp: one handler per message type; every reply passes the what-leaves-a-site check.

A training round: the global starting point arrives (whole, or as a delta against the copy the site holds), the
site trains its local steps, and only its update ``w_local - w_global`` leaves, in the transfer dtype with error
feedback, clipped under central DP, masked under SecAgg+.
"""

from __future__ import annotations

import logging
import math
import sys
import time

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import site_privacy, task
from client.outbox import check_outgoing
from wire import contract, downlink, flower_transfer
from wire.codec import ErrorFeedback, from_record
from wire.contract import ARRAYS_KEY, AUTOENCODER_KEY, CONFIG_KEY, MEMORISATION_METRICS, METRICS_KEY, UNET_KEY
from wire.secagg import RECORD_KEY, REPLY_FIELDS, STATS_SHAPES, WEIGHT_KEY, SecAggParams, SiteSecAgg
from wire.settings import Settings

flower_transfer.install()  # the reply is pushed without a second copy of the update (wire/flower_transfer.py)
app = ClientApp()


def _site_logging() -> None:
    """Progress lines of a round (``histodiff.site``) reach the SuperNode's output when nothing else shows them."""
    package = logging.getLogger("histodiff")
    if package.handlers or logging.getLogger().handlers:
        return  # e.g. the simulation runtime inside server.run, which already logs
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    package.addHandler(handler)
    package.setLevel(logging.INFO)


_site_logging()


def _site(context: Context):
    """This site, its composed config and the run's settings (parsed once per message)."""
    settings = Settings.from_run_config(context.run_config)
    site = task.site_from_context(context.node_config, settings)
    cfg = task.site_config(settings, site)
    task.ensure_phantom(cfg, site, settings.phantom_per_class, int(cfg.seed))
    return site, cfg, settings


def _reply(message: Message, content: RecordDict, allowed: dict, **check) -> Message:
    check_outgoing(content, allowed, **check)  # raises before anything is sent
    return Message(content, reply_to=message)


def _metrics(values: dict) -> MetricRecord:
    return MetricRecord({k: (int(v) if isinstance(v, int) else float(v)) for k, v in values.items()})


@app.query("role")
def role(message: Message, context: Context) -> Message:
    """The server asks which sites pre-train (unlabeled) and which receive the model (labeled), and how many tiles an
    unlabeled site has: the most it will ever claim as its FedAvg weight."""
    site, cfg, _ = _site(context)
    values = {"labeled": int(site.role == "labeled")}
    if site.role == "unlabeled":
        values["tiles"] = len(task.load_dataset(cfg))
    return _reply(message, RecordDict({METRICS_KEY: _metrics(values)}), {})


def _refuse_labeled(site) -> None:
    if site.role == "labeled":
        raise RuntimeError(f"site {site.name} is labeled: it receives the model and does not pre-train")


def _clipping_norm(conf) -> float | None:
    """Central DP: the clipping norm the server calibrates its noise to (Flower's config key), if it sent one."""
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    return float(conf[KEY_CLIPPING_NORM]) if KEY_CLIPPING_NORM in conf else None


def _secure_round(message: Message, context: Context, cfg) -> SiteSecAgg | None:
    """The site's SecAgg+ state for this round (shares received, neighbours known), or None in a plain round.

    A site configured with ``privacy.secagg=true`` refuses a plain round: it never sends an unmasked update.
    """
    if RECORD_KEY not in message.content:
        if cfg.privacy.secagg:
            raise RuntimeError("privacy.secagg=true at this site but the server asked for a plain round: "
                               "refusing to send an unmasked update")
        return None
    secure = _site_secagg(message, context)
    secure.receive(message.content[RECORD_KEY])
    return secure


def _site_secagg(message: Message, context: Context) -> SiteSecAgg:
    """This site's side of the secure round the message's protocol record names."""
    return SiteSecAgg(context.state, message.metadata.dst_node_id, str(message.content[RECORD_KEY]["round"]))


def _masked(cfg, secure: SiteSecAgg, update: dict, stats: bool = False):
    """(masked ArrayRecord, metrics) of ``update`` for the secure round ``secure`` from ``_secure_round``."""
    record, clipped = secure.mask(update, SecAggParams.from_config(cfg, stats=stats))
    total = sum(math.prod(a.shape) for name, a in record.items() if name != WEIGHT_KEY)
    return record, {"secagg-clipped": clipped / max(total, 1)}


def _starting_point(message: Message, site, phase: str) -> tuple[dict, task.StartingPoint]:
    """The global arrays of ``phase`` this round starts from (a lossy dtype keeps a copy for the next delta), and
    the same on disk for the update at the end (the lossy dtypes' copy, else a file of this round)."""
    conf = message.content[CONFIG_KEY]
    held = site.state / f"global_{phase}.safetensors" if str(conf["transfer-dtype"]) != "fp32" else None
    weights = downlink.receive(message.content[ARRAYS_KEY], conf, held)
    del message.content[ARRAYS_KEY]  # decoded: the received bytes (one model) are not kept through training
    kept = held is not None and downlink.DIGEST_KEY in conf  # receive() wrote exactly these weights there
    return weights, task.StartingPoint(weights, held if kept else site.state / f"start_{phase}.safetensors", kept)


def _update_in_place(weights: dict, base: dict) -> dict:
    """``wire.codec.difference(weights, base)`` computed in the trained weights' own memory (they are not used
    again), emptying ``base`` as it goes: no third copy of the model at the end of a round."""
    for name in list(weights):
        v = weights[name]
        if v.is_floating_point() and name in base:
            weights[name] = v.float().sub_(base.pop(name).float())
    base.clear()
    return weights


def _train_reply(message: Message, cfg, site, phase: str, result, global_weights, secure, start: float,
                 clock: task.StageClock | None = None) -> Message:
    """The site's update ``w - g``: clipped under central DP, then in the transfer dtype with error feedback, or
    under SecAgg+ masked (integer buffers such as BatchNorm's batch counter stay at the global value then)."""
    conf = message.content[CONFIG_KEY]
    clock = clock or task.StageClock(f"{site.name} {phase}")
    metrics = {**result.metrics, "num-examples": result.num_examples, "step": result.step}
    with clock.stage("encode"):
        import gc

        gc.collect()  # the trainer's reference cycles: its optimiser state goes now, before the update is encoded
        update = _update_in_place(result.weights, global_weights)
        del result.weights
        update, clip_metrics = site_privacy.clip_update(cfg, update, _clipping_norm(conf))
        metrics.update(clip_metrics)
        allowed = contract.phase_shapes(cfg, phase)
        if secure is None:
            codec = ErrorFeedback(str(conf["transfer-dtype"]), site.state / f"residual_{phase}.safetensors")
            arrays, _ = codec.encode(update)
        else:
            arrays, extra = _masked(cfg, secure, {k: v for k, v in update.items() if v.is_floating_point()})
            metrics.update(extra)
            allowed = {**allowed, WEIGHT_KEY: (1,)}
    content = RecordDict({ARRAYS_KEY: arrays,
                          METRICS_KEY: _metrics({**metrics, **clock.metrics(), "site-seconds": time.time() - start})})
    return _reply(message, content, allowed, masked=secure is not None)


# ------------------------------------------------------------------ SecAgg+ stages 1, 2 and 4 (wire/secagg.py)


def _protocol_reply(message: Message, rec, stage: str) -> Message:
    return _reply(message, RecordDict({RECORD_KEY: rec}), {}, protocol=REPLY_FIELDS[stage])


@app.query("secagg_keys")
def secagg_keys(message: Message, context: Context) -> Message:
    """Stage 1: fresh key pairs; the public halves and this site's FedAvg weight (its tile count) go out."""
    site, cfg, _ = _site(context)
    _refuse_labeled(site)
    weight = len(task.load_dataset(cfg, train=str(message.content[CONFIG_KEY]["phase"]) != "latent-stats"))
    return _protocol_reply(message, _site_secagg(message, context).keys(weight), "keys")


@app.query("secagg_shares")
def secagg_shares(message: Message, context: Context) -> Message:
    """Stage 2: Shamir shares of this round's mask seed and mask key, encrypted for each other site; the site
    holds the server to its own threshold."""
    params = SecAggParams.from_config(_site(context)[1])
    return _protocol_reply(message, _site_secagg(message, context).shares(message.content[RECORD_KEY], params), "shares")


@app.query("secagg_unmask")
def secagg_unmask(message: Message, context: Context) -> Message:
    """Stage 4: shares of the survivors' seeds and the dropouts' keys (never both for one site), once."""
    return _protocol_reply(message, _site_secagg(message, context).unmask(message.content[RECORD_KEY]), "unmask")


# ------------------------------------------------------------------ training rounds


@app.train("lae")
def train_lae(message: Message, context: Context) -> Message:
    start = time.time()
    site, cfg, _ = _site(context)
    _refuse_labeled(site)
    clock = task.StageClock(f"{site.name} lae", start)
    conf = message.content[CONFIG_KEY]
    with clock.stage("receive"):
        weights, base = _starting_point(message, site, "lae")
    secure = _secure_round(message, context, cfg)  # SecAgg+: shares decrypted before any training
    # DP-SGD under local DP (a budget refusal raises: an error reply with a one-line reason), else task.lae_round
    result = site_privacy.lae_round(cfg, task.load_dataset(cfg), site, int(conf["local-steps"]), weights,
                                    float(conf.get("proximal-mu", 0.0)), clock=clock, release=True)
    del weights
    return _train_reply(message, cfg, site, "lae", result, base, secure, start, clock)


@app.query("latent_stats")
def latent_stats(message: Message, context: Context) -> Message:
    site, cfg, _ = _site(context)
    _refuse_labeled(site)
    weights = from_record(message.content[AUTOENCODER_KEY])
    digest = task.cache_global_autoencoder(site, weights)
    if digest != str(message.content[CONFIG_KEY].get("lae-digest", digest)):
        raise RuntimeError("the global autoencoder arrived corrupted (digest mismatch)")
    secure = _secure_round(message, context, cfg)
    dataset = task.load_dataset(cfg, train=False)
    stats, dp_metrics = site_privacy.latent_stats(cfg, dataset, contract.autoencoder_from(cfg, weights), site)
    if secure is None:
        content = RecordDict({METRICS_KEY: _metrics({
            "latent-sum": float(stats.sum), "latent-sum-sq": float(stats.sum_sq), "latent-count": int(stats.count),
            "num-examples": len(dataset), **dp_metrics})})
        return _reply(message, content, {})
    # SecAgg+: only the masked per-tile moments leave; the server unmasks their tile-weighted mean over sites
    import torch

    moments = {"latent.mean": torch.tensor([stats.mean], dtype=torch.float64),
               "latent.meansq": torch.tensor([stats.sum_sq / stats.count], dtype=torch.float64)}
    arrays, extra = _masked(cfg, secure, moments, stats=True)
    content = RecordDict({ARRAYS_KEY: arrays, METRICS_KEY: _metrics({"num-examples": len(dataset), **dp_metrics,
                                                                     **extra})})
    return _reply(message, content, {**STATS_SHAPES, WEIGHT_KEY: (1,)}, masked=True)


def _global_autoencoder(message: Message, site, cfg):
    """The frozen global autoencoder of the DM phase: sent with the message (once per site) or the copy the site
    keeps, checked against the server's digest."""
    from histodiff.model_files import no_weight_init

    digest = str(message.content[CONFIG_KEY]["lae-digest"])
    if AUTOENCODER_KEY in message.content.array_records:
        ae_weights = from_record(message.content[AUTOENCODER_KEY])
        del message.content[AUTOENCODER_KEY]
        if task.cache_global_autoencoder(site, ae_weights) != digest:
            raise RuntimeError("the global autoencoder arrived corrupted (digest mismatch)")
    else:
        ae_weights = task.cached_global_autoencoder(site, digest)
    with no_weight_init():  # every weight is loaded (strict) right after: no random draw to throw away
        return contract.autoencoder_from(cfg, ae_weights)


@app.train("dm")
def train_dm(message: Message, context: Context) -> Message:
    start = time.time()
    site, cfg, _ = _site(context)
    _refuse_labeled(site)
    clock = task.StageClock(f"{site.name} dm", start)
    conf = message.content[CONFIG_KEY]
    with clock.stage("receive"):
        autoencoder = _global_autoencoder(message, site, cfg)
        weights, base = _starting_point(message, site, "dm")
    secure = _secure_round(message, context, cfg)
    result = site_privacy.dm_round(cfg, task.load_dataset(cfg), site, int(conf["local-steps"]), weights, autoencoder,
                                   float(conf["scale-factor"]), float(conf.get("proximal-mu", 0.0)), clock=clock,
                                   release=True)
    del weights
    return _train_reply(message, cfg, site, "dm", result, base, secure, start, clock)


@app.query("memorisation")
def memorisation(message: Message, context: Context) -> Message:
    """The memorisation check (strategies/memorisation_round.py): samples of the global model against this site's own
    tiles; only the named counts and quantiles leave, never a sample, a tile, a feature or an index."""
    start = time.time()
    site, cfg, _ = _site(context)
    _refuse_labeled(site)
    conf = message.content[CONFIG_KEY]
    autoencoder = _global_autoencoder(message, site, cfg)
    unet = contract.unet_from(cfg, from_record(message.content[UNET_KEY]))
    figures = task.memorisation_check(cfg, site, unet, autoencoder, float(conf["scale-factor"]), int(conf["samples"]),
                                      int(conf["ddim-steps"]), float(conf["alpha"]), int(conf["seed"]))
    content = RecordDict({METRICS_KEY: _metrics({**figures, "site-seconds": time.time() - start})})
    return _reply(message, content, {}, metrics=MEMORISATION_METRICS)


# ------------------------------------------------------------------ delivery (strategies/delivery.py)


@app.train("deliver")
def deliver(message: Message, context: Context) -> Message:
    """Store the global model and start the labeled-site pipeline as this site's own job; answer at once."""
    site, cfg, settings = _site(context)
    if site.role != "labeled":
        raise RuntimeError(f"site {site.name} is not labeled: the global model is delivered to labeled sites only")
    conf = message.content[CONFIG_KEY]
    metrics = task.deliver(cfg, settings, site, from_record(message.content[AUTOENCODER_KEY]),
                           from_record(message.content[UNET_KEY]), float(conf["scale-factor"]),
                           run_pipeline=bool(conf.get("augment", settings.augment)))
    return _reply(message, RecordDict({METRICS_KEY: _metrics(metrics)}), {})


@app.query("deliver_status")
def deliver_status(message: Message, context: Context) -> Message:
    """Where the pipeline stands (restarting it where it stopped if its process died); its Table 1 when done."""
    site, _, _ = _site(context)
    if site.role != "labeled":
        raise RuntimeError(f"site {site.name} is not labeled: it runs no labeled-site pipeline")
    return _reply(message, RecordDict({METRICS_KEY: _metrics(task.pipeline_status(site))}), {})
