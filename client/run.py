"""Start this site's SuperNode: ``python -m client.run --data /site/tiles --superlink HOST:PORT [options]``.

The tile folder is checked first (a bad folder fails with the loader's one-line report); then the process
becomes ``flower-supernode`` with the site's data path, name, role and work directory in its node config.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path

log = logging.getLogger("histodiff.client")


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m client.run", description=__doc__)
    p.add_argument("--data", required=True, help="this site's tile folder")
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
    return p.parse_args(argv)


def check_data(args, work: Path) -> int:
    from histodiff.config import compose
    from histodiff.data.tiles import tile_dataset_from_config

    cfg = compose([f"profile={args.profile}", *shlex.split(args.overrides), f"data={args.data}", f"work_dir={work}"])
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
    from histodiff.errors import InputError

    site = args.site or Path(args.data).resolve().name
    work = Path(args.work or Path(args.data).resolve().parent / f"{site}-work").resolve()
    if args.insecure:
        log.warning("--insecure: no TLS and no node authentication; model weights travel in the clear")
    elif not args.root_certificates:
        print("error: pass --root-certificates CA.crt (or --insecure for a local test)", file=sys.stderr)
        return 2
    try:
        n = check_data(args, work)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log.info("site %s (%s): %d tiles in %s; work dir %s", site, args.role, n, args.data, work)
    from wire.flower_env import flower_env

    cmd = supernode_cmd(args, work, site)
    os.execvpe(cmd[0], cmd, flower_env())  # this process becomes the SuperNode (signals reach it directly)


if __name__ == "__main__":
    sys.exit(main())
