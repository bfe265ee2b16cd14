"""Coordinator: ``python -m server.run [--superlink HOST:PORT] [--resume RUN_DIR | --resume-or-start RUN_DIR]
[--config 'k=v ...']``.

Starts a SuperLink (TLS + SuperNode authentication unless ``--insecure``) or joins one, submits the federated
run with ``flwr run`` under a project-controlled FLWR_HOME, streams one progress line per round, and stops
every process it started on exit (also on Ctrl-C and errors). Exit code 0 done, 3 stopped, 1 failed, 2 refused
(bad arguments or credentials that do not fit the addresses).

Addresses of a SuperLink it starts: ``--host`` is the bind address (default 127.0.0.1: only this machine can
connect; sites on other machines need ``--host 0.0.0.0`` or the coordinator's own address), ``--advertise`` the
name(s) sites connect to (default: ``--host`` when it is one address; with a bind-all ``--host``, the names the
existing certificate carries). New credentials name both; existing ones must (else it refuses, in one line).
Once the SuperLink is up it prints each site's ``python -m client.run`` command line. Flower 1.42 serves the Fleet
API, the Control API (run submission) and the Runtime API on this one port: let only the sites reach it.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import queue
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from server import flwr_cli
from server.lock import LOCK_FILE, RunDirBusy, RunLock, reap, reap_flower, set_parent_death_signal
from strategies.schedule import STATE_FILE, load_state

log = logging.getLogger("histodiff.fed")
APP_DIR = Path(__file__).resolve().parent.parent
COORDINATOR_FILE = "coordinator.json"
SHOWN = ("[fed]", "FEDERATION", "Successfully started run", "ERROR", "resumed", "left out", "deliver:")


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m server.run", description=__doc__)
    p.add_argument("--run-dir", default="runs/federated")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--resume", metavar="RUN_DIR", default=None,
                       help="continue the run in RUN_DIR at its next round (refused when RUN_DIR holds no run)")
    start.add_argument("--resume-or-start", metavar="RUN_DIR", default=None,
                       help="continue the run in RUN_DIR, or start one there when RUN_DIR is missing or empty (what "
                            "a restarted Kubernetes Job runs; what a start killed early leaves counts as empty); refused "
                            "when RUN_DIR holds other files")
    p.add_argument("--superlink", default=None, help="join this SuperLink (HOST:PORT) instead of starting one")
    p.add_argument("--port", type=int, default=None, help="port of the SuperLink to start (default: a free one)")
    p.add_argument("--host", default=None,
                   help="bind address of the SuperLink to start (default 127.0.0.1: this machine only; "
                        "0.0.0.0 or the coordinator's address lets sites on other machines connect)")
    p.add_argument("--advertise", action="append", default=[], metavar="NAME",
                   help="host name or IP address sites connect to (repeatable; default: --host unless bind-all): "
                        "put into new credentials, checked against existing ones, used in the printed site commands")
    p.add_argument("--labeled-site", action="append", default=[], metavar="SITE",
                   help="print this site's command with --role labeled (the printed commands only)")
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
    if args.resume_or_start:
        target = Path(args.resume_or_start)
        if (target / COORDINATOR_FILE).is_file() or (target / STATE_FILE).is_file():
            args.resume = args.resume_or_start
        elif target.exists() and (not target.is_dir() or _foreign(target)):
            print(f"error: --resume-or-start {args.resume_or_start}: holds files but no federated run (no "
                  f"{COORDINATOR_FILE} or {STATE_FILE}): {', '.join(_foreign(target)[:3]) or target.name}; give "
                  "an empty or new folder", file=sys.stderr)
            return 2
        else:
            args.run_dir = args.resume_or_start
    run_dir = Path(args.resume or args.run_dir).resolve()
    if args.resume and not ((run_dir / COORDINATOR_FILE).is_file() or (run_dir / STATE_FILE).is_file()):
        print(f"error: --resume {args.resume}: not a federated run directory (no {COORDINATOR_FILE} or "
              f"{STATE_FILE} in {run_dir})", file=sys.stderr)
        return 2
    try:
        check_config(args.config)
    except ValueError as exc:
        print(f"error: --config: {exc}", file=sys.stderr)
        return 2
    run_dir.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGHUP, _on_term)
    try:
        lock = RunLock(run_dir).acquire()  # one coordinator per run directory, released when this process dies
    except RunDirBusy as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        return _coordinate(args, run_dir)
    finally:
        lock.release()


# what server.run writes into a run directory before its coordinator.json: a start killed that early left only these
STARTUP_NAMES = (LOCK_FILE, "flwr-home", "logs", "certs", "superlink.db")


def _foreign(folder: Path) -> list[str]:
    """The entries of ``folder`` that no server.run start wrote (sorted names)."""
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(STARTUP_NAMES))


def _coordinate(args, run_dir: Path) -> int:
    saved = json.loads((run_dir / COORDINATOR_FILE).read_text()) if args.resume and (run_dir / COORDINATOR_FILE).is_file() else {}
    # a killed coordinator's processes never run beside this one: its process groups and Flower's own
    # sessions under this run's FLWR_HOME are stopped before anything starts
    gone = reap(saved.get("pgids", [])) + reap_flower(run_dir / "flwr-home")
    if gone:
        log.warning("stopped %d process(es) of an earlier coordinator of %s", len(gone), run_dir)
    if args.resume:
        args.simulation = args.simulation or int(saved.get("simulation", 0))  # resume needs nothing repeated
        if args.config and saved.get("config") is not None and args.config != saved.get("config"):
            log.warning("run config changed on resume: was %r, now %r", saved.get("config"), args.config)
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
        own_link = superlink is None
        if own_link:
            bind = args.host or saved.get("host") or "127.0.0.1"
            labeled = args.labeled_site or saved.get("labeled_sites", [])
            port = args.port or saved.get("port") or flwr_cli.free_port(bind)
            # the coordinator's own flwr commands (and the SuperLink's SuperExec) connect where it listens
            superlink = flwr_cli.hostport(flwr_cli.connect_host(bind), port)
            advertised: list[str] = []
            if not args.simulation:
                advertised = addresses(bind, args.advertise or saved.get("advertise", []), certs, args.sites)
                _bind_notes(bind, port, advertised)
            env = flwr_cli.flower_env(run_dir / "flwr-home")
            if args.simulation:
                env.update(flwr_cli.simulation_env(env))
            db = None if args.simulation else run_dir / "superlink.db"
            proc = flwr_cli.start(flwr_cli.superlink_cmd(port, certs, db, host=bind, simulation=bool(args.simulation)),
                                  env, run_dir / "logs" / "superlink.log", cwd=run_dir)
            started.append(proc)
            _record_pgids(run_dir, started)
            flwr_cli.wait_healthy(port, proc, tls=certs is not None, host=bind)
            _save(run_dir, {"pgids": [p.pid for p in started], "simulation": args.simulation, "port": port, "host": bind, "advertise": advertised, "labeled_sites": labeled,
                            "certs": str(certs) if certs else None, "insecure": insecure,
                            "superlink_pid": proc.pid, "config": user_config})
            log.info("SuperLink listening on %s (pid %d, log %s)", flwr_cli.hostport(bind, port), proc.pid,
                     run_dir / "logs" / "superlink.log")
        else:
            _save(run_dir, {"simulation": args.simulation, "joined": superlink, "certs": str(certs) if certs else None, "insecure": insecure,
                            "config": user_config})
        home = flwr_cli.write_flwr_home(run_dir / "flwr-home", superlink, certs / "ca.crt" if certs else None, insecure)
        keys: list[Path] = []
        if not args.superlink and certs is not None:
            keys = [Path(k) for k in args.register] if args.register is not None else sorted((certs / "sites").glob("*.pub"))
            flwr_cli.register_keys(home, keys)
        if own_link and not args.simulation:
            sites = [k.name[:-len(".pub")] if k.name.endswith(".pub") else k.name for k in keys]
            print("[fed] each site runs this, with its own tile folders for /site/..."
                  + (f" and copies of {_show(certs / 'ca.crt')} and of its own key only (never ca.key)"
                     if certs else " (--insecure: no TLS, no authentication)") + ":", flush=True)
            for line in site_commands(flwr_cli.hostport(advertised[0], port), certs, sites, labeled):
                print(f"  {line}", flush=True)
        config = f'run-dir="{run_dir}" resume={"true" if args.resume else "false"} {user_config}'.strip()
        return _submit(home, config, run_dir, args, started)
    except AddressError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        log.warning("interrupted: stopping the processes this command started")
        return 130
    finally:
        for proc in reversed(started):
            flwr_cli.stop(proc)
        reap_flower(run_dir / "flwr-home")  # Flower's own sessions (SuperExec, ServerApp, simulation) too


class AddressError(Exception):
    """Why the SuperLink was not started: its addresses and credentials do not fit (one line)."""


def _show(path: Path) -> str:
    """``path`` relative to the working directory where it is under it (as an operator would type it)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def addresses(bind: str, advertise: list[str], certs: Path | None, sites: int = 3) -> list[str]:
    """The names sites connect to (first: the one printed). Creates credentials naming them (and a specific bind
    address) when ``certs`` has none; otherwise checks that its certificate names them and the address the
    coordinator's own commands use. Raises ``AddressError`` (one line) when they do not fit."""
    from server import certs as credentials

    named = list(dict.fromkeys(n.strip() for item in advertise for n in str(item).split(",") if n.strip()))
    local = flwr_cli.connect_host(bind)
    wildcard = flwr_cli.is_wildcard(bind)
    if certs is None:  # --insecure: nothing to check against
        return named or [socket.getfqdn() if wildcard else bind]
    if not (certs / "ca.crt").is_file() and not (certs / "server.pem").exists():
        if not named and wildcard:
            raise AddressError(f"--host {bind} binds every interface: pass --advertise NAME (the host name or address "
                               "sites connect to) so the new certificate names it")
        named = named or [bind]
        try:
            credentials.create(certs, sites, [*named, *([] if wildcard else [bind])])
        except credentials.CredentialsError as exc:
            raise AddressError(str(exc)) from None
        log.info("created credentials in %s for %s", certs, ", ".join(credentials.cert_names(certs / "server.pem")))
        return named
    pem = certs / "server.pem"
    if not pem.is_file():
        raise AddressError(f"{_show(pem)} not found: issue it with python -m server.certs --out {_show(certs)} "
                           f"--server-cert --host {named[0] if named else 'NAME'}")
    names = credentials.cert_names(pem)
    if not named:
        named = [bind] if not wildcard else [n for n in names if not _is_loopback(n)]
        if not named:
            raise AddressError(f"--host {bind} binds every interface but {_show(pem)} names only {', '.join(names)}: "
                               f"pass --advertise NAME and re-issue it with python -m server.certs --out {_show(certs)} "
                               "--server-cert --host NAME --force")
    for host, who in [*((n, "sites") for n in named), (local, "the coordinator's own flwr commands")]:
        if not credentials.covers(names, host):
            raise AddressError(
                f"{_show(pem)} does not name {host}, which {who} connect to (it names {', '.join(names)}): TLS "
                f"verification would fail; re-issue it with python -m server.certs --out {_show(certs)} --server-cert "
                f"--host {','.join(dict.fromkeys([*named, *([] if wildcard else [bind])]))} --force, or --advertise a "
                "name it carries")
    return named


