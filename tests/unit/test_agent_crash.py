"""The hostile suite's crash points: an agent killed after every step of an apply or delete.

A step is a kernel change (ip_forward, service, destination, VIP) or a state write. For an
operation of N steps, the agent is killed before step k for every k = 0..N (k = N: everything
was done but the reply was lost), then a fresh agent process runs the same request again, as
the next `pulumi up` or `destroy` does. It must converge to the table written out below, with
nothing stray and nothing refused.
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from providers import agent, model, ownership
from tests import hostile
from tests.unit.test_agent_logic import OWNER, Crash, MemoryKernel, spec

VIP = "203.0.113.201"
A = (("203.0.113.11", 1), ("203.0.113.12", 1), ("203.0.113.13", 1))


def request(op, port=80, interface="eth0", adopt=False, **kw):
    if op == "delete":
        return {"op": "delete", "protocol": "tcp", "vip": VIP, "port": port, "owner": OWNER}
    return {"op": "apply", "spec": spec(port=port, **kw), "interface": interface, "adopt": adopt}


def update_b():
    r = request("apply", adopt=True, servers=(("203.0.113.12", 5), ("203.0.113.14", 1)))
    r["spec"] |= {"scheduler": "rr", "persistenceSeconds": 300}
    return r


def hand_drift(k: MemoryKernel) -> None:
    """Stray port destinations, a weight changed, the VIP unbound and ip_forward off."""
    svc = k.services[("tcp", VIP, 80)]
    dests = [
        dataclasses.replace(d, weight=7) if d.address == "203.0.113.11" else d for d in svc.dests
    ]
    stray = [model.LiveDest("203.0.113.99", 8080, 1), model.LiveDest("203.0.113.12", 8080, 1)]
    k.services[("tcp", VIP, 80)] = dataclasses.replace(svc, dests=tuple(dests + stray))
    k.addresses.clear()
    k.forwarding = False


def rows(servers, port=80):
    return sorted((a, port, w, 3) for a, w in servers)


# name: (setup requests, setup hook, the request killed and retried, expected services, VIP on)
SCENARIOS = {
    "create": ([], None, request("apply", servers=A), {80: rows(A)}, 2),
    "update with swaps": (
        [request("apply", servers=A)],
        None,
        update_b(),
        {80: rows([("203.0.113.12", 5), ("203.0.113.14", 1)])},
        2,
    ),
    "repair drift": (
        [request("apply", servers=A)],
        hand_drift,
        request("apply", adopt=True, servers=A),
        {80: rows(A)},
        2,
    ),
    "move interface": (
        [request("apply", servers=A)],
        lambda k: setattr(k, "route_oif", 3),
        request("apply", interface="eth1", adopt=True, servers=A),
        {80: rows(A)},
        3,
    ),
    "update after the record was lost": (
        [request("apply", servers=A)],
        lambda k: os.unlink(ownership.STATE_PATH),
        update_b(),
        {80: rows([("203.0.113.12", 5), ("203.0.113.14", 1)])},
        2,
    ),
    "update of a renamed stack": (
        [request("apply", servers=A, owner="ipvs-ingress/old")],
        None,
        update_b() | {"formerOwner": "ipvs-ingress/old"},
        {80: rows([("203.0.113.12", 5), ("203.0.113.14", 1)])},
        2,
    ),
    "turn repair off (a record change only)": (
        [request("apply", servers=A)],
        None,
        request("apply", adopt=True, servers=A) | {"repair": False},
        {80: rows(A)},
        2,
    ),
    "delete, VIP still used": (
        [request("apply", servers=A), request("apply", port=443, servers=A)],
        None,
        request("delete", port=443),
        {80: rows(A)},
        2,
    ),
    "delete the last": ([request("apply", servers=A)], None, request("delete"), {}, None),
}


def director(tmp_path, monkeypatch, name: str) -> MemoryKernel:
    """A fresh director: a new kernel, a new state file, set up as the scenario says."""
    monkeypatch.setattr(ownership, "STATE_PATH", str(tmp_path / "state.json"))
    kernel = MemoryKernel()
    setup, hook, _, _, _ = SCENARIOS[name]
    for r in setup:
        agent.Agent(kernel).handle(json.loads(json.dumps(r)))
    if hook:
        hook(kernel)
    kernel.steps = 0
    return kernel


@pytest.fixture(autouse=True)
def saves_are_steps(monkeypatch):
    save = agent.Ownership.save

    def counted(self):
        if CURRENT:
            CURRENT[-1].step("save")
        save(self)

    monkeypatch.setattr(agent.Ownership, "save", counted)


CURRENT: list[MemoryKernel] = []


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_killed_at_every_step_the_next_run_converges(name, tmp_path, monkeypatch):
    monkeypatch.setattr(ownership, "LOCK_PATH", str(tmp_path / "lock"))
    _, _, killed, expected, vip_on = SCENARIOS[name]
    CURRENT[:] = [director(tmp_path / "count", monkeypatch, name)]
    agent.Agent(CURRENT[0]).handle(json.loads(json.dumps(killed)))
    steps = CURRENT[0].steps
    assert steps >= 2, "the operation under test changes something"
    stuck = lost = 0
    for k in range(steps + 1):
        kernel = director(tmp_path / str(k), monkeypatch, name)
        CURRENT[:] = [kernel]
        kernel.crash_after = k
        if k < steps:
            with pytest.raises(Crash):
                agent.Agent(kernel).handle(json.loads(json.dumps(killed)))
        else:
            agent.Agent(kernel).handle(json.loads(json.dumps(killed)))
        kernel.crash_after = None
        try:
            agent.Agent(kernel).handle(json.loads(json.dumps(killed)))
        except agent.AgentError as err:  # refused or failing: stuck
            stuck += 1
            pytest.fail(f"{name}, killed before step {k}: the retry failed: {err}")
        live = {key[2]: kernel.table(port=key[2]) for key in kernel.services}
        lost += sum(1 for p in expected if p not in live)
        assert live == expected, f"{name}, killed before step {k}"
        assert kernel.addresses == ({(vip_on, VIP)} if vip_on else set()), name
        with open(ownership.STATE_PATH) as f:
            record = json.load(f)
        assert sorted(record["services"]) == [f"tcp/{VIP}:{p}" for p in sorted(expected)]
        assert all(
            e["owner"] == OWNER and e["state"] == "applied" for e in record["services"].values()
        )
        if killed["op"] == "apply":  # the repair setting the request carried (absent: on)
            setting = killed.get("repair", True)
            assert record["services"][f"tcp/{VIP}:80"]["repair"] is setting, name
        if expected:  # nothing left to do, and the service is ours
            again = agent.Agent(kernel).handle(
                json.loads(
                    json.dumps(killed if killed["op"] == "apply" else request("apply", servers=A))
                )
            )
            assert again["touched"] == 0, f"{name}, killed before step {k}: {again['changes']}"
    hostile.record(crash_points=steps + 1, stuck=stuck, lost=lost)
