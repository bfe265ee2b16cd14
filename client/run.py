"""Start this site's SuperNode: ``python -m client.run --data /site/tiles --superlink HOST:PORT [options]``.

``--slides /site/slides`` instead of ``--data`` tiles the site's whole-slide images into ``<work>/tiles`` first
(``histodiff.data.slide_tiling``; a restart keeps the finished slides). The tile folder is checked first (a bad
folder fails with the loader's one-line report); then ``flower-supernode``
runs as a child with the site's data path, name, role and work directory in its node config:

* only the trusted app runs: a ``flwr-clientapp`` shim first on the SuperNode's PATH checks every FAB before it is
  installed (``client.trusted_clientapp``; the app digest of this checkout, or the ones ``--trusted-app FILE`` pins);
* the site comes back: a SuperNode that exits because it could not connect or activate (code 305, e.g. restarted
  within its heartbeat window) is restarted with backoff; ``--give-up-after`` seconds without a connection end
  ``client.run`` with a one-line error naming the address and why it fails; SIGINT/SIGTERM stop the SuperNode.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

log = logging.getLogger("histodiff.client")


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m client.run", description=__doc__)
    p.add_argument("--data", default=None, help="this site's tile folder (or --slides)")
    p.add_argument("--slides", default=None, metavar="DIR",
                   help="this site's whole-slide images instead of --data: tiled into <work>/tiles first (256 px at "
                        "0.5 um/px, tissue only; finished slides are kept; see python -m histodiff.slides)")
    p.add_argument("--slide-labels", default=None, metavar="CSV",
                   help="with --slides on a labeled site: 'slide,class' CSV; the tiles go to class folders")
    p.add_argument("--superlink", required=True, help="SuperLink address HOST:PORT")
    p.add_argument("--site", default=None, help="site name (default: the data folder's name)")
    p.add_argument("--role", choices=("unlabeled", "labeled"), default="unlabeled")
    p.add_argument("--work", default=None, help="work directory (default: <data>/../<site>-work)")
    p.add_argument("--test-data", default=None, help="labeled sites: held-out test tiles")
    p.add_argument("--root-certificates", default=None, help="CA certificate that signed the SuperLink's certificate")
    p.add_argument("--auth-key", default=None, help="this site's registered ECDSA private key (OpenSSH)")
    p.add_argument("--insecure", action="store_true", help="no TLS and no node authentication (tests only)")
    p.add_argument("--port", type=int, default=None, help="local ClientAppIo port (one per SuperNode on a host)")
    p.add_argument("--profile", default="tiny", help="config profile used to check the tiles")
    p.add_argument("--overrides", default="", help="extra config overrides for the data check")
    p.add_argument("--trusted-app", default=None, metavar="FILE",
                   help="file pinning the app digest(s) this site runs, one a line (default: the digest of this "
                        "checkout; `python -m client.trusted_clientapp digest` prints it)")
    p.add_argument("--give-up-after", type=float, default=600.0, metavar="SECONDS",
                   help="stop when the SuperNode has not been connected for this long (default 600)")
    return p.parse_args(argv)


def check_args(args) -> str | None:
    """What is wrong with the command line, in one line, before anything starts (None when it is usable).

    Files named by options must exist, ``--overrides`` must parse as shell words, and the profile with its
    overrides must compose; the tile folder itself is checked by ``check_data``.
    """
    from histodiff.config import ConfigError, compose

    if (args.data is None) == (args.slides is None):
        return "pass either --data TILE_FOLDER or --slides SLIDE_FOLDER" + (" (not both)" if args.data else "")
    if args.slide_labels and not args.slides:
        return "--slide-labels goes with --slides (tiles in --data take their labels from class folders)"
    if args.slides and args.role == "labeled" and not args.slide_labels:
        return "--role labeled with --slides needs --slide-labels CSV ('slide,class') to put the tiles in classes"
    for option, value, kind in (("--data", args.data, "dir"), ("--slides", args.slides, "dir"),
                                ("--slide-labels", args.slide_labels, "file"), ("--test-data", args.test_data, "dir"),
                                ("--root-certificates", args.root_certificates, "file"),
                                ("--auth-key", args.auth_key, "file")):
        if value is None or (args.insecure and option in ("--root-certificates", "--auth-key")):
            continue
        path = Path(value).expanduser()
        if not path.exists():
            return f"{option} {value} does not exist"
        if kind == "file" and not path.is_file():
            return f"{option} {value} is not a file"
        if kind == "dir" and not path.is_dir():
            return f"{option} {value} is not a folder"
    try:
        overrides = shlex.split(args.overrides)
    except ValueError as exc:
        return f"--overrides {args.overrides!r} does not parse ({exc})"
    bad = [o for o in overrides if "=" not in o]
    if bad:
        return f"--overrides takes key=value words, got {bad[0]!r}"
    try:
        compose([f"profile={args.profile}", *overrides])
    except ConfigError as exc:
        if os.environ.get("HISTODIFF_DEBUG"):
            raise
        return f"--profile/--overrides: {exc}"
    return None


def prepare_slides(args, work: Path) -> str | None:
    """``--slides``: tile them into ``<work>/tiles`` and make that ``args.data``; ``--data`` holding slides but no
    tiles: say how to tile them. The problem in one line, or None."""
    from histodiff.data.slide_sources import slide_files_without_tiles
    from histodiff.data.slide_tiling import TilingParams, describe, tile_slides

    if args.slides is None:
        slides = slide_files_without_tiles(args.data)
        if not slides:
            return None
        return (f"--data {args.data} holds {len(slides)} whole-slide image(s) ({slides[0].name}) but no tiles: tile "
                f"them first (python -m histodiff.slides --slides {args.data} --out TILES, then --data TILES), or "
                f"pass --slides {args.data}")
    tiles = work / "tiles"
    log.info("tiling the slides in %s into %s (finished slides are kept)", args.slides, tiles)
    summary = tile_slides(args.slides, tiles, TilingParams(), labels_csv=args.slide_labels, progress=False)
    if not summary.with_tiles:
        first = summary.skipped[0]
        return f"none of the {len(summary.results)} slide(s) in {args.slides} gave tiles (first: " \
               f"{describe(first.slide)}: {first.reason})"
    args.data = str(tiles)
    return None


def check_data(args, work: Path) -> int:
    """The number of usable tiles (InputError / ConfigError in one line), counted in a child process: reading the
    config and the tiles loads torch (~0.5 GB), which this launcher, alive for the whole federation, need not keep."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_count_tiles, args.profile, args.overrides, args.data, str(work)).result()


