"""The agent with `vrrp` (issue 10, contract section 2) on the in-memory kernel of
test_agent_logic: keepalived owns the VIP, so the agent never binds or unbinds it; vrrp is
recorded with the service; replies say whether the VIP is on the interface now; conflicting
vrrp between services of one director is refused with one line naming the field, before any
change; converting from one director and back hands the VIP over in place."""

from __future__ import annotations

import json

import pytest

from providers import agent, ownership
from tests.unit.test_agent_logic import OWNER, MemoryKernel, spec

VIP = "203.0.113.201"
KEY = f"tcp/{VIP}:80"
VRRP = {
    "virtualRouterId": 51,
    "priority": 150,
    "address": "203.0.113.2",
    "peers": ["203.0.113.3"],
    "advertSeconds": 0.1,
}


@pytest.fixture
def kernel(tmp_path, monkeypatch):
    monkeypatch.setattr(ownership, "STATE_PATH", str(tmp_path / "state.json"))
    monkeypatch.setattr(ownership, "LOCK_PATH", str(tmp_path / "run" / "lock"))
    return MemoryKernel()


def apply(kernel, vrrp=None, op="apply", interface="eth0", **kw):
    request = {"op": op, "spec": spec(**kw), "interface": interface}
    if vrrp is not None:
        request["vrrp"] = vrrp
    return agent.Agent(kernel).handle(json.loads(json.dumps(request)))


def record(path) -> dict:
    with open(ownership.STATE_PATH) as f:
        return json.load(f)


def test_with_vrrp_the_vip_is_never_bound_and_vrrp_is_recorded(kernel):
    reply = apply(kernel, vrrp=VRRP)
    assert kernel.addresses == set()  # keepalived binds it, when this director is master
    assert reply["vipBound"] is False
    assert not any(c.startswith("bind") for c in kernel.changes)
    saved = record(ownership.STATE_PATH)
    assert saved["addresses"] == {}
    assert saved["services"][KEY]["vrrp"] == VRRP
    # keepalived made this director master: the reply says so, nothing else changes.
    kernel.addresses.add((2, VIP))
    again = apply(kernel, vrrp=VRRP)
    assert again["vipBound"] is True and again["touched"] == 0
    read = agent.Agent(kernel).handle(
        {
            "op": "read",
            "protocol": "tcp",
            "vip": VIP,
            "port": 80,
            "owner": OWNER,
            "interface": "eth0",
        }  # fmt: skip
    )
    assert read["vipBound"] is True and read["vrrp"] == VRRP


def test_delete_with_vrrp_leaves_the_vip_to_keepalived(kernel):
    apply(kernel, vrrp=VRRP)
    kernel.addresses.add((2, VIP))  # held by keepalived now
    done = agent.Agent(kernel).handle(
        {"op": "delete", "protocol": "tcp", "vip": VIP, "port": 80, "owner": OWNER}
    )
    assert done == {"deleted": True, "removedVip": False}
    assert kernel.addresses == {(2, VIP)}


def test_plan_says_what_the_vrrp_change_does(kernel):
    apply(kernel)  # one director: the VIP bound by ipvs-ingress
    changes = apply(kernel, vrrp=VRRP, op="plan")["changes"]
    assert (
        changes
        == [
            f"hand {VIP} over to keepalived (VRRP), bound as it is",
            "record vrrp vrid 51 priority 150 peers 203.0.113.3 advert 0.1s nopreempt (keepalived's config)",  # fmt: skip
        ]
    )


def test_converting_to_vrrp_keeps_the_vip_bound_and_gives_it_away(kernel):
    apply(kernel)
    assert kernel.addresses == {(2, VIP)}
    before = len(kernel.changes)
    reply = apply(kernel, vrrp=VRRP)
    assert kernel.changes[before:] == []  # no unbind: clients keep reaching it
    assert reply["vipBound"] is True
    assert record(ownership.STATE_PATH)["addresses"] == {}  # no longer ours to remove
    # A delete now leaves it: keepalived's.
    agent.Agent(kernel).handle(
        {"op": "delete", "protocol": "tcp", "vip": VIP, "port": 80, "owner": OWNER}
    )
    assert kernel.addresses == {(2, VIP)}


