"""Issue 10's measured proof on the real path: two lab directors, the stack file `./dev lab up`
writes (ipvs-ingress:directors), `components.config.load_stack_file` ->
`components.ingress.service_props(cfg, owner)` -> the provider (its gRPC server) checking,
diffing, creating, updating and deleting each resource as `pulumi up` would. Each director's
runtime then manages keepalived, the sync daemons and the ready file by itself: the test only
breaks things (crash, stop, kill, cut) and watches.

One module-scoped lab, the steps in one order (each starts from where the last left the VIP):
    1. one-director stack applied, then the stack with both directors (director 1's resources
       updated with `vrrp`, director 2's created) under the paced client
    2. keepalived stopped on the holder (its runtime starts it again, as a backup)
    3. the runtime killed (kill -9) on the holder (director 2): the VIP back on director 1
    4. primary crash (kill -9 of director 1's VM, the higher priority) with a long download; the
       VM started again, the stack re-applied, its runtime restores it; no preemption
    5. failback: keepalived stopped on the holder once the other is back and ready
    6. the holder's ready file set to 0 (what the runtime writes when out of sync)
    7. split brain: the directors' link cut (tests/lab/drill.py `split`), then healed
Figures are printed with MET/MISSED against the issue's goals (TCG on a shared host: timings
are not asserted). Asserted: exactly one holder per VIP after every step, `ipvsadm -Sn` equal on
both directors after every apply, the download surviving a crash with sync on, the preview
of adding a director being an update (no replace) of director 1's resources, `ipvs-ingress
status` on both (holder, sync daemons, ready), keepalived running realtime, and after the
destroy nothing the runtimes started for VRRP left (unit, config, record, sync daemons).
Marked `slow_lab` (two VMs, one booted twice): `-m slow_lab` runs it alone.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from pulumi.runtime.proto import provider_pb2

from components.config import load_stack_file
from providers import keepalived, runtime, vrrp
from tests.conftest import _say, own_lab
from tests.lab import drill, harness
from tests.lab.__main__ import lab_stack
from tests.provider.grpc_client import ProviderServer

pytestmark = [pytest.mark.lab, pytest.mark.slow_lab]

OWNER = "ipvs-ingress/lab"
KEEPALIVED_UNIT = vrrp.UNIT_NAME
# keepalived stopped the way `systemctl stop` stops it (SIGTERM to its main process: it leaves
# with priority 0 adverts), without a stop job: the runtime starts keepalived again whenever it
# finds it inactive, and its start job cancels a pending stop job ("Job ... canceled", seen).
STOP_KEEPALIVED = f"systemctl kill -s TERM --kill-who=main {KEEPALIVED_UNIT}"
READY_WAIT = 60.0
FLOW_AGE = 6.0  # s: the download's age at the primary's crash (see _crash_primary)  # s: a (re)booted director's runtime restores its table and says ready


@pytest.fixture(scope="module")
def two(request):
    with own_lab(request, "ha lab", directors=2) as the_lab:
        yield the_lab


class Applier:
    """`pulumi up` for one stack, minus the engine: per resource of `service_props`, check, then
    create (new name), diff + update (a name, or the unsuffixed alias of a first director's
    resource, seen before), and delete what the stack no longer declares; the operations run
    in parallel, as the engine runs independent ones."""

    def __init__(self, lab: harness.Lab) -> None:
        self.lab = lab
        self.srv = ProviderServer()
        self.srv.configure({"ipvs-ingress:sshPrivateKey": lab.private_key_pem})
        self.state: dict[str, tuple[str, dict, dict]] = {}  # name: (id, inputs, outputs)
        self.log: list[str] = []  # "create NAME", "update NAME", "delete NAME"

    def apply(self, stack: dict) -> dict[str, dict]:
        """Check and diff every resource (the preview), then run the creates, updates and
        deletes side by side, as the engine runs operations that do not depend on each other:
        the directors' resources are independent."""
        from components.ingress import service_props  # issue 10 (helper P)

        cfg = load_stack_file(stack["config"])
        first = cfg.directors[0].director.host if cfg.directors else None
        plan: list[tuple[str, str, tuple | None, dict]] = []  # (name, old name, old, inputs)
        for name, dc, props in service_props(cfg, OWNER):
            old_name = name if name in self.state else _unsuffixed(name, dc.director.host, first)
            old = self.state.pop(old_name, None) if old_name in self.state else None
            inputs, failures = self.srv.check(props, old[1] if old else None)
            assert failures == [], (name, failures)
            plan.append((name, old_name, old, inputs))
        gone, self.state = self.state, {}
        with ThreadPoolExecutor(max_workers=len(plan) + len(gone) or 1) as pool:
            done = [pool.submit(self._one, *step) for step in plan]
            done += [pool.submit(self._delete, name, *old) for name, old in gone.items()]
            for future in done:
                future.result()
        return {name: outs for name, (_id, _inputs, outs) in self.state.items()}

    def _one(self, name: str, old_name: str, old: tuple | None, inputs: dict) -> None:
        if old is None:
            id_, outs = self.srv.create(inputs)
            self.log.append(f"create {name}")
        else:
            id_, _, outs = old
            diff = self.srv.diff(id_, outs, inputs)
            assert list(diff.replaces) == [], (name, diff)  # an update, never a replace
            if diff.changes == provider_pb2.DiffResponse.DIFF_SOME:
                outs = self.srv.update(id_, outs, inputs)
                alias = f" (alias of {old_name})" if old_name != name else ""
                self.log.append(f"update {name}{alias}")
        self.state[name] = (id_, inputs, outs)

    def _delete(self, name: str, id_: str, _inputs: dict, outs: dict) -> None:
        self.srv.delete(id_, outs)
        self.log.append(f"delete {name}")

    def destroy(self) -> list[str]:
        """Delete every resource; the errors (a director whose VM is down cannot answer)."""
        errors = []
        for name, (id_, _inputs, outs) in self.state.items():
            try:
                self.srv.delete(id_, outs)
            except Exception as exc:  # noqa: BLE001 - said, then asserted by the caller
                errors.append(f"{name}: {str(exc)[:300]}")
        self.state = {}
        return errors

    def close(self) -> None:
        self.srv.close()