def _bind_notes(bind: str, port: int, advertised: list[str]) -> None:
    where = flwr_cli.hostport(bind, port)
    if _is_loopback(bind):
        log.warning("the SuperLink listens on %s, a loopback address: sites on other machines cannot reach it%s; "
                    "pass --host 0.0.0.0 --advertise NAME, or --host <the coordinator's address>", where,
                    f" at {', '.join(a for a in advertised if not _is_loopback(a))}"
                    if any(not _is_loopback(a) for a in advertised) else "")
    else:
        log.warning("the SuperLink listens on %s; Flower 1.42 serves run submission (Control API, no account "
                    "authentication) on that same port: let only the sites' addresses reach it (firewall)", where)
    log.info("sites connect to %s", ", ".join(flwr_cli.hostport(a, port) for a in advertised))


def site_commands(superlink: str, certs: Path | None, sites: list[str], labeled=()) -> list[str]:
    """The ``python -m client.run`` line each site runs to join this SuperLink."""
    lines = []
    for site in sites or ["SITE"]:
        role = "labeled" if site in labeled else "unlabeled"
        cmd = ["python", "-m", "client.run", "--data", "/site/labeled" if role == "labeled" else "/site/tiles"]
        if role == "labeled":
            cmd += ["--test-data", "/site/test"]
        cmd += ["--superlink", superlink]
        if certs is None:
            cmd.append("--insecure")
        else:
            cmd += ["--root-certificates", _show(certs / "ca.crt"), "--auth-key", _show(certs / "sites" / site)]
        lines.append(shlex.join(cmd + ["--site", site, "--role", role]))
    return lines


