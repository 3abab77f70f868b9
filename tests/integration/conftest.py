import uuid

import pytest

from pipeline.broker.embedded import EmbeddedBroker
from pipeline.sinks.clickhouse import connect


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    """One real Tansu broker for the session; tests isolate themselves by topic names."""
    with EmbeddedBroker(tmp_path_factory.mktemp("broker")) as running:
        yield running


@pytest.fixture
def unique():
    return uuid.uuid4().hex[:10]


@pytest.fixture(scope="session")
def chdb_dsn(tmp_path_factory):
    """The one chDB data path of this test process.

    chDB runs ClickHouse in-process and a process can hold only one data path ("EmbeddedServer
    already initialized with path ..."), so every in-process chDB test uses this DSN and isolates
    itself by database name (e.g. ``f"t_{unique}"``).
    """
    return f"chdb://{tmp_path_factory.mktemp('chdb')}"


@pytest.fixture(scope="session")
def chdb_client(chdb_dsn):
    """The shared clickhouse-connect client on ``chdb_dsn`` (the same one ``connect`` hands out)."""
    return connect(chdb_dsn)
