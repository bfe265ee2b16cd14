"""Loopback federation helpers for the e2e tests: phantom sites, process tracking, bounded waits."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from server import flwr_cli

REPO = Path(__file__).resolve().parents[2]
OVERRIDES = "weights.perceptual=random lae.perceptual_weight=0 tiles.batch_size=4 tiles.image_size=32"
RUN_CONFIG = {"overrides": f'"{OVERRIDES}"', "lae-rounds": "1", "dm-rounds": "1", "local-steps": "1",
              "min-sites": "2", "deliver": "false", "round-timeout": "120.0", "wait-timeout": "60.0"}


def run_config(**extra: str) -> str:
    """The e2e run config as ``flwr run --run-config`` text; ``extra`` (kebab keys with _) overrides."""
    values = dict(RUN_CONFIG, **{k.replace("_", "-"): v for k, v in extra.items()})
    return " ".join(f"{k}={v}" for k, v in values.items())


def make_sites(root: Path, n: int, per_class: int = 1) -> list[Path]:
    from histodiff.data.phantom_tissue import write_phantom_site

    sites = []
    for i in range(n):
        path = root / f"site{i}"
        write_phantom_site(path, per_class=per_class, size=32, site=i, seed=0, labeled=False)
        sites.append(path)
    return sites


class Processes:
    """Every process a test starts, each in its own session; ``stop_all`` kills them by id."""

    def __init__(self, logs: Path):
        self.logs, self.procs = logs, []

    def start(self, name: str, cmd: list[str], env: dict | None = None, cwd: Path | str = REPO,
              flwr_home: Path | None = None) -> subprocess.Popen:
        """``env``: exactly this environment (default: Flower's, see ``flwr_cli.flower_env``)."""
        proc = flwr_cli.start(cmd, env if env is not None else flwr_cli.flower_env(flwr_home),
                              self.logs / f"{name}.log", cwd=cwd)
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        """The last 4000 characters of a process's log."""
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def supernode(self, name: str, data: Path, superlink: str, certs: Path | None, key: Path | None,
                  work: Path, give_up_after: float | None = None) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "client.run", "--data", str(data), "--superlink", superlink, "--site", name,
               "--work", str(work), "--port", str(flwr_cli.free_port()), "--overrides", OVERRIDES]
        if give_up_after is not None:
            cmd += ["--give-up-after", str(give_up_after)]
        cmd += ["--insecure"] if certs is None else ["--root-certificates", str(certs / "ca.crt")]
        if key is not None:
            cmd += ["--auth-key", str(key)]
        return self.start(name, cmd)

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            flwr_cli.stop(proc, grace=5.0)


def wait_for(predicate, timeout: float, what: str, poll: float = 0.5, details=None):
    """Poll ``predicate`` until truthy; on time-out raise with ``details()`` (e.g. process logs) appended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}" + (f"\n{details()}" if details else ""))
