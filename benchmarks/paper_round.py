"""A paper-size federated round on loopback: ``python -m benchmarks.paper_round [--dtypes fp32,int8] [--sites 3]``.

Real processes, as a deployment runs them: ``python -m server.run`` (a ``flower-superlink`` with TLS and SuperNode
authentication, the ServerApp) and one ``python -m client.run`` (``flower-supernode``) per site, each with its own
phantom tiles, the ``paper`` profile's models (LAE ~55 M, UNet ~288 M parameters), one LAE round, the latent
statistics and one DM round of one local step of batch 1 per site, so the compute is small and the overhead shows.

Printed per training round: wall time split into stages (push, delivery to the site's ClientApp process, that
process's start, receive/decode, model build, state load, training, state save, encode, reply, aggregation,
checkpoint), bytes each way, and the peak RSS of the SuperLink, the ServerApp and each site's processes (sampled
from ``/proc`` every ``--sample`` seconds), for each transfer dtype; then the limits: writing and reading the model
once on disk (safetensors) and copying its bytes once in memory. ``--json`` keeps everything for the docs table.

Memory guard: the run is stopped (and reported as not completed) when its processes together hold more than
``--max-rss-gb``, or when the machine has less than ``--min-available-gb`` left.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

GB = 1024 ** 3
MB = 1e6
# paper models, one local step of batch 1 on a few tiles; no pretrained LPIPS backbone needed (same compute)
OVERRIDES = "weights.perceptual=random tiles.batch_size=1 tiles.num_workers=0"
ROLES = (("client.trusted_clientapp", "clientapp"), ("flwr-clientapp", "clientapp"), ("flwr-serverapp", "serverapp"),
         ("flower-superlink", "superlink"), ("server.superlink", "superlink"), ("flower-superexec", "superexec"),
         ("flower-supernode", "supernode"),
         ("server.run", "launcher"), ("client.run", "launcher"), ("flwr run", "flwr-cli"))


# ---------------------------------------------------------------------------------------------- /proc sampling


def role_of(cmdline: str) -> str:
    """The Flower role of a process from its command line (``other`` when none fits)."""
    for key, role in ROLES:
        if key in cmdline:
            return role
    return "other"


def read_procs(proc: Path = Path("/proc")) -> dict[int, tuple[int, str, int]]:
    """``pid -> (ppid, command line, RSS bytes)`` of every readable process."""
    out = {}
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            rss = 0
            for line in (d / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                    break
        except (OSError, IndexError, ValueError):
            continue
        out[int(d.name)] = (ppid, cmd, rss)
    return out


def descendants(procs: dict[int, tuple[int, str, int]], roots: list[int]) -> set[int]:
    """``roots`` and every process below them (by parent id)."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    seen, todo = set(), [r for r in roots if r in procs]
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo.extend(children.get(pid, []))
    return seen


def snapshot(procs: dict[int, tuple[int, str, int]], groups: dict[str, list[int]]) -> dict[str, int]:
    """RSS summed per ``group/role`` (groups: ``coordinator``, ``site0``, ...: the process trees of their roots)."""
    out: dict[str, int] = {}
    for group, roots in list(groups.items()):
        for pid in descendants(procs, roots):
            key = f"{group}/{role_of(procs[pid][1])}"
            out[key] = out.get(key, 0) + procs[pid][2]
    return out


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


@dataclass
class Sampler:
    """Samples the RSS of the process groups every ``every`` seconds in a thread; ``samples``: (time, {key: bytes});
    ``over``: why the memory guard fired (empty while it has not)."""

    groups: dict[str, list[int]]
    every: float = 0.25
    max_rss: float = 18 * GB
    min_available: float = 1.5 * GB
    samples: list = field(default_factory=list)
    over: str = ""

    def start(self) -> "Sampler":
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            snap = snapshot(read_procs(), self.groups)
            self.samples.append((time.time(), snap))
            total, avail = sum(snap.values()), mem_available()
            if not self.over and total > self.max_rss:
                self.over = f"the run's processes held {total / GB:.1f} GB (> {self.max_rss / GB:.1f} GB)"
            if not self.over and avail < self.min_available:
                self.over = f"the machine had {avail / GB:.1f} GB available (< {self.min_available / GB:.1f} GB)"
            self._stop.wait(self.every)


