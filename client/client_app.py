"""The site's ClientApp: one handler per message type; every reply passes the what-leaves-a-site check."""

from __future__ import annotations

import time

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


def _reply(message: Message, content: RecordDict, allowed: dict) -> Message:
    check_outgoing(content, allowed)  # raises before anything is sent
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


@app.train("lae")
def train_lae(message: Message, context: Context) -> Message:
    from client import privacy, task
    from client.outbox import phase_arrays
    from strategies.arrays import from_record, to_record, transfer_dtype

    start = time.time()
    site, cfg = _site(context)
    _refuse_labeled(site)
    conf = message.content["config"]
    weights = from_record(message.content[ARRAYS_KEY])
    # DP-SGD under local DP (a budget refusal raises: an error reply with a one-line reason), clipped update
    # under central DP, else task.lae_round
    result = privacy.lae_round(cfg, task.load_dataset(cfg), site, int(conf["local-steps"]), weights,
                               float(conf.get("proximal-mu", 0.0)))
    content = RecordDict({
        ARRAYS_KEY: to_record(result.weights, transfer_dtype(str(conf["transfer-dtype"]))),
        METRICS_KEY: _metrics({**result.metrics, "num-examples": result.num_examples, "step": result.step,
                               "site-seconds": time.time() - start}),
    })
    return _reply(message, content, phase_arrays(cfg, "lae"))


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
    dataset = task.load_dataset(cfg, train=False)
    stats, dp_metrics = privacy.latent_stats(cfg, dataset, task.build_global_autoencoder(cfg, weights), site)
    content = RecordDict({METRICS_KEY: _metrics({
        "latent-sum": float(stats.sum), "latent-sum-sq": float(stats.sum_sq), "latent-count": int(stats.count),
        "num-examples": len(dataset), **dp_metrics})})
    return _reply(message, content, {})


@app.train("dm")
def train_dm(message: Message, context: Context) -> Message:
    from client import privacy, task
    from client.outbox import phase_arrays
    from strategies.arrays import from_record, to_record, transfer_dtype

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
    result = privacy.dm_round(cfg, task.load_dataset(cfg), site, int(conf["local-steps"]), weights, autoencoder,
                              float(conf["scale-factor"]), float(conf.get("proximal-mu", 0.0)))
    content = RecordDict({
        ARRAYS_KEY: to_record(result.weights, transfer_dtype(str(conf["transfer-dtype"]))),
        METRICS_KEY: _metrics({**result.metrics, "num-examples": result.num_examples, "step": result.step,
                               "site-seconds": time.time() - start}),
    })
    return _reply(message, content, phase_arrays(cfg, "dm"))


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