def _count_tiles(profile: str, overrides: str, data: str, work: str) -> int:
    from histodiff.config import compose
    from histodiff.data.tile_dataset import tile_dataset_from_config

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = compose([f"profile={profile}", *shlex.split(overrides), f"data={data}", f"work_dir={work}"])
    return len(tile_dataset_from_config(cfg, train=False))


def supernode_cmd(args, work: Path, site: str) -> list[str]:
    node_config = f'data-path="{Path(args.data).resolve()}" site-name="{site}" role="{args.role}" work-dir="{work}"'
    if args.test_data:
        node_config += f' test-path="{Path(args.test_data).resolve()}"'
    cmd = ["flower-supernode", "--superlink", args.superlink, "--node-config", node_config]
    if args.port:
        cmd += ["--port", str(args.port)]
    if args.insecure:
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", str(Path(args.root_certificates).resolve())]
        if args.auth_key:
            cmd += ["--auth-supernode-private-key", str(Path(args.auth_key).resolve())]
    return cmd


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse(sys.argv[1:] if argv is None else argv)
    problem = check_args(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    from histodiff.config import ConfigError
    from histodiff.errors import InputError

    source = Path(args.data or args.slides).resolve()
    site = args.site or source.name
    work = Path(args.work or source.parent / f"{site}-work").resolve()
    if args.insecure:
        log.warning("--insecure: no TLS and no node authentication; model weights travel in the clear")
    elif not args.root_certificates:
        print("error: pass --root-certificates CA.crt (or --insecure for a local test)", file=sys.stderr)
        return 2
    try:
        problem = prepare_slides(args, work)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
        n = check_data(args, work)
    except (InputError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log.info("site %s (%s): %d tiles in %s; work dir %s", site, args.role, n, args.data, work)
    try:
        trusted, source = trusted_digests(args)
    except (OSError, ValueError) as exc:
        print(f"error: app trust: {exc}", file=sys.stderr)
        return 2
    log.info("app trust: this site runs only apps with digest %s (%s)", ", ".join(trusted), source)
    from client.trusted_clientapp import write_shim
    from wire.flower_env import flower_env

    shim_dir = Path(tempfile.mkdtemp(prefix="histodiff-trust-"))
    try:
        write_shim(shim_dir, trusted)
        env = flower_env()
        env["PATH"] = str(shim_dir) + os.pathsep + env["PATH"]  # Flower's SuperExec starts `flwr-clientapp` by name
        return supervise(supernode_cmd(args, work, site), env, args.superlink, args.give_up_after)
    finally:
        shutil.rmtree(shim_dir, ignore_errors=True)


def trusted_digests(args) -> tuple[list[str], str]:
    """The app digests this site runs, and where they come from (``--trusted-app`` or this checkout)."""
    from client.trusted_clientapp import PROJECT_ROOT, local_digest, read_pinned

    if args.trusted_app:
        return read_pinned(Path(args.trusted_app).expanduser()), f"pinned in {args.trusted_app}"
    try:
        return [local_digest(PROJECT_ROOT)], f"this site's copy of the app at {PROJECT_ROOT}"
    except FileNotFoundError as exc:
        raise ValueError(f"{exc}; pin the coordinator's app digest with --trusted-app FILE") from None


RETRYABLE = {305}  # flower-supernode: could not connect to the SuperLink or activate this node
CONNECTED_MARK = "SuperNode ID:"  # what flower-supernode logs once the SuperLink has activated it
_EXIT_CODE = re.compile(r"\bExit Code: (\d+)\b")  # Flower's own code in its exit message (the process exits 1)
ATTEMPT_S = 60.0  # one SuperNode's connection attempts (--max-wait-time); client.run retries after that


def superlink_reason(address: str, timeout: float = 3.0) -> str:
    """Why ``address`` may be unreachable, from one TCP connection attempt."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except ValueError:
        return f"{address!r} is not HOST:PORT"
    except socket.gaierror as exc:
        return f"host {host!r} does not resolve ({exc.strerror})"
    except ConnectionRefusedError:
        return "connection refused: nothing listens on that port"
    except (socket.timeout, TimeoutError):
        return f"no answer within {timeout:.0f} s (wrong host, or a firewall drops the packets)"
    except OSError as exc:
        return exc.strerror or str(exc)
    return "the port answers, but the SuperLink did not accept this node"


class _Child:
    """One flower-supernode: its output echoed line by line, whether it got connected, its last error line."""

    def __init__(self, cmd: list[str], env: dict):
        self.connected = threading.Event()
        self.last_error, self.flower_code = "", None
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     errors="replace", bufsize=1)
        self.reader = threading.Thread(target=self._echo, daemon=True)
        self.reader.start()

    def _echo(self):
        for line in self.proc.stdout:
            sys.stderr.write(line)
            sys.stderr.flush()
            if CONNECTED_MARK in line:
                self.connected.set()
            text = line.strip()
            code = _EXIT_CODE.search(text)
            if code:
                self.flower_code = int(code.group(1))
            if text and "retrying" not in text and any(w in text.lower() for w in ("error", "fail", "refused", "unavail")):
                self.last_error = text[:300]

    def stop(self, grace: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.reader.join(1)  # the SuperExec it started may hold the pipe a moment longer
        # Flower exits 1 on any error and logs its own code ("Exit Code: 305"): that one tells what happened
        return self.flower_code if self.flower_code is not None and self.proc.returncode > 0 else self.proc.returncode


class _Stop(Exception):
    pass


def supervise(cmd: list[str], env: dict, superlink: str, give_up_after: float) -> int:
    """Run the SuperNode ``cmd`` until it exits for good: restart it with backoff after a connection/activation
    failure, give up after ``give_up_after`` s without a connection; SIGINT/SIGTERM stop it (exit 0)."""
    def on_signal(signum, _frame):
        raise _Stop(signal.Signals(signum).name)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    child, attempt = None, 0
    down_since = time.monotonic()  # the SuperNode has not been connected since then
    try:
        while True:
            left = give_up_after - (time.monotonic() - down_since)
            attempt += 1
            log.info("SuperNode: connecting to the SuperLink at %s (attempt %d; giving up in %.0f s)",
                     superlink, attempt, max(left, 0))
            child, cut_off = _Child(cmd + ["--max-wait-time", f"{max(1.0, min(ATTEMPT_S, left)):.0f}"], env), False
            while child.proc.poll() is None:
                if child.connected.is_set() and down_since is not None:
                    log.info("SuperNode: connected to %s", superlink)
                    down_since, attempt = None, 0
                if down_since is not None and time.monotonic() - down_since > give_up_after + 15:
                    cut_off = True  # Flower's own bound did not end it: ours does
                    break
                time.sleep(0.2)
            code = child.stop()
            if code == 0:
                return 0
            was_connected = down_since is None
            if was_connected:  # the outage starts now
                down_since = time.monotonic()
            if code >= 0 and code not in RETRYABLE and not cut_off:
                if child.flower_code in (1, 2, 3):  # Flower's graceful exits on a signal it got directly
                    return 0
                print(f"error: flower-supernode exited with code {code}: {child.last_error or 'see above'}",
                      file=sys.stderr)
                return code
            reason = superlink_reason(superlink)
            if code < 0 and not cut_off:
                reason = f"it was killed by {signal.Signals(-code).name}; the SuperLink: {reason}"
            elif "activate" in child.last_error.lower():
                reason = ("the SuperLink refused to activate this node (its previous session may still be within "
                          "its heartbeat window, or its key is not registered)")
            waited = time.monotonic() - down_since
            if waited >= give_up_after:
                detail = f"; last SuperNode error: {child.last_error}" if child.last_error else ""
                print(f"error: gave up after {waited:.0f} s: cannot join the SuperLink at {superlink}: "
                      f"{reason}{detail}", file=sys.stderr)
                return 1
            pause = min(2.0 ** min(attempt, 5), 30.0, max(give_up_after - waited, 0.5))
            log.warning("SuperNode exited (code %s) %s %s: %s%s; waiting %.0f s for the SuperLink to accept this "
                        "site, then restarting it (giving up in %.0f s)", code,
                        "after losing its connection to" if was_connected else "without joining", superlink, reason,
                        f" [{child.last_error}]" if child.last_error else "", pause, give_up_after - waited)
            time.sleep(pause)
    except _Stop as stop:
        log.info("%s: stopping the SuperNode", stop)
        if child is not None:
            child.stop()
        return 0
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


if __name__ == "__main__":
    sys.exit(main())