def _unsuffixed(name: str, host: str, first: str | None) -> str:
    """The first director's resources alias the single-director name (CONTRACTS-10 section 4)."""
    suffix = f"-on-{host.replace('.', '-').replace(':', '-')}"
    return name.removesuffix(suffix) if host == first and name.endswith(suffix) else name


def _one_director_stack(lab: harness.Lab) -> dict:
    stack = lab_stack(lab.describe())
    config = dict(stack["config"])
    config.pop("ipvs-ingress:directors")
    config["ipvs-ingress:director"] = lab.director_config(1)
    return {"config": config}


# -- reading the directors -----------------------------------------------------------------------


def _log(lab: harness.Lab, n: int) -> str:
    got = lab.director(
        f"journalctl -q -o cat -u {KEEPALIVED_UNIT} -u {runtime.UNIT_NAME} | tail -n 12",
        n=n,
        check=False,
    )
    return got.stdout[-1500:]


def _transitions(lab: harness.Lab, n: int) -> list[str]:
    """keepalived's state changes and VIP moves on director n (its journal, short)."""
    got = lab.director(
        f"journalctl -q -o short-precise -u {KEEPALIVED_UNIT} | grep Keepalived_vrrp"
        " | grep -E 'Entering|VIP|removing|Removing|received' | tail -n 8"
        r" | sed -E 's/^\S+ \S+ (\S+) \S+ \S+ /\1 /'",
        n=n,
        check=False,
    )
    return got.stdout.splitlines()


def _logs(lab: harness.Lab):
    return lambda n: _log(lab, n)


def _tables_identical(lab: harness.Lab, say, when: str) -> str:
    tables = {n: lab.ipvsadm_sn(n) for n in lab.live_directors()}
    say(f"tables after {when}: {'identical' if len(set(tables.values())) == 1 else 'DIFFER'}")
    assert len(set(tables.values())) == 1, tables
    return tables[1] if 1 in tables else next(iter(tables.values()))


def _ready(lab: harness.Lab, n: int) -> str:
    return lab.director(f"cat {keepalived.READY_FILE} 2>/dev/null", n=n, check=False).stdout.strip()


def _await_ready(lab: harness.Lab, n: int, since: float) -> float:
    """Seconds until director n's runtime says ready ("1") and its keepalived runs."""
    deadline = time.time() + READY_WAIT
    while time.time() < deadline:
        running = lab.director(f"systemctl is-active -q {KEEPALIVED_UNIT}", n=n, check=False)
        if _ready(lab, n) == "1" and running.returncode == 0:
            return time.time() - since
        time.sleep(0.5)
    raise AssertionError(f"director {n} not ready within {READY_WAIT}s: {_log(lab, n)}")


def _holder(lab: harness.Lab) -> int:
    return drill.one_holder(lab, logs=_logs(lab))[lab.vip][0]


def _other(n: int) -> int:
    return 3 - n


# -- the drills ------------------------------------------------------------------------------


