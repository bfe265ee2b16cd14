"""Seconds per round and peak memory against the number of simulated sites: ``python -m benchmarks.many_sites``.

``python -m benchmarks.many_sites --sites 5 10 20 50 [--out DIR]``: for each N, one real
``python -m server.run --simulation N`` (Flower's simulation runtime, Ray backend) at the ``tiny`` profile, each
site on its own phantom tiles (``phantom-per-class``), ``local-steps`` steps of batch 4 per round, no labeled site
(the labeled pipeline does not run), no delivery, no memorisation check, every site must answer (min-sites=N). By
default one LAE round (its ``prepare`` stage is the role query that opens the run, where the sites write their tiles;
Ray's workers start during it), the latent statistics and one DM round (the warm one: read it for seconds per round).
Seconds per round and per stage come from the coordinator's ``metrics.jsonl``; the sites' own handler times from the
clocks each reply carries.

Memory: every ``--interval`` seconds the process tree of that command is read from ``/proc`` (RSS and PSS of each
process) and each process is put in one group by its command line: ``superlink`` (flower-superlink and its
flower-superexec), ``serverapp`` (flwr-simulation: the ServerApp, Flower's in-memory message store and the Ray
driver of the simulation), ``launcher`` (``python -m server.run`` and the ``flwr run`` it streams), ``sites``
(Ray's ClientApp actors and idle workers, and their children), ``ray`` (raylet, GCS, dashboard, agents).
Coordinator = superlink + serverapp, summed per sample; "all" = every process of the tree. PSS divides shared
pages (torch's libraries, Ray's object store) among the processes that map them, so the PSS sum is what the run
takes from the machine; the RSS sum counts shared pages once per process.

Each N's processes are all gone before the next N starts (the command stops its own; whatever of its tree is left,
and any process under its own Ray temp folder, is stopped by pid). Writes ``<out>/many_sites.json`` after each N.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks import TINY_OVERRIDES

ROLES = ("superlink", "serverapp", "launcher", "sites", "ray", "other")
COORDINATOR = ("superlink", "serverapp")
STATE_FILES = ("server_state.json", "privacy_ledger.json", "metrics.jsonl")


# ------------------------------------------------------------------ /proc, one process


def parse_stat(text: str) -> tuple[int, str, str, int, int]:
    """(pid, comm, state, ppid, start time in clock ticks) of one ``/proc/<pid>/stat`` line (comm may hold spaces
    and parentheses: it is everything between the first '(' and the last ')')."""
    pid = int(text[:text.index("(")])
    comm = text[text.index("(") + 1:text.rindex(")")]
    rest = text[text.rindex(")") + 2:].split()
    return pid, comm, rest[0], int(rest[1]), int(rest[19])  # fields 3, 4 (ppid) and 22 (starttime) of proc(5)


def parse_kb(text: str, key: str) -> int | None:
    """The ``key:  123 kB`` value of a ``/proc/<pid>/status`` or ``smaps_rollup`` text, in kB."""
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return None


def classify(argv: list[str]) -> str | None:
    """The group of a process from its command line; None: not recognised (it takes its parent's group)."""
    if not argv:
        return None
    first = argv[0]
    if first.startswith("ray::"):
        return "sites" if first.startswith(("ray::ClientAppActor", "ray::IDLE")) else "ray"
    names = [os.path.basename(a) for a in argv[:2]]
    if "flower-superlink" in names or "flower-superexec" in names or ("-m" in argv and "server.superlink" in argv):
        return "superlink"
    if "flwr-simulation" in names:
        return "serverapp"
    if "flwr" in names and "run" in argv[1:3]:
        return "launcher"
    if "-m" in argv and "server.run" in argv:
        return "launcher"
    if any(n in ("raylet", "gcs_server") for n in names) or any("/ray/" in a and a.endswith(".py") for a in argv[:3]):
        return "ray"
    return None


@dataclass
class Proc:
    pid: int
    ppid: int
    start: int  # clock ticks since boot: tells a pid reused by another process apart
    argv: list[str]
    rss_kb: int
    pss_kb: int | None


def read_proc(pid: int, root: Path = Path("/proc"), pss: bool = True) -> Proc | None:
    """One process's stat, command line, RSS and (``pss``) PSS; None when it is gone (or a zombie) or unreadable."""
    base = root / str(pid)
    try:
        _, _, state, ppid, start = parse_stat((base / "stat").read_text())
        if state in ("Z", "X"):
            return None
        argv = [a for a in (base / "cmdline").read_bytes().decode(errors="replace").split("\0") if a]
        rss = parse_kb((base / "status").read_text(), "VmRSS") or 0
        p = None
        if pss:
            try:
                p = parse_kb((base / "smaps_rollup").read_text(), "Pss")
            except OSError:
                p = None
    except (OSError, ValueError, IndexError):
        return None
    return Proc(pid, ppid, start, argv, rss, p)


def all_parents(root: Path = Path("/proc")) -> dict[int, int]:
    """pid -> ppid of every process visible now."""
    out = {}
    for entry in os.scandir(root):
        if entry.name.isdigit():
            try:
                pid, _, _, ppid, _ = parse_stat(Path(entry.path, "stat").read_text())
            except (OSError, ValueError, IndexError):
                continue
            out[pid] = ppid
    return out


def descendants(parents: dict[int, int], root: int) -> list[int]:
    """``root`` and every process below it, from a pid -> ppid map (breadth first)."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    out, todo, seen = [], [root] if root in parents else [], set()
    while todo:
        pid = todo.pop(0)
        if pid in seen:
            continue
        seen.add(pid)
        out.append(pid)
        todo.extend(sorted(children.get(pid, [])))
    return out


def roles_of(procs: dict[int, Proc]) -> dict[int, str]:
    """Each process's group: its own (``classify``), else its nearest classified ancestor's, else ``other``."""
    memo: dict[int, str] = {}

    def role(pid: int, depth: int = 0) -> str:
        if pid in memo:
            return memo[pid]
        p = procs.get(pid)
        if p is None or depth > 64:
            return "other"
        r = classify(p.argv) or (role(p.ppid, depth + 1) if p.ppid in procs else "other")
        memo[pid] = r
        return r

    return {pid: role(pid) for pid in procs}


# ------------------------------------------------------------------ the sampler


@dataclass
class Sample:
    t: float
    rss_kb: dict[str, int]  # per group
    pss_kb: dict[str, int]
    processes: dict[str, int]
    load1: float


def summarise(procs: dict[int, Proc], t: float, load1: float) -> Sample:
    roles = roles_of(procs)
    rss = {r: 0 for r in ROLES}
    pss = {r: 0 for r in ROLES}
    count = {r: 0 for r in ROLES}
    for pid, p in procs.items():
        r = roles[pid]
        rss[r] += p.rss_kb
        pss[r] += p.pss_kb if p.pss_kb is not None else p.rss_kb
        count[r] += 1
    return Sample(t, rss, pss, count, load1)


def peaks(samples: list[Sample]) -> dict:
    """Peak MB per group, of the coordinator (superlink + serverapp) and of all processes, each the largest sum seen
    in one sample (RSS and PSS); the most processes per group seen at once; load average (1 min) mean and max."""
    def mb(kb):
        return round(kb / 1024, 1)

    out: dict = {"samples": len(samples)}
    if not samples:
        return out
    for kind in ("rss", "pss"):
        values = [getattr(s, f"{kind}_kb") for s in samples]
        out[f"{kind}_mb"] = {r: mb(max(v[r] for v in values)) for r in ROLES}
        out[f"coordinator_{kind}_mb"] = mb(max(sum(v[r] for r in COORDINATOR) for v in values))
        out[f"all_{kind}_mb"] = mb(max(sum(v.values()) for v in values))
    out["processes"] = {r: max(s.processes[r] for s in samples) for r in ROLES}
    loads = [s.load1 for s in samples]
    out["load1_mean"], out["load1_max"] = round(sum(loads) / len(loads), 2), round(max(loads), 2)
    return out


class TreeSampler:
    """Samples the process tree under ``root_pid`` every ``interval`` seconds in a thread. Processes seen once stay
    tracked (by pid and start time) when their parent dies and they are re-parented, so they are measured and
    stopped too; ``extra`` picks further processes by command line (e.g. everything under a Ray temp folder)."""

    def __init__(self, root_pid: int, interval: float = 0.5, extra=None, proc_root: Path = Path("/proc")):
        self.root_pid, self.interval, self.extra, self.proc_root = root_pid, interval, extra, proc_root
        self.samples: list[Sample] = []
        self.seen: dict[int, tuple[int, list[str]]] = {}  # pid -> (start ticks, argv)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> TreeSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def current(self, pss: bool = True) -> dict[int, Proc]:
        parents = all_parents(self.proc_root)
        pids = set(descendants(parents, self.root_pid)) | (set(self.seen) & set(parents))
        procs = {}
        for pid in pids:
            p = read_proc(pid, self.proc_root, pss)
            if p is None:
                continue
            if pid in self.seen and self.seen[pid][0] != p.start:
                continue  # the pid now belongs to another process
            procs[pid] = p
        if self.extra is not None:
            for pid in set(parents) - set(procs):
                try:
                    argv = [a for a in (self.proc_root / str(pid) / "cmdline").read_bytes().decode(
                        errors="replace").split("\0") if a]
                except OSError:
                    continue
                p = read_proc(pid, self.proc_root, pss) if self.extra(argv) else None
                if p is not None:
                    procs[pid] = p
        for pid, p in procs.items():
            self.seen.setdefault(pid, (p.start, p.argv))
        return procs

    def sample(self) -> Sample | None:
        procs = self.current()
        if not procs:
            return None
        s = summarise(procs, time.time(), os.getloadavg()[0])
        self.samples.append(s)
        return s

    def _loop(self) -> None:
        while not self._stop.is_set():
            t = time.monotonic()
            self.sample()
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - t)))

    def left_over(self) -> dict[int, Proc]:
        """Processes of this tree still alive (same pid and start time as when seen)."""
        return self.current(pss=False)

    def stop_all(self, grace: float = 10.0) -> list[int]:
        """SIGTERM, then SIGKILL after ``grace`` seconds, every process of this tree still alive. Returns the pids
        it found alive (empty: nothing was left); raises RuntimeError if any survives SIGKILL."""
        found = sorted(self.left_over())
        left = found
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            for pid in left:
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            deadline = time.monotonic() + wait
            while left and time.monotonic() < deadline:
                time.sleep(0.2)
                left = sorted(self.left_over())
            if not left:
                return found
        raise RuntimeError(f"processes {left} survived SIGKILL")


# ------------------------------------------------------------------ the coordinator's metrics


def round_table(metrics: list[dict]) -> list[dict]:
    """One row per round of ``metrics.jsonl``: phase, round, seconds, stages, sites asked/answered, the sites'
    mean local time (``site-seconds``) and bytes each way."""
    rows = []
    for m in metrics:
        if "phase" not in m or "seconds" not in m:
            continue
        rows.append({"phase": m["phase"], "round": m.get("round"), "seconds": float(m["seconds"]),
                     "stages": dict(m.get("stages") or {}), "asked": m.get("sites_asked"),
                     "answered": m.get("sites_answered"), "dropped": len(m.get("dropped") or {}),
                     "site_seconds": (m.get("losses") or {}).get("site-seconds"),
                     "bytes_sent": m.get("bytes_sent"), "bytes_received": m.get("bytes_received"),
                     **site_clocks(m.get("losses_per_site") or {})})
    return rows


def site_clocks(per_site: dict) -> dict:
    """From each site's ``clock-handler-start`` and ``clock-reply`` (epoch seconds, set by the ClientApp): ``busy_s``,
    the sum of the sites' handler times; ``span_s``, first handler start to last reply. With W workers serving the
    sites, ``1 - busy_s / (W * span_s)`` is the share of the workers' time spent outside the handler (Flower/Ray
    dispatch between sites, waiting). Empty when the sites sent no clocks."""
    spans = [(float(v["clock-handler-start"]), float(v["clock-reply"])) for v in per_site.values()
             if "clock-handler-start" in v and "clock-reply" in v]
    if not spans:
        return {}
    return {"busy_s": round(sum(b - a for a, b in spans), 3),
            "span_s": round(max(b for _, b in spans) - min(a for a, _ in spans), 3)}


def idle_share(row: dict, workers: int) -> float | None:
    """``1 - busy_s / (workers * span_s)`` of one round (see ``site_clocks``); None without clocks."""
    if not row.get("span_s") or not workers:
        return None
    return round(max(0.0, 1.0 - row["busy_s"] / (workers * row["span_s"])), 3)


def phase_seconds(rows: list[dict]) -> dict[str, list[float]]:
    """Seconds of each round, grouped by phase in run order (``lae`` -> [round 1, round 2, ...])."""
    out: dict[str, list[float]] = {}
    for r in rows:
        out.setdefault(r["phase"], []).append(r["seconds"])
    return out


def growth(ns: list[int], values: list[float]) -> float | None:
    """Log-log slope of ``values`` against ``ns`` from the first to the last point: 1.0 is linear, 0 flat."""
    import math

    pairs = [(n, v) for n, v in zip(ns, values) if v and v > 0]
    if len(pairs) < 2 or pairs[0][0] == pairs[-1][0]:
        return None
    (n0, v0), (n1, v1) = pairs[0], pairs[-1]
    return round(math.log(v1 / v0) / math.log(n1 / n0), 2)


# ------------------------------------------------------------------ one N


def run_config(args) -> str:
    return (f'overrides="{TINY_OVERRIDES}" lae-rounds={args.lae_rounds} dm-rounds={args.dm_rounds} '
            f'local-steps={args.steps} phantom-per-class={args.per_class} labeled-partitions="" deliver=false '
            f"augment=false memorisation-samples=0 min-sites={{n}} round-timeout={args.round_timeout} "
            f"{args.config}").strip()


def measure(n: int, out: Path, args) -> dict:
    from strategies.checkpoint import read_metrics
    from wire.flower_env import flower_env

    run_dir = (out / f"n{n}").resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    ray_tmp = flower_env(run_dir / "flwr-home")["RAY_TMPDIR"]  # the Ray folder server.run's processes get
    config = run_config(args).replace("{n}", str(n))
    cmd = [sys.executable, "-m", "server.run", "--run-dir", str(run_dir), "--simulation", str(n), "--config", config,
           "--timeout", str(args.timeout)]
    if args.federation_config:
        cmd += ["--federation-config", args.federation_config]
    env = dict(os.environ, HF_HUB_OFFLINE="1", FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
    load_before = os.getloadavg()
    t0 = time.time()
    with open(out / f"n{n}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        sampler = TreeSampler(proc.pid, args.interval, extra=lambda argv: any(ray_tmp in a for a in argv)).start()
        try:
            code = proc.wait(timeout=args.timeout + 120)
        except subprocess.TimeoutExpired:
            code = None
        except KeyboardInterrupt:
            code = 130
        finally:
            sampler.stop()
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # server.run stops what it started (its own clean stop)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    pass
            try:
                killed = sampler.stop_all()
            except RuntimeError as exc:
                killed = [str(exc)]
    wall = time.time() - t0
    rows = round_table(read_metrics(run_dir))
    result = {"sites": n, "returncode": code, "wall_s": round(wall, 1), "command": cmd, "run_dir": str(run_dir),
              "loadavg_before": [round(x, 2) for x in load_before],
              "loadavg_after": [round(x, 2) for x in os.getloadavg()], "rounds": rows,
              "seconds": phase_seconds(rows), "memory": peaks(sampler.samples), "left_over_stopped": killed,
              # what the coordinator keeps per site, on disk (the same records it holds in memory)
              "state_bytes": {f: (run_dir / f).stat().st_size for f in STATE_FILES if (run_dir / f).is_file()}}
    if killed:
        print(f"  N={n}: stopped {len(killed)} process(es) left over: {killed}", flush=True)
    return result


# ------------------------------------------------------------------ report


def _fmt(values: list[float]) -> str:
    return "/".join(f"{v:.1f}" for v in values) if values else "-"


def _round(r: dict, phase: str) -> dict:
    rows = [x for x in r["rounds"] if x["phase"] == phase]
    return rows[-1] if rows else {}


def table(results: list[dict]) -> str:
    """One line per N: the last round of each phase (s), the DM round's seconds per site, the sites' mean handler
    time in it, the workers' idle share, peak memory (MB) and the load average while it ran."""
    head = (f"{'N':>3} {'ok':>3} {'lae s':>7} {'role s':>6} {'stats s':>7} {'dm s':>7} {'dm s/site':>9} "
            f"{'site-s':>6} {'idle':>5} {'coord RSS':>9} {'coord PSS':>9} {'all RSS':>8} {'all PSS':>8} "
            f"{'workers':>7} {'load 1m':>9} {'wall s':>6}")
    lines = [head]
    for r in results:
        m = r["memory"]
        workers = m.get("processes", {}).get("sites", 0)
        lae, stats, dm = _round(r, "lae"), _round(r, "latent-stats"), _round(r, "dm")
        first = next((x for x in r["rounds"] if x["phase"] == "lae"), {})
        ok = "yes" if r["returncode"] == 0 and r["rounds"] and all(x["answered"] == x["asked"] for x in r["rounds"]) \
            else "NO"
        idle = idle_share(dm, workers)
        lines.append(
            f"{r['sites']:>3} {ok:>3} {lae.get('seconds', 0):>7.1f} {first.get('stages', {}).get('prepare', 0):>6.1f} "
            f"{stats.get('seconds', 0):>7.1f} {dm.get('seconds', 0):>7.1f} "
            f"{(dm.get('stages', {}).get('sites', 0) / r['sites']):>9.2f} {dm.get('site_seconds') or 0:>6.1f} "
            f"{'-' if idle is None else f'{idle:.0%}':>5} {m.get('coordinator_rss_mb', 0):>9.0f} "
            f"{m.get('coordinator_pss_mb', 0):>9.0f} {m.get('all_rss_mb', 0):>8.0f} {m.get('all_pss_mb', 0):>8.0f} "
            f"{workers:>7} {m.get('load1_mean', 0):>4.1f}/{m.get('load1_max', 0):<4.1f} {r['wall_s']:>6.0f}")
    return "\n".join(lines)


