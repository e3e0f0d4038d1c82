"""Issue 10 through the SDK's gRPC server: the `vrrp` input (a director's part in the VRRP group
holding the VIP) is checked at preview in one line naming the field (numbers arrive as floats,
an unknown one waits), normalized, an update and never a replace (so a one-director stack gains
a second director without replacing the first one's services), sent with every request to the
director, and the `vipHeld` output says whether this director held the VIP; a director that
does not hold it (the other one does) is in sync.

The director is the real agent on the in-memory kernel (tests/provider/memory_director.py);
expected values are written out here.
"""

from __future__ import annotations

import json

import pytest

from components.config import load
from components.ingress import service_props
from providers import model
from providers import virtual_service as vs
from tests.program.conftest import HOST_KEY as PROGRAM_HOST_KEY
from tests.provider.test_repair_grpc import INPUTS, NONE, SOME, TABLE, MemoryDirectorServer
from tests.provider.test_unknowns import UNKNOWN

VIP = INPUTS["vip"]
VRRP = {"priority": 150, "address": "203.0.113.2", "peers": ["203.0.113.4", "203.0.113.3"]}
NORMALIZED = {
    "virtualRouterId": 51,
    "priority": 150,
    "address": "203.0.113.2",
    "peers": ["203.0.113.3", "203.0.113.4"],
    "advertSeconds": 0.1,
}


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


