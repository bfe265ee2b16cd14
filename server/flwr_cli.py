"""The Flower processes this project starts: environment, FLWR_HOME config.toml, SuperLink/SuperNode command lines.

Every process is started in its own process group and stopped by its id (never by name).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from server.lock import set_parent_death_signal
from wire.flower_env import flower_env  # noqa: F401 - the processes started here use it

log = logging.getLogger("histodiff.fed")
CONNECTION = "histodiff"


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` (the address the process that takes it will bind)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host.strip("[]"), 0))
        return s.getsockname()[1]


def is_wildcard(host: str) -> bool:
    """A bind-all address (``0.0.0.0``, ``::``)."""
    return host.strip("[]") in ("", "0.0.0.0", "::")


def connect_host(bind: str) -> str:
    """Where a process on this machine reaches a server bound to ``bind``: loopback for a bind-all address
    (what Flower's SuperExec does too), else the bind address itself."""
    host = bind.strip("[]")
    return {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)


def hostport(host: str, port: int) -> str:
    """``HOST:PORT``, an IPv6 address in brackets."""
    host = host.strip("[]")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def simulation_env(env: dict | None = None) -> dict[str, str]:
    """What the simulation's SuperLink (and so its Ray cluster) gets on top of ``flower_env``: Ray's memory monitor
    off (``RAY_memory_monitor_refresh_ms=0``) unless ``env`` already sets it. The monitor kills a Ray worker when
    the whole machine's memory passes 95%, whoever uses it; in Flower 1.42 a killed ClientApp actor is never
    replaced (its pool takes the dead actor back), so every later message sent to it fails at once and the run
    stops after ``wait-timeout``. Measured with 50 simulated sites: one kill while other jobs filled the machine
    (22.4 of 23.5 GB; this run's processes took about 6 GB) left half of every retried DM round failing. Without the
    monitor the kernel handles a real shortage, as it does for SuperNodes."""
    env = os.environ if env is None else env
    return {} if "RAY_memory_monitor_refresh_ms" in env else {"RAY_memory_monitor_refresh_ms": "0"}


def write_flwr_home(home: Path, superlink: str, root_certificates: Path | None, insecure: bool = False) -> Path:
    """A project-controlled FLWR_HOME whose config.toml holds one connection (no pyproject federations)."""
    home = Path(home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]", f'address = "{superlink}"']
    if insecure:
        lines.append("insecure = true")
    elif root_certificates:
        lines.append(f'root-certificates = "{Path(root_certificates).resolve()}"')
    (home / "config.toml").write_text("\n".join(lines) + "\n")
    return home


def start(cmd: list[str], env: dict, log_file: Path, cwd: Path | None = None) -> subprocess.Popen:
    log_file.parent.mkdir(parents=True, exist_ok=True)
    out = open(log_file, "ab")
    # its own process group (stopped as one), and SIGTERM when this coordinator dies, however it dies
    return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=set_parent_death_signal)


def stop(proc: subprocess.Popen | None, grace: float = 10.0) -> None:
    """SIGTERM the process group we started, then SIGKILL it after ``grace`` seconds."""
    if proc is None or proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def superlink_cmd(port: int, certs: Path | None, database: Path | None = None, auth: bool = True,
                  host: str = "127.0.0.1", simulation: bool = False) -> list[str]:
    """``flower-superlink`` on ``host:port``. In Flower 1.42 one HTTP(S) server there serves the Fleet API (what
    SuperNodes reach), the Control API (where ``flwr run`` submits runs) and the Runtime API: its
    ``--fleet-api-address``/``--control-api-address`` are deprecated and ignored (they only configure legacy gRPC
    servers behind internal switches), so the Control API cannot be kept on loopback while sites connect.
    With a ``database`` the SuperLink runs through ``python -m server.superlink`` (Flower's own, waiting longer
    for a busy SQLite lock: see that module)."""
    launcher = [sys.executable, "-m", "server.superlink"] if database is not None else ["flower-superlink"]
    cmd = [*launcher, "--host", host, "--port", str(port), "--disable-runtime-dependency-installation"]
    if certs is None:
        cmd.append("--insecure")
    else:
        cmd += ["--ssl-certfile", str(certs / "server.pem"), "--ssl-keyfile", str(certs / "server.key"),
                "--ssl-ca-certfile", str(certs / "ca.crt")]
        if auth:
            cmd.append("--enable-supernode-auth")
    if database is not None:
        cmd += ["--database", str(database)]
    if simulation:
        cmd.append("--simulation")
    return cmd


def wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 60.0, tls: bool = True,
                 host: str = "127.0.0.1") -> None:
    """Wait for the SuperLink's ``/health`` on ``host:port`` (any HTTP answer counts: the port serves); ``host`` is
    where it listens (``connect_host`` of its bind address)."""
    import ssl

    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    url = f"{'https' if tls else 'http'}://{hostport(connect_host(host), port)}/health"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with code {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2, context=ctx if tls else None)
            return
        except urllib.error.HTTPError:
            return
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.5)
    raise TimeoutError(f"SuperLink on {hostport(connect_host(host), port)} not healthy after {timeout:.0f} s")


def register_keys(flwr_home: Path, public_keys: list[Path], timeout: float = 60.0) -> None:
    env = flower_env(flwr_home)
    for key in public_keys:
        res = subprocess.run(["flwr", "supernode", "register", str(key), CONNECTION], env=env, capture_output=True,
                             text=True, timeout=timeout)
        if res.returncode != 0 and "already in use" in (res.stdout + res.stderr):
            log.info("%s was registered before", key.name)  # a resumed SuperLink keeps its database
            continue
        if res.returncode != 0:
            raise RuntimeError(f"registering {key.name} failed: {(res.stdout + res.stderr).strip()[-500:]}")
        log.info("registered %s", key.name)
