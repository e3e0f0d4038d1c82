"""Issue 9 groundwork through the SDK's gRPC server: the `health` input is checked at preview
in one line (also when state or another program sends it), normalized (numbers arrive as
floats), a change of it alone is an update and never a replace, it is sent with applies and
recorded on the director with no kernel change, and refresh shows the recorded one.

The director is the real agent on the in-memory kernel (tests/provider/memory_director.py);
expected inputs and records are written out here.
"""

from __future__ import annotations

import json

import pytest

from tests.program.conftest import TCP_HEALTH
from tests.provider.test_repair_grpc import INPUTS, KEY, NONE, SOME, TABLE, MemoryDirectorServer

DEFAULTS = TCP_HEALTH  # the contract's defaults, written out once (tests/program/conftest.py)
HTTP = {**DEFAULTS, "fall": 3, "http": {"path": "/healthz", "expectStatus": 200}}


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


def test_check_fills_the_defaults_and_keeps_no_health_absent(server):
    assert "health" not in server.check(INPUTS)[0]  # state or a program from before it: none
    assert server.check({**INPUTS, "health": {}})[0]["health"] == DEFAULTS
    given = {"fall": 3, "http": {"path": "/healthz"}, "intervalSeconds": 1}
    assert server.check({**INPUTS, "health": given})[0]["health"] == HTTP
    udp = server.check({**INPUTS, "protocol": "udp", "health": {}})[0]["health"]
    assert udp == {**DEFAULTS, "check": "kubeProxy"}


@pytest.mark.parametrize(
    ("health", "field", "message"),
    [
        (
            {"rise": 11},
            "health.rise",
            "11.0 is not a valid count of successes that restore a drained server: use a whole"
            " number from 1 to 10",
        ),
        (
            {"intervalSeconds": 0.1},
            "health.intervalSeconds",
            "0.1 is not a probe interval: use seconds from 0.2 to 60, e.g. 1 or 0.5",
        ),
        (
            {"intervalSeconds": 0.5, "timeoutSeconds": 0.75},
            "health.timeoutSeconds",
            "0.75 is not a probe timeout: use seconds from 0.1 up to intervalSeconds (0.5)",
        ),
        (
            {"depoolThreshold": 1.5},
            "health.depoolThreshold",
            "1.5 is not a fraction: use a number from 0 to 1, the share of real servers kept"
            " in service however many fail (e.g. 0.5)",
        ),
        (
            {"http": {"path": "healthz", "expectStatus": 200}},
            "health.http.path",
            "'healthz' is not a request path: give one starting with '/', at most 200 ASCII"
            " characters, no spaces or control characters, e.g. /healthz",
        ),
        (
            {"http": {"expectStatus": 99}},
            "health.http.expectStatus",
            "99.0 is not a valid HTTP status: use a whole number from 100 to 599",
        ),
        (
            {"check": "kubeProxy", "http": {"path": "/"}},
            "health.http",
            "{'path': '/'} is set but check is 'kubeProxy': an HTTP GET needs check vip;"
            " remove http, or give http: null where check is kubeProxy or none",
        ),
        (
            {"check": "http"},
            "health.check",
            "'http' is not a health check: use vip (a connect to the VIP through IPVS),"
            " kubeProxy (the node's :10256/healthz) or none",
        ),
        (
            {"intervall": 1},
            "health.intervall",
            "unknown key 'intervall': use only check, intervalSeconds, timeoutSeconds, rise,"
            " fall, http, depoolThreshold, kubeProxyPort",
        ),
        (
            "x" * 100,
            "health",
            f"'{'x' * 36}... is not an object: give {{check, intervalSeconds, timeoutSeconds,"
            " rise, fall, http, depoolThreshold, kubeProxyPort}, each optional",
        ),
    ],
)
def test_check_refuses_a_bad_health_in_one_line(server, health, field, message):
    # Numbers arrive as floats (11.0): the message quotes the value as the provider got it.
    _, failures = server.check({**INPUTS, "health": health})
    assert failures == [(field, message)]


def test_vip_on_a_udp_port_is_refused(server):
    _, failures = server.check({**INPUTS, "protocol": "udp", "health": {"check": "vip"}})
    assert failures == [
        (
            "health.check",
            "'vip' cannot check a udp port (a TCP connect cannot test a UDP service): use"
            " kubeProxy or none, or leave check unset (vip for tcp, kubeProxy for udp)",
        )
    ]


def test_a_change_of_health_alone_is_an_update(server):
    plain = checked(server, health=DEFAULTS)
    http = checked(server, health=HTTP)
    diff = server.diff("id", {**plain, "inSync": True}, http)
    assert diff.changes == SOME and list(diff.replaces) == [] and not diff.deleteBeforeReplace
    assert server.diff("id", {**plain, "inSync": True}, plain).changes == NONE
    old_state = {k: v for k, v in plain.items() if k != "health"}  # written before the input
    diff = server.diff("id", {**old_state, "inSync": True}, plain)
    assert diff.changes == SOME and list(diff.replaces) == []
    # Numbers back from state as floats (rise 2.0) are the same health: no diff.
    floats = {**plain, "health": {**DEFAULTS, "rise": 2.0, "kubeProxyPort": 10256.0}}
    assert server.diff("id", {**floats, "inSync": True}, plain).changes == NONE