def stage_table(results: list[dict]) -> str:
    """Every round of every N: seconds per stage, the sites' mean handler time, the workers' idle share."""
    lines = [f"{'N':>3} {'phase':>12} {'round':>5} {'s':>7} {'prepare':>8} {'sites':>7} {'aggregate':>9} "
             f"{'checkpoint':>10} {'site-s':>7} {'idle':>5} {'answered':>8}"]
    for r in results:
        workers = r["memory"].get("processes", {}).get("sites", 0)
        for x in r["rounds"]:
            st, idle = x["stages"], idle_share(x, workers)
            lines.append(f"{r['sites']:>3} {x['phase']:>12} {x['round']:>5} {x['seconds']:>7.1f} "
                         f"{st.get('prepare', 0):>8.2f} {st.get('sites', 0):>7.1f} {st.get('aggregate', 0):>9.2f} "
                         f"{st.get('checkpoint', 0):>10.2f} {x['site_seconds'] or 0:>7.2f} "
                         f"{'-' if idle is None else f'{idle:.0%}':>5} {x['answered']}/{x['asked']:<4}")
    return "\n".join(lines)


def readings(results: list[dict]) -> dict:
    """The log-log growth of the warm rounds' seconds and of the coordinator's peak memory against N."""
    done = [r for r in results if r["seconds"]]
    ns = [r["sites"] for r in done]
    out = {}
    for phase in ("lae", "dm"):
        out[f"{phase}_growth"] = growth(ns, [(r["seconds"].get(phase) or [0])[-1] for r in done])
        # the same with each round's seconds divided by its sites' mean handler time: other load on the machine
        # slows every site alike, so this ratio shows how the round grows with N itself
        out[f"{phase}_growth_per_site_second"] = growth(
            ns, [_round(r, phase).get("seconds", 0) / (_round(r, phase).get("site_seconds") or float("inf"))
                 for r in done])
    out["coordinator_pss_growth"] = growth(ns, [r["memory"].get("coordinator_pss_mb", 0) for r in done])
    out["all_pss_growth"] = growth(ns, [r["memory"].get("all_pss_mb", 0) for r in done])
    return out