def peaks(samples: list, start: float = 0.0, end: float = float("inf")) -> dict[str, int]:
    """Peak bytes between ``start`` and ``end``: per ``group/role`` key, per group (``group``: its processes
    together) and of everything together (``total``); each the maximum of the sum at one instant."""
    out: dict[str, int] = {}
    for t, snap in samples:
        if not start <= t <= end:
            continue
        groups: dict[str, int] = {}
        for key, value in snap.items():
            out[key] = max(out.get(key, 0), value)
            g = key.split("/", 1)[0]
            groups[g] = groups.get(g, 0) + value
        for g, value in groups.items():
            out[g] = max(out.get(g, 0), value)
        out["total"] = max(out.get("total", 0), sum(snap.values()))
        coord = sum(v for k, v in snap.items() if k in ("coordinator/superlink", "coordinator/serverapp"))
        out["superlink+serverapp"] = max(out.get("superlink+serverapp", 0), coord)
    return out


def peak_moment(samples: list, key: str, start: float = 0.0, end: float = float("inf")) -> tuple[int, float]:
    """(peak bytes of ``key``, when) between ``start`` and ``end``."""
    best = (0, 0.0)
    for t, snap in samples:
        if start <= t <= end and snap.get(key, 0) > best[0]:
            best = (snap[key], t)
    return best


def server_event_before(line: dict, t: float) -> str:
    """What the ServerApp last did before time ``t`` in a round (``metrics.jsonl`` timeline): the push, a reply
    arriving, or a reply taken (checked and added; with ``max-parallel-sites`` the next push follows it)."""
    tl = line.get("timeline") or {}
    take = tl.get("take_seconds") or {}
    events = [(float(tl.get("pushed", 0.0)), "the first push started")]
    for node, arrived in (tl.get("arrived") or {}).items():
        events.append((float(arrived), f"site {node}'s reply arrived"))
        events.append((float(arrived) + float(take.get(node, 0.0)), f"site {node}'s reply taken"))
    before = [e for e in events if e[0] <= t]
    if not before:
        return "before the first push"
    at, what = max(before)
    return f"{t - at:.0f} s after {what}"


# ---------------------------------------------------------------------------------------------- round stages


def site_stages(line: dict) -> dict[str, dict[str, float]]:
    """Per site (node id): seconds of each stage of a training round from its ``metrics.jsonl`` line.

    ``send``: from the ServerApp starting to push the messages (serialise, upload to the SuperLink; the round's
    ``push`` seconds, all sites, are in the server's stages) to the creation of the site's ClientApp process (the
    SuperNode has pulled the message, SuperExec starts the process); ``process-start``: from there to the handler
    (imports, the app check, pulling and deserialising the message from the SuperNode); then the site's own stages
    (``seconds-*``: receive/decode, build, state-load, train, state-save, encode); ``reply``: from the reply built to
    the ServerApp holding it (upload through SuperNode and SuperLink, pull, deserialise); ``take``: checking it and
    adding it to the running sum."""
    tl = line.get("timeline") or {}
    pushed = float(tl.get("pushed", 0.0))
    out = {}
    for node, m in (line.get("losses_per_site") or {}).items():
        stages = {}
        created = m.get("clock-process-created")
        start, reply = m.get("clock-handler-start"), m.get("clock-reply")
        if created and start:
            stages["send"] = max(0.0, created - pushed)
            stages["process-start"] = max(0.0, start - created)
        elif start:
            stages["send"] = max(0.0, start - pushed)
        for k, v in m.items():
            if k.startswith("seconds-"):
                stages[k[len("seconds-"):]] = float(v)
        arrived = (tl.get("arrived") or {}).get(node)
        if arrived and reply:
            stages["reply"] = max(0.0, float(arrived) - float(reply))
        stages["take"] = float((tl.get("take_seconds") or {}).get(node, 0.0))
        out[node] = stages
    return out


