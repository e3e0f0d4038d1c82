"""kill -9 of the director's runtime mid-create and mid-update (issue 7 item 3, issue 8).

The runtime (systemd unit, installed by the provider) makes every apply's kernel changes. A
watcher on the director (tests/lab/crash_watch.py) kills it with SIGKILL as soon as the kernel
shows it made some of an apply's changes, and the test kills that `pulumi up`'s provider
process at the same moment. systemd starts the runtime again, which leaves the interrupted
apply's service (recorded `pending`) alone. The next `pulumi up` is a fresh provider process:
it must converge to the exact table written here from the inputs, leave nothing stray, refuse
nothing, and the VIP must carry traffic.
"""

from __future__ import annotations

import threading

import grpc
import pytest

from tests import hostile
from tests.lab.hostile_lab import (
    Watcher,
    bound,
    expected_sn,
    owner_of,
    props,
    provider,
    recorded,
    reset,
    runtime_serving,
    state_text,
    table,
    traffic,
)

pytestmark = pytest.mark.lab

VIP = "203.0.113.201"  # the lab's VIP: every node DNATs it at :80
KEY = f"tcp/{VIP}:80"
OWNER = "ipvs-ingress/hostile-crash"
# On-link RFC 5737 fillers with weight 0: many kernel changes, and no traffic goes to them.
FILLERS_V1 = [f"203.0.113.{i}" for i in range(100, 180)]
FILLERS_V2 = [f"203.0.113.{i}" for i in (*range(140, 200), *range(220, 240))]  # not .201-.206


def servers_v1(lab) -> list[tuple[str, int]]:
    return [(ip, 1) for ip in lab.node_ips] + [(a, 0) for a in FILLERS_V1]


def servers_v2(lab) -> list[tuple[str, int]]:
    return [(ip, 2) for ip in lab.node_ips] + [(a, 0) for a in FILLERS_V2]


def total_changes(old: list | None, new: list) -> int:
    """Kernel changes from `old` to `new` as crash_watch.py counts them."""
    if old is None:
        return 1 + len(new)
    before, after = dict(old), dict(new)
    return sum(before.get(a) != after.get(a) for a in set(before) | set(after))


# (operation, kill once the kernel shows at least this many of its changes)
POINTS = [("create", 1), ("create", 40), ("update", 1), ("update", 50)]


@pytest.fixture
def clean(lab):
    reset(lab, [VIP])
    lab.expose(VIP, 80)
    yield
    reset(lab, [VIP])


def crash(lab, srv, call, after: int) -> tuple[int, int]:
    """Run `call` (a create or update on `srv`) and kill -9 the runtime and the provider mid-way."""
    watcher = Watcher(lab, VIP, 80, after, runtime_serving(lab))
    try:
        errors: list[grpc.StatusCode] = []

        def run() -> None:
            try:
                call()
            except grpc.RpcError as err:  # expected: its provider process is killed
                errors.append(err.code())

        thread = threading.Thread(target=run)
        thread.start()
        seen = watcher.killed()
        srv.proc.kill()  # the whole `pulumi up` dies with the runtime (no retry from it)
        thread.join(timeout=60)
        final = watcher.final()
    finally:
        watcher.close()
    assert not thread.is_alive() and errors, "the apply finished although its provider was killed"
    return seen, final


@pytest.mark.parametrize(("op", "after"), POINTS, ids=[f"{o}@{a}" for o, a in POINTS])
def test_kill_9_mid_apply_then_a_fresh_up_converges(lab, clean, op, after):
    old = servers_v1(lab) if op == "update" else None
    new = servers_v2(lab) if op == "update" else servers_v1(lab)
    id_ = outs = None
    if op == "update":  # the stack already holds the service, created by an earlier `up`
        with provider(lab) as srv:
            inputs, _ = srv.check(props(lab, VIP, 80, old, OWNER))
            id_, outs = srv.create(inputs)
        assert table(lab) == expected_sn((VIP, 80, old))

    with provider(lab) as srv:
        inputs, failures = srv.check(props(lab, VIP, 80, new, OWNER))
        assert failures == []
        srv.read(id_ or "", outs or inputs)  # attached (installed if need be): the one to kill
        if op == "create":
            seen, final = crash(lab, srv, lambda: srv.create(inputs), after)
        else:
            seen, final = crash(lab, srv, lambda: srv.update(id_, outs, inputs), after)
    total = total_changes(old, new)
    assert after <= seen and 0 < final < total, f"not mid-{op}: {final} of {total} changes made"
    left, record = len(table(lab)), recorded(lab).get(KEY, {}).get("state", "no record")
    restarted = runtime_serving(lab)  # systemd started it again; it keeps the pending apply
    assert len(table(lab)) == left, "the restarted runtime changed the interrupted apply's service"
    print(
        f"\n    kill -9 mid-{op}: runtime killed after {final} of {total} kernel changes "
        f"({left} ipvsadm -Sn lines, record: {record}; restarted as pid {restarted})",
        end="",
    )

    with provider(lab) as srv:  # the next `pulumi up`
        inputs, _ = srv.check(props(lab, VIP, 80, new, OWNER))
        if op == "create":  # the engine never got an id: it creates again
            id_, outs = srv.create(inputs)
        else:  # the engine still holds the old outputs: it updates again
            outs = srv.update(id_, outs, inputs)
        assert outs["inSync"] is True
        assert table(lab) == expected_sn((VIP, 80, new)), table(lab)
        assert bound(lab) == [f"{VIP}/32"]
        assert owner_of(lab, KEY) == OWNER and list(recorded(lab)) == [KEY], state_text(lab)
        gets = traffic(lab, VIP, count=6)
        srv.delete(id_, outs)
    assert table(lab) == [] and bound(lab) == [] and recorded(lab) == {}
    print(
        f"; fresh provider's {op}: converged to "
        f"{len(expected_sn((VIP, 80, new)))} lines, nothing stray, {gets}/{gets} GETs ok"
    )
    hostile.record(crash_points=1, stuck=0, lost=0)
