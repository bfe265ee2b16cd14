"""The memorisation check after the DM phase: every unlabeled site (whose tiles trained the DM) samples the global
model and compares the samples with its own tiles (``histodiff.privacy.memorisation``); only counts and quantiles
come back. The run is flagged when a site's near-copy rate is above ``memorisation-max-rate``; a site that fails
or misses the deadline is reported, never fatal, and a malformed reply is refused like any other.
"""

from __future__ import annotations

import time

from flwr.app import Message, RecordDict

from histodiff.privacy.memorisation import COUNTS, FIGURES, PIXEL_SIDE, QUANTILES, SPACES
from strategies import validate
from strategies.collect import Collected, collect
from wire import contract
from wire.codec import to_record
from wire.contract import AUTOENCODER_KEY, CONFIG_KEY, UNET_KEY

FEATURE_SPACE = "the LAE encoder's latent means (flattened)"
PIXEL_SPACE = f"RMS over [0, 1] pixel values at {PIXEL_SIDE} px"


def request(s) -> dict:
    """What a site is asked to do (the settings travel with the message: the server's word is the one used)."""
    return {"samples": s.memorisation_samples, "ddim-steps": s.memorisation_ddim_steps,
            "alpha": float(s.memorisation_alpha), "seed": s.seed}


LACKS_AUTOENCODER = "lacks the global autoencoder"  # a site's error when its copy is gone (client/task.py)


def memorisation_round(fed) -> dict:
    s, start = fed.s, time.time()
    nodes = fed._sites("unlabeled", 0)  # every site that trained the DM; none needed: the check never stops a run
    figures: dict[int, dict] = {}

    def take(node: int, reply: Message) -> int:
        m = validate.metrics_of(reply.content)
        figures[node] = check_figures(m, s.memorisation_samples, fed.state.declared.get(str(node)), s.max_examples)
        fed.privacy.record(node, "memorisation", fed.state.global_round + 1, {})
        return 0

    collecting = time.time()
    got = _ask(fed, nodes, set(fed.state.has_lae), take)
    # a site that lost its copy of the frozen autoencoder (a wiped work folder) is asked once more, with it
    again = [n for n, why in got.dropped.items() if LACKS_AUTOENCODER in why]
    if again:
        retry = _ask(fed, again, set(), take)
        for node in again:
            got.dropped.pop(node)
            got.sent[node] += retry.sent.get(node, 0)
        got.answered += retry.answered
        got.received.update(retry.received)
        got.dropped.update(retry.dropped)
    fed._log_dropped("memorisation", got.dropped)
    result = summarise(figures, got.dropped, s)
    fed.state.memorisation = {k: result[k] for k in ("verdict", "flagged", "flagged_sites", "checked", "asked")}
    fed.emit(verdict_line(result))
    line = fed._line("memorisation", start, got, {}, {"prepare": collecting - start, "sites": time.time() - collecting})
    line["memorisation"] = result
    return line


def _ask(fed, nodes: list[int], holding_lae: set[int], take) -> Collected:
    """One check message per site: the delivered (EMA) UNet, and the frozen autoencoder to sites not holding it."""
    if not nodes:
        return Collected([])
    unet = to_record(contract.pick(fed.weights, "dm"))
    ae = to_record(fed._autoencoder()) if set(nodes) - holding_lae else None
    config = fed._config("memorisation", **request(fed.s))
    messages = []
    for node in nodes:
        content = RecordDict({UNET_KEY: unet, CONFIG_KEY: config})
        if node not in holding_lae:
            content[AUTOENCODER_KEY] = ae
        messages.append(fed._message(content, node, "query.memorisation"))
    del ae, unet
    return collect(fed.grid, messages, fed.s.round_timeout, fed.s.poll, take, say=fed.emit)


