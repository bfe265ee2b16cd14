"""One self-contained HTML page of a federated run: ``python -m server.dashboard RUN_DIR [--out FILE] [--watch S]``.

Readable offline, with no server: plots are inline SVG drawn here, pictures are embedded PNGs (base64). It shows
the run's status and its last coordinator lines, loss per round (the sites' mean and each site), MB sent and
received per round, seconds per stage of each round, epsilon per site, a table of the rounds (sites answered,
left out and why), the labeled site's Table 1 and real-vs-synthetic grids, and the privacy report. Sources, all
optional: ``metrics.jsonl``, ``server_state.json``, ``coordinator.json``/``coordinator.lock``,
``logs/flwr-run.log``, ``privacy.md``, and the labeled site's ``augment/`` folder where it is readable (simulation:
under ``sites/``; or ``--augment DIR``); a piece that is missing shows as "not yet".

While the run goes on (``server_state.json`` not ``done``/``stopped``, and its coordinator, where this machine can
tell, alive) the page reloads itself every 30 s; ``--watch SECONDS`` rewrites it every SECONDS until the run ends.
Default ``--out``: ``RUN_DIR/dashboard.html``. A folder that is no run directory: one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import os
import socket
import sys
import time
from pathlib import Path

STATE_FILE, METRICS_FILE, COORDINATOR_FILE, LOCK_FILE = ("server_state.json", "metrics.jsonl", "coordinator.json",
                                                          "coordinator.lock")
RUN_MARKERS = (STATE_FILE, METRICS_FILE, COORDINATOR_FILE)
REFRESH = 30  # seconds: the page's own reload while the run goes on
MAX_EMBED = 8_000_000  # bytes: a PNG above this is linked, not embedded
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]
STAGE_ORDER = ["prepare", "sites", "aggregate", "checkpoint", "hand-over", "pipeline"]
MAIN_LOSSES = {"lae": ["total", "rec"], "dm": ["loss"]}  # the losses plotted per phase (others: the table)
SKIP_METRICS = ("lr", "site-seconds", "disc_factor", "d_weight")
MB = 1e6


class NotARun(ValueError):
    """The folder holds no federated run."""


# ---------------------------------------------------------------------------------------------- reading a run


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_lines(run_dir: Path) -> list[dict]:
    """``metrics.jsonl``; a line being written (or damaged) is skipped."""
    out = []
    try:
        text = (run_dir / METRICS_FILE).read_text()
    except OSError:
        return out
    for raw in text.splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if isinstance(line, dict):
            out.append(line)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True


def run_status(run_dir: Path) -> tuple[str, bool]:
    """(status, finished): ``done`` or ``stopped`` from ``server_state.json`` (the final marker); ``interrupted`` when
    the coordinator that held the run directory (``coordinator.lock``, this host) is gone; else ``running``."""
    state = _json(run_dir / STATE_FILE) or {}
    status = state.get("status", "running")
    if status in ("done", "stopped"):
        return status, True
    holder = _json(run_dir / LOCK_FILE) or {}
    pid = holder.get("pid")
    if isinstance(pid, int) and holder.get("host") == socket.gethostname() and not _alive(pid):
        return "interrupted", True
    return "running", False


def find_augment_dirs(run_dir: Path, extra: list[Path] = ()) -> list[Path]:
    """The labeled sites' ``augment/`` folders readable from here: under the run directory (simulation) and ``extra``."""
    found: list[Path] = []
    for folder in [Path(p) for p in extra]:
        if folder.is_dir():
            found.append(folder)
    sites = run_dir / "sites"
    roots = [sites] if sites.is_dir() else []
    for root in roots:
        for marker in sorted(root.rglob("augment")):
            if marker.is_dir() and any((marker / f).exists() for f in ("table1.md", "results.json", "grids",
                                                                         "job_status.json")):
                found.append(marker)
    seen, out = set(), []
    for f in found:
        if f.resolve() not in seen:
            seen.add(f.resolve())
            out.append(f)
    return out


def _site_name(augment: Path) -> str:
    parts = augment.resolve().parts
    return parts[-3] if len(parts) >= 3 and parts[-1] == "augment" else augment.name


