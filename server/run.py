"""Coordinator: ``python -m server.run [--superlink HOST:PORT] [--resume RUN_DIR] [--config 'k=v ...']``.

Starts a SuperLink (TLS + SuperNode authentication unless ``--insecure``) or joins one, submits the federated
run with ``flwr run`` under a project-controlled FLWR_HOME, streams one progress line per round, and stops
every process it started on exit (also on Ctrl-C and errors). Exit code 0 done, 3 stopped, 1 failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

from server import flwr_cli
from strategies.schedule import load_state

log = logging.getLogger("histodiff.fed")
APP_DIR = Path(__file__).resolve().parent.parent
COORDINATOR_FILE = "coordinator.json"
SHOWN = ("[fed]", "FEDERATION", "Successfully started run", "ERROR", "resumed", "left out")


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m server.run", description=__doc__)
    p.add_argument("--run-dir", default="runs/federated")
    p.add_argument("--resume", metavar="RUN_DIR", default=None, help="continue the run in RUN_DIR at its next round")
    p.add_argument("--superlink", default=None, help="join this SuperLink (HOST:PORT) instead of starting one")
    p.add_argument("--port", type=int, default=None, help="port of the SuperLink to start (default: a free one)")
    p.add_argument("--host", default="127.0.0.1", help="bind address of the SuperLink to start")
    p.add_argument("--certs", default=None, help="credentials folder (default: <run-dir>/certs, created)")
    p.add_argument("--sites", type=int, default=3, help="site keys to create with new credentials")
    p.add_argument("--register", nargs="*", default=None, help="site public keys to register (default: all created)")
    p.add_argument("--insecure", action="store_true", help="no TLS, no node authentication (local tests only)")
    p.add_argument("--config", default="", help="run config overrides, TOML values: 'lae-rounds=2 strategy=\"fedadam\"'")
    p.add_argument("--simulation", type=int, default=0, metavar="N",
                   help="local simulation of N sites (Flower's simulation runtime; loopback SuperLink, no TLS)")
    p.add_argument("--federation-config", default="", help="extra simulation options, e.g. 'client-resources-num-cpus=1'")
    p.add_argument("--timeout", type=float, default=24 * 3600.0, help="stop everything after this many seconds")
    p.add_argument("--verbose", action="store_true", help="show all of Flower's log, not only progress lines")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    args = parse(sys.argv[1:] if argv is None else argv)
    run_dir = Path(args.resume or args.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    saved = json.loads((run_dir / COORDINATOR_FILE).read_text()) if args.resume and (run_dir / COORDINATOR_FILE).is_file() else {}
    insecure = args.insecure or saved.get("insecure", False) or bool(args.simulation)
    if args.simulation:
        log.info("simulation of %d sites on this machine: loopback SuperLink without TLS", args.simulation)
    elif insecure:
        log.warning("--insecure: TLS and SuperNode authentication are OFF; use only on a trusted local machine")
    certs = None if insecure else Path(args.certs or saved.get("certs") or run_dir / "certs").resolve()
    started: list[subprocess.Popen] = []
    # a resumed run must see the same run config as the run it continues (sites read it too)
    user_config = args.config or saved.get("config", "")
    try:
        superlink = args.superlink or saved.get("joined")
        if superlink is None:
            port = args.port or saved.get("port") or flwr_cli.free_port()
            superlink = f"127.0.0.1:{port}"
            if certs is not None and not (certs / "ca.crt").is_file():
                from server.certs import create

                create(certs, args.sites, [] if args.host in ("127.0.0.1", "0.0.0.0") else [args.host])
                log.info("created test credentials in %s", certs)
            env = flwr_cli.flower_env(run_dir / "flwr-home")
            db = None if args.simulation else run_dir / "superlink.db"
            proc = flwr_cli.start(flwr_cli.superlink_cmd(port, certs, db, host=args.host, simulation=bool(args.simulation)),
                                  env, run_dir / "logs" / "superlink.log", cwd=run_dir)
            started.append(proc)
            flwr_cli.wait_healthy(port, proc, tls=certs is not None)
            _save(run_dir, {"port": port, "certs": str(certs) if certs else None, "insecure": insecure,
                            "superlink_pid": proc.pid, "config": user_config})
            log.info("SuperLink on %s (pid %d, log %s)", superlink, proc.pid, run_dir / "logs" / "superlink.log")
        else:
            _save(run_dir, {"joined": superlink, "certs": str(certs) if certs else None, "insecure": insecure,
                            "config": user_config})
        home = flwr_cli.write_flwr_home(run_dir / "flwr-home", superlink, certs / "ca.crt" if certs else None, insecure)
        if not args.superlink and certs is not None:
            keys = [Path(k) for k in args.register] if args.register is not None else sorted((certs / "sites").glob("*.pub"))
            flwr_cli.register_keys(home, keys)
        config = f'run-dir="{run_dir}" resume={"true" if args.resume else "false"} {user_config}'.strip()
        return _submit(home, config, run_dir, args, started)
    except KeyboardInterrupt:
        log.warning("interrupted: stopping the processes this command started")
        return 130
    finally:
        for proc in reversed(started):
            flwr_cli.stop(proc)


def _save(run_dir: Path, values: dict) -> None:
    (run_dir / COORDINATOR_FILE).write_text(json.dumps(values, indent=2))


def _submit(home: Path, config: str, run_dir: Path, args, started: list) -> int:
    cmd = ["flwr", "run", str(APP_DIR), flwr_cli.CONNECTION, "--stream", "--run-config", config]
    if args.simulation:
        fed = f"num-supernodes={args.simulation} client-resources-num-cpus=1 {args.federation_config}".strip()
        cmd += ["--federation-config", fed]
    proc = subprocess.Popen(cmd, env=flwr_cli.flower_env(home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, cwd=run_dir)
    started.append(proc)
    deadline = time.monotonic() + args.timeout
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout] and None, daemon=True).start()
    (run_dir / "logs").mkdir(exist_ok=True)
    with open(run_dir / "logs" / "flwr-run.log", "a") as out:
        while True:
            if time.monotonic() > deadline:
                log.error("timeout after %.0f s: stopping", args.timeout)
                return 1
            try:
                line = lines.get(timeout=1.0)
            except queue.Empty:
                if proc.poll() is not None:
                    break
                continue
            out.write(line)
            out.flush()
            if args.verbose or any(key in line for key in SHOWN):
                print(line.rstrip(), flush=True)
            if "[fed] status" in line:
                break
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    state = load_state(run_dir)
    if state is None:
        log.error("the run ended without a checkpoint; see %s", run_dir / "logs")
        return 1
    print(f"[fed] run {state.status}: phase {state.phase}, {state.global_round} rounds, run dir {run_dir}"
          + (f" ({state.message})" if state.message else ""), flush=True)
    return {"done": 0, "stopped": 3}.get(state.status, 1)


if __name__ == "__main__":
    sys.exit(main())
