"""Drift matrix on the real director (issue 7, the standing hostile suite).

One VirtualService is created through the SDK's gRPC server; each case then breaks the director
by hand the way an operator or bad luck would, and checks what `pulumi refresh` (Read) shows and
that `pulumi up` (Diff, then Create or Update as the engine would call them) repairs it: the
kernel table equals the one written here from the inputs, the VIP is bound, ip_forward is on,
the service is recorded for its owner, and requests through the VIP all reach a node.

The stack's repair is off (the operator's /etc/ipvs-ingress/runtime.json), so the director's
runtime keeps the drift for refresh to show; tests/lab/test_runtime_lab.py has it repaired.
"""

from __future__ import annotations

import json

import pytest
from pulumi.runtime.proto import provider_pb2

from tests import hostile
from tests.lab import ops
from tests.lab.hostile_lab import (
    STATE,
    bound,
    expected_sn,
    ip_forward,
    one_line_error,
    owner_of,
    props,
    provider,
    recorded,
    reset,
    state_text,
    table,
    traffic,
)

pytestmark = pytest.mark.lab

VIP = "203.0.113.201"  # the lab's VIP: every node DNATs it at :80
KEY = f"tcp/{VIP}:80"
OWNER = "ipvs-ingress/hostile-drift"
FOREIGN_DEST = "203.0.113.50"  # on-link, nobody there


def _cases(lab) -> dict[str, str]:
    first = lab.node_ips[0]
    return {
        "flush": "ipvsadm -C",
        "vip-deleted": f"ip addr del {VIP}/32 dev {lab.interface}",
        "ip_forward=0": "sysctl -qw net.ipv4.ip_forward=0",
        "state-deleted": f"rm {STATE}",
        "state-corrupt": f'printf \'{{"services": {{"tcp/\' > {STATE}',
        "masquerade": f"ipvsadm -e -t {VIP}:80 -r {first}:80 -m -w 1",
        "foreign-dest": f"ipvsadm -a -t {VIP}:80 -r {FOREIGN_DEST} -g -w 1",
        # ipvsadm forces a -g destination onto the service port, so another port is masqueraded.
        "other-port": f"ipvsadm -a -t {VIP}:80 -r {first}:8080 -m -w 1",
    }


CASES = [
    "flush",
    "vip-deleted",
    "ip_forward=0",
    "state-deleted",
    "state-corrupt",
    "masquerade",
    "foreign-dest",
    "other-port",
]


class Drift:
    """The stack's view of the one resource: its id, inputs and the outputs the engine holds."""

    def __init__(self, lab, srv):
        self.lab, self.srv = lab, srv
        self.servers = [(ip, 1) for ip in lab.node_ips]
        self.inputs, failures = srv.check(props(lab, VIP, 80, self.servers, OWNER))
        assert failures == []
        self.id, self.outs = None, None

    def expected(self) -> list[str]:
        return expected_sn((VIP, 80, self.servers))

    def healthy(self) -> bool:
        lab = self.lab
        return (
            table(lab) == self.expected()
            and bound(lab) == [f"{VIP}/32"]
            and ip_forward(lab) == "1"
            and owner_of(lab, KEY) == OWNER
            and list(recorded(lab)) == [KEY]
        )

    def create(self) -> None:
        reset(self.lab, [VIP])
        self.id, self.outs = self.srv.create(self.inputs)
        assert self.id.endswith(f"/{KEY}")
        assert self.outs["inSync"] is True
        assert self.healthy(), (table(self.lab), bound(self.lab), state_text(self.lab))

    def refresh(self) -> tuple[str, dict]:
        return self.srv.read(self.id, self.outs)

    def up(self, rid: str, live: dict) -> str:
        """What the engine does after a refresh that returned (rid, live)."""
        if rid == "":  # refresh dropped it from the stack: up creates it again
            new_id, self.outs = self.srv.create(self.inputs)
            assert new_id == self.id
            return "create"
        diff = self.srv.diff(self.id, live, self.inputs)
        if diff.changes != provider_pb2.DiffResponse.DIFF_SOME:
            self.outs = live
            return "no change"
        assert list(diff.replaces) == [], diff
        self.outs = self.srv.update(self.id, live, self.inputs)
        return "update"


