"""``python -m server.superlink [flower-superlink options]``: Flower's SuperLink, with its state database waiting
longer for a busy lock.

With ``--database FILE`` (what ``python -m server.run`` and the Kubernetes SuperLink Deployment start, so that
registered sites and runs survive a restart) the SuperLink keeps its state and every message object in SQLite.
Flower 1.42 opens each connection with ``busy_timeout = 5000``: a write that finds the database locked for more than
5 s fails with ``sqlite3.OperationalError: database is locked``. On a loaded machine, while the SuperLink stores a
large model's objects for several sites at once, 5 s is not enough: the paper-size round benchmark's first check
run failed this way (docs/benchmarks.md). The fix is to wait longer rather than fail the round. Everything else is
Flower's own ``flower-superlink``, unchanged; without ``--database`` (the in-memory state of simulations) there is
one connection and no lock to wait for, and ``server.flwr_cli.superlink_cmd`` starts plain ``flower-superlink``.
"""

from __future__ import annotations

import sys

# a write waits up to this long for another connection's lock before SQLite gives up (Flower's default: 5 s)
BUSY_TIMEOUT_MS = 120_000


def set_busy_timeout(ms: int = BUSY_TIMEOUT_MS) -> None:
    """Make every SQLite connection Flower's SQL states open from now on wait ``ms`` for a lock. Raises
    ``RuntimeError`` (one line) when the installed Flower no longer sets its pragmas where 1.42 does."""
    from flwr.supercore import sql_mixin

    pragmas = getattr(sql_mixin, "SQLITE_PRAGMAS", None)
    if not pragmas or "busy_timeout" not in dict(pragmas):
        raise RuntimeError("flwr.supercore.sql_mixin.SQLITE_PRAGMAS has no busy_timeout: this Flower sets its SQLite "
                           "pragmas elsewhere than 1.42 does; update server/superlink.py")
    sql_mixin.SQLITE_PRAGMAS = tuple((name, str(int(ms)) if name == "busy_timeout" else value)
                                     for name, value in pragmas)


def main() -> None:
    set_busy_timeout()
    from flwr.superlink.cli.flower_superlink import flower_superlink

    sys.argv[0] = "flower-superlink"  # Flower's own usage and log lines
    flower_superlink()


if __name__ == "__main__":
    main()
