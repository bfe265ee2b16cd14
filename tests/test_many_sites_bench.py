"""The pure helpers of ``benchmarks.many_sites``: /proc parsing, the process tree, groups, peaks, the metrics table."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import many_sites as ms


def test_parse_stat_with_spaces_and_parentheses_in_comm():
    line = "4242 (ray::Client (x) y) S 17 4242 4242 0 -1 4194560 10 0 0 0 5 6 0 0 20 0 3 0 98765 1000 200 rest\n"
    assert ms.parse_stat(line) == (4242, "ray::Client (x) y", "S", 17, 98765)


def test_parse_stat_of_this_process():
    pid, _, state, ppid, start = ms.parse_stat(Path(f"/proc/{os.getpid()}/stat").read_text())
    assert (pid, state, ppid) == (os.getpid(), "R", os.getppid()) and start > 0


def test_parse_kb():
    text = "Name:\tpython\nVmPeak:\t  900 kB\nVmRSS:\t  12345 kB\n"
    assert ms.parse_kb(text, "VmRSS") == 12345
    assert ms.parse_kb("Rss: 10 kB\nPss:   77 kB\n", "Pss") == 77
    assert ms.parse_kb(text, "Pss") is None


def test_classify_flower_and_ray_processes():
    venv = "/v/bin/"
    assert ms.classify([f"{venv}python", f"{venv}flower-superlink", "--insecure", "--simulation"]) == "superlink"
    assert ms.classify([f"{venv}python", f"{venv}flower-superexec", "--insecure"]) == "superlink"
    assert ms.classify([f"{venv}python", "-m", "server.superlink", "--database", "s.db"]) == "superlink"
    assert ms.classify([f"{venv}python", f"{venv}flwr-simulation", "--runtime-api-address", "x"]) == "serverapp"
    assert ms.classify([f"{venv}python", f"{venv}flwr", "run", "/app", "histodiff", "--stream"]) == "launcher"
    assert ms.classify([f"{venv}python", "-m", "server.run", "--simulation", "5"]) == "launcher"
    assert ms.classify(["ray::ClientAppActor.run"]) == "sites"
    assert ms.classify(["ray::IDLE"]) == "sites"
    assert ms.classify(["ray::DashboardAgent"]) == "ray"
    assert ms.classify(["/v/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet", "--x"]) == "ray"
    assert ms.classify([f"{venv}python", "-u", "/v/lib/python3.11/site-packages/ray/dashboard/dashboard.py"]) == "ray"
    assert ms.classify(["/bin/sh", "-c", "true"]) is None
    assert ms.classify([]) is None


def test_descendants_and_inherited_roles():
    parents = {1: 0, 10: 1, 11: 10, 12: 11, 13: 12, 14: 13, 20: 1, 99: 5}
    assert ms.descendants(parents, 10) == [10, 11, 12, 13, 14]
    assert ms.descendants(parents, 99) == [99]
    assert ms.descendants(parents, 7) == []  # gone
    procs = {
        10: ms.Proc(10, 1, 1, ["python", "-m", "server.run"], 100, 50),
        11: ms.Proc(11, 10, 1, ["python", "/v/flwr-simulation"], 1000, 600),
        12: ms.Proc(12, 11, 1, ["/v/ray/raylet"], 30, 20),
        13: ms.Proc(13, 12, 1, ["ray::ClientAppActor.run"], 900, 400),
        14: ms.Proc(14, 13, 1, ["python", "-c", "worker"], 10, 5),  # a child of a site: a site's
    }
    assert ms.roles_of(procs) == {10: "launcher", 11: "serverapp", 12: "ray", 13: "sites", 14: "sites"}
    s = ms.summarise(procs, 0.0, 1.5)
    assert s.rss_kb["sites"] == 910 and s.pss_kb["serverapp"] == 600 and s.processes["sites"] == 2


def test_peaks_take_the_largest_sum_within_one_sample():
    zero = {r: 0 for r in ms.ROLES}
    a = ms.Sample(0.0, {**zero, "superlink": 1024, "serverapp": 2048, "sites": 10240},
                  {**zero, "superlink": 1024, "serverapp": 1024, "sites": 5120}, {**zero, "sites": 2}, 1.0)
    b = ms.Sample(0.5, {**zero, "superlink": 2048, "serverapp": 0, "sites": 20480},
                  {**zero, "superlink": 2048, "serverapp": 0, "sites": 1024}, {**zero, "sites": 3}, 3.0)
    p = ms.peaks([a, b])
    assert p["coordinator_rss_mb"] == 3.0  # 1 + 2 MB in sample a, not 2 + 2 across samples
    assert p["rss_mb"]["superlink"] == 2.0 and p["rss_mb"]["sites"] == 20.0
    assert p["all_rss_mb"] == 22.0 and p["all_pss_mb"] == 7.0
    assert p["processes"]["sites"] == 3 and p["load1_mean"] == 2.0 and p["load1_max"] == 3.0
    assert ms.peaks([]) == {"samples": 0}


def test_round_table_and_growth():
    metrics = [
        {"phase": "lae", "round": 1, "seconds": 30.0, "stages": {"prepare": 10.0, "sites": 20.0}, "sites_asked": 5,
         "sites_answered": 5, "dropped": {}, "losses": {"site-seconds": 3.0}, "bytes_sent": 10, "bytes_received": 9},
        {"phase": "lae", "round": 2, "seconds": 8.0, "stages": {}, "sites_asked": 5, "sites_answered": 4,
         "dropped": {"7": "timeout"}, "losses": {}},
        {"status": "done"},  # not a round
        {"phase": "dm", "round": 1, "seconds": 4.0, "sites_asked": 5, "sites_answered": 5},
    ]
    rows = ms.round_table(metrics)
    assert [r["phase"] for r in rows] == ["lae", "lae", "dm"]
    assert rows[0]["site_seconds"] == 3.0 and rows[1]["dropped"] == 1 and rows[2]["stages"] == {}
    assert ms.phase_seconds(rows) == {"lae": [30.0, 8.0], "dm": [4.0]}
    assert ms.growth([5, 50], [2.0, 20.0]) == 1.0
    assert ms.growth([5, 10, 50], [300.0, 1.0, 300.0]) == 0.0
    assert ms.growth([5, 50], [1.0, 100.0]) == 2.0
    assert ms.growth([5], [1.0]) is None


def test_sampler_follows_a_real_tree_and_stops_what_is_left():
    # a parent that starts a sleeping child in its own session and exits: the child is re-parented, yet still
    # measured (seen once) and stopped by stop_all
    code = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
            "start_new_session=True); time.sleep(1.5)")
    parent = subprocess.Popen([sys.executable, "-c", code])
    sampler = ms.TreeSampler(parent.pid, interval=0.1).start()
    parent.wait(timeout=30)
    time.sleep(0.3)
    sampler.stop()
    left = sampler.left_over()
    assert len(left) == 1 and parent.pid not in left  # the re-parented child, found by pid + start time
    assert max(s.processes["other"] for s in sampler.samples) == 2
    assert sampler.stop_all(grace=5.0) == sorted(left)
    assert sampler.left_over() == {} and sampler.stop_all() == []


def test_site_clocks_and_idle_share():
    per_site = {"1": {"clock-handler-start": 100.0, "clock-reply": 104.0, "loss": 1.0},
                "2": {"clock-handler-start": 100.0, "clock-reply": 102.0},
                "3": {"clock-handler-start": 102.5, "clock-reply": 104.0},
                "4": {"loss": 2.0}}  # a site without clocks is left out
    clocks = ms.site_clocks(per_site)
    assert clocks == {"busy_s": 7.5, "span_s": 4.0}
    assert ms.idle_share(clocks, 2) == round(1 - 7.5 / 8.0, 3)
    assert ms.idle_share({}, 2) is None and ms.site_clocks({}) == {}
    row = ms.round_table([{"phase": "dm", "round": 1, "seconds": 5.0, "losses_per_site": per_site}])[0]
    assert row["busy_s"] == 7.5 and row["span_s"] == 4.0


def test_table_reads_the_last_round_of_each_phase():
    zero = {r: 0 for r in ms.ROLES}
    memory = ms.peaks([ms.Sample(0.0, {**zero, "serverapp": 2048}, {**zero, "serverapp": 1024}, {**zero, "sites": 2},
                                 1.0)])
    rounds = ms.round_table([
        {"phase": "lae", "round": 1, "seconds": 50.0, "stages": {"prepare": 20.0}, "sites_asked": 4,
         "sites_answered": 4},
        {"phase": "dm", "round": 1, "seconds": 12.0, "stages": {"sites": 10.0}, "sites_asked": 4,
         "sites_answered": 4, "losses": {"site-seconds": 4.0}}])
    result = {"sites": 4, "returncode": 0, "rounds": rounds, "seconds": ms.phase_seconds(rounds), "memory": memory,
              "wall_s": 99.0}
    line = ms.table([result]).splitlines()[1].split()
    assert line[:8] == ["4", "yes", "50.0", "20.0", "0.0", "12.0", "2.50", "4.0"]
    assert ms.readings([result, {**result, "sites": 8}])["coordinator_pss_growth"] == 0.0
    failed = {**result, "returncode": 1}
    assert ms.table([failed]).splitlines()[1].split()[1] == "NO"


def test_simulation_env_turns_rays_memory_monitor_off_unless_set():
    from server.flwr_cli import simulation_env

    assert simulation_env({"PATH": "/bin"}) == {"RAY_memory_monitor_refresh_ms": "0"}
    assert simulation_env({"RAY_memory_monitor_refresh_ms": "250"}) == {}  # the operator's own choice stays