def print_report(report: dict, out: Path) -> None:
    results = report["results"]
    print(table(results))
    print()
    print(stage_table(results))
    print()
    print("growth exponents (log-log, first to last N; 1 = linear, 0 = flat):", json.dumps(report["readings"]))
    print(f"written: {out / 'many_sites.json'}")


def report_only(out: Path) -> int:
    """The tables of an earlier run folder, recomputed from its runs' metrics files (and state file sizes)."""
    from strategies.checkpoint import read_metrics

    report = json.loads((out / "many_sites.json").read_text())
    for r in report["results"]:
        run_dir = Path(r["run_dir"])
        r["rounds"] = round_table(read_metrics(run_dir))
        r["seconds"] = phase_seconds(r["rounds"])
        r["state_bytes"] = {f: (run_dir / f).stat().st_size for f in STATE_FILES if (run_dir / f).is_file()}
    report["readings"] = readings(report["results"])
    (out / "many_sites.json").write_text(json.dumps(report, indent=2))
    print_report(report, out)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.many_sites", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sites", type=int, nargs="+", default=[5, 10, 20, 50])
    p.add_argument("--out", default=None, help="run folder (default runs/many-sites/<UTC time>)")
    p.add_argument("--lae-rounds", type=int, default=1, help="LAE rounds (the first is cold; the table reads the last)")
    p.add_argument("--dm-rounds", type=int, default=1)
    p.add_argument("--steps", type=int, default=1, help="local steps per round at each site")
    p.add_argument("--per-class", type=int, default=1, help="phantom tiles per class at each site (9 classes)")
    p.add_argument("--round-timeout", type=float, default=1800.0)
    p.add_argument("--config", default="", help="further run-config overrides")
    p.add_argument("--federation-config", default="", help="extra simulation options (server.run --federation-config)")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between memory samples")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds one N may take")
    p.add_argument("--report", metavar="DIR", default=None,
                   help="no run: re-read DIR/many_sites.json and the runs' metrics.jsonl, rewrite it, print the tables")
    args = p.parse_args(argv)
    if args.report:
        return report_only(Path(args.report))
    out = Path(args.out or Path("runs/many-sites") / time.strftime("%Y%m%d-%H%M%S", time.gmtime())).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = []
    report = {"command": [sys.executable, "-m", "benchmarks.many_sites", *(argv if argv is not None else sys.argv[1:])],
              "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "cpus": os.cpu_count(),
              "config": run_config(args), "federation_config": args.federation_config, "results": results}
    for n in args.sites:
        print(f"N={n}: running (log {out / f'n{n}.log'})", flush=True)
        results.append(measure(n, out, args))
        report["readings"] = readings(results)
        (out / "many_sites.json").write_text(json.dumps(report, indent=2))
        print(table(results[-1:]).splitlines()[-1], flush=True)
    report["finished_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    (out / "many_sites.json").write_text(json.dumps(report, indent=2))
    print()
    print_report(report, out)
    return 0 if all(r["returncode"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
