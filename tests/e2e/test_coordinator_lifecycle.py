"""The coordinator's life: one per run directory, nothing left behind by SIGTERM, a kill -9 mid-round resumed
without a round redone or a file overwritten, bad --config and --resume arguments refused in one line."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from server.lock import RunLock, flower_processes
from strategies.checkpoint import read_metrics
from strategies.schedule import load_state
from tests.e2e.loopback import OVERRIDES, REPO

CONFIG = (f'overrides="{OVERRIDES}" lae-rounds=2 dm-rounds=0 deliver=false local-steps=1 phantom-per-class=1 '
          'labeled-partitions="" min-sites=2')


def _server(run_dir, *extra, config=CONFIG):
    cmd = [sys.executable, "-m", "server.run", *(["--run-dir", str(run_dir), "--simulation", "2", "--config", config]
                                                 if "--resume" not in extra else []), *extra]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _wait_for(proc, needle, timeout):
    lines, found = [], threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if needle in line:
                found.set()

    threading.Thread(target=read, daemon=True).start()
    found.wait(timeout)
    return found.is_set(), lines


def _none_left(run_dir, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and flower_processes(run_dir / "flwr-home"):
        time.sleep(0.5)
    return flower_processes(run_dir / "flwr-home")


def test_bad_arguments_are_refused_before_anything_starts(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "server.run", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=120)

    res = run("--resume", str(tmp_path / "typo"))
    assert res.returncode == 2 and "not a federated run directory" in res.stderr
    assert not (tmp_path / "typo").exists()  # a mistyped folder is not created
    (tmp_path / "stray").mkdir()
    (tmp_path / "stray" / "notes.txt").write_text("not a run")
    res = run("--resume-or-start", str(tmp_path / "stray"))
    assert res.returncode == 2 and "holds files but no federated run" in res.stderr and "notes.txt" in res.stderr
    res = run("--resume-or-start", str(tmp_path / "new"), "--config", "lae-rounds=-1")  # a new folder: a start,
    assert res.returncode == 2 and "'lae-rounds'" in res.stderr  # so it reaches the config check
    (tmp_path / "early" / "flwr-home").mkdir(parents=True)  # a start killed before its coordinator.json
    (tmp_path / "early" / "coordinator.lock").write_text("")
    res = run("--resume-or-start", str(tmp_path / "early"), "--config", "lae-rounds=-1")
    assert res.returncode == 2 and "'lae-rounds'" in res.stderr  # a start again, not a refusal
    res = run("--resume", str(tmp_path / "new"), "--resume-or-start", str(tmp_path / "new"))
    assert res.returncode == 2 and "not allowed with" in res.stderr
    res = run("--run-dir", str(tmp_path / "r"), "--simulation", "2", "--config", "this is not toml")
    assert res.returncode == 2 and "cannot parse" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = run("--run-dir", str(tmp_path / "r"), "--simulation", "2", "--config", "lae-rounds=-1")
    assert res.returncode == 2 and "'lae-rounds'" in res.stderr
    with RunLock(tmp_path / "busy"):  # a live coordinator holds it
        res = run("--run-dir", str(tmp_path / "busy"), "--simulation", "2")
    assert res.returncode == 2 and "in use by another coordinator" in res.stderr and f"pid {os.getpid()}" in res.stderr


@pytest.mark.timeout(400)
def test_sigterm_leaves_no_process_behind(tmp_path):
    run_dir = tmp_path / "run"
    proc = _server(run_dir, "--timeout", "300")
    started, lines = _wait_for(proc, "Successfully started run", 240)
    assert started, "".join(lines)[-3000:]
    assert flower_processes(run_dir / "flwr-home")  # the SuperLink and the run are up
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=90) != 0
    assert _none_left(run_dir) == []


@pytest.mark.timeout(900)
def test_kill_9_mid_round_then_resume(tmp_path):
    run_dir = tmp_path / "run"
    proc = _server(run_dir, "--timeout", "600")
    done, lines = _wait_for(proc, "[fed] lae round 1/2", 400)
    assert done, "".join(lines)[-3000:]
    first = (run_dir / "metrics.jsonl").read_text()
    os.kill(proc.pid, signal.SIGKILL)  # no handler runs: its children get SIGTERM from the kernel (PDEATHSIG)
    proc.wait(timeout=30)
    resumed = _server(run_dir, "--resume", str(run_dir), "--timeout", "600")  # no --simulation: it is saved
    out, _ = resumed.communicate(timeout=700)
    assert resumed.returncode == 0, out[-3000:]
    state = load_state(run_dir)
    assert state.status == "done"
    metrics = read_metrics(run_dir)
    assert [m["global_round"] for m in metrics] == [1, 2, 3]  # continuous: no round redone, none lost
    assert [m["phase"] for m in metrics] == ["lae", "lae", "latent-stats"]
    assert (run_dir / "metrics.jsonl").read_text().startswith(first)  # the first round's line untouched
    assert json.loads((run_dir / "coordinator.json").read_text())["simulation"] == 2
    assert _none_left(run_dir) == []
