"""The labeled-site pipeline as the site's own job: ``python -m client.pipeline_job OUT_DIR``.

The deliver message writes ``OUT_DIR/job.json`` and starts this in a process of its own (own session, so neither
the ClientApp's exit nor a message deadline stops it). It runs ``histodiff.labeled_site.pipeline.run_augment``, whose stages
are skipped on a rerun when their outputs are complete, and keeps ``OUT_DIR/job_status.json`` up to date. The
server's status queries read that file; when the job's process is gone before it finished (a killed or restarted
site), a query starts it again, and it resumes at the stage where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger("histodiff.client")
RUNNING, DONE, FAILED, OFF = 0, 1, 2, 3  # "pipeline-state" in the status reply (strategies/delivery.py)
STATE_CODES = {"running": RUNNING, "done": DONE, "failed": FAILED, "off": OFF}
JOB_FILE, STATUS_FILE, LOG_FILE = "job.json", "job_status.json", "job.log"
MAX_STARTS = 4  # a job that dies this often without finishing is reported as failed


def read_status(out: Path) -> dict:
    try:
        return json.loads((Path(out) / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return {}


def write_status(out: Path, status: dict) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (STATUS_FILE + ".tmp")
    tmp.write_text(json.dumps({**status, "time": time.time()}, indent=1))
    tmp.replace(out / STATUS_FILE)


def _alive(pid: int | None) -> bool:
    """True when ``pid`` is a running pipeline job (not a reused pid of something else)."""
    if not pid:
        return False
    try:
        cmdline = Path(f"/proc/{int(pid)}/cmdline").read_bytes()
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
    except OSError:
        return False
    return b"client.pipeline_job" in cmdline and ") Z" not in stat  # a zombie has finished


def start(job: dict, restart: bool = False) -> int:
    """Write ``job.json`` and start the job in its own session; returns its pid. ``restart``: a new job (a new
    global model arrived), so earlier starts do not count against ``MAX_STARTS``."""
    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    previous = read_status(out)
    if _alive(previous.get("pid")):
        if not restart:
            return int(previous["pid"])
        _stop(int(previous["pid"]))
    (out / JOB_FILE).write_text(json.dumps(job, indent=1))
    starts = 1 if restart else int(previous.get("starts", 0)) + 1
    with open(out / LOG_FILE, "ab") as logfile:
        proc = subprocess.Popen([sys.executable, "-m", "client.pipeline_job", str(out)], stdout=logfile,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                cwd=str(Path(__file__).resolve().parent.parent))
    write_status(out, {"state": "running", "pid": proc.pid, "starts": starts, "started": time.time()})
    log.info("labeled-site pipeline started (pid %d, start %d); log %s", proc.pid, starts, out / LOG_FILE)
    return proc.pid


def _stop(pid: int) -> None:
    import signal

    try:
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass


def _stages_done(out: Path) -> int:
    return len(list((Path(out) / "stages").glob("*.json")))


def status(out: Path) -> dict[str, float]:
    """The job's state as scalar metrics; a dead unfinished job is started again (it resumes its stages)."""
    out = Path(out)
    st = read_status(out)
    state = st.get("state")
    if state == "done" or state == "off":
        return {**st.get("metrics", {}), "pipeline-state": STATE_CODES[state]}
    if state == "failed":
        raise RuntimeError(f"labeled-site pipeline failed: {st.get('error', 'unknown error')} (log {out / LOG_FILE})")
    if not (out / JOB_FILE).is_file():
        raise RuntimeError("no labeled-site pipeline here: the global model was never delivered to this site")
    if not _alive(st.get("pid")):
        if int(st.get("starts", 0)) >= MAX_STARTS:
            write_status(out, {**st, "state": "failed", "error": f"the job died {MAX_STARTS} times without finishing"})
            return status(out)
        log.warning("labeled-site pipeline (pid %s) is not running and has not finished: starting it again",
                    st.get("pid"))
        start(json.loads((out / JOB_FILE).read_text()))
        st = read_status(out)
    return {"pipeline-state": RUNNING, "pipeline-stages-done": _stages_done(out),
            "pipeline-starts": int(st.get("starts", 1)), "pipeline-seconds": time.time() - float(st.get("started", time.time()))}


def main(argv: list[str] | None = None) -> int:
    from client.task import table_metrics
    from histodiff.config import compose
    from histodiff.labeled_site.pipeline import run_augment
    from histodiff.logs import setup_logging

    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0])
    job = json.loads((out / JOB_FILE).read_text())
    st = read_status(out)
    write_status(out, {**st, "state": "running", "pid": os.getpid()})
    started = time.time()
    try:
        cfg = compose(job["overrides"])
        setup_logging(out, "augment.log")
        results = run_augment(cfg, job["data"], job["test"], job["model"], out)
    except BaseException as exc:  # noqa: BLE001 - recorded for the server, then the job ends
        if isinstance(exc, (KeyboardInterrupt, SystemExit)) or getattr(exc, "signal", None):
            raise  # stopped, not failed: the next status query restarts it
        line = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        write_status(out, {**read_status(out), "state": "failed", "error": line})
        log.exception("labeled-site pipeline failed")
        return 1
    metrics = {**table_metrics(results), "delivered": 1.0, "augment-ran": 1.0,
               "deliver-seconds": time.time() - started}
    (out.parent / "deliver_metrics.json").write_text(json.dumps(metrics, indent=2))
    write_status(out, {**read_status(out), "state": "done", "metrics": metrics})
    return 0


if __name__ == "__main__":
    sys.exit(main())