def round_summary(line: dict) -> dict:
    """A training round in figures: its seconds, the stage split (the slowest site's), the server stages, the
    sites' training time and the overhead (round time minus the longest local training)."""
    per_site = site_stages(line)
    train = max((s.get("train", 0.0) for s in per_site.values()), default=0.0)
    slowest = max(per_site.values(), key=lambda s: sum(s.values()), default={})
    stages = dict(line.get("stages") or {})
    stages["push"] = float((line.get("timeline") or {}).get("push_seconds", 0.0))
    return {"phase": line["phase"], "seconds": line["seconds"] + stages.get("checkpoint", 0.0),
            "sites": line["sites_answered"], "bytes_sent": line["bytes_sent"], "bytes_received": line["bytes_received"],
            "site_stages": per_site, "slowest_site": slowest, "server_stages": stages, "train_seconds": train,
            "overhead_seconds": line["seconds"] + stages.get("checkpoint", 0.0) - train}


# ---------------------------------------------------------------------------------------------- the limits


def model_limits(cfg, phases=("lae", "dm"), tmp: Path | None = None) -> dict:
    """Seconds to write the fp32 model once to disk (safetensors, with fsync), to read it back (page cache dropped
    where allowed, else warm: noted), and to copy its bytes once in memory; per phase and together."""
    from safetensors.torch import load_file, save_file

    from wire.contract import init_phase

    out = {}
    tmp = Path(tmp or tempfile.mkdtemp(prefix="paper-limits"))
    tmp.mkdir(parents=True, exist_ok=True)
    for phase in phases:
        weights = {k: v.contiguous() for k, v in init_phase(cfg, phase, 0).items()}
        nbytes = sum(v.numel() * v.element_size() for v in weights.values())
        params = sum(v.numel() for v in weights.values() if v.is_floating_point())
        t = time.perf_counter()
        copies = {k: v.clone() for k, v in weights.items()}
        copy_s = time.perf_counter() - t
        del copies
        path = tmp / f"{phase}.safetensors"
        t = time.perf_counter()
        save_file(weights, str(path))
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        write_s = time.perf_counter() - t
        del weights
        cold = _drop_cache(path)
        t = time.perf_counter()
        back = load_file(str(path))
        _ = sum(float(v.reshape(-1)[-1]) for v in back.values() if v.numel())  # touch every tensor
        read_s = time.perf_counter() - t
        del back
        path.unlink()
        out[phase] = {"bytes": nbytes, "params": params, "copy_s": copy_s, "write_s": write_s, "read_s": read_s,
                      "read_cold": cold}
    return out


def _drop_cache(path: Path) -> bool:
    """Ask the kernel to drop ``path``'s pages from the page cache (a cold read); False when it may not."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return True
    except (OSError, AttributeError):
        return False


def move_once_seconds(limits: dict, phase: str) -> float:
    """Time to move the phase's model bytes once through memory and disk: one copy, one write, one read."""
    x = limits[phase]
    return x["copy_s"] + x["write_s"] + x["read_s"]


# ---------------------------------------------------------------------------------------------- one federation


def snapshot_app(dest: Path, root: Path | None = None) -> Path:
    """A frozen copy of the app (the files ``flwr run`` packs: ``client.trusted_clientapp.local_files``), so the
    FAB the sites check and run stays the same while the checkout changes, and a before/after pair can be kept."""
    from client.trusted_clientapp import PROJECT_ROOT, local_files

    dest = Path(dest)
    for rel, data in local_files(Path(root or PROJECT_ROOT)).items():
        path = dest / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return dest


