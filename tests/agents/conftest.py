import pytest

from tests.agents.harness import agent_settings


@pytest.fixture
def settings(tmp_path):
    """A profile stage driven by the test: memory store, event clock, one record per batch."""
    return agent_settings(tmp_path)
