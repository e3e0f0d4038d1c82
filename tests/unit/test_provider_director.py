"""The provider's create/read/update/delete against the agent on the in-memory kernel, with the
requests going through JSON as on the wire: what refresh shows and what the next up repairs."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from providers import agent, model, ownership, virtual_service
from tests.unit.test_agent_logic import OWNER
from tests.unit.test_agent_logic import kernel as kernel  # noqa: F401 (the fixture)

HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMUmmSK6gtVhUmYnKSwP+B/ZoYbs1FkFCtqNm4AxvOq"
INPUTS = {
    "director": {"host": "203.0.113.2", "hostKey": HOST_KEY},
    "vip": "203.0.113.201",
    "port": 80.0,  # numbers arrive from gRPC as floats
    "realServers": [{"address": "203.0.113.11", "weight": 1.0}],
    "owner": OWNER,
}


class Session:
    """Stands in for the transport: every request and reply crosses JSON, as over SSH."""

    def __init__(self, kernel):
        self.agent, self.sent = agent.Agent(kernel), []

    def request(self, op, **fields):
        request = json.loads(json.dumps({"op": op, **fields}))
        self.sent.append(request)
        return json.loads(json.dumps(self.agent.handle(request)))


@pytest.fixture
def provider(kernel, monkeypatch):
    session = Session(kernel)
    monkeypatch.setattr(virtual_service.POOL, "session", lambda _director, _key: session)
    p = virtual_service.VirtualServiceProvider()
    p._private_key = "unused by the stand-in session"
    p.sent = session.sent
    return p


def created(provider):
    inputs = provider.check({}, INPUTS).inputs
    result = provider.create(inputs)
    return result.id, inputs, result.outs


@pytest.mark.parametrize("drift", ["vip-unbound", "ip_forward=0"])
def test_refresh_shows_an_unbound_vip_or_forwarding_off_and_up_repairs_it(provider, kernel, drift):
    id_, inputs, outs = created(provider)
    assert (outs["vipBound"], outs["ipForward"], outs["inSync"]) == (True, True, True)
    if drift == "vip-unbound":
        kernel.addresses.clear()
    else:
        kernel.forwarding = False
    refreshed = provider.read(id_, outs)
    assert refreshed.id == id_
    expected = (drift != "vip-unbound", drift != "ip_forward=0", False)
    assert (
        refreshed.outs["vipBound"],
        refreshed.outs["ipForward"],
        refreshed.outs["inSync"],
    ) == expected
    assert refreshed.outs["ipvsadm"] == ["TCP 203.0.113.201:80 wlc -> 203.0.113.11:80 Route 1"]
    assert provider.diff(id_, refreshed.outs, inputs).changes is True
    repaired = provider.update(id_, refreshed.outs, inputs).outs
    assert (repaired["vipBound"], repaired["ipForward"], repaired["inSync"]) == (True, True, True)
    assert kernel.addresses == {(2, "203.0.113.201")} and kernel.forwarding is True


def test_create_claims_only_what_is_free_and_the_others_adopt_with_the_owner(provider):
    id_, inputs, outs = created(provider)
    provider.read(id_, outs)
    provider.update(id_, outs, inputs)
    provider.delete(id_, outs)
    ops = [(r["op"], r["adopt"], r.get("owner") or r["spec"]["owner"]) for r in provider.sent]
    assert ops == [
        ("apply", False, OWNER),
        ("read", True, OWNER),
        ("apply", True, OWNER),
        ("delete", True, OWNER),
    ]
    assert all(r["interface"] == "eth0" for r in provider.sent)


def test_after_the_state_file_is_lost_refresh_keeps_the_resource_and_destroy_removes_it(
    provider, kernel
):
    # ...but not the VIP: after the record is lost nothing says who bound it, so it stays.
    id_, _, outs = created(provider)
    os.unlink(ownership.STATE_PATH)
    refreshed = provider.read(id_, outs)
    # Kept, and out of sync: the director records no desired table for it any more.
    assert refreshed.id == id_ and refreshed.outs["ipvsadm"] == outs["ipvsadm"]
    assert (refreshed.outs["desired"], refreshed.outs["inSync"]) == ([], False)
    provider.delete(id_, refreshed.outs)
    assert kernel.services == {} and kernel.addresses == {(2, "203.0.113.201")}


def test_read_of_a_service_gone_from_the_director_drops_it(provider, kernel):
    id_, _, outs = created(provider)
    kernel.services.clear()
    assert provider.read(id_, outs).id == ""


def test_a_destination_at_another_port_is_drift_in_ipvsadm_not_a_real_server(provider, kernel):
    id_, inputs, outs = created(provider)
    svc = kernel.services[("tcp", "203.0.113.201", 80)]
    stray = model.LiveDest("203.0.113.11", 8080, 1)
    kernel.services[("tcp", "203.0.113.201", 80)] = dataclasses.replace(
        svc, dests=svc.dests + (stray,)
    )
    refreshed = provider.read(id_, outs).outs
    assert refreshed["realServers"] == [{"address": "203.0.113.11", "weight": 1}]
    assert refreshed["ipvsadm"] == [
        "TCP 203.0.113.201:80 wlc -> 203.0.113.11:80 Route 1",
        "TCP 203.0.113.201:80 wlc -> 203.0.113.11:8080 Route 1",
    ]
    assert refreshed["inSync"] is False
    assert provider.update(id_, refreshed, inputs).outs["inSync"] is True
    assert kernel.table() == [("203.0.113.11", 80, 1, 3)]


def test_a_renamed_stack_updates_refreshes_and_destroys_its_service(provider, kernel):
    id_, _, outs = created(provider)
    renamed = provider.check(outs, {**INPUTS, "owner": "ipvs-ingress/dev2"}).inputs
    diff = provider.diff(id_, outs, renamed)
    assert diff.changes is True and not diff.replaces
    outs = provider.update(id_, outs, renamed).outs
    assert provider.sent[-1]["formerOwner"] == OWNER and outs["inSync"] is True
    with open(ownership.STATE_PATH) as f:
        assert json.load(f)["services"]["tcp/203.0.113.201:80"]["owner"] == "ipvs-ingress/dev2"
    assert provider.read(id_, outs).id == id_
    provider.delete(id_, outs)
    assert kernel.services == {} and kernel.addresses == set()


def test_a_destroy_of_another_stacks_service_fails_naming_the_owner(provider, kernel):
    id_, _, outs = created(provider)
    with pytest.raises(agent.AgentError) as err:
        provider.delete(id_, {**outs, "owner": "ipvs-ingress/prod"})
    assert "belongs to stack ipvs-ingress/dev" in str(err.value) and "\n" not in str(err.value)
    assert kernel.table() == [("203.0.113.11", 80, 1, 3)]


def test_check_requires_an_owner_but_state_from_before_owners_still_updates(provider, kernel):
    no_owner = {k: v for k, v in INPUTS.items() if k != "owner"}
    failures = provider.check({}, no_owner).failures
    assert [(f.property, f.reason) for f in failures] == [
        (
            "owner",
            "missing: give the stack that declares this service as '<project>/<stack>'"
            " (the Ingress component sets it)",
        )
    ]
    id_, inputs, outs = created(provider)
    # State and record written before owners existed: neither names a stack.
    olds = {k: v for k, v in outs.items() if k != "owner"}
    with open(ownership.STATE_PATH, "w") as f:
        json.dump(
            {
                "services": {"tcp/203.0.113.201:80": {"vip": "203.0.113.201", "interface": "eth0"}},
                "addresses": {"203.0.113.201": {"interface": "eth0"}},
            },
            f,
        )
    assert provider.read(id_, olds).id == id_
    diff = provider.diff(id_, olds, inputs)
    assert diff.changes is True and not diff.replaces
    assert provider.update(id_, olds, inputs).outs["inSync"] is True
    assert "formerOwner" not in provider.sent[-1]
    with open(ownership.STATE_PATH) as f:
        assert json.load(f)["services"]["tcp/203.0.113.201:80"]["owner"] == OWNER