def run_federation(out: Path, dtype: str, sites: int, per_class: int, size: int, every: float, max_rss: float,
                   min_available: float, timeout: float, extra_config: str = "", profile: str = "paper",
                   app: Path | None = None, state: str = "memory") -> dict:
    """Start the coordinator and ``sites`` SuperNodes on loopback, run LAE -> latent-stats -> DM, sample memory."""
    from histodiff.data.phantom_tissue import write_phantom_site
    from server import flwr_cli
    from server.certs import create
    from strategies.checkpoint import read_metrics

    out.mkdir(parents=True, exist_ok=True)
    certs = out / "certs"
    if not (certs / "ca.crt").exists():
        create(certs, sites)
    data = []
    for i in range(sites):
        d = out / "data" / f"site{i}"
        if not d.is_dir():
            write_phantom_site(d, per_class=per_class, size=size, site=i, seed=0, labeled=False)
        data.append(d)
    run_dir = out / f"run-{dtype}"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    overrides = f"{OVERRIDES} tiles.image_size={size}"
    config = (f'profile="{profile}" overrides="{overrides}" lae-rounds=1 dm-rounds=1 local-steps=1 min-sites={sites} '
              f'deliver=false memorisation-samples=0 transfer-dtype="{dtype}" round-timeout=3000.0 '
              f'wait-timeout=600.0 {extra_config}').strip()
    port = flwr_cli.free_port()
    logs = run_dir / "bench-logs"
    env = flwr_cli.flower_env()
    app = Path(app) if app else snapshot_app(out / "app")
    env["PYTHONPATH"] = str(app.resolve())
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # the frozen app stays exactly as copied (its digest too)
    procs = []
    groups: dict[str, list[int]] = {"coordinator": []}
    sampler = Sampler(groups, every, max_rss, min_available).start()
    started = time.time()
    status = "done"
    try:
        link_cmd = [sys.executable, "-m", "server.run", "--run-dir", str(run_dir), "--port", str(port), "--certs",
                    str(certs), "--config", config, "--timeout", str(timeout)]
        if state == "memory":
            # Flower's in-memory SuperLink state (no --database), started here with TLS and SuperNode
            # authentication as server.run starts it, and server.run joins it. (Flower's 5 s SQLite lock timeout
            # failed this benchmark's first check with "database is locked"; server.run's own SuperLink now waits
            # up to 120 s for a lock: --superlink-state sqlite)
            link = flwr_cli.start(flwr_cli.superlink_cmd(port, certs), env, logs / "superlink.log", cwd=app)
            procs.append(link)
            groups["coordinator"].append(link.pid)
            flwr_cli.wait_healthy(port, link)
            home = flwr_cli.write_flwr_home(run_dir / "bench-home", f"127.0.0.1:{port}", certs / "ca.crt")
            flwr_cli.register_keys(home, sorted((certs / "sites").glob("*.pub")))
            link_cmd = [sys.executable, "-m", "server.run", "--run-dir", str(run_dir), "--superlink",
                        f"127.0.0.1:{port}", "--certs", str(certs), "--config", config, "--timeout", str(timeout)]
        server = flwr_cli.start(link_cmd, env, logs / "server.log", cwd=app)
        procs.append(server)
        groups["coordinator"].append(server.pid)
        deadline = time.monotonic() + 180
        while not (run_dir / "coordinator.json").exists():
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the coordinator did not start: {(logs / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        for i, d in enumerate(data):
            node = flwr_cli.start([sys.executable, "-m", "client.run", "--data", str(d), "--superlink",
                                   f"127.0.0.1:{port}", "--site", f"site{i}", "--work", str(run_dir / f"work{i}"),
                                   "--port", str(flwr_cli.free_port()), "--profile", profile, "--overrides", overrides,
                                   "--root-certificates", str(certs / "ca.crt"),
                                   "--auth-key", str(certs / "sites" / f"site{i}")], env, logs / f"site{i}.log",
                                  cwd=app)
            procs.append(node)
            groups[f"site{i}"] = [node.pid]
        while server.poll() is None:
            if sampler.over:
                status = f"stopped by the memory guard: {sampler.over}"
                break
            if time.time() - started > timeout + 60:
                status = "timed out"
                break
            time.sleep(0.5)
        if status == "done" and server.returncode != 0:
            status = f"coordinator exit code {server.returncode}"
    finally:
        sampler.stop()
        for p in reversed(procs):
            flwr_cli.stop(p, grace=10.0)
    (run_dir / "bench-samples.json").write_text(json.dumps(sampler.samples))  # raw, for a later look
    lines = read_metrics(run_dir)
    rounds = []
    for line in lines:
        start = float((line.get("timeline") or {}).get("pushed") or line["time"] - line["seconds"])
        summary = round_summary(line) if line["phase"] in ("lae", "dm") else {
            "phase": line["phase"], "seconds": line["seconds"], "sites": line["sites_answered"],
            "bytes_sent": line["bytes_sent"], "bytes_received": line["bytes_received"],
            "server_stages": line.get("stages", {})}
        summary["peaks"] = peaks(sampler.samples, start - 1.0, line["time"] + 1.0)
        summary["peak_at"] = {}
        for key in ("coordinator/serverapp", "coordinator/superlink"):
            value, t = peak_moment(sampler.samples, key, start - 1.0, line["time"] + 1.0)
            if value:
                summary["peak_at"][key] = {"bytes": value, "seconds": t - start, "when": server_event_before(line, t)}
        rounds.append(summary)
    return {"dtype": dtype, "sites": sites, "profile": profile, "app": str(app), "superlink_state": state, "status": status, "tiles_per_site": per_class * 9, "image_size": size,
            "seconds": time.time() - started, "rounds": rounds, "peaks": peaks(sampler.samples),
            "run_dir": str(run_dir), "load": os.getloadavg()}


# ---------------------------------------------------------------------------------------------- report


def _gb(x: float) -> str:
    return f"{x / GB:.2f}"


STAGE_ORDER = ("send", "process-start", "receive", "build", "state-load", "train", "state-save", "encode",
               "reply", "take")


def report(result: dict, limits: dict | None = None) -> str:
    lines = [f"## transfer-dtype {result['dtype']}, {result['sites']} sites, {result['tiles_per_site']} tiles/site at "
             f"{result['image_size']} px: {result['status']} in {result['seconds']:.0f} s (load {result['load'][0]:.2f})"]
    for r in result["rounds"]:
        p = r["peaks"]
        head = (f"{r['phase']:>12}: {r['seconds']:.1f} s, sent {r['bytes_sent'] / MB:.0f} MB, received "
                f"{r['bytes_received'] / MB:.0f} MB | peak RSS GB: superlink {_gb(p.get('coordinator/superlink', 0))}, "
                f"serverapp {_gb(p.get('coordinator/serverapp', 0))}, coordinator {_gb(p.get('coordinator', 0))}, "
                + ", ".join(f"site{i} {_gb(p.get(f'site{i}', 0))} (clientapp {_gb(p.get(f'site{i}/clientapp', 0))})"
                            for i in range(result["sites"]))
                + f", all {_gb(p.get('total', 0))}")
        lines.append(head)
        for key, at in (r.get("peak_at") or {}).items():
            lines.append(f"              {key.split('/')[1]} peak {_gb(at['bytes'])} GB at +{at['seconds']:.0f} s: "
                         f"{at['when']}")
        if "slowest_site" in r:
            s = r["slowest_site"]
            lines.append("              slowest site: " + ", ".join(f"{k} {s[k]:.1f}" for k in STAGE_ORDER if k in s)
                         + " s | server: " + ", ".join(f"{k} {v:.1f}" for k, v in r["server_stages"].items())
                         + f" s | overhead {r['overhead_seconds']:.1f} s (round minus training {r['train_seconds']:.1f} s)")
            if limits and r["phase"] in limits:
                budget = 3 * result["sites"] * move_once_seconds(limits, r["phase"])
                lines.append(f"              target: overhead <= 3 x sites x move-once = {budget:.1f} s -> "
                             f"{'met' if r['overhead_seconds'] <= budget else 'missed'} "
                             f"({r['overhead_seconds'] / max(budget, 1e-9):.1f}x the budget)")
    p = result["peaks"]
    lines.append(f"  whole run peak RSS GB: superlink+serverapp {_gb(p.get('superlink+serverapp', 0))}, "
                 f"coordinator {_gb(p.get('coordinator', 0))}, all processes {_gb(p.get('total', 0))}")
    return "\n".join(lines)


def limits_report(limits: dict) -> str:
    lines = ["## limits (fp32 model bytes; safetensors on this machine's disk)"]
    for phase, x in limits.items():
        lines.append(f"{phase:>4}: {x['params'] / 1e6:.1f} M values, {x['bytes'] / MB:.0f} MB: copy in memory "
                     f"{x['copy_s']:.2f} s, write+fsync {x['write_s']:.2f} s, read {x['read_s']:.2f} s "
                     f"({'cold' if x['read_cold'] else 'warm'} cache), move once {move_once_seconds(limits, phase):.2f} s")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.paper_round", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", default="fp32,int8", help="transfer dtypes to run, comma-separated")
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--tiles-per-class", type=int, default=1, help="phantom tiles per class and site (9 classes)")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--profile", default="paper", help="model profile (tiny: a quick check of the benchmark itself)")
    p.add_argument("--out", default="runs/paper-round")
    p.add_argument("--sample", type=float, default=0.25, help="seconds between /proc samples")
    p.add_argument("--max-rss-gb", type=float, default=18.0)
    p.add_argument("--min-available-gb", type=float, default=1.5)
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument("--config", default="", help="extra run-config overrides")
    p.add_argument("--no-limits", action="store_true", help="skip the disk/memory limits")
    p.add_argument("--limits-only", action="store_true", help="print the limits as JSON and stop")
    p.add_argument("--app", default=None, help="run this frozen copy of the app (default: a fresh copy of the "
                   "checkout in <out>/app; --snapshot-only makes one)")
    p.add_argument("--snapshot-only", action="store_true", help="copy the app to <out>/app and stop")
    p.add_argument("--superlink-state", choices=("memory", "sqlite"), default="memory",
                   help="memory: a SuperLink without --database, which server.run joins; sqlite: server.run's own "
                        "SuperLink with its SQLite database (python -m server.superlink: a lock waits up to 120 s)")
    p.add_argument("--json", default=None, help="write all figures here (default: <out>/paper_round.json)")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    out = Path(a.out).resolve()
    if a.snapshot_only:
        print(f"app copied to {snapshot_app(out / 'app')}")
        return 0
    app = Path(a.app).resolve() if a.app else snapshot_app(out / "app")
    results = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "runs": [], "limits": None}
    limits = None
    if a.limits_only:  # in its own process: the models it builds would stay in this one's heap
        from histodiff.config import compose

        cfg = compose([f"profile={a.profile}", *OVERRIDES.split(), f"tiles.image_size={a.image_size}"])
        print(json.dumps(model_limits(cfg, tmp=out)))
        return 0
    if not a.no_limits:
        import subprocess

        res = subprocess.run([sys.executable, "-m", "benchmarks.paper_round", "--limits-only", "--profile", a.profile,
                              "--image-size", str(a.image_size), "--out", str(out)], capture_output=True, text=True)
        if res.returncode:
            raise SystemExit(f"limits failed: {res.stderr[-2000:]}")
        limits = json.loads(res.stdout.strip().splitlines()[-1])
        results["limits"] = limits
        print(limits_report(limits), flush=True)
    for dtype in [d.strip() for d in a.dtypes.split(",") if d.strip()]:
        r = run_federation(out, dtype, a.sites, a.tiles_per_class, a.image_size, a.sample, a.max_rss_gb * GB,
                           a.min_available_gb * GB, a.timeout, a.config, a.profile, app, a.superlink_state)
        results["runs"].append(r)
        print(report(r, limits), flush=True)
    path = Path(a.json) if a.json else out / "paper_round.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    print(f"figures: {path}")
    return 0 if all(r["status"] == "done" for r in results["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
