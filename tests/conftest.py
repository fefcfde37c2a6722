"""Shared fixtures: one real two-engine cluster for the whole session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("IPYLB_PROGRESS", "0")


@pytest.fixture(scope="session")
def rc():
    """A private cluster of two real engine kernels, started through jupyter_client."""
    import ipylb

    client = ipylb.Client(engines=2)
    yield client
    client.shutdown()


@pytest.fixture
def view(rc):
    """A fresh load-balanced view (flags at their defaults)."""
    return rc.load_balanced_view()