def requests(srv) -> list[dict]:
    lines = (srv.folder / "requests.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def vip_on_director(srv) -> bool:
    return any(vip == VIP for _index, vip in srv.kernel()["addresses"])


def test_check_normalizes_vrrp_and_leaves_it_absent_for_one_director(server):
    assert "vrrp" not in server.check(INPUTS)[0]
    given = {**VRRP, "virtualRouterId": 51.0, "priority": 150.0}  # as the engine sends numbers
    assert server.check({**INPUTS, "vrrp": given})[0]["vrrp"] == NORMALIZED
    delayed = {**VRRP, "advertSeconds": 0.05, "preemptDelaySeconds": 30.0}
    assert server.check({**INPUTS, "vrrp": delayed})[0]["vrrp"] == {
        **NORMALIZED,
        "advertSeconds": 0.05,
        "preemptDelaySeconds": 30,
    }


@pytest.mark.parametrize(
    ("change", "field", "start"),
    [
        (
            {"virtualRouterId": 0},
            "vrrp.virtualRouterId",
            "0.0 is not a valid VRRP virtual router id",
        ),  # fmt: skip
        ({"priority": 255}, "vrrp.priority", "255.0 is not a valid VRRP priority"),
        ({"priority": None}, "vrrp.priority", "missing: give this director's VRRP priority"),
        (
            {"address": "lb-a"},
            "vrrp.address",
            "'lb-a' is not an IP address: give the director address",
        ),
        ({"address": VIP}, "vrrp.address", f"'{VIP}' is the VIP: a VIP moves between directors"),
        ({"peers": []}, "vrrp.peers", "[] names no peer: give the other directors' addresses"),
        (
            {"peers": ["203.0.113.2"]},
            "vrrp.peers[0]",
            "'203.0.113.2' is this director's own address",
        ),  # fmt: skip
        (
            {"peers": ["2001:db8::3"]},
            "vrrp.peers[0]",
            "'2001:db8::3' is IPv6 but this director's address is IPv4",
        ),  # fmt: skip
        ({"advertSeconds": 0.001}, "vrrp.advertSeconds", "0.001 is not a VRRPv3 advert interval"),
        ({"advertSeconds": 41}, "vrrp.advertSeconds", "41.0 is not a VRRPv3 advert interval"),
        (
            {"preemptDelaySeconds": 1001},
            "vrrp.preemptDelaySeconds",
            "1001.0 is not a valid preempt delay in seconds",
        ),  # fmt: skip
        ({"prio": 3}, "vrrp.prio", "unknown key 'prio': use only virtualRouterId, priority"),
    ],
)
def test_each_vrrp_problem_is_one_line_naming_the_field(server, change, field, start):
    value = {k: v for k, v in {**VRRP, **change}.items() if v is not None}
    _, failures = server.check({**INPUTS, "vrrp": value})
    assert [f for f, _ in failures] == [field]
    (reason,) = [r for _, r in failures]
    assert reason.startswith(start) and "\n" not in reason and len(reason) <= vs.MAX_REASON


def test_vrrp_that_is_not_an_object_is_one_line(server):
    _, failures = server.check({**INPUTS, "vrrp": "keepalived"})
    assert failures == [
        (
            "vrrp",
            "'keepalived' is not an object: give {virtualRouterId, priority, address, peers,"
            " advertSeconds, preemptDelaySeconds}",
        )
    ]


@pytest.mark.parametrize(
    "unknown",
    [
        lambda v: UNKNOWN,
        lambda v: {**v, "priority": UNKNOWN},
        lambda v: {**v, "peers": [UNKNOWN]},
        lambda v: {**v, "address": UNKNOWN},
    ],
    ids=["whole", "priority", "a-peer", "address"],
)
def test_an_unknown_vrrp_waits_and_is_an_update(server, unknown):
    news = {**INPUTS, "vrrp": unknown(VRRP)}
    inputs, failures = server.check(news)
    assert (inputs, failures) == (news, [])
    old = {**checked(server, vrrp=VRRP), "inSync": True}
    diff = server.diff("id", old, news)
    assert diff.changes == SOME and list(diff.replaces) == []


def test_adding_or_changing_vrrp_is_an_update_never_a_replace(server):
    alone = {**checked(server), "inSync": True}
    paired = checked(server, vrrp=VRRP)
    diff = server.diff("id", alone, paired)
    assert diff.changes == SOME and list(diff.replaces) == [] and not diff.deleteBeforeReplace
    lower = checked(server, vrrp={**VRRP, "priority": 90})
    diff = server.diff("id", {**paired, "inSync": True}, lower)
    assert diff.changes == SOME and list(diff.replaces) == []
    assert server.diff("id", {**paired, "inSync": True}, paired).changes == NONE
    # Back to one director: an update too.
    diff = server.diff("id", {**paired, "inSync": True}, checked(server))
    assert diff.changes == SOME and list(diff.replaces) == []


def test_the_program_turning_director_into_directors_is_an_update_of_the_first_ones(server):
    """The program's own inputs, before and after `director: X` becomes `directors: [X, Y]`."""
    base = {
        "vips": [{"address": VIP, "ports": [{"port": 80}]}],
        "realServers": [{"address": "203.0.113.11"}],
    }
    x = {"host": "203.0.113.2", "hostKey": PROGRAM_HOST_KEY}
    y = {"host": "203.0.113.3", "hostKey": PROGRAM_HOST_KEY, "priority": 100}
    ((name, _d, before),) = service_props(load({**base, "director": x}), "ipvs-ingress/dev")
    pair = load({**base, "directors": [{**x, "priority": 150}, y]})
    after = {n: p for n, _d, p in service_props(pair, "ipvs-ingress/dev")}
    olds = {**checked(server, **before), "inSync": True}
    diff = server.diff("id", olds, server.check(after[f"{name}-on-203-0-113-2"])[0])
    assert diff.changes == SOME and list(diff.replaces) == [] and not diff.deleteBeforeReplace


def test_vrrp_reaches_the_director_with_every_request_and_vip_held_is_reported(director):
    inputs = checked(director, vrrp=VRRP)
    id_, outs = director.create(inputs)
    assert outs["vrrp"] == NORMALIZED and outs["ipvsadm"] == TABLE[:1] + TABLE[1:]
    assert outs["vipHeld"] is vip_on_director(director)  # as the director found it
    assert outs["inSync"] is True
    director.read(id_, outs)
    director.delete(id_, outs)
    sent = [(r["op"], r.get("vrrp")) for r in requests(director)]
    assert sent == [("apply", NORMALIZED), ("read", NORMALIZED), ("delete", NORMALIZED)]


def test_a_director_that_does_not_hold_the_vip_is_in_sync(director):
    inputs = checked(director, vrrp=VRRP)
    id_, outs = director.create(inputs)
    kernel = director.kernel()
    kernel["addresses"] = [a for a in kernel["addresses"] if a[1] != VIP]  # keepalived moved it
    (director.folder / "kernel.json").write_text(json.dumps(kernel))
    rid, live = director.read(id_, outs)
    assert rid == id_ and (live["vipHeld"], live["vipBound"], live["inSync"]) == (
        False,
        False,
        True,
    )
    assert director.diff(id_, live, inputs).changes == NONE  # nothing for up to do


def test_without_vrrp_an_unbound_vip_is_still_drift(director):
    inputs = checked(director)
    id_, outs = director.create(inputs)
    assert "vrrp" not in outs and outs["vipHeld"] is True
    kernel = director.kernel()
    kernel["addresses"] = [a for a in kernel["addresses"] if a[1] != VIP]
    (director.folder / "kernel.json").write_text(json.dumps(kernel))
    _, live = director.read(id_, outs)
    assert (live["vipHeld"], live["inSync"]) == (False, False)
    assert director.diff(id_, live, inputs).changes == SOME
    assert [r.get("vrrp") for r in requests(director)] == [None, None]  # none sent


def test_vip_held_is_none_when_the_director_does_not_say():
    spec = model.parse_virtual_service(checked_locally())[1]
    director = model.parse_virtual_service(checked_locally())[0]
    reply = {"live": None, "desired": [], "ipForward": True}  # an agent without vipBound
    assert vs._outputs(director, spec, reply, NORMALIZED)["vipHeld"] is None
    said = vs._outputs(director, spec, {**reply, "vipBound": False}, NORMALIZED)
    assert said["vipHeld"] is False


def test_a_recorded_vrrp_in_the_reply_is_shown_over_the_inputs():
    director, spec = model.parse_virtual_service(checked_locally())
    reply = {"live": None, "desired": [], "vipBound": True, "vrrp": {**VRRP, "priority": 90.0}}
    assert vs._outputs(director, spec, reply, NORMALIZED)["vrrp"]["priority"] == 90
    assert "vrrp" not in vs._outputs(director, spec, {**reply, "vrrp": None}, NORMALIZED)


def checked_locally() -> dict:
    return vs.VirtualServiceProvider().check({}, {**INPUTS, "vrrp": VRRP}).inputs


def test_a_malformed_vrrp_in_state_never_blocks_a_refresh_or_a_destroy(director):
    id_, outs = director.create(checked(director, vrrp=VRRP))
    broken = {**outs, "vrrp": {**NORMALIZED, "priority": 999}}  # e.g. hand-edited state
    rid, live = director.read(id_, broken)
    assert rid == id_ and live["ipvsadm"] == TABLE
    director.delete(id_, broken)
    assert [(r["op"], r.get("vrrp")) for r in requests(director)][1:] == [
        ("read", None),
        ("delete", None),
    ]


def test_a_new_director_listed_first_does_not_take_over_the_old_directors_services(server):
    """`director: X` becoming `directors: [Y, X]`: Y's resources carry the unsuffixed names of
    X's (the first listed director's do), so the engine would replace X's services by Y's and
    then delete the old ones on X, the very services X's own new resources hold: X would lose
    its table while the stack's state says it has it. Refused at preview, in one line."""
    base = {
        "vips": [{"address": VIP, "ports": [{"port": 80}]}],
        "realServers": [{"address": "203.0.113.11"}],
    }
    x = {"host": "203.0.113.2", "hostKey": PROGRAM_HOST_KEY}
    y = {"host": "203.0.113.3", "hostKey": PROGRAM_HOST_KEY, "priority": 150}
    ((name, _d, before),) = service_props(load({**base, "director": x}), "ipvs-ingress/dev")
    pair = load({**base, "directors": [y, {**x, "priority": 100}]})
    after = {n: p for n, _d, p in service_props(pair, "ipvs-ingress/dev")}
    olds = checked(server, **before)
    _inputs, failures = server.check(after[f"{name}-on-203-0-113-3"], olds)
    assert len(failures) == 1 and failures[0][0] == "director.host", failures
    reason = failures[0][1]
    assert "203.0.113.2" in reason and "203.0.113.3" in reason and "\n" not in reason
    assert "first" in reason  # the fix: list the former director first
    # X listed first is the supported order: no failure.
    pair = load({**base, "directors": [{**x, "priority": 100}, y]})
    after = {n: p for n, _d, p in service_props(pair, "ipvs-ingress/dev")}
    assert server.check(after[f"{name}-on-203-0-113-2"], olds)[1] == []
    # A one-director stack moving to another director stays a replace, as before.
    moved = checked(server, **{**before, "director": {**before["director"], "host": "203.0.113.9"}})
    assert server.check(moved, olds)[1] == []
