"""The same schedule in Flower's simulation runtime (``flwr run`` with num-supernodes), phantom site per partition."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from strategies.checkpoint import read_metrics
from strategies.schedule import load_state
from server.lock import reap_flower
from tests.e2e.loopback import OVERRIDES, REPO

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(400)
def test_simulation_runtime_full_story(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "server.demo", "--out", str(run_dir), "--unlabeled", "3", "--per-class", "1",
           "--lae-rounds", "1", "--dm-rounds", "1", "--local-steps", "1", "--overrides", OVERRIDES, "--timeout", "300", "--no-augment"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=360)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    state = load_state(run_dir)
    assert state.status == "done" and state.scale_factor > 0
    metrics = read_metrics(run_dir)
    assert [m["phase"] for m in metrics] == ["lae", "latent-stats", "dm", "memorisation", "deliver"]
    assert [m["sites_answered"] for m in metrics] == [3, 3, 3, 3, 1]
    assert metrics[-1]["labeled_sites"]  # only metrics came back from the labeled site
    info = json.loads((run_dir / "global_model" / "model_info.json").read_text())
    assert info["scale_factor"] == pytest.approx(state.scale_factor)
    assert "[fed] dm round 1/1" in res.stdout
    # each virtual site generated its own phantom tiles (its own stain style)
    assert (run_dir / "sites" / "site3" / "phantom-tiles" / "TUM").is_dir()
    assert not (run_dir / "sites" / "site0" / "phantom-tiles" / "TUM").is_dir()


# ---------------------------------------------------------------- `flwr run` itself, as a Flower user runs it

SIMULATION = "local-sim"


def _simulation_home(home: Path, supernodes: int) -> Path:
    """A FLWR_HOME whose config.toml holds one local simulation connection (nothing in pyproject.toml)."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{SIMULATION}"\n\n[superlink.{SIMULATION}]\naddress = ":local:"\n'
        f"options.num-supernodes = {supernodes}\noptions.backend.client-resources.num-cpus = 1\n")
    return home


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes_of(home: Path) -> dict[int, list[str]]:
    """PID -> argv of every live process started for this FLWR_HOME: ``flwr run`` hands its environment on to the
    detached SuperLink, which hands it to its SuperExec, the simulation and Ray's processes (some in sessions of their
    own, some orphaned once the SuperLink is gone), and no other process on the machine has this test's path."""
    needle = f"FLWR_HOME={home}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid() or not _alive(int(entry.name)):
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                found[int(entry.name)] = [a.decode(errors="replace") for a in argv]
        except OSError:
            continue
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _stop_flower(home: Path, settle: float = 30.0) -> None:
    """Let the finished run's simulation shut Ray down by itself (up to ``settle`` s), then SIGTERM and SIGKILL, each
    by its PID, what is left of this FLWR_HOME's processes (the local SuperLink keeps running otherwise)."""
    deadline = time.monotonic() + settle
    while time.monotonic() < deadline and any("flwr-simulation" in " ".join(a) for a in _processes_of(home).values()):
        time.sleep(0.5)
    reap_flower(home)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the detached local SuperLink's processes in /proc")
@pytest.mark.timeout(420)
def test_flwr_run_local_simulation_with_project_defaults(tmp_path):
    """``flwr run <app> <connection> --stream`` against a simulation connection of 4 SuperNodes, no
    labeled-partitions given: partitions 0-2 pre-train, the last one (3) is the labeled site the model goes to."""
    home = _simulation_home(tmp_path / "flwr-home", 4)
    run_dir = tmp_path / "run"
    ray_tmp = Path(tempfile.mkdtemp(prefix="hdray"))  # Ray's socket paths must stay under 107 bytes
    env = dict(os.environ, FLWR_HOME=str(home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", HF_HUB_OFFLINE="1", RAY_TMPDIR=str(ray_tmp),
               PYTHONUNBUFFERED="1", PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
               # the local SuperLink on ports of its own, not the shared default 39091/39093
               FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(_free_port()), FLWR_LOCAL_CONTROL_API_PORT=str(_free_port()))
    config = (f'run-dir="{run_dir}" lae-rounds=1 dm-rounds=1 local-steps=1 phantom-per-class=1 augment=false '
              f'overrides="{OVERRIDES}"')
    flwr = shutil.which("flwr", path=env["PATH"])
    assert flwr, "flwr is not on the venv's PATH"
    cmd = [flwr, "run", str(REPO), SIMULATION, "--stream", "--run-config", config]
    superlink_log = home / "local-superlink" / "superlink.log"  # where flwr's local SuperLink logs
    try:
        for _ in range(2):
            proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, start_new_session=True)
            try:
                out, _ = proc.communicate(timeout=330)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                out = proc.communicate()[0]
                pytest.fail("flwr run did not finish in 330 s:\n" + out[-4000:])
            # flwr gives the SuperLink it starts 15 s to come up: a loaded machine can miss that once
            if "Failed to start local SuperLink" not in out:
                break
        assert any(str(superlink_log) in argv for argv in _processes_of(home).values()), "no local SuperLink:\n" + out
    finally:
        _stop_flower(home)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not _processes_of(home), "processes of this run are still alive"
    log = superlink_log.read_text(errors="replace")[-3000:] if superlink_log.is_file() else ""
    details = out[-3000:] + log
    assert proc.returncode == 0, details
    state = load_state(run_dir)
    assert state is not None and state.status == "done", details
    metrics = read_metrics(run_dir)
    assert [m["phase"] for m in metrics] == ["lae", "latent-stats", "dm", "memorisation", "deliver"]
    assert [m["sites_answered"] for m in metrics] == [3, 3, 3, 3, 1]
    (labeled,) = metrics[-1]["labeled_sites"].values()
    assert labeled["delivered"] == 1.0 and labeled["augment-ran"] == 0.0
    assert "[fed] dm round 1/1" in out
    # the last partition is the labeled site: its phantom tiles have class folders and a test split
    sites = run_dir / "sites"
    assert (sites / "site3" / "phantom-tiles" / "TUM").is_dir() and (sites / "site3" / "phantom-test").is_dir()
    assert (sites / "site3" / run_dir.name / "global_model" / "model_info.json").is_file()
    assert not (sites / "site0" / "phantom-tiles" / "TUM").is_dir()
