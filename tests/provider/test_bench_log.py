"""The benchmark counts handshakes, interpreters started on the director and runtime pids from
the provider's connection log: read here from what the real transport logs."""

from __future__ import annotations

import logging

from bench.provider import ConnectionLog
from providers import transport
from tests.provider.test_transport import director_with, private_key  # noqa: F401 (fixtures)


def test_the_connection_log_counts_what_the_transport_did(director_with, private_key, tmp_path):  # noqa: F811
    log = tmp_path / "provider.log"
    handler = logging.FileHandler(log)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    transport.log.addHandler(handler)
    old_level = transport.log.level
    transport.log.setLevel(logging.INFO)
    try:
        director, _, _ = director_with("0123456789abcdef")  # another version: upgraded
        first = transport.RuntimeSession(director, private_key)
        first.request("read")
        first.close()
        second = transport.RuntimeSession(director, private_key)
        second.request("read")
        second.close()
    finally:
        transport.log.removeHandler(handler)
        transport.log.setLevel(old_level)
        handler.close()
    conn = ConnectionLog.read(log)
    assert (conn.handshakes, conn.installs) == (2, 1)
    assert len(conn.runtime_pids) == 2 and conn.attached is not None and conn.connected is not None
