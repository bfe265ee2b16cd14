"""Peak RSS of the launchers, which live as long as the federation: ``python -m benchmarks.launcher_memory``.

- ``client.run`` on a small phantom site, its SuperNode trying to reach a SuperLink that is not there (the launcher
  checks the tiles and supervises; what it holds does not depend on the SuperLink answering);
- ``server.run`` with its own SuperLink (``--insecure``, loopback), a run submitted and its ServerApp waiting for
  sites.

Each runs for ``--seconds`` while ``/proc`` is sampled every 0.25 s; the table gives the peak RSS of each process
role in the launcher's tree (the launcher itself, its ``flwr run`` child, the SuperNode, the SuperLink ...). Then
the launcher's process group gets SIGTERM (SIGKILL after 60 s). docs/benchmarks.md quotes the output.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.paper_round import GB, Sampler, peaks

MB = 1024 ** 2
# client.run checks the tiles in a spawned child (it imports torch, then exits before the SuperNode starts)
ROLE_NAMES = {"other": "other (client.run: the tile check's spawned child, gone once the check ends)"}


def measure(name: str, cmd: list[str], seconds: float, log: Path) -> dict[str, int]:
    """Start ``cmd`` in its own process group, sample its tree for ``seconds``, stop it; peak RSS per role."""
    from server import flwr_cli

    proc = flwr_cli.start(cmd, flwr_cli.flower_env(), log)
    sampler = Sampler({name: [proc.pid]}, max_rss=64 * GB, min_available=0).start()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.25)
    sampler.stop()
    ended = proc.poll()
    flwr_cli.stop(proc, grace=60.0)
    if ended is not None:
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        raise SystemExit(f"error: {name} ended early (exit {ended}) after less than {seconds:.0f} s; its log "
                         f"{log}:\n  " + "\n  ".join(tail))
    found = peaks(sampler.samples)
    roles = {ROLE_NAMES.get(k.split("/", 1)[1], k.split("/", 1)[1]): v for k, v in found.items()
             if k.startswith(f"{name}/")}
    return {**roles, "(all together)": found.get(name, 0)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.launcher_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=40.0, help="how long each launcher runs while sampled")
    p.add_argument("--out", default=None, help="folder for the logs and the site (default: a temporary one)")
    args = p.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="launcher-memory-")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    from histodiff.data.phantom_tissue import write_phantom_site

    site = write_phantom_site(out / "site0", 2, 64, site=0, seed=0, labeled=False)
    py = sys.executable
    runs = {
        "client.run": [py, "-m", "client.run", "--data", str(site), "--superlink", "127.0.0.1:9", "--insecure",
                       "--work", str(out / "site0-work"), "--give-up-after", str(args.seconds + 120)],
        "server.run": [py, "-m", "server.run", "--run-dir", str(out / "run"), "--insecure", "--config",
                       "min-sites=1 wait-timeout=600.0 deliver=false memorisation-samples=0"],
    }
    print(f"peak RSS (MB) per process role over {args.seconds:.0f} s of each launcher running; logs in {out}")
    print("| launcher | role | peak RSS (MB) |")
    print("|---|---|---|")
    for name, cmd in runs.items():
        for role, rss in measure(name, cmd, args.seconds, out / f"{name}.log").items():
            print(f"| {name} | {role} | {rss / MB:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