def test_a_bad_health_in_state_is_a_change_not_a_crash(server):
    plain = checked(server, health=DEFAULTS)
    junk = {**plain, "health": {"rise": "many"}, "inSync": True}
    assert server.diff("id", junk, plain).changes == SOME


def test_create_records_health_and_update_changes_only_the_record(director):
    inputs = checked(director, health=DEFAULTS)
    id_, outs = director.create(inputs)
    assert outs["health"] == DEFAULTS and outs["ipvsadm"] == TABLE and outs["inSync"] is True
    assert director.record()["health"] == DEFAULTS
    assert director.read(id_, outs) == (id_, outs)
    kernel = director.kernel()
    new = checked(director, health=HTTP)
    assert director.diff(id_, outs, new).changes == SOME
    updated = director.update(id_, outs, new)
    assert updated["health"] == HTTP and updated["inSync"] is True
    assert director.record()["health"] == HTTP and director.kernel() == kernel
    assert director.diff(id_, updated, new).changes == NONE


def test_a_record_that_lost_its_health_shows_on_refresh_and_up_records_it(director):
    inputs = checked(director, health=HTTP)
    id_, outs = director.create(inputs)
    state = json.loads((director.folder / "state.json").read_text())
    del state["services"][KEY]["health"]  # e.g. written by an older run of the stack
    (director.folder / "state.json").write_text(json.dumps(state))
    rid, live = director.read(id_, outs)
    assert rid == id_ and "health" not in live and live["ipvsadm"] == TABLE
    assert director.diff(id_, live, inputs).changes == SOME
    updated = director.update(id_, live, inputs)
    assert updated["health"] == HTTP and director.record()["health"] == HTTP


def test_a_malformed_health_in_state_blocks_neither_refresh_nor_destroy(director):
    inputs = checked(director, health=DEFAULTS)
    id_, outs = director.create(inputs)
    junk = {**outs, "health": {"rise": "many", "x": [1]}}
    rid, live = director.read(id_, junk)
    assert rid == id_ and live["health"] == DEFAULTS and live["ipvsadm"] == TABLE
    director.delete(id_, junk)
    assert KEY not in json.loads((director.folder / "state.json").read_text())["services"]
    assert director.kernel()["services"] == []


def drain_first_node(srv) -> None:
    """What the director's runtime does when 203.0.113.11 fails its probes: health.json says it
    is down, and the kernel holds it at weight 0."""
    down = {"up": False, "successes": 0, "failures": 2, "since": 1700000000.0, "reason": "HTTP 503"}
    doc = {"version": 1, "services": {KEY: {"203.0.113.11:80": down}}}
    (srv.folder / "health.json").write_text(json.dumps(doc))
    data = srv.kernel()
    for d in data["services"][0]["dests"]:
        d["weight"] = 0 if d["address"] == "203.0.113.11" else d["weight"]
    (srv.folder / "kernel.json").write_text(json.dumps(data))


def test_a_drain_is_no_diff_on_refresh_and_up_keeps_it(director):
    inputs = checked(director, health={"check": "kubeProxy"})
    id_, outs = director.create(inputs)
    drain_first_node(director)
    rid, live = director.read(id_, outs)
    assert rid == id_ and live["inSync"] is True
    assert live["realServers"] == INPUTS["realServers"]  # the configured weights: not drift
    assert live["ipvsadm"] == [TABLE[0].replace("Route 1", "Route 0"), TABLE[1]]
    got = [tuple(h[k] for k in ("address", "port", "state", "since", "reason", "weight")) for h in live["realServerHealth"]]  # fmt: skip
    assert got == [
        ("203.0.113.11", 80, "drained", "2023-11-14T22:13:20Z", "HTTP 503", 0),
        ("203.0.113.12", 80, "up", None, "", 2),
    ]
    assert director.diff(id_, live, inputs).changes == NONE
    # An update for another reason (fall 3) keeps the drain: the kernel's weight stays 0.
    changed = checked(director, health={"check": "kubeProxy", "fall": 3})
    assert director.diff(id_, live, changed).changes == SOME
    updated = director.update(id_, live, changed)
    weights = [(d["address"], d["weight"]) for d in director.kernel()["services"][0]["dests"]]
    assert sorted(weights) == [("203.0.113.11", 0), ("203.0.113.12", 2)]
    assert updated["inSync"] is True and updated["realServers"] == INPUTS["realServers"]
    # Without health's state (no runtime: an old director), the configured weights come back.
    (director.folder / "health.json").unlink()
    updated = director.update(id_, updated, checked(director, health={"check": "kubeProxy"}))
    assert updated["ipvsadm"] == TABLE and updated["realServerHealth"] == []