def test_ha_real_path(two, request):
    lab = two
    say = lambda line: _say(request, f"ha: {line}")  # noqa: E731
    goal = drill.goal
    stack = Applier(lab)
    errors = ["not destroyed"]
    try:
        _add_second_director(lab, stack, say, goal)
        _stop_keepalived(lab, say, goal)
        _kill_runtime(lab, say, goal)
        _crash_primary(lab, stack, say, goal)
        _failback(lab, say, goal)
        _not_ready(lab, say, goal)
        drill.split_brain(lab, say, logs=_logs(lab))
        _tables_identical(lab, say, "the split brain")
    finally:
        try:
            errors = stack.destroy()
        finally:
            stack.close()
    assert errors == [], errors
    # The health check's probe services and keepalived go within a runtime pass or two.
    left = _await_empty(lab)
    assert left == {}, left


def _await_empty(lab: harness.Lab, timeout: float = 20.0) -> dict:
    """{director: what is left} until no director has an IPVS table, a running keepalived or
    the VIP (bounded); {} when all went."""
    deadline = time.time() + timeout
    while True:
        left = {}
        for n in lab.live_directors():
            table = lab.ipvsadm_sn(n).strip()
            active = lab.director(f"systemctl is-active {KEEPALIVED_UNIT}", n=n, check=False)
            # What the runtime started for VRRP goes too: its config, its record, the daemons.
            files = lab.director(
                f"ls {vrrp.CONF_PATH} {vrrp.STATE_PATH} 2>/dev/null; ipvsadm -L --daemon",
                n=n,
                check=False,
            ).stdout.split()
            if table or active.stdout.strip() == "active" or files:
                left[n] = {"table": table, "keepalived": active.stdout.strip(), "files": files}
        held = {vip: n for vip, n in lab.vip_holders().items() if n}
        if held:
            left["vip"] = held
        if not left or time.time() > deadline:
            return left
        time.sleep(1.0)


def _add_second_director(lab, stack: Applier, say, goal) -> None:
    single = stack.apply(_one_director_stack(lab))
    assert len(single) == 1 and lab.vip_holders() == {lab.vip: [1]}, (single, lab.vip_holders())
    assert drill.nodes.attempts(lab, lab.vip, 80, count=3)[0]["outcome"] == "ok"
    stack.log.clear()

    def add(at: float) -> dict:
        return stack.apply(lab_stack(lab.describe()))

    fig, at, outs = drill.under_load(lab, add, after=3.0)
    took = time.time() - at
    say(
        f"second director added to the running stack ({', '.join(stack.log)}) in {took:.1f}s:"
        f" {fig} (goal 0 failed: {goal(fig.failed == 0)})"
    )
    assert sorted(a.split()[0] for a in stack.log) == ["create", "update"], stack.log
    for n in (1, 2):
        _await_ready(lab, n, at)
    drill.await_holder(lab, None, time.time(), _logs(lab))
    held = {name: outs[name].get("vipHeld") for name in outs}
    say(f"holder {_holder(lab)}; vipHeld per resource at the apply {held}")
    say(f"director 1's keepalived since: {_transitions(lab, 1)}")
    _tables_identical(lab, say, "adding the second director")
    _status_says_who_holds(lab)


def _status_says_who_holds(lab: harness.Lab) -> None:
    """`ipvs-ingress status` on each director: who holds the VIP, the sync daemons, ready; and
    keepalived runs realtime (its unit), so adverts never wait behind the runtime."""
    holder = _holder(lab)
    for n in (1, 2):
        status = lab.director("ipvs-ingress status", n=n, check=False).stdout
        held = "held by this director" if n == holder else "not held here (backup)"
        assert f"VIP {lab.vip} on {lab.interface} (VRRP router 51): {held}" in status, status
        sync = f"sync daemons: backup on {lab.interface} syncid 0, master on {lab.interface} syncid 0"  # fmt: skip
        assert sync in status and "ready 1" in status, status
        policy = lab.director(
            f"chrt -p $(systemctl show -p MainPID --value {KEEPALIVED_UNIT})", n=n, check=False
        ).stdout
        assert "SCHED_RR" in policy, policy


def _stop_keepalived(lab, say, goal) -> None:
    holder = _holder(lab)

    def stop(at: float) -> float:
        lab.director(STOP_KEEPALIVED, n=holder)
        return drill.await_holder(lab, _other(holder), at, _logs(lab))

    fig, at, moved = drill.under_load(lab, stop)
    say(
        f"keepalived stopped (SIGTERM) on director {holder} (holder): VIP on director"
        f" {_other(holder)} within {moved:.2f}s (polled), {fig} (goal 0-1 failed: {goal(fig.failed <= 1)})"
    )
    back = _await_ready(lab, holder, at)  # its runtime starts keepalived again (a backup)
    time.sleep(1.0)
    drill.one_holder(lab, _other(holder), _logs(lab))
    say(f"director {holder}'s runtime had keepalived running again {back:.1f}s later; no preempt")


