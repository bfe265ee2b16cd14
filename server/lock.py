"""One coordinator per run directory, and no process of a dead coordinator left behind.

- ``RunLock``: an exclusive ``flock`` on ``RUN_DIR/coordinator.lock`` held for the life of ``server.run``; the
  kernel drops it when the process dies however it dies (SIGKILL included), so a stale lock never blocks a
  resume, while a live holder (its pid and host are written in the file) refuses a second coordinator.
- ``reap``: the process groups a previous coordinator of this run directory started (recorded in
  ``coordinator.json``) are stopped before a resume starts anything, so an orphaned SuperLink or ServerApp of a
  killed coordinator never runs beside the new one.
- Processes this coordinator starts get SIGTERM when it dies (``PR_SET_PDEATHSIG``, see ``server.flwr_cli``).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import socket
import time
from pathlib import Path

log = logging.getLogger("histodiff.fed")
LOCK_FILE = "coordinator.lock"


class RunDirBusy(RuntimeError):
    """Another live coordinator holds the run directory; one line, naming it."""


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(self.path)
            os.close(fd)
            raise RunDirBusy(f"{self.path.parent} is in use by another coordinator (pid {holder.get('pid', '?')} on "
                             f"{holder.get('host', '?')} since {holder.get('since', '?')}); stop it first, or use "
                             "another --run-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _alive_group(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def reap(pgids: list[int], grace: float = 10.0) -> list[int]:
    """SIGTERM, then SIGKILL, the process groups in ``pgids`` that are still alive; returns those that were.
    Only called with the groups a coordinator of this run directory recorded, while holding its lock."""
    alive = [g for g in pgids if g and g != os.getpgid(0) and _alive_group(g)]
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for g in alive:
            try:
                os.killpg(g, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(_alive_group(g) for g in alive):
            time.sleep(0.2)
        if not any(_alive_group(g) for g in alive):
            break
    if alive:
        log.warning("stopped %d process group(s) left by an earlier coordinator of this run directory: %s",
                    len(alive), ", ".join(map(str, alive)))
    return alive


def flower_processes(flwr_home: Path) -> list[int]:
    """Pids of the processes started for this run directory's FLWR_HOME (SuperLink, SuperExec, ServerApp,
    simulation): Flower starts some in sessions of their own, out of reach of a process-group signal."""
    want = f"FLWR_HOME={Path(flwr_home).resolve()}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if want in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def reap_flower(flwr_home: Path, grace: float = 10.0) -> list[int]:
    """SIGTERM, then SIGKILL, every process of ``flower_processes``; returns those found."""
    found = flower_processes(flwr_home)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for pid in flower_processes(flwr_home):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and flower_processes(flwr_home):
            time.sleep(0.2)
        if not flower_processes(flwr_home):
            break
    return found


def set_parent_death_signal(sig: int = signal.SIGTERM) -> None:
    """In a child before exec: receive ``sig`` when the parent dies (Linux ``prctl(PR_SET_PDEATHSIG)``)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except OSError:  # not Linux: the reaping on resume still applies
        pass
