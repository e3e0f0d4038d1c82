"""Issue 8 through the SDK's gRPC server: the `repair` input (checked at preview, an update
and never a replace, recorded on the director with no kernel change) and `read` returning the
recorded desired table next to the live one, so a refresh of a stack with repair off shows
the drift and `up` converges, with no diff left once in sync.

The director is the real agent on the in-memory kernel (tests/provider/memory_director.py);
expected tables and records are written out here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from pulumi.dynamic.dynamic import serialize_provider
from pulumi.runtime.proto import provider_pb2, provider_pb2_grpc

from providers.virtual_service import VirtualServiceProvider
from tests.provider.grpc_client import REPO, ProviderServer
from tests.provider.test_grpc_pure import HOST_KEY

VIP = "203.0.113.201"
KEY = f"tcp/{VIP}:80"
OWNER = "ipvs-ingress/test"
INPUTS = {
    "director": {"host": "203.0.113.2", "hostKey": HOST_KEY},
    "vip": VIP,
    "port": 80,
    "realServers": [
        {"address": "203.0.113.11", "weight": 1},
        {"address": "203.0.113.12", "weight": 2},
    ],
    "owner": OWNER,
}
TABLE = [
    f"TCP {VIP}:80 wlc -> 203.0.113.11:80 Route 1",
    f"TCP {VIP}:80 wlc -> 203.0.113.12:80 Route 2",
]
NONE, SOME = provider_pb2.DiffResponse.DIFF_NONE, provider_pb2.DiffResponse.DIFF_SOME


class MemoryDirectorServer(ProviderServer):
    """ProviderServer whose director is tests/provider/memory_director.py in `folder`."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.proc = subprocess.Popen(
            [sys.executable, "-u", "-m", "tests.provider.memory_director", str(folder)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        port = int(self.proc.stdout.readline())
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = provider_pb2_grpc.ResourceProviderStub(self.channel)
        self.serialized = serialize_provider(VirtualServiceProvider())

    def record(self) -> dict:
        return json.loads((self.folder / "state.json").read_text())["services"][KEY]

    def kernel(self) -> dict:
        return json.loads((self.folder / "kernel.json").read_text())

    def drop_dest(self, address: str) -> None:
        """Out of band, as `ipvsadm -d` would: the runtime is the one to repair it, or not."""
        data = self.kernel()
        (svc,) = data["services"]
        svc["dests"] = [d for d in svc["dests"] if d["address"] != address]
        (self.folder / "kernel.json").write_text(json.dumps(data))


@pytest.fixture
def director(tmp_path):
    srv = MemoryDirectorServer(tmp_path)
    srv.configure({"ipvs-ingress:sshPrivateKey": "unused: no SSH here"})
    yield srv
    srv.close()


def checked(srv, **changes) -> dict:
    inputs, failures = srv.check({**INPUTS, **changes})
    assert failures == []
    return inputs


def test_check_takes_repair_true_by_default_and_refuses_a_non_boolean(server):
    assert server.check(INPUTS)[0]["repair"] is True
    assert server.check({**INPUTS, "repair": False})[0]["repair"] is False
    _, failures = server.check({**INPUTS, "repair": "no"})
    assert failures == [
        (
            "repair",
            "'no' is not true or false: set the stack config ipvs-ingress:repair to true or"
            " false (the Ingress component passes it on)",
        )
    ]


def test_a_change_of_repair_alone_is_an_update_and_state_without_it_means_true(server):
    on = server.check(INPUTS)[0]
    off = server.check({**INPUTS, "repair": False})[0]
    diff = server.diff("id", {**on, "inSync": True}, off)
    assert diff.changes == SOME and list(diff.replaces) == [] and not diff.deleteBeforeReplace
    old_state = {k: v for k, v in on.items() if k != "repair"}  # written before the input
    assert server.diff("id", {**old_state, "inSync": True}, on).changes == NONE
    assert server.diff("id", {**old_state, "inSync": True}, off).changes == SOME


def test_refresh_of_a_stack_with_repair_off_shows_drift_and_up_converges(director):
    inputs = checked(director, repair=False)
    id_, outs = director.create(inputs)
    assert (outs["repair"], outs["desired"], outs["ipvsadm"], outs["inSync"]) == (
        False,
        TABLE,
        TABLE,
        True,
    )
    assert director.record()["repair"] is False
    # In sync: a refresh returns what create did, and the next up has nothing to do.
    rid, live = director.read(id_, outs)
    assert (rid, live) == (id_, outs)
    assert director.diff(id_, live, inputs).changes == NONE
    director.drop_dest("203.0.113.11")  # nobody repairs it: this stack's repair is off
    rid, live = director.read(id_, outs)
    assert rid == id_ and live["desired"] == TABLE and live["ipvsadm"] == TABLE[1:]
    assert live["inSync"] is False and live["realServers"] == [
        {"address": "203.0.113.12", "weight": 2}
    ]
    diff = director.diff(id_, live, inputs)
    assert diff.changes == SOME and list(diff.replaces) == []
    updated = director.update(id_, live, inputs)
    assert (updated["ipvsadm"], updated["desired"], updated["inSync"]) == (TABLE, TABLE, True)
    assert director.read(id_, updated) == (id_, updated)
    assert director.diff(id_, updated, inputs).changes == NONE


def test_turning_repair_on_is_an_update_that_changes_the_record_only(director):
    id_, outs = director.create(checked(director, repair=False))
    kernel = director.kernel()
    on = checked(director)
    diff = director.diff(id_, outs, on)
    assert diff.changes == SOME and list(diff.replaces) == []
    updated = director.update(id_, outs, on)
    assert updated["repair"] is True and updated["inSync"] is True
    assert director.record()["repair"] is True and director.kernel() == kernel
    assert director.diff(id_, updated, on).changes == NONE


def test_a_record_changed_on_the_director_shows_on_refresh_and_up_rewrites_it(director):
    inputs = checked(director)
    id_, outs = director.create(inputs)
    state = json.loads((director.folder / "state.json").read_text())
    entry = state["services"][KEY]
    entry["repair"] = False  # e.g. written by the stack's run with repair off, then reverted
    entry["spec"]["realServers"] = entry["spec"]["realServers"][:1]
    (director.folder / "state.json").write_text(json.dumps(state))
    rid, live = director.read(id_, outs)
    assert rid == id_ and live["ipvsadm"] == TABLE and live["desired"] == TABLE[:1]
    assert (live["repair"], live["inSync"]) == (False, False)
    assert director.diff(id_, live, inputs).changes == SOME
    updated = director.update(id_, live, inputs)
    assert (updated["desired"], updated["repair"], updated["inSync"]) == (TABLE, True, True)
    assert director.record()["spec"]["realServers"] == INPUTS["realServers"]


@pytest.mark.parametrize("record", ["lost", "pending"])
def test_a_lost_or_pending_record_is_drift_that_up_records_again(director, record):
    # Lost: refresh re-adopts the service with no spec, which the runtime cannot keep. Pending:
    # an apply was cut, the runtime leaves it alone. Either way the next up must record it.
    inputs = checked(director)
    id_, outs = director.create(inputs)
    state_path = director.folder / "state.json"
    if record == "lost":
        state_path.unlink()
    else:
        state = json.loads(state_path.read_text())
        state["services"][KEY]["state"] = "pending"
        state_path.write_text(json.dumps(state))
    rid, live = director.read(id_, outs)
    assert rid == id_ and live["ipvsadm"] == TABLE and live["inSync"] is False
    assert live["desired"] == ([] if record == "lost" else TABLE)
    assert director.diff(id_, live, inputs).changes == SOME
    updated = director.update(id_, live, inputs)
    assert (updated["desired"], updated["inSync"]) == (TABLE, True)
    assert director.record()["state"] == "applied" and director.record()["spec"]["port"] == 80
