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
import tempfile
import time
import urllib.request
from pathlib import Path

log = logging.getLogger("histodiff.fed")
CONNECTION = "histodiff"


def flower_env(flwr_home: Path | None = None) -> dict[str, str]:
    """The environment every flower process gets: the venv's bin on PATH, no telemetry, no runtime installs."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(HF_HUB_OFFLINE="1", FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", PYTHONUNBUFFERED="1")
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
        # Ray's socket paths must stay under 107 bytes: a short folder of our own, not one under the run dir
        env.setdefault("RAY_TMPDIR", str(Path(tempfile.gettempdir()) / f"hdfed-ray-{os.getuid()}"))
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


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
    cmd = ["flower-superlink", "--host", host, "--port", str(port), "--disable-runtime-dependency-installation"]
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


def wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 60.0, tls: bool = True) -> None:
    """Wait for the SuperLink's ``/health`` (any HTTP answer counts: the port serves)."""
    import ssl

    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}/health"
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
    raise TimeoutError(f"SuperLink on port {port} not healthy after {timeout:.0f} s")


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
