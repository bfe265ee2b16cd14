"""The run's dashboard page (server/dashboard.py): from a real in-process federation, from a run still going, from a
folder that is no run; and the page in a real browser (headless Chromium; skipped where it is not installed)."""

import json
import re
import shutil
import subprocess
import threading
import time

import pytest
from flwr.supercore.task_identity import TaskIdentity
from PIL import Image

from server import dashboard

OVERRIDES = "weights.perceptual=random lae.perceptual_weight=0 tiles.batch_size=4 tiles.image_size=32"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


@pytest.fixture(autouse=True)
def _identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def _labeled_outputs(augment):
    """What the labeled-site pipeline leaves in its augment/ folder (Table 1, grids, its job status)."""
    (augment / "grids").mkdir(parents=True)
    (augment / "table1.md").write_text(
        "| setting | FID | accuracy | F1 | sensitivity | specificity |\n|---|---|---|---|---|---|\n"
        "| baseline, real only | - | 0.412 | 0.380 | 0.401 | 0.925 |\n"
        "| + selective 50% | 81.250 | 0.478 | 0.455 | 0.470 | 0.934 |\n")
    for i, name in enumerate(("ADI", "TUM")):
        img = Image.new("RGB", (64, 32), "white")
        img.paste((200, 80 + 60 * i, 160), (0, 0, 32, 32))  # real tile
        img.paste((190, 90 + 60 * i, 170), (32, 0, 64, 32))  # synthetic tile
        img.save(augment / "grids" / f"{name}.png")
    (augment / "job_status.json").write_text(json.dumps({"state": "done"}))


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """A real federation through the in-process grid (real ClientApp handlers): LAE, latent statistics, DM, delivery
    to the labeled site, one site failing from round 2; then the labeled site's pipeline outputs where the simulation keeps them."""
    from client.client_app import app
    from strategies.federation import Federation
    from tests.inprocess_grid import InProcessGrid

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    tmp = tmp_path_factory.mktemp("dash")
    run = tmp / "run"
    rc = {"profile": "tiny", "overrides": OVERRIDES, "lae-rounds": 2, "dm-rounds": 1, "local-steps": 1,
          "min-sites": 2, "round-timeout": 300.0, "wait-timeout": 60.0, "poll": 0.05, "run-dir": str(run),
          "phantom-per-class": 1, "labeled-partitions": "3", "augment": False}
    grid = InProcessGrid(app, {10 + i: {"partition-id": i, "num-partitions": 4} for i in range(4)}, rc)


    def emit(line):
        if line.startswith("[fed] lae round 1/"):
            grid.failing.add(12)  # errors from the second round on: left out, with its reason

    assert Federation.from_run_config(grid, rc, emit=emit).run().status == "done"
    _labeled_outputs(run / "sites" / "site3" / "run" / "augment")
    return run


def test_the_page_of_a_finished_run(real_run, tmp_path):
    out = tmp_path / "page.html"
    assert dashboard.main([str(real_run), "--out", str(out)]) == 0
    page = out.read_text()
    assert 'http-equiv="refresh"' not in page  # done: nothing more will change
    assert "<span class='status done'>done</span>" in page
    # plots drawn here, inline: loss per round (mean and each site), bytes, stage times
    for title in ("LAE total per round", "DM loss per round", "MB per round (all sites)",
                  "Seconds per stage of each round"):
        assert f'aria-label="{title}"' in page, title
    assert page.count("<svg") >= 4 and "site 10" in page and "mean over sites" in page
    assert "12: error 0: site failure (injected)" in page  # the rounds table says who was left out and why
    # the labeled site: its Table 1 and its grids, embedded
    assert "<td>+ selective 50%</td>" in page and "<td>81.250</td>" in page
    assert len(re.findall(r'src="data:image/png;base64,[A-Za-z0-9+/=]+"', page)) == 2
    # the privacy report written at the end of the run; no DP: the epsilon plot is "not yet"
    assert "Never leaves a site" in page and "<b>Epsilon per site</b>: not yet" in page
    assert "tensorboard --logdir" in page and "src=\"http" not in page  # offline: nothing fetched


