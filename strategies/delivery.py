"""Delivery: the global model goes to the labeled site(s) in one short message; each runs its pipeline as its own
resumable job, and the server follows it with status queries (each with a short deadline of its own) until the
site's Table 1 arrives, its pipeline fails, or ``deliver-timeout`` passes. No message is held open for hours.
"""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict

from strategies.board import IMAGES_KEY, labeled_grids
from strategies.collect import Collected, RoundFailed, collect
from strategies.schedule import save_state
from wire import contract
from wire.codec import to_record
from wire.contract import AUTOENCODER_KEY, CONFIG_KEY, METRICS_KEY, UNET_KEY

# "pipeline-state" in a labeled site's status reply
PIPELINE_STATES = {0: "running", 1: "done", 2: "failed", 3: "off"}
FAILED_MARK = "labeled-site pipeline failed"
STATUS_TIMEOUT = 120.0  # a status query is answered in a second; a site silent this long is asked again later


def deliver_round(fed) -> dict:
    start = time.time()
    nodes = fed._sites("labeled", 1)
    if not fed.state.delivered:
        _hand_over(fed, nodes)
    following = time.time()
    results = _follow(fed, [int(n) for n in fed.state.delivered])
    got = Collected(asked=nodes, answered=[int(n) for n, r in results.items() if r["status"] in ("done", "off")],
                    dropped={int(n): f"pipeline {r['status']}: {r.get('error', '')}".strip()
                             for n, r in results.items() if r["status"] not in ("done", "off")},
                    sent={int(n): b for n, b in fed.state.delivered.items()})
    line = fed._line("deliver", start, got, {}, {"hand-over": following - start, "pipeline": time.time() - following})
    line["labeled_sites"] = results
    grids = labeled_grids([fed.run_dir, *([Path(fed.s.work_root)] if fed.s.work_root else [])])
    if grids:  # readable where the labeled site's folder is (simulation): shown in TensorBoard and the dashboard
        line[IMAGES_KEY] = {tag: _relative(path, fed.run_dir) for tag, path in grids.items()}
    return line


def _relative(path: str, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(Path(path).resolve())


def _hand_over(fed, nodes: list[int]) -> None:
    """One short message per labeled site with the global model; the site stores it, starts its job, answers."""
    ae = to_record(fed._autoencoder())
    unet = to_record(contract.pick(fed.weights, "dm"))
    config = fed._config("deliver", augment=bool(fed.s.augment))
    messages = [fed._message(RecordDict({AUTOENCODER_KEY: ae, UNET_KEY: unet, CONFIG_KEY: config}), n,
                             "train.deliver") for n in nodes]
    del ae, unet
    got = collect(fed.grid, messages, fed.s.round_timeout, fed.s.poll, lambda node, reply: _accepted(reply),
                  say=fed.emit)
    fed._log_dropped("deliver", got.dropped)
    if not got.answered:
        raise RoundFailed(f"none of {len(nodes)} labeled site(s) took the global model")
    fed.state.delivered = {str(n): got.sent[n] for n in got.answered}
    save_state(fed.run_dir, fed.state)  # a resumed server follows the pipelines instead of delivering again
    fed.emit(f"deliver: global model handed to labeled site(s) {', '.join(str(n) for n in got.answered)}; "
             f"following their pipelines every {fed.s.deliver_poll:g} s (deliver-timeout {fed.s.deliver_timeout:g} s)")


def _accepted(reply: Message) -> int:
    if METRICS_KEY not in reply.content:
        raise KeyError("a deliver reply without metrics")
    return 0


def _follow(fed, nodes: list[int]) -> dict[str, dict]:
    results: dict[str, dict] = {}
    pending = set(nodes)
    deadline = time.monotonic() + fed.s.deliver_timeout
    said: dict[int, str] = {}
    while pending:
        statuses: dict[int, dict] = {}
        messages = [fed._message(RecordDict({CONFIG_KEY: ConfigRecord({"phase": "deliver-status"})}), n,
                                 "query.deliver_status") for n in sorted(pending)]
        got = collect(fed.grid, messages, min(fed.s.round_timeout, STATUS_TIMEOUT), fed.s.poll,
                      lambda node, reply: statuses.__setitem__(node, dict(reply.content[METRICS_KEY])), say=fed.emit)
        for node, m in statuses.items():
            status = PIPELINE_STATES.get(int(m.pop("pipeline-state", 0)), "running")
            if status == "running":
                news = f"pipeline running ({int(m.get('pipeline-stages-done', 0))} stages done)"
            else:
                results[str(node)] = {**m, "status": status}
                pending.discard(node)
                news = f"pipeline {status}"
            _say(fed, said, node, news)
        for node, why in got.dropped.items():
            if FAILED_MARK in why:
                results[str(node)] = {"status": "failed", "error": why}
                pending.discard(node)
            _say(fed, said, node, f"no status: {why}" if FAILED_MARK not in why else why)
        if pending and time.monotonic() >= deadline:
            for node in pending:
                results[str(node)] = {"status": "timed out", "error": f"no result after {fed.s.deliver_timeout:g} s"}
            break
        if pending:
            time.sleep(min(fed.s.deliver_poll, max(0.0, deadline - time.monotonic())))
    return results


def _say(fed, said: dict, node: int, news: str) -> None:
    if said.get(node) != news:
        fed.emit(f"deliver: site {node}: {news}")
        said[node] = news
