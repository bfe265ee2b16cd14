"""The SuperLink's state database waits for a busy lock instead of failing the round (server/superlink.py).

Reproduced with Flower's own SQL state class: another connection holds the write lock for longer than the busy
timeout. With Flower's short timeout the write fails with "database is locked"; with ours it waits and succeeds."""

from __future__ import annotations

import sqlite3
import sys
import threading
import time

import pytest

from server import flwr_cli, superlink


@pytest.fixture
def restore_pragmas():
    from flwr.supercore import sql_mixin

    saved = sql_mixin.SQLITE_PRAGMAS
    yield
    sql_mixin.SQLITE_PRAGMAS = saved


def _write_while_locked(db, hold_s: float) -> tuple[Exception | None, float]:
    from flwr.supercore.object_store.sql_object_store import SqlObjectStore

    store = SqlObjectStore(str(db))
    store.initialize()
    locked = threading.Event()

    def hold():
        other = sqlite3.connect(db, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # the write lock, as a long write of another request holds it
        locked.set()
        time.sleep(hold_s)
        other.execute("COMMIT")
        other.close()

    holder = threading.Thread(target=hold)
    holder.start()
    locked.wait(10)
    start = time.monotonic()
    try:
        store.query("CREATE TABLE probe (x INTEGER)")
        error = None
    except Exception as exc:  # noqa: BLE001 - the error is the result
        error = exc
    waited = time.monotonic() - start
    holder.join()
    return error, waited


def test_a_short_busy_timeout_fails_a_write_on_a_locked_database(tmp_path, restore_pragmas):
    superlink.set_busy_timeout(300)  # Flower's 5 s, scaled down: the lock is held longer than this
    error, waited = _write_while_locked(tmp_path / "state.db", hold_s=2.0)
    assert error is not None and "database is locked" in str(error)
    assert waited < 1.9


def test_our_busy_timeout_waits_for_the_lock_and_the_write_succeeds(tmp_path, restore_pragmas):
    superlink.set_busy_timeout(30_000)
    error, waited = _write_while_locked(tmp_path / "state.db", hold_s=2.0)
    assert error is None and waited >= 1.5


def test_the_default_outlasts_flowers(restore_pragmas):
    from flwr.supercore import constant, sql_mixin

    flower = int(dict(constant.SQLITE_PRAGMAS)["busy_timeout"])
    superlink.set_busy_timeout()
    assert int(dict(sql_mixin.SQLITE_PRAGMAS)["busy_timeout"]) == superlink.BUSY_TIMEOUT_MS > 10 * flower
    # the other pragmas are Flower's
    assert {k: v for k, v in sql_mixin.SQLITE_PRAGMAS if k != "busy_timeout"} == \
        {k: v for k, v in constant.SQLITE_PRAGMAS if k != "busy_timeout"}


def test_a_superlink_with_a_database_is_started_through_the_wrapper(tmp_path):
    with_db = flwr_cli.superlink_cmd(9092, None, tmp_path / "superlink.db")
    assert with_db[:3] == [sys.executable, "-m", "server.superlink"] and "--database" in with_db
    in_memory = flwr_cli.superlink_cmd(9092, None, None, simulation=True)
    assert in_memory[0] == "flower-superlink" and "--database" not in in_memory
