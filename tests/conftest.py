"""Fixtures shared by several test dirs: a private mongod for FiftyOne (inspect, notebooks), and
the benchmark scripts as modules."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

from sskd.inspect import database


@pytest.fixture(scope="session")
def mongod():
    """A private mongod for the whole session; FiftyOne is pointed at it before import."""
    handle = database.start_mongod()
    # A bounded server-selection time keeps any late client (e.g. FiftyOne's atexit cleanup)
    # from waiting 30 s once the server is gone.
    uri = f"{handle.uri}/?serverSelectionTimeoutMS=2000"
    old = os.environ.get(database.URI_ENV)
    os.environ[database.URI_ENV] = uri
    if "fiftyone" in sys.modules:  # imported by another test dir: redirect before connecting
        sys.modules["fiftyone"].config.database_uri = uri
    try:
        yield handle
    finally:
        if "fiftyone.core.odm.database" in sys.modules:
            import fiftyone.core.odm.database as fodb
            fodb._disconnect()  # close pooled connections before the server goes away
        database.stop(handle)
        if old is None:
            os.environ.pop(database.URI_ENV, None)
        else:
            os.environ[database.URI_ENV] = old


@pytest.fixture(scope="session")
def load_benchmark():
    """``load_benchmark("seed_noise")``: ``benchmarks/seed_noise.py`` imported as a module (the
    scripts are not a package)."""
    root = Path(__file__).resolve().parents[1] / "benchmarks"

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, root / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    return load