def test_converting_back_claims_the_vip_keepalived_held(kernel):
    apply(kernel, vrrp=VRRP)
    kernel.addresses.add((2, VIP))  # keepalived holds it
    before = len(kernel.changes)
    apply(kernel)
    assert kernel.changes[before:] == []  # bound already: not bound twice
    assert record(ownership.STATE_PATH)["addresses"] == {VIP: {"interface": "eth0"}}
    assert "vrrp" not in record(ownership.STATE_PATH)["services"][KEY]


def test_converting_back_on_a_backup_binds_the_vip(kernel):
    apply(kernel, vrrp=VRRP)  # the other director was master: not bound here
    apply(kernel)
    assert kernel.addresses == {(2, VIP)}
    assert record(ownership.STATE_PATH)["addresses"] == {VIP: {"interface": "eth0"}}


CONFLICTS = [
    # (first service's vrrp, second's changes, the field named)
    ({"priority": 100}, "vrrp.priority"),
    ({"address": "203.0.113.4"}, "vrrp.address"),
    ({"advertSeconds": 0.5}, "vrrp.advertSeconds"),
    ({"preemptDelaySeconds": 30}, "vrrp.preemptDelaySeconds"),
    ({"peers": ["203.0.113.3", "203.0.113.5"]}, "vrrp.peers"),
]


@pytest.mark.parametrize("change,field", CONFLICTS)
def test_a_conflicting_vrrp_is_refused_naming_the_field_before_any_change(kernel, change, field):
    apply(kernel, vrrp=VRRP, vip="203.0.113.202")
    saved, changes = record(ownership.STATE_PATH), list(kernel.changes)
    with pytest.raises(agent.AgentError) as err:
        apply(kernel, vrrp={**VRRP, **change}, owner="team-b/prod")
    line = str(err.value)
    assert err.value.code == "vrrp-conflict"
    assert line.startswith(f"{field}: ") and "\n" not in line and "team-b" not in line
    assert "tcp/203.0.113.202:80 (stack ipvs-ingress/dev)" in line
    assert record(ownership.STATE_PATH) == saved and kernel.changes == changes


def test_other_virtual_routers_may_have_other_peers(kernel):
    apply(kernel, vrrp=VRRP, vip="203.0.113.202")
    other = {**VRRP, "virtualRouterId": 52, "peers": ["203.0.113.5"]}
    apply(kernel, vrrp=other)
    assert record(ownership.STATE_PATH)["services"][KEY]["vrrp"] == other


def test_one_vip_is_in_one_virtual_router(kernel):
    apply(kernel, vrrp=VRRP, port=443)
    with pytest.raises(agent.AgentError, match=r"^vrrp.virtualRouterId: 52 differs from 51"):
        apply(kernel, vrrp={**VRRP, "virtualRouterId": 52})


def test_vrrp_on_another_interface_is_refused(kernel):
    apply(kernel, vrrp=VRRP, vip="203.0.113.202")
    kernel.route_oif = 3  # the real servers are on eth1's segment
    with pytest.raises(agent.AgentError, match=r"^director.interface: eth1 differs from eth0"):
        apply(kernel, vrrp=VRRP, interface="eth1", servers=(("198.51.100.11", 1),))


def test_one_vip_with_and_without_vrrp_across_stacks_is_refused(kernel):
    apply(kernel, port=443, owner="team-b/prod")
    with pytest.raises(agent.AgentError, match=r"^vrrp: 203.0.113.201 is bound without VRRP"):
        apply(kernel, vrrp=VRRP)
    apply(kernel, vrrp=VRRP, vip="203.0.113.202")
    with pytest.raises(agent.AgentError, match=r"^vrrp: 203.0.113.202 is held by VRRP"):
        apply(kernel, vip="203.0.113.202", port=443, owner="team-b/prod")


def test_a_bad_vrrp_is_one_line_naming_the_field(kernel):
    with pytest.raises(agent.AgentError) as err:
        apply(kernel, vrrp={**VRRP, "priority": 255})
    assert err.value.code == "bad-request" and str(err.value).startswith("vrrp.priority: 255")
    assert kernel.changes == []


def test_a_record_with_a_malformed_vrrp_is_refused_as_corrupt(kernel):
    apply(kernel, vrrp=VRRP)
    saved = record(ownership.STATE_PATH)
    saved["services"][KEY]["vrrp"]["priority"] = "high"
    with open(ownership.STATE_PATH, "w") as f:
        json.dump(saved, f)
    with pytest.raises(agent.AgentError) as err:
        apply(kernel, vrrp=VRRP)
    assert err.value.code == "corrupt-state"
