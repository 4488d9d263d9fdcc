"""Fixtures, and the test Hub (tests/hub_server.py), which must be set up before anything imports huggingface_hub."""

from __future__ import annotations

from hub_server import FakeHub, clear_client_cache, serve_for_session

HUB = serve_for_session()  # before the imports below: transformers and peft import huggingface_hub

import pytest
from helpers import TokenDataset, tiny_llama
from transformers.utils import logging


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def tokens():
    return TokenDataset()


@pytest.fixture
def hub() -> FakeHub:
    """The session's test Hub, empty, with an empty huggingface_hub cache: every Hub test starts from nothing."""
    HUB.reset()
    clear_client_cache()
    return HUB


@pytest.fixture
def warnings_log(caplog):
    """The transformers logger's warnings, which it does not propagate to pytest by default."""
    logging.enable_propagation()
    with caplog.at_level("WARNING"):
        yield caplog
    logging.disable_propagation()
