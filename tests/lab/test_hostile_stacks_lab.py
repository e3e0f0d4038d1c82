"""Two stacks on one real director (issue 7 item 5, the standing hostile suite).

Stacks A and B are two provider processes (two `pulumi up` runs) with different owners
("<project>/<stack>"). Disjoint VIPs applied in parallel lose nothing; the same VIP:port from
the other stack is refused with one line naming its owner; a destroy never touches the other
stack's services; a VIP both use stays bound until the last of its services goes; a destroyed
stack leaves the director's runtime holding nothing for it (`ipvs-ingress status` names it no
more).
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from tests import hostile
from tests.lab import ops
from tests.lab.hostile_lab import (
    bound,
    expected_sn,
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

A_OWNER, B_OWNER = "team-a/prod", "team-b/prod"
A_VIPS = ("203.0.113.202", "203.0.113.203")
B_VIPS = ("203.0.113.204", "203.0.113.205")
SHARED = "203.0.113.206"  # A serves it on :80, B on :8080
ALL_VIPS = (*A_VIPS, *B_VIPS, SHARED)


class Stack:
    """One stack's resources as its engine holds them: (vip, port) -> (id, inputs, outputs)."""

    def __init__(self, lab, srv, owner: str):
        self.lab, self.srv, self.owner = lab, srv, owner
        self.servers = [(ip, 1) for ip in lab.node_ips]
        self.held: dict[tuple[str, int], tuple[str, dict, dict]] = {}

    def inputs(self, vip: str, port: int) -> dict:
        inputs, failures = self.srv.check(props(self.lab, vip, port, self.servers, self.owner))
        assert failures == []
        return inputs

    def apply(self, vip: str, port: int = 80) -> None:
        inputs = self.inputs(vip, port)
        id_, outs = self.srv.create(inputs)
        assert outs["inSync"] is True
        self.held[vip, port] = (id_, inputs, outs)

    def destroy(self, vip: str, port: int = 80) -> None:
        id_, _, outs = self.held.pop((vip, port))
        self.srv.delete(id_, outs)

    def expected(self) -> list[tuple[str, int, list]]:
        return [(vip, port, self.servers) for vip, port in self.held]


@pytest.fixture(scope="module")
def stacks(lab):
    reset(lab, ALL_VIPS)
    for vip in ALL_VIPS:
        lab.expose(vip, 80)
    lab.expose(SHARED, 8080)
    with provider(lab) as a, provider(lab) as b:
        both = Stack(lab, a, A_OWNER), Stack(lab, b, B_OWNER)
        yield both
        for stack in both:
            for vip, port in list(stack.held):
                stack.destroy(vip, port)
    assert table(lab) == [] and bound(lab) == []
    reset(lab, ALL_VIPS)


def ensure_disjoint(a: Stack, b: Stack) -> None:
    """What the parallel test applies (again, if it failed), so each test stands on its own."""
    for stack, vips in ((a, A_VIPS), (b, B_VIPS)):
        for vip in vips:
            if (vip, 80) not in stack.held:
                stack.apply(vip)


def check_holdings(lab, *stacks: Stack) -> None:
    """The kernel holds exactly what the stacks hold, each VIP bound once, each owner recorded."""
    assert table(lab) == expected_sn(*(e for s in stacks for e in s.expected())), table(lab)
    vips = {vip for s in stacks for vip, _ in s.held}
    assert bound(lab) == sorted(f"{v}/32" for v in vips)
    for s in stacks:
        for vip, port in s.held:
            assert owner_of(lab, f"tcp/{vip}:{port}") == s.owner, state_text(lab)
    held = {f"tcp/{vip}:{port}" for s in stacks for vip, port in s.held}
    assert set(recorded(lab)) == held, state_text(lab)