def _kill_runtime(lab, say, goal) -> None:
    holder = _holder(lab)

    def kill(at: float) -> float:
        lab.director(f"systemctl kill -s KILL {runtime.UNIT_NAME}", n=holder)
        return drill.await_holder(lab, _other(holder), at, _logs(lab))

    fig, at, moved = drill.under_load(lab, kill)
    say(
        f"runtime killed (kill -9) on director {holder} (holder): VIP on director"
        f" {_other(holder)} within {moved:.2f}s (polled), {fig}"
        f" (goal 0-1 failed: {goal(fig.failed <= 1)})"
    )
    back = _await_ready(lab, holder, at)
    time.sleep(1.0)
    drill.one_holder(lab, _other(holder), _logs(lab))
    say(f"director {holder}'s runtime back (systemd restart) and ready {back:.1f}s later")


def _not_ready(lab, say, goal) -> None:
    """The holder's ready file says "0" (what its runtime writes when the table is out of sync):
    keepalived's track_file gives the VIP up. Written by hand, atomically as the runtime does;
    the runtime writes "1" again at its next pass and nopreempt keeps the VIP where it went."""
    holder = _holder(lab)
    tmp = keepalived.READY_FILE + ".drill"
    zero = f"printf '0\\n' > {tmp} && mv -f {tmp} {keepalived.READY_FILE}"

    def not_ready(at: float) -> float:
        lab.director(zero, n=holder)
        return drill.await_holder(lab, _other(holder), at, _logs(lab))

    fig, at, moved = drill.under_load(lab, not_ready)
    say(
        f"ready file 0 on director {holder} (holder): VIP on director {_other(holder)} within"
        f" {moved:.2f}s (polled), {fig} (goal 0-1 failed: {goal(fig.failed <= 1)})"
    )
    _await_ready(lab, holder, at)
    time.sleep(1.0)
    drill.one_holder(lab, _other(holder), _logs(lab))


def _crash_primary(lab, stack: Applier, say, goal) -> None:
    holder = _holder(lab)
    download = drill.Download(lab, seconds=24)
    # The flow is FLOW_AGE s old at the crash. At 3 s old it was reset in 2 of 6 runs (seen);
    # likely cause: IPVS's sync master sends a buffered connection state after up to ~2 s (its
    # flush time) and later under TCG, so a flow that young may not have reached the backup.
    started = time.time()
    time.sleep(FLOW_AGE - 2.0)  # under_load runs 2 s of load before the crash

    def crash(at: float) -> float:
        lab.crash(holder)
        return drill.await_holder(lab, _other(holder), at, _logs(lab))

    fig, at, moved = drill.under_load(lab, crash, after=4.0)
    drill.one_holder(lab, _other(holder), _logs(lab))
    got = download.result()
    say(
        f"primary crash (kill -9 director {holder}'s VM): VIP on director {_other(holder)} within"
        f" {moved:.2f}s (polled), {fig} (goal gap <= 500 ms: {goal(fig.gap <= 0.5)};"
        f" <= 3 failed: {goal(fig.failed <= 3)}), {drill.download_line(got, at)}"
        f" (goal survives: {goal(got['survived'])})"
    )
    say(f"(the download was {at - started:.1f}s old at the crash)")
    assert got["survived"], got  # connection sync on: the flow goes on through the survivor
    booted = lab.start_director(holder)
    ready = _await_ready(lab, holder, time.time())
    stack.log.clear()
    stack.apply(lab_stack(lab.describe()))  # `pulumi up` again: nothing to change
    seen = drill.watch_holders(lab, seconds=6.0)
    say(f"holders seen over 6 s after director {holder}'s return: {seen}")
    drill.one_holder(lab, _other(holder), _logs(lab))
    say(
        f"director {holder} booted again in {booted:.1f}s, its runtime restored it and was ready"
        f" {ready:.1f}s later; re-apply: {stack.log or 'no change'}; VIP stays on director"
        f" {_other(holder)} (no preemption)"
    )
    _tables_identical(lab, say, "the crashed director's return")


def _failback(lab, say, goal) -> None:
    holder = _holder(lab)
    back_to = _other(holder)
    _await_ready(lab, back_to, time.time())
    download = drill.Download(lab, seconds=15)
    time.sleep(2.0)  # the flow's state reaches the other director's backup sync daemon

    def move_back(at: float) -> float:
        lab.director(STOP_KEEPALIVED, n=holder)
        return drill.await_holder(lab, back_to, at, _logs(lab))

    fig, at, moved = drill.under_load(lab, move_back)
    got = download.result()
    _await_ready(lab, holder, at)
    drill.one_holder(lab, back_to, _logs(lab))
    say(
        f"failback (keepalived stopped on director {holder}): VIP on director {back_to} within"
        f" {moved:.2f}s (polled), {fig} (goal 0-1 failed: {goal(fig.failed <= 1)}),"
        f" {drill.download_line(got, at)} (goal survives: {goal(got['survived'])})"
    )
