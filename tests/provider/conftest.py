"""Shared fixtures of the provider tests."""

from __future__ import annotations

import pytest

from tests.provider.grpc_client import ProviderServer


@pytest.fixture(scope="module")
def server():
    """One `python -m pulumi.dynamic` per test module, configured with no key (check and diff
    need none)."""
    srv = ProviderServer()
    srv.configure({})
    yield srv
    srv.close()
