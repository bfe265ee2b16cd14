"""The site's ClientApp: one handler per message type; every reply passes the what-leaves-a-site check."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.outbox import ARRAYS_KEY, METRICS_KEY, check_outgoing

app = ClientApp()


def _site(context: Context):
    from client import task
    from strategies.settings import site_run_config

    site = task.site_from_context(context.node_config, context.run_config)
    # the federation's privacy overrides (privacy.planned_steps in target-epsilon mode) reach every site
    cfg = task.site_config(site_run_config(context.run_config), site)
    task.ensure_phantom(cfg, site, int(context.run_config.get("phantom-per-class", 4)), int(cfg.seed))
    return site, cfg


def _reply(message: Message, content: RecordDict, allowed: dict, **check) -> Message:
    check_outgoing(content, allowed, **check)  # raises before anything is sent
    return Message(content, reply_to=message)


def _metrics(values: dict) -> MetricRecord:
    return MetricRecord({k: (int(v) if isinstance(v, int) else float(v)) for k, v in values.items()})


@app.query("role")
def role(message: Message, context: Context) -> Message:
    """The server asks which sites pre-train (unlabeled) and which receive the model (labeled)."""
    from client.task import site_from_context

    site = site_from_context(context.node_config, context.run_config)
    return _reply(message, RecordDict({METRICS_KEY: _metrics({"labeled": int(site.role == "labeled")})}), {})


def _refuse_labeled(site) -> None:
    if site.role == "labeled":
        raise RuntimeError(f"site {site.name} is labeled: it receives the model and does not pre-train")


def _clipping_norm(conf) -> float | None:
    """Central DP: the clipping norm the server calibrates its noise to (Flower's config key), if it sent one."""
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    return float(conf[KEY_CLIPPING_NORM]) if KEY_CLIPPING_NORM in conf else None


def _secure_round(message: Message, context: Context, cfg):
    """The site's SecAgg+ state for this round (shares received, neighbours known), or None in a plain round.

    A site configured with ``privacy.secagg=true`` refuses a plain round: it never sends an unmasked update.
    """
    from strategies.secagg import RECORD_KEY

    if RECORD_KEY not in message.content:
        if cfg.privacy.secagg:
            raise RuntimeError("privacy.secagg=true at this site but the server asked for a plain round: "
                               "refusing to send an unmasked update")
        return None
    secure = _site_secagg(message, context)
    secure.receive(message.content[RECORD_KEY])
    return secure


def _site_secagg(message: Message, context: Context):
    """This site's side of the secure round the message's protocol record names."""
    from strategies.secagg import RECORD_KEY, SiteSecAgg

    return SiteSecAgg(context.state, message.metadata.dst_node_id, str(message.content[RECORD_KEY]["round"]))


class UpdateView(Mapping):
    """``w - g`` of the floating arrays, computed one array at a time as the masking reads it (no model copy)."""

    def __init__(self, weights: dict, global_weights: dict):
        self.weights, self.names = weights, [k for k, g in global_weights.items() if g.is_floating_point()]
        self.global_weights = global_weights

    def __getitem__(self, name):
        if name not in self.names:
            raise KeyError(name)
        return self.weights[name].float() - self.global_weights[name].float()

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def _masked(cfg, secure, update: dict, stats: bool = False):
    """(masked ArrayRecord, metrics) of ``update`` for the secure round ``secure`` from ``_secure_round``."""
    from strategies.secagg import WEIGHT_KEY, SecAggParams

    record, clipped = secure.mask(update, SecAggParams.from_config(cfg, stats=stats))
    total = sum(math.prod(a.shape) for name, a in record.items() if name != WEIGHT_KEY)
    return record, {"secagg-clipped": clipped / max(total, 1)}


def _train_reply(message: Message, cfg, phase: str, result, global_weights: dict, secure, start: float) -> Message:
    """The trained arrays in the transfer dtype, or under SecAgg+ the masked update ``w - g`` of the floating arrays
    (integer buffers such as BatchNorm's batch counter stay at the global value then)."""
    from client.outbox import phase_arrays
    from strategies.arrays import to_record, transfer_dtype
    from strategies.secagg import WEIGHT_KEY

    conf = message.content["config"]
    metrics = {**result.metrics, "num-examples": result.num_examples, "step": result.step}
    allowed = phase_arrays(cfg, phase)
    if secure is None:
        arrays = to_record(result.weights, transfer_dtype(str(conf["transfer-dtype"])))
    else:
        arrays, extra = _masked(cfg, secure, UpdateView(result.weights, global_weights))
        metrics.update(extra)
        allowed = {**allowed, WEIGHT_KEY: (1,)}
    content = RecordDict({ARRAYS_KEY: arrays,
                          METRICS_KEY: _metrics({**metrics, "site-seconds": time.time() - start})})
    return _reply(message, content, allowed, masked=secure is not None)


# ------------------------------------------------------------------ SecAgg+ stages 1, 2 and 4 (strategies/secagg.py)


def _protocol_reply(message: Message, rec, stage: str) -> Message:
    from strategies.secagg import RECORD_KEY, REPLY_FIELDS

    return _reply(message, RecordDict({RECORD_KEY: rec}), {}, protocol=REPLY_FIELDS[stage])


@app.query("secagg_keys")
def secagg_keys(message: Message, context: Context) -> Message:
    """Stage 1: fresh key pairs; the public halves and this site's FedAvg weight (its tile count) go out."""
    from client import task

    site, cfg = _site(context)
    _refuse_labeled(site)
    weight = len(task.load_dataset(cfg, train=str(message.content["config"]["phase"]) != "latent-stats"))
    return _protocol_reply(message, _site_secagg(message, context).keys(weight), "keys")


@app.query("secagg_shares")
def secagg_shares(message: Message, context: Context) -> Message:
    """Stage 2: Shamir shares of this round's mask seed and mask key, encrypted for each other site; the site
    holds the server to its own threshold."""
    from strategies.secagg import RECORD_KEY, SecAggParams

    params = SecAggParams.from_config(_site(context)[1])
    return _protocol_reply(message, _site_secagg(message, context).shares(message.content[RECORD_KEY], params), "shares")


@app.query("secagg_unmask")
def secagg_unmask(message: Message, context: Context) -> Message:
    """Stage 4: shares of the survivors' seeds and the dropouts' keys (never both for one site), once."""
    from strategies.secagg import RECORD_KEY

    return _protocol_reply(message, _site_secagg(message, context).unmask(message.content[RECORD_KEY]), "unmask")


@app.train("lae")
def train_lae(message: Message, context: Context) -> Message:
    from client import privacy, task
    from strategies.arrays import from_record

    start = time.time()
    site, cfg = _site(context)
    _refuse_labeled(site)
    conf = message.content["config"]
    weights = from_record(message.content[ARRAYS_KEY])
    # DP-SGD under local DP (a budget refusal raises: an error reply with a one-line reason), clipped update
    # under central DP, else task.lae_round
    secure = _secure_round(message, context, cfg)  # SecAgg+: shares decrypted before any training
    result = privacy.lae_round(cfg, task.load_dataset(cfg), site, int(conf["local-steps"]), weights,
                               float(conf.get("proximal-mu", 0.0)), _clipping_norm(conf))
    return _train_reply(message, cfg, "lae", result, weights, secure, start)


@app.query("latent_stats")
def latent_stats(message: Message, context: Context) -> Message:
    from client import privacy, task
    from strategies.arrays import from_record

    site, cfg = _site(context)
    _refuse_labeled(site)
    weights = from_record(message.content["autoencoder"])
    digest = task.cache_global_autoencoder(site, weights)
    if digest != str(message.content["config"].get("lae-digest", digest)):
        raise RuntimeError("the global autoencoder arrived corrupted (digest mismatch)")
    secure = _secure_round(message, context, cfg)
    dataset = task.load_dataset(cfg, train=False)
    stats, dp_metrics = privacy.latent_stats(cfg, dataset, task.build_global_autoencoder(cfg, weights), site)
    if secure is None:
        content = RecordDict({METRICS_KEY: _metrics({
            "latent-sum": float(stats.sum), "latent-sum-sq": float(stats.sum_sq), "latent-count": int(stats.count),
            "num-examples": len(dataset), **dp_metrics})})
        return _reply(message, content, {})
    # SecAgg+: only the masked per-tile moments leave; the server unmasks their tile-weighted mean over sites
    import torch

    from strategies.secagg import STATS_SHAPES, WEIGHT_KEY

    moments = {"latent.mean": torch.tensor([stats.mean], dtype=torch.float64),
               "latent.meansq": torch.tensor([stats.sum_sq / stats.count], dtype=torch.float64)}
    arrays, extra = _masked(cfg, secure, moments, stats=True)
    content = RecordDict({ARRAYS_KEY: arrays, METRICS_KEY: _metrics({"num-examples": len(dataset), **dp_metrics,
                                                                     **extra})})
    return _reply(message, content, {**STATS_SHAPES, WEIGHT_KEY: (1,)}, masked=True)


@app.train("dm")
def train_dm(message: Message, context: Context) -> Message:
    from client import privacy, task
    from strategies.arrays import from_record

    start = time.time()
    site, cfg = _site(context)
    _refuse_labeled(site)
    conf = message.content["config"]
    digest = str(conf["lae-digest"])
    if "autoencoder" in message.content.array_records:
        ae_weights = from_record(message.content["autoencoder"])
        if task.cache_global_autoencoder(site, ae_weights) != digest:
            raise RuntimeError("the global autoencoder arrived corrupted (digest mismatch)")
    else:
        ae_weights = task.cached_global_autoencoder(site, digest)
    autoencoder = task.build_global_autoencoder(cfg, ae_weights)
    weights = from_record(message.content[ARRAYS_KEY])
    secure = _secure_round(message, context, cfg)
    result = privacy.dm_round(cfg, task.load_dataset(cfg), site, int(conf["local-steps"]), weights, autoencoder,
                              float(conf["scale-factor"]), float(conf.get("proximal-mu", 0.0)), _clipping_norm(conf))
    return _train_reply(message, cfg, "dm", result, weights, secure, start)


@app.train("deliver")
def deliver(message: Message, context: Context) -> Message:
    from client import task
    from strategies.arrays import from_record

    site, cfg = _site(context)
    if site.role != "labeled":
        raise RuntimeError(f"site {site.name} is not labeled: the global model is delivered to labeled sites only")
    conf = message.content["config"]
    metrics = task.deliver(cfg, site, from_record(message.content["autoencoder"]),
                           from_record(message.content["unet"]), float(conf["scale-factor"]),
                           run_pipeline=bool(context.run_config.get("augment", True)))
    return _reply(message, RecordDict({METRICS_KEY: _metrics(metrics)}), {})


__all__ = ["app", "ArrayRecord"]