@pytest.fixture(scope="module")
def drift(lab):
    reset(lab, [VIP])
    lab.expose(VIP, 80)
    with ops.repair_off(lab, OWNER), provider(lab) as srv:
        d = Drift(lab, srv)
        d.create()
        yield d
        ours = VIP in addresses(lab)
        srv.delete(d.id, d.outs)
        # A VIP re-adopted after a lost record is not known to be ours: a destroy leaves it bound.
        assert table(lab) == [] and bound(lab) == ([] if ours else [f"{VIP}/32"])
    reset(lab, [VIP])


def _shown(name: str, d: Drift, rid: str, live: dict) -> str:
    """Assert what a refresh must show for drift `name`; a short description of it."""
    if name == "flush":
        if rid == "":
            return "gone (refresh drops it)"
        assert rid == d.id and live["inSync"] is False and live["realServers"] == [], live
        return "inSync false, no real servers"
    assert rid == d.id, f"refresh lost the resource: {rid!r}"
    if name == "state-deleted":
        # Re-adopted: the stack's own id proves it is ours; the kernel still matches. The bound
        # VIP is not claimed: nothing says ipvs-ingress bound it (it may be keepalived's).
        assert live["realServers"] == d.outs["realServers"], live
        assert VIP not in addresses(d.lab), state_text(d.lab)
        return f"still present (inSync {live['inSync']})"
    assert live["inSync"] is False, live
    assert live != d.outs
    if name == "vip-deleted":
        assert live.get("vipBound") is False, live
        return "inSync false, vipBound false"
    if name == "ip_forward=0":
        assert live.get("ipForward") is False, live
        return "inSync false, ipForward false"
    if name == "foreign-dest":
        assert {"address": FOREIGN_DEST, "weight": 1} in live["realServers"], live
        return f"inSync false, {FOREIGN_DEST} in realServers"
    # masquerade / other-port: the ipvsadm output names the hand-made destination.
    first = d.servers[0][0]
    dest = f"{first}:80 Masq" if name == "masquerade" else f"{first}:8080 Masq"
    assert any(line.endswith(f"-> {dest} 1") for line in live["ipvsadm"]), live["ipvsadm"]
    return f"inSync false, ipvsadm shows {dest}"


def addresses(lab) -> dict:
    """The VIPs state.json records as bound by ipvs-ingress."""
    return json.loads(state_text(lab) or "{}").get("addresses", {})


def _corrupt(d: Drift) -> str:
    """A corrupt state.json: refresh and up both fail naming the file and a fix; nothing changes."""
    lab = d.lab
    before, record = table(lab), state_text(lab)
    msg = one_line_error(d.srv.read, d.id, d.outs)
    assert STATE in msg and "JSONDecodeError" not in msg, msg
    assert f"mv {STATE} " in msg, f"no fix in: {msg}"
    again = one_line_error(d.srv.update, d.id, d.outs, d.inputs)
    assert STATE in again, again
    assert table(lab) == before and state_text(lab) == record and bound(lab) == [f"{VIP}/32"]
    print(f"\n    corrupt state.json: {msg}")
    # The fix the line names: move the record aside; refresh re-adopts this stack's services.
    lab.director(f"mv {STATE} {STATE}.bad && rm {STATE}.bad")
    return "one-line error naming the file and fix"


@pytest.mark.parametrize("name", CASES)
def test_drift_is_shown_by_refresh_and_repaired_by_up(lab, drift, name):
    d = drift
    if not d.healthy():  # an earlier case failed: start this one from a clean create
        d.create()
    lab.director(_cases(lab)[name])
    if name == "state-corrupt":
        shown = _corrupt(d)
    rid, live = d.refresh()
    if name != "state-corrupt":
        shown = _shown(name, d, rid, live)
    how = d.up(rid, live)
    assert d.outs["inSync"] is True, d.outs
    assert table(lab) == d.expected(), table(lab)
    assert bound(lab) == [f"{VIP}/32"] and ip_forward(lab) == "1"
    assert owner_of(lab, KEY) == OWNER and list(recorded(lab)) == [KEY], state_text(lab)
    gets = traffic(lab, VIP, count=8)
    print(
        f"\n    drift {name:<13} refresh: {shown:<52} up: {how:<9} "
        f"-> table exact ({len(d.expected())} lines), VIP bound, {gets}/{gets} GETs ok"
    )
    hostile.record(drift_cases=1, lost=0, stuck=0)