def test_disjoint_stacks_applied_in_parallel_lose_nothing(lab, stacks):
    a, b = stacks
    errors: list[str] = []

    def apply(stack: Stack, vip: str) -> None:
        try:
            stack.apply(vip)
        except grpc.RpcError as err:  # reported below, with the others
            errors.append(f"{stack.owner} {vip}: {err.details()}")

    started = time.monotonic()
    threads = [
        threading.Thread(target=apply, args=(stack, vip))
        for stack, vips in ((a, A_VIPS), (b, B_VIPS))
        for vip in vips
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=280)
    elapsed = time.monotonic() - started
    assert errors == [] and not any(t.is_alive() for t in threads), errors
    check_holdings(lab, a, b)
    gets = sum(traffic(lab, vip, count=4) for vip in (*A_VIPS, *B_VIPS))
    print(
        f"\n    two stacks: {len(threads)} services by 2 provider processes in parallel in "
        f"{elapsed:.1f} s: table exact ({len(table(lab))} lines), {len(bound(lab))} VIPs bound, "
        f"owners recorded, {gets}/{gets} GETs ok"
    )
    hostile.record(lost=0)


def test_same_vip_port_from_another_stack_is_refused_naming_its_owner(lab, stacks):
    a, b = stacks
    ensure_disjoint(a, b)
    before, record = table(lab), state_text(lab)
    msg = one_line_error(b.srv.create, b.inputs(A_VIPS[0], 80))
    assert A_OWNER in msg and f"{A_VIPS[0]}:80" in msg, msg
    assert table(lab) == before and state_text(lab) == record
    check_holdings(lab, a, b)
    traffic(lab, A_VIPS[0])
    print(f"\n    B's apply of A's {A_VIPS[0]}:80 refused: {msg}")


def test_destroy_never_touches_another_stacks_service(lab, stacks):
    a, b = stacks
    ensure_disjoint(a, b)
    before = table(lab)
    # B's destroy of a resource it thinks it has on A's VIP:port (e.g. a stale import).
    a_id = a.held[A_VIPS[0], 80][0]
    try:
        b.srv.delete(a_id, b.inputs(A_VIPS[0], 80))
        outcome = "a no-op"
    except grpc.RpcError as err:
        msg = err.details()
        assert "\n" not in msg and A_OWNER in msg, msg
        outcome = f"refused: {msg}"
    assert table(lab) == before
    check_holdings(lab, a, b)
    traffic(lab, A_VIPS[0])
    print(f"\n    B's delete of A's {A_VIPS[0]}:80 was {outcome}; A's service and VIP intact")


def test_shared_vip_stays_bound_until_its_last_service_goes(lab, stacks):
    a, b = stacks
    ensure_disjoint(a, b)
    a.apply(SHARED, 80)
    b.apply(SHARED, 8080)  # ownership is per VIP:port: another port on the VIP is B's to take
    check_holdings(lab, a, b)
    a.destroy(SHARED, 80)
    assert f"{SHARED}/32" in bound(lab), "A's destroy unbound a VIP that B still serves"
    check_holdings(lab, a, b)
    traffic(lab, SHARED, 8080)
    for vip in A_VIPS:  # the rest of stack A goes: B is left exactly as it was
        a.destroy(vip)
    check_holdings(lab, b)
    lines, services = ops.held_for(lab, A_OWNER)
    assert (lines, services) == ([], []), "the runtime still holds stack A after its destroy"
    b_keys = sorted(f"tcp/{vip}:{port}" for vip, port in b.held)
    b_lines, b_services = ops.held_for(lab, B_OWNER, want=b_keys)
    assert b_services == b_keys
    assert any(line.startswith("stacks: ") for line in b_lines), b_lines
    gets = sum(traffic(lab, vip, port) for vip, port in b.held)
    b.destroy(SHARED, 8080)
    assert f"{SHARED}/32" not in bound(lab), "the VIP outlived its last service"
    check_holdings(lab, b)
    print(
        f"\n    shared {SHARED}: bound while B's :8080 remained after A's :80 went; "
        f"stack A destroyed, B intact ({len(b.held) + 1} services, {gets}/{gets} GETs ok); "
        "VIP unbound with its last service; the runtime's status names stack A nowhere"
    )
    hostile.record(lost=0, stuck=0)