def check_figures(m, samples: int, declared: int | None, cap: int) -> dict[str, float]:
    """A site's figures, whole: exactly the named counts and quantiles, consistent with each other."""
    names = set(m.keys()) - {"site-seconds"}
    if names != set(FIGURES):
        extra, missing = sorted(names - set(FIGURES)), sorted(set(FIGURES) - names)
        raise validate.BadReply(f"memorisation figures differ from the check's (extra {extra[:3]}, missing {missing[:3]})")
    f = {k: float(m[k]) for k in FIGURES}
    for k in COUNTS:
        if f[k] != int(f[k]) or f[k] < 0:
            raise validate.BadReply(f"memorisation figure {k} = {f[k]:g} is not a count")
        f[k] = int(f[k])
    if f["samples"] != samples:
        raise validate.BadReply(f"memorisation check of {f['samples']} samples, {samples} were asked for")
    limit = min(cap, declared) if declared else cap
    if not 2 <= f["tiles"] <= limit:
        raise validate.BadReply(f"memorisation check against {f['tiles']} tiles, outside [2, {limit}]")
    per_space = [f[f"near-copies-{space}"] for space in SPACES]
    if max(per_space) > samples or not max(per_space) <= f["near-copies"] <= min(samples, sum(per_space)):
        raise validate.BadReply(f"memorisation near-copy counts {per_space} (either: {f['near-copies']}) do not fit "
                                f"{samples} samples")
    for space in SPACES:
        for what, top in (("nn", 1.0 if space == "pixel" else float("inf")), ("ratio", 1.0)):
            q = [f[f"{space}-{what}-{name}"] for name in QUANTILES]
            if not (0.0 <= q[0] and q == sorted(q) and q[-1] <= top):
                raise validate.BadReply(f"memorisation quantiles of {space} {what} {q} are not ordered within [0, {top}]")
    return f


def summarise(figures: dict[int, dict], failed: dict[int, str], s) -> dict:
    """The check as the run records it (metrics.jsonl, privacy.json): per site, its figures, rate and flag."""
    sites = {}
    for node, f in sorted(figures.items()):
        rate = f["near-copies"] / f["samples"]
        sites[str(node)] = {**f, "rate": rate, "flagged": rate > s.memorisation_max_rate}
    flagged = [node for node, site in sites.items() if site["flagged"]]
    verdict = "FLAGGED" if flagged else "ok" if sites else "unchecked"
    return {"verdict": verdict, "flagged": bool(flagged), "flagged_sites": flagged, "checked": len(sites),
            "asked": len(sites) + len(failed), "max_rate": s.memorisation_max_rate,
            "samples": s.memorisation_samples, "ddim_steps": s.memorisation_ddim_steps,
            "alpha": s.memorisation_alpha, "seed": s.seed, "feature_space": FEATURE_SPACE, "pixel_space": PIXEL_SPACE,
            "sites": sites, "failed": {str(node): why for node, why in sorted(failed.items())}}


def verdict_line(result: dict) -> str:
    """The coordinator's line about the check (also a short form in the round's progress line)."""
    rule = f"memorisation-max-rate {result['max_rate']:g}"
    failed = "; ".join(f"site {n} not checked: {why}" for n, why in result["failed"].items())
    if result["flagged"]:
        worst = "; ".join(f"site {n}: {site['near-copies']} of {site['samples']} samples are near-copies of its own "
                          f"tiles (feature {site['near-copies-feature']}, pixel {site['near-copies-pixel']})"
                          for n, site in result["sites"].items() if site["flagged"])
        return (f"MEMORISATION FLAG: {worst}; above {rule}. The global model reproduces training tiles: see "
                f"privacy.md before releasing it" + (f" ({failed})" if failed else ""))
    if not result["sites"]:
        return f"memorisation check: NO site answered, the global model was not checked ({failed or 'no site asked'})"
    rates = max(site["rate"] for site in result["sites"].values())
    return (f"memorisation check ok at {result['checked']} of {result['asked']} site(s): largest near-copy rate "
            f"{rates:.3g}, not above {rule}" + (f"; {failed}" if failed else ""))


def short(result: dict) -> str:
    """``memorisation FLAGGED (site 10)`` / ``memorisation ok (2/3 sites)`` for the progress line."""
    if result.get("flagged"):
        return f"memorisation FLAGGED (site {', '.join(result.get('flagged_sites', []))})"
    return f"memorisation {result.get('verdict', '?')} ({result.get('checked', 0)}/{result.get('asked', 0)} sites)"