def test_the_page_of_a_run_still_going_reloads_and_shows_what_is_missing(tmp_path, capsys):
    run = tmp_path / "lae-only"
    run.mkdir()
    lines = [{"phase": "lae", "round": r, "rounds": 20, "global_round": r, "sites_asked": 3, "sites_answered": 3,
              "dropped": {}, "losses": {"rec": 0.6 - 0.05 * r, "total": 0.7 - 0.05 * r}, "bytes_sent": 3_000_000,
              "bytes_received": 1_500_000, "seconds": 40.0, "time": time.time(),
              "stages": {"prepare": 1.0, "sites": 38.0, "aggregate": 0.5, "checkpoint": 0.5}} for r in (1, 2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"phase": "la')  # mid-write
    (run / "server_state.json").write_text(json.dumps({"phase": "lae", "phase_round": 2, "global_round": 2,
                                                       "status": "running"}))
    assert dashboard.main([str(run)]) == 0
    page = (run / "dashboard.html").read_text()
    assert '<meta http-equiv="refresh" content="30">' in page
    assert "<b>DM loss per round</b>: not yet" in page and "<b>The labeled site&#x27;s results</b>: not yet" in page
    assert "<b>Privacy report</b>: not yet" in page and 'aria-label="LAE rec per round"' in page
    assert "wrote " in capsys.readouterr().out


def test_watch_rewrites_the_page_until_the_run_ends(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    state = {"phase": "lae", "phase_round": 0, "global_round": 0, "status": "running"}
    (run / "server_state.json").write_text(json.dumps(state))
    ended = threading.Timer(0.6, lambda: (run / "server_state.json").write_text(json.dumps({**state, "status": "stopped",
                                                                                             "message": "min-sites"})))
    ended.start()
    started = time.monotonic()
    assert dashboard.main([str(run), "--watch", "0.1"]) == 0  # returns once the run has ended
    assert 0.5 < time.monotonic() - started < 30
    page = (run / "dashboard.html").read_text()
    assert "status stopped" in page and 'http-equiv="refresh"' not in page


def test_a_folder_that_is_no_run_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    assert dashboard.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "is not a federated run directory" in err and err.count("\n") == 1
    assert dashboard.main([str(tmp_path / "missing")]) == 2


def test_nice_ticks_and_markdown():
    assert dashboard.nice_ticks(0.0, 9.3) == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
    assert dashboard.nice_ticks(1, 3, integer=True) == [1.0, 2.0, 3.0]
    html = dashboard.markdown("## Title\n\nA `x` <b>.\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n- one\n  more\n- two\n")
    assert "<h3>Title</h3>" in html and "<code>x</code> &lt;b&gt;" in html and "<td>2</td>" in html
    assert "<li>one more</li>" in html


def _browser():
    return next((b for b in map(shutil.which, BROWSERS) if b), None)


@pytest.mark.skipif(_browser() is None, reason="no Chromium here (apt-get install -y chromium)")
def test_the_page_in_a_real_browser(real_run, tmp_path):
    out = tmp_path / "page.html"
    assert dashboard.main([str(real_run), "--out", str(out)]) == 0
    shot = tmp_path / "out.png"
    subprocess.run([_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1280,900",
                    out.resolve().as_uri()], check=True, timeout=180, capture_output=True, cwd=tmp_path)
    assert shot.is_file()
    with Image.open(shot) as img:
        assert img.size == (1280, 900)
        grey = img.convert("L")
        dark = sum(grey.histogram()[:200])  # pixels of text, lines and bars (the page is white)
        colours = len(set(img.convert("RGB").resize((320, 225)).getdata()))
    assert dark > 0.01 * 1280 * 900 and colours > 20  # drawn, not blank