def check_config(text: str) -> dict:
    """The run-config overrides of ``--config``, parsed as Flower parses them and checked as the ServerApp will
    check them (known keys, typed values), so a bad one is refused here, in one line, before anything starts."""
    import re

    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    from flwr.common.config import parse_config_args

    from wire.settings import Settings

    pattern = re.compile(r"(\S+?)=(\'[^\']*\'|\"[^\"]*\"|\S+)")
    leftover = pattern.sub("", text or "").strip()
    if leftover:
        raise ValueError(f"cannot parse {leftover[:60]!r}: expected key=value pairs, e.g. 'lae-rounds=2 strategy=\"fedadam\"'")
    try:
        values = parse_config_args([text]) if text else {}
    except Exception as exc:  # noqa: BLE001 - click's exception: say it in one line
        raise ValueError(str(getattr(exc, "message", exc)).splitlines()[0]) from None
    known = tomllib.loads((APP_DIR / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown run-config key(s) {', '.join(unknown)} (the keys are in pyproject.toml, "
                         "[tool.flwr.app.config])")
    Settings.from_run_config({**known, **values})  # SettingsError (a ValueError) names the key
    return values


def _record_pgids(run_dir: Path, started: list) -> None:
    """The process groups this coordinator started, for a later resume to stop if this one is killed."""
    path = run_dir / COORDINATOR_FILE
    values = json.loads(path.read_text()) if path.is_file() else {}
    values["pgids"] = [p.pid for p in started]
    _save(run_dir, values)


def _on_term(signum, frame):
    raise KeyboardInterrupt  # SIGTERM/SIGHUP: the same clean stop as Ctrl-C (every process started is stopped)


def _save(run_dir: Path, values: dict) -> None:
    (run_dir / COORDINATOR_FILE).write_text(json.dumps(values, indent=2))


def _submit(home: Path, config: str, run_dir: Path, args, started: list) -> int:
    cmd = ["flwr", "run", str(APP_DIR), flwr_cli.CONNECTION, "--stream", "--run-config", config]
    if args.simulation:
        fed = f"num-supernodes={args.simulation} client-resources-num-cpus=1 {args.federation_config}".strip()
        cmd += ["--federation-config", fed]
    proc = subprocess.Popen(cmd, env=flwr_cli.flower_env(home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, cwd=run_dir, preexec_fn=set_parent_death_signal)
    started.append(proc)
    _record_pgids(run_dir, started)
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