def _coordinator_lines(run_dir: Path, n: int = 10) -> list[str]:
    """The coordinator's last progress lines (``logs/flwr-run.log``, lines with ``[fed]``, ``deliver:``, ...)."""
    path = run_dir / "logs" / "flwr-run.log"
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, fh.seek(0, 2) - 200_000))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return []
    keys = ("[fed]", "FEDERATION", "left out", "deliver:", "resumed", "ERROR", "WARNING")
    lines = [x.strip() for x in text.splitlines() if any(k in x for k in keys)]
    return lines[-n:]


# ---------------------------------------------------------------------------------------------- SVG plots


def _esc(text) -> str:
    return html.escape(str(text), quote=True)


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.1e}".replace("e+0", "e").replace("e-0", "e-")
    return f"{v:.4g}"


def nice_ticks(lo: float, hi: float, n: int = 5, integer: bool = False) -> list[float]:
    """Round tick values covering [lo, hi] (about ``n`` intervals)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        lo, hi = 0.0, 1.0
    if hi <= lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = mag
    for m in (1, 2, 2.5, 5, 10):
        step = m * mag
        if (hi - lo) / step <= n:
            break
    if integer:
        step = max(1.0, round(step))
    first = math.floor(lo / step + 1e-9) * step
    ticks = [first]
    while ticks[-1] < hi - step * 1e-9:
        ticks.append(ticks[-1] + step)
    return [round(t, 12) for t in ticks]


def _legend(names: list[str], colors: list[str], x0: int, y0: int, width: int) -> tuple[str, int]:
    out, x, y = [], x0, y0
    for name, color in zip(names, colors):
        w = 22 + 7 * len(name)
        if x + w > x0 + width and x > x0:
            x, y = x0, y + 18
        out.append(f'<rect x="{x}" y="{y - 9}" width="12" height="12" fill="{color}"/>'
                   f'<text x="{x + 16}" y="{y + 1}" font-size="12">{_esc(name)}</text>')
        x += w
    return "".join(out), y + 18 - y0


def _frame(title: str, width: int, height: int, body: str, note: str = "") -> str:
    return (f'<figure class="plot"><svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="{_esc(title)}">'
            f'<rect width="{width}" height="{height}" fill="white"/>'
            f'<text x="{width / 2}" y="18" text-anchor="middle" font-size="14" font-weight="bold">{_esc(title)}</text>'
            f'{body}</svg>{f"<figcaption>{_esc(note)}</figcaption>" if note else ""}</figure>')


def _axes(x0, y0, pw, ph, xt, yt, xmap, ymap, xlabel, ylabel, ylabels=None) -> str:
    out = [f'<rect x="{x0}" y="{y0}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>']
    for i, t in enumerate(yt):
        y = ymap(t)
        label = ylabels[i] if ylabels else _fmt(t)
        out.append(f'<line x1="{x0}" x2="{x0 + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e5e5"/>'
                   f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{_esc(label)}</text>')
    for t, label in xt:
        x = xmap(t)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y0 + ph}" y2="{y0 + ph + 4}" stroke="#999"/>'
                   f'<text x="{x:.1f}" y="{y0 + ph + 16}" text-anchor="middle" font-size="11">{_esc(label)}</text>')
    out.append(f'<text x="{x0 + pw / 2}" y="{y0 + ph + 32}" text-anchor="middle" font-size="12">{_esc(xlabel)}</text>'
               f'<text x="14" y="{y0 + ph / 2}" text-anchor="middle" font-size="12" '
               f'transform="rotate(-90 14 {y0 + ph / 2})">{_esc(ylabel)}</text>')
    return "".join(out)


def line_chart(title: str, series: dict[str, list[tuple[float, float]]], xlabel: str = "global round",
               ylabel: str = "", width: int = 600, height: int = 300, bold: tuple[str, ...] = (),
               log_y: bool | None = None) -> str:
    """Lines with markers, one per series (``bold``: drawn thicker, e.g. the mean over sites)."""
    series = {k: [(float(x), float(y)) for x, y in v if y is not None and math.isfinite(float(y))]
              for k, v in series.items()}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return not_yet(title)
    merged: dict[str, list] = {}  # series that are the same points (e.g. sites spending the same epsilon): one line
    for name, pts in series.items():
        twin = next((k for k, v in merged.items() if v == pts and k not in bold and name not in bold), None)
        if twin is None:
            merged[name] = pts
        else:
            merged[f"{twin} = {name}"] = merged.pop(twin)
    series = merged
    names = list(series)
    colors = ["#000000" if n in bold else PALETTE[i % len(PALETTE)] for i, n in enumerate(names)]
    xs = [x for v in series.values() for x, _ in v]
    ys = [y for v in series.values() for _, y in v]
    if log_y is None:
        log_y = min(ys) > 0 and max(ys) / min(ys) > 50
    tf = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    legend, lh = _legend(names, colors, 60, 0, width - 80)
    x0, y0, pw, ph = 64, 30, width - 84, height - 30 - 46 - lh
    xt = nice_ticks(min(xs), max(xs), min(8, max(1, int(max(xs) - min(xs)))), integer=True)
    if log_y:
        lo, hi = math.floor(math.log10(min(ys))), math.ceil(math.log10(max(ys)))
        yt = list(range(lo, hi + 1)) if hi > lo else [lo, lo + 1]
        ylabels = [_fmt(10.0 ** t) for t in yt]
    else:
        yt, ylabels = nice_ticks(min(ys), max(ys)), None
    xmap = (lambda x: x0 + pw * (x - xt[0]) / ((xt[-1] - xt[0]) or 1))
    ymap = (lambda y: y0 + ph - ph * (y - yt[0]) / ((yt[-1] - yt[0]) or 1))
    body = [_axes(x0, y0, pw, ph, [(t, f"{t:g}") for t in xt], yt, xmap, ymap, xlabel,
                  ylabel + (" (log)" if log_y else ""), ylabels)]
    for name, color in zip(names, colors):
        pts = sorted(series[name])
        w = 2.6 if name in bold else 1.6
        coords = " ".join(f"{xmap(x):.1f},{ymap(tf(y)):.1f}" for x, y in pts)
        body.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="{w}"/>')
        body += [f'<circle cx="{xmap(x):.1f}" cy="{ymap(tf(y)):.1f}" r="{3.2 if name in bold else 2.6}" '
                 f'fill="{color}"><title>{_esc(name)}: round {x:g}, {_fmt(y)}</title></circle>' for x, y in pts]
    body.append(f'<g transform="translate(0,{height - lh + 4})">{legend}</g>')
    return _frame(title, width, height, "".join(body))


def bar_chart(title: str, categories: list, stacks: dict[str, list[float]], ylabel: str = "",
              xlabel: str = "global round", width: int = 600, height: int = 300, stacked: bool = True) -> str:
    """Bars per category: stacked (parts of a whole) or grouped side by side."""
    stacks = {k: [float(v or 0.0) for v in vals] for k, vals in stacks.items() if any(v for v in vals)}
    if not categories or not stacks:
        return not_yet(title)
    names = list(stacks)
    colors = [PALETTE[i % len(PALETTE)] for i in range(len(names))]
    n = len(categories)
    tops = ([sum(stacks[k][i] for k in names) for i in range(n)] if stacked
            else [max(stacks[k][i] for k in names) for i in range(n)])
    legend, lh = _legend(names, colors, 60, 0, width - 80)
    x0, y0, pw, ph = 64, 30, width - 84, height - 30 - 46 - lh
    yt = nice_ticks(0.0, max(tops) or 1.0)
    ymap = (lambda y: y0 + ph - ph * (y - yt[0]) / ((yt[-1] - yt[0]) or 1))
    slot = pw / n
    every = max(1, math.ceil(n / 12))
    xt = [(i, str(categories[i])) for i in range(0, n, every)]
    body = [_axes(x0, y0, pw, ph, xt, yt, lambda i: x0 + slot * (i + 0.5), ymap, xlabel, ylabel)]
    bw = slot * 0.8
    for i in range(n):
        left, base = x0 + slot * i + slot * 0.1, 0.0
        for j, name in enumerate(names):
            v = stacks[name][i]
            if stacked:
                y1, y2 = ymap(base + v), ymap(base)
                x, w = left, bw
                base += v
            else:
                w = bw / len(names)
                x, y1, y2 = left + j * w, ymap(v), ymap(0.0)
            body.append(f'<rect x="{x:.1f}" y="{y1:.1f}" width="{max(w - 0.5, 0.5):.1f}" height="{max(y2 - y1, 0):.1f}" '
                        f'fill="{colors[j]}"><title>{_esc(name)}: {_esc(categories[i])}, {_fmt(v)}</title></rect>')
    body.append(f'<g transform="translate(0,{height - lh + 4})">{legend}</g>')
    return _frame(title, width, height, "".join(body))


def not_yet(title: str, why: str = "") -> str:
    return (f'<div class="notyet"><b>{_esc(title)}</b>: not yet'
            f'{f" &mdash; {_esc(why)}" if why else ""}</div>')


# ---------------------------------------------------------------------------------------------- small markdown


def _inline(text: str) -> str:
    parts = _esc(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def markdown(text: str) -> str:
    """The markdown the project writes (headings, pipe tables, lists, paragraphs) as HTML."""
    out, para, table, items = [], [], [], []

    def flush() -> None:
        if para:
            out.append(f"<p>{_inline(' '.join(para))}</p>")
            para.clear()
        if items:
            out.append("<ul>" + "".join(f"<li>{_inline(x)}</li>" for x in items) + "</ul>")
            items.clear()
        if table:
            rows = [r for r in table if not set(r.replace("|", "").strip()) <= set("-: ")]
            cells = [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows]
            head, rest = cells[0], cells[1:]
            out.append("<table><thead><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr></thead><tbody>"
                       + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rest)
                       + "</tbody></table>")
            table.clear()

    for raw in text.splitlines():
        line = raw.rstrip()
        if line.startswith("|"):
            if para or items:
                flush()
            table.append(line)
            continue
        if table:
            flush()
        if not line.strip():
            flush()
        elif line.startswith("#"):
            flush()
            level = min(6, len(line) - len(line.lstrip("#")) + 1)
            out.append(f"<h{level}>{_inline(line.lstrip('#').strip())}</h{level}>")
        elif line.lstrip().startswith("- "):
            if para:
                flush()
            items.append(line.lstrip()[2:])
        elif items and raw.startswith("  "):
            items[-1] += " " + line.strip()
        else:
            para.append(line.strip())
    flush()
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- sections


def _png(path: Path, alt: str) -> str:
    try:
        size = path.stat().st_size
        if size > MAX_EMBED:
            return f'<a href="{_esc(path.resolve().as_uri())}">{_esc(path.name)}</a> ({size / MB:.1f} MB, not embedded)'
        data = base64.b64encode(path.read_bytes()).decode()
    except OSError:
        return ""
    return f'<img alt="{_esc(alt)}" title="{_esc(alt)}" src="data:image/png;base64,{data}">'


def _node_order(lines: list[dict], key: str) -> list[str]:
    seen: list[str] = []
    for line in lines:
        for node in (line.get(key) or {}):
            if str(node) not in seen:
                seen.append(str(node))
    return seen


def loss_plots(lines: list[dict]) -> str:
    out = []
    for phase in ("lae", "dm"):
        rows = [x for x in lines if x.get("phase") == phase]
        if not rows:
            out.append(not_yet(f"{phase.upper()} loss per round", f"no {phase} round committed"))
            continue
        keys = [k for k in MAIN_LOSSES.get(phase, []) if any(k in (x.get("losses") or {}) for x in rows)]
        if not keys:
            keys = [k for k in (rows[-1].get("losses") or {}) if k not in SKIP_METRICS and "seconds" not in k][:1]
        same = [k for i, k in enumerate(keys) if i and all((x.get("losses") or {}).get(k) ==
                                                          (x.get("losses") or {}).get(keys[0]) for x in rows)]
        for key in keys:
            if key in same:  # e.g. total == rec when the other terms are off: one plot says it
                continue
            series: dict[str, list] = {"mean over sites": [(x["global_round"], (x.get("losses") or {}).get(key))
                                                           for x in rows]}
            for node in _node_order(rows, "losses_per_site"):
                series[f"site {node}"] = [(x["global_round"], ((x.get("losses_per_site") or {}).get(node) or {}).get(key))
                                          for x in rows]
            out.append(line_chart(f"{phase.upper()} {key} per round", series, ylabel=key, bold=("mean over sites",)))
    return "".join(out)


def bytes_plot(lines: list[dict]) -> str:
    rows = [x for x in lines if x.get("bytes_sent") or x.get("bytes_received")]
    return bar_chart("MB per round (all sites)", [x.get("global_round") for x in rows],
                     {"sent to sites": [x.get("bytes_sent", 0) / MB for x in rows],
                      "received from sites": [x.get("bytes_received", 0) / MB for x in rows]},
                     ylabel="MB", stacked=False)


def stage_plot(lines: list[dict]) -> str:
    names: list[str] = []
    for x in lines:
        for k in (x.get("stages") or {"round": 0}):
            if k not in names:
                names.append(k)
    names.sort(key=lambda k: STAGE_ORDER.index(k) if k in STAGE_ORDER else len(STAGE_ORDER))
    stacks = {k: [((x.get("stages") or {"round": x.get("seconds", 0.0)}).get(k) or 0.0) for x in lines] for k in names}
    return bar_chart("Seconds per stage of each round", [x.get("global_round") for x in lines], stacks,
                     ylabel="seconds")


def epsilon_plot(lines: list[dict]) -> str:
    series: dict[str, list] = {}
    for node in _node_order(lines, "privacy"):
        series[f"site {node}"] = [(x["global_round"], ((x.get("privacy") or {}).get(node) or {}).get("epsilon"))
                                  for x in lines if x.get("privacy")]
    central = [(x["global_round"], (x.get("privacy_central") or {}).get("epsilon")) for x in lines
               if x.get("privacy_central")]
    if central:
        series["central DP"] = central
    if not any(y is not None for v in series.values() for _, y in v):
        return not_yet("Epsilon per site", "no site reported a privacy spend (differential privacy off, or no "
                                           "training round committed)")
    return line_chart("Epsilon spent per site", series, ylabel="epsilon", log_y=False)


def rounds_table(lines: list[dict]) -> str:
    if not lines:
        return not_yet("Rounds")
    head = ("round", "phase", "sites", "left out (why)", "loss", "MB sent", "MB received", "seconds", "at")
    rows = []
    for x in lines:
        losses = x.get("losses") or {}
        key = next((k for k in MAIN_LOSSES.get(x.get("phase"), []) if k in losses), None)
        loss = f"{key} {_fmt(losses[key])}" if key else ("scale factor " + _fmt(x["scale_factor"])
                                                         if "scale_factor" in x else "")
        dropped = "; ".join(f"{n}: {why}" for n, why in (x.get("dropped") or {}).items())
        at = time.strftime("%m-%d %H:%M:%S", time.localtime(x["time"])) if x.get("time") else ""
        rows.append((x.get("global_round"), f"{x.get('phase')} {x.get('round')}/{x.get('rounds')}",
                     f"{x.get('sites_answered')}/{x.get('sites_asked')}", dropped, loss,
                     f"{(x.get('bytes_sent') or 0) / MB:.2f}", f"{(x.get('bytes_received') or 0) / MB:.2f}",
                     f"{x.get('seconds', 0):.1f}", at))
    return ("<table class='rounds'><thead><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"
            + "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in r) + "</tr>" for r in rows) + "</tbody></table>")


def _table_from_metrics(result: dict) -> str:
    """Table 1 from the scalar metrics a labeled site sent back (``<setting>/<metric>``)."""
    cols = ["fid", "accuracy", "f1", "sensitivity", "specificity", "n_synthetic"]
    settings: dict[str, dict] = {}
    for key, value in result.items():
        if "/" in str(key):
            setting, metric = str(key).split("/", 1)
            settings.setdefault(setting, {})[metric] = value
    if not settings:
        return ""
    body = "".join("<tr><td>" + _esc(s) + "</td>" + "".join(
        f"<td>{_fmt(v[c]) if isinstance(v.get(c), (int, float)) else '-'}</td>" for c in cols) + "</tr>"
        for s, v in settings.items())
    return ("<table><thead><tr><th>setting</th>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr></thead><tbody>"
            + body + "</tbody></table>")


def labeled_section(lines: list[dict], augment_dirs: list[Path]) -> str:
    out = []
    for folder in augment_dirs:
        site = _site_name(folder)
        part = [f"<h3>{_esc(site)} <span class='path'>{_esc(folder)}</span></h3>"]
        status = _json(folder / "job_status.json") or {}
        if status.get("state") and status.get("state") != "done":
            part.append(f"<p>pipeline: <b>{_esc(status['state'])}</b> {_esc(status.get('error', ''))}</p>")
        table = folder / "table1.md"
        part.append(markdown(table.read_text()) if table.is_file() else not_yet(f"Table 1 of {site}"))
        grids = sorted((folder / "grids").glob("*.png"))
        if grids:
            part.append("<p>Real tiles (top row) and selected synthetic tiles (bottom row) per class:</p><div class='grids'>"
                        + "".join(f"<figure>{_png(g, f'{site} {g.stem}')}<figcaption>{_esc(g.stem)}</figcaption></figure>"
                                  for g in grids) + "</div>")
        else:
            part.append(not_yet(f"grids of {site}"))
        confusion = sorted((folder / "confusion").glob("*.png"))
        if confusion:
            part.append("<details><summary>confusion matrices (test set)</summary><div class='grids'>"
                        + "".join(f"<figure>{_png(c, c.stem)}</figure>" for c in confusion) + "</div></details>")
        out.append("".join(part))
    deliver = [x for x in lines if x.get("phase") == "deliver"]
    if deliver and not augment_dirs:  # the coordinator's own record: the scalars the labeled site sent back
        for node, result in (deliver[-1].get("labeled_sites") or {}).items():
            table = _table_from_metrics(result)
            out.append(f"<h3>labeled site {_esc(node)}: pipeline {_esc(result.get('status', 'done'))}</h3>"
                       + (table or not_yet("Table 1", result.get("error", "")))
                       + "<p>Its grids stay at the site (only scalar metrics leave it); where its <code>augment/</code> "
                         "folder is readable, <code>--augment DIR</code> adds them here.</p>")
    if not out:
        return not_yet("The labeled site's results", "the global model has not been delivered yet, or the "
                                                     "labeled site's pipeline has not finished")
    return "".join(out)


def privacy_section(run_dir: Path, lines: list[dict]) -> str:
    md = run_dir / "privacy.md"
    text = md.read_text() if md.is_file() else ""
    if text.startswith("## Privacy"):  # the section heading is the page's own
        text = text[len("## Privacy"):]
    report = (markdown(text) if md.is_file() else
              not_yet("Privacy report", "privacy.json and privacy.md are written when the run ends or stops; "
                                        f"python -m server.privacy_report {run_dir} writes them now"))
    return epsilon_plot(lines) + report


# ---------------------------------------------------------------------------------------------- the page

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif;margin:18px 28px;color:#222;max-width:1300px}
h1{font-size:22px;margin:0 0 6px} h2{font-size:18px;margin:26px 0 8px;border-bottom:1px solid #ddd;padding-bottom:3px}
h3{font-size:15px;margin:16px 0 6px} .path{font-weight:normal;color:#888;font-size:12px}
.status{display:inline-block;padding:2px 10px;border-radius:10px;color:white;font-weight:bold}
.running{background:#1f77b4} .done{background:#2ca02c} .stopped{background:#d62728} .interrupted{background:#ff7f0e}
.summary td{padding:1px 12px 1px 0} .plots{display:flex;flex-wrap:wrap;gap:10px}
figure.plot{margin:0;border:1px solid #eee}
table{border-collapse:collapse;font-size:13px;margin:6px 0} th,td{border:1px solid #ddd;padding:3px 7px;text-align:left}
th{background:#f4f4f4} table.rounds td:nth-child(4){max-width:380px;color:#a33}
.notyet{color:#777;background:#fafafa;border:1px dashed #ccc;padding:10px 14px;margin:6px 0;min-width:260px}
.grids{display:flex;flex-wrap:wrap;gap:12px} .grids figure{margin:0;text-align:center;font-size:12px}
.grids img{image-rendering:pixelated;min-width:220px;border:1px solid #ddd}
pre{background:#f7f7f7;padding:8px;font-size:12px;overflow-x:auto} code{background:#f3f3f3;padding:0 3px}
"""


