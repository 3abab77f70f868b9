import uuid

import pytest

from pipeline.broker.embedded import EmbeddedBroker


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    """One real Tansu broker for the session; tests isolate themselves by topic names."""
    with EmbeddedBroker(tmp_path_factory.mktemp("broker")) as running:
        yield running


@pytest.fixture
def unique():
    return uuid.uuid4().hex[:10]