def render(run_dir: str | Path, augment: list[Path] = (), now: float | None = None) -> tuple[str, bool]:
    """(the page, whether the run has finished). Raises ``NotARun`` for a folder that holds no run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not any((run_dir / m).is_file() for m in RUN_MARKERS):
        raise NotARun(f"{run_dir} is not a federated run directory (no {', '.join(RUN_MARKERS)})")
    now = time.time() if now is None else now
    lines = read_lines(run_dir)
    state = _json(run_dir / STATE_FILE) or {}
    status, finished = run_status(run_dir)
    last = lines[-1] if lines else {}
    position = (f"phase {state.get('phase', '?')}, {state.get('global_round', 0)} round(s) committed"
                if state else "starting (no round committed yet)")
    if last:
        position += (f"; last: {last.get('phase')} round {last.get('round')}/{last.get('rounds')} "
                     f"(global {last.get('global_round')}), "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(last.get('time', now)))}")
    coordinator = _coordinator_lines(run_dir)
    summary = [("run directory", str(run_dir.resolve())), ("where", position)]
    if state.get("message"):
        summary.append(("message", state["message"]))
    if state.get("scale_factor"):
        summary.append(("latent scale factor", _fmt(state["scale_factor"])))
    summary.append(("TensorBoard", f"tensorboard --logdir {run_dir.resolve() / 'tensorboard'}"
                    if (run_dir / "tensorboard").is_dir() else "not yet"))
    summary.append(("page written", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
                    + (f", reloads every {REFRESH} s while the run goes on" if not finished else "")))
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f'<meta http-equiv="refresh" content="{REFRESH}">' if not finished else "",
        f"<title>HistoDiffusion run {_esc(run_dir.name)}: {status}</title><style>{CSS}</style></head><body>",
        f"<h1>Federated HistoDiffusion: {_esc(run_dir.name)} <span class='status {status}'>{status}</span></h1>",
        "<table class='summary'>" + "".join(f"<tr><td><b>{_esc(k)}</b></td><td>{_esc(v)}</td></tr>"
                                            for k, v in summary) + "</table>",
    ]
    if coordinator:
        parts.append("<h2>Coordinator, last lines</h2><pre>" + _esc("\n".join(coordinator)) + "</pre>")
    parts += ["<h2>Training</h2><div class='plots'>", loss_plots(lines), "</div>",
              "<h2>Traffic and time</h2><div class='plots'>", bytes_plot(lines), stage_plot(lines), "</div>",
              "<h2>Rounds</h2>", rounds_table(lines),
              "<h2>Labeled site</h2>", labeled_section(lines, find_augment_dirs(run_dir, list(augment))),
              "<h2>Privacy</h2>", privacy_section(run_dir, lines),
              "</body></html>"]
    return "\n".join(p for p in parts if p), finished


def write(run_dir: Path, out: Path, augment: list[Path] = ()) -> bool:
    """Write the page atomically (a browser reloading it never sees half a page); returns whether the run finished."""
    page, finished = render(run_dir, augment)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    return finished


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m server.dashboard", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (server.run --run-dir)")
    p.add_argument("--out", default=None, help="the HTML file (default RUN_DIR/dashboard.html)")
    p.add_argument("--watch", type=float, default=0.0, metavar="SECONDS",
                   help="rewrite the page every SECONDS until the run ends")
    p.add_argument("--augment", action="append", default=[], metavar="DIR",
                   help="a labeled site's augment/ folder to show (repeatable; simulation runs are found by themselves)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    run_dir = Path(args.run_dir)
    out = Path(args.out) if args.out else run_dir / "dashboard.html"
    if args.watch < 0:
        print("error: --watch must be a number of seconds > 0", file=sys.stderr)
        return 2
    said = None
    try:
        while True:
            finished = write(run_dir, out, [Path(a) for a in args.augment])
            news = f"{out} ({run_status(run_dir)[0]}, {len(read_lines(run_dir))} round(s))"
            if news != said:
                print(f"wrote {news}", flush=True)
                said = news
            if finished or not args.watch:
                return 0
            time.sleep(args.watch)
    except NotARun as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
