"""The agent's reconcile/delete rules on an in-memory kernel: ownership, refusals before any
change, VIP release, the director lock and the JSON-lines protocol. The real kernel path is
tested against the lab director (tests/lab)."""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import json
import socket
import threading
import time

import pytest

from providers import agent, api, model, ownership


class Crash(BaseException):
    """kill -9: nothing after it runs, no except or finally of the agent's reaches the disk."""


class MemoryKernel:
    """Implements the Kernel interface the agent uses, on dicts, with the kernel's own rules:
    a destination is (address, port) and keeps the port the change names; adding what exists or
    changing what does not is refused; so is the broadcast address of an on-link prefix
    (EINVAL, as Linux does). Records every change; `crash_after` kills the "agent" there."""

    version = "test"
    interfaces = {"eth0": 2, "eth1": 3}
    networks = {2: ["203.0.113.0/24"], 3: ["198.51.100.0/24"]}

    def __init__(self):
        self.services: dict[tuple[str, str, int], model.LiveService] = {}
        self.addresses: set[tuple[int, str]] = set()
        self.off_link: set[str] = set()
        self.changes: list[str] = []
        self.loaded = True
        self.forwarding = False
        self.fail_on: str | None = None  # an op action the "kernel" refuses
        self.crash_after: int | None = None  # steps (changes and state writes) before a kill
        self.steps = 0
        self.route_oif = 2
        self.fwmarks: dict[
            int, tuple[str, dict]
        ] = {}  # mark -> (scheduler, {(addr, port): (fwd, w)})

    def step(self, what: str) -> None:
        if self.crash_after is not None and self.steps >= self.crash_after:
            raise Crash(what)
        self.steps += 1

    def missing_modules(self, scheduler=None):
        return [] if self.loaded else ["ip_vs"] + ([f"ip_vs_{scheduler}"] if scheduler else [])

    def ensure_ipvs(self, scheduler=None):
        if not self.loaded:
            self.loaded = True
            self.changes.append("modprobe")

    def open_ipvs(self):
        assert self.loaded

    def forwarding_on(self):
        return self.forwarding

    def ensure_forwarding(self):
        if not self.forwarding:
            self.step("forward")
            self.forwarding = True
            self.changes.append("forward")

    def ifindex(self, name):
        if name not in self.interfaces:
            raise agent.AgentError(
                "no-interface", f"interface {name!r} does not exist on the director"
            )
        return self.interfaces[name]

    def has_address(self, index, vip):
        return (index, vip) in self.addresses

    def bound_addresses(self, index):
        return {vip for i, vip in self.addresses if i == index}

    def table_text(self):
        """Changes whenever the table does, as /proc/net/ip_vs does: the services of a key in any
        deterministic text, then the fwmark services as the kernel prints them
        (ip_vs_info_seq_show: `FWM  %08X %s ` and `  -> %08X:%04X      %-7s %-6d ...`)."""
        if not self.loaded:
            return ""
        lines = [repr(sorted(self.services.items()))]
        for mark, (scheduler, dests) in sorted(self.fwmarks.items()):
            lines.append(f"FWM  {mark:08X} {scheduler} ")
            for (address, port), (forwarding, weight) in sorted(dests.items()):
                host = (
                    f"[{address}]"
                    if ":" in address
                    else f"{int(ipaddress.IPv4Address(address)):08X}"
                )
                lines.append(
                    f"  -> {host}:{port:04X}      {forwarding:<7} {weight:<6} 0          0"
                )
        return "\n".join(lines) + "\n"

    # The runtime's probe services (RuntimeKernel's contract: what exists already is kept).
    def add_probe_service(self, mark, node, scheduler):
        self.step("add-probe")
        if mark in self.fwmarks:
            raise agent.AgentError("kernel-refused", f"fwmark {mark:#x}: File exists")
        self.fwmarks[mark] = (scheduler, {})
        self.changes.append(f"add-probe {mark:#x}")
        self.add_probe_dest(mark, node)

    def add_probe_dest(self, mark, node):
        self.step("add-probe-dest")
        self.fwmarks[mark][1].setdefault((node, 0), ("Route", 1))
        self.changes.append(f"add-probe-dest {mark:#x} {node}")

    def local_addresses(self):
        return {"203.0.113.2", "198.51.100.2"} | {vip for _i, vip in self.addresses}

    def del_probe_service(self, mark, node):
        self.step("del-probe")
        self.fwmarks.pop(mark, None)
        self.changes.append(f"del-probe {mark:#x}")

    def source_for(self, node, exclude=frozenset()):
        own = {"203.0.113.": "203.0.113.2", "198.51.100.": "198.51.100.2"}
        return next((a for p, a in own.items() if node.startswith(p) and a not in exclude), None)

    def add_address(self, index, vip):
        self.step("bind")
        assert (index, vip) not in self.addresses, "EEXIST"
        self.addresses.add((index, vip))
        self.changes.append(f"bind {vip}@{index}")

    def del_address(self, index, vip):
        self.step("unbind")
        self.addresses.discard((index, vip))
        self.changes.append(f"unbind {vip}@{index}")

    def route_via(self, address):
        return self.route_oif, ("203.0.113.1" if address in self.off_link else None)

    def prefixes(self, index):
        return [ipaddress.ip_network(n) for n in self.networks[index]]

    def get_service(self, protocol, vip, port):
        return self.services.get((protocol, vip, port))

    def apply(self, spec, op):
        self.step(op.action)
        if op.action == self.fail_on:
            raise agent.AgentError("no-scheduler", f"refused {op.action}")
        key = (spec.protocol, spec.vip, spec.port)
        svc = self.services.get(key)
        if (op.action == "add-service") != (svc is None):
            raise agent.refusal(spec, op, errno.EEXIST if svc else errno.ESRCH)
        if op.action == "add-service":
            self.services[key] = model.LiveService(
                spec.protocol, spec.vip, spec.port, spec.scheduler, spec.persistence_seconds
            )
        elif op.action == "set-service":
            self.services[key] = dataclasses.replace(
                svc, scheduler=spec.scheduler, persistence_seconds=spec.persistence_seconds
            )
        elif op.action == "del-service":
            del self.services[key]
        else:
            dests = {(d.address, d.port): d for d in svc.dests}
            where = (op.address, op.port)
            if (op.action == "add-dest") == (where in dests):
                raise agent.refusal(spec, op, errno.EEXIST if where in dests else errno.ENOENT)
            if op.action == "add-dest" and self._broadcast(op.address):
                raise agent.refusal(spec, op, errno.EINVAL)
            if op.action == "del-dest":
                del dests[where]
            else:
                dests[where] = model.LiveDest(op.address, op.port, op.weight)
            self.services[key] = dataclasses.replace(svc, dests=tuple(dests.values()))
        self.changes.append(op.describe(spec))

    def _broadcast(self, address):
        addr = ipaddress.ip_address(address)
        nets = [ipaddress.ip_network(n) for ns in self.networks.values() for n in ns]
        return any(addr == n.broadcast_address for n in nets)

    def table(self, protocol="tcp", vip="203.0.113.201", port=80):
        """(address, port, weight, forwarding) rows of one service, sorted."""
        svc = self.services[(protocol, vip, port)]
        return sorted((d.address, d.port, d.weight, d.forwarding) for d in svc.dests)


@pytest.fixture
def kernel(tmp_path, monkeypatch):
    monkeypatch.setattr(ownership, "STATE_PATH", str(tmp_path / "state.json"))
    monkeypatch.setattr(ownership, "LOCK_PATH", str(tmp_path / "run" / "lock"))
    return MemoryKernel()


OWNER = "ipvs-ingress/dev"


def spec(
    vip="203.0.113.201",
    port=80,
    servers=(("203.0.113.11", 1), ("203.0.113.12", 1)),
    owner=OWNER,
):
    rs = [{"address": a, "weight": w} for a, w in servers]
    return {
        "owner": owner,
        "vip": vip,
        "port": port,
        "protocol": "tcp",
        "scheduler": "wlc",
        "persistenceSeconds": 0,
        "realServers": rs,
    }


def apply(kernel, interface="eth0", adopt=False, **kw):
    request = {"op": "apply", "spec": spec(**kw), "interface": interface, "adopt": adopt}
    return agent.Agent(kernel).handle(json.loads(json.dumps(request)))


def read(kernel, port=80, owner=OWNER, vip="203.0.113.201", interface="eth0"):
    return agent.Agent(kernel).handle(
        {"op": "read", "protocol": "tcp", "vip": vip, "port": port, "interface": interface}
        | {"owner": owner, "adopt": True}
    )


def delete(kernel, port=80, owner=OWNER, vip="203.0.113.201", adopt=True):
    return agent.Agent(kernel).handle(
        {"op": "delete", "protocol": "tcp", "vip": vip, "port": port}
        | {"owner": owner, "adopt": adopt, "interface": "eth0"}
    )


def test_apply_binds_vip_creates_service_and_reports_live_state(kernel):
    result = apply(kernel)
    # Forwarding first; the VIP last, once the service exists to take its traffic.
    assert kernel.changes[0] == "forward" and kernel.changes[-1] == "bind 203.0.113.201@2"
    assert result["touched"] == 4  # VIP, service, two destinations
    assert model.ipvsadm_lines(model.LiveService.from_dict(result["live"])) == [
        "TCP 203.0.113.201:80 wlc -> 203.0.113.11:80 Route 1",
        "TCP 203.0.113.201:80 wlc -> 203.0.113.12:80 Route 1",
    ]
    again = apply(kernel)
    assert again["touched"] == 0 and again["changes"] == []


def test_plan_is_a_dry_run(kernel):
    result = agent.Agent(kernel).handle({"op": "plan", "spec": spec(), "interface": "eth0"})
    assert result["changes"][0] == "set net.ipv4.ip_forward=1"
    assert result["changes"][-1] == "bind 203.0.113.201 on eth0"
    assert "add-service tcp/203.0.113.201:80 wlc persistent 0" in result["changes"]
    assert kernel.changes == [] and kernel.services == {}


def test_foreign_service_is_refused_and_never_touched(kernel):
    foreign = model.LiveService(
        "tcp", "203.0.113.201", 80, "rr", 0, (model.LiveDest("203.0.113.99", 80, 1),)
    )
    kernel.services[("tcp", "203.0.113.201", 80)] = foreign
    with pytest.raises(agent.AgentError) as err:
        apply(kernel)
    assert err.value.code == "foreign" and "ipvsadm -D" in str(err.value)
    deleted = delete(kernel, adopt=False)  # no stack holds it
    assert deleted == {"deleted": False, "reason": "not managed by ipvs-ingress"}
    assert kernel.services[("tcp", "203.0.113.201", 80)] == foreign and kernel.changes == []


def test_off_link_real_server_is_refused_before_any_change(kernel):
    kernel.off_link.add("203.0.113.12")
    with pytest.raises(agent.AgentError) as err:
        apply(kernel)
    assert err.value.code == "off-link" and "203.0.113.12 (via 203.0.113.1)" in str(err.value)
    assert kernel.changes == [] and kernel.addresses == set()


def test_unknown_interface_is_refused(kernel):
    with pytest.raises(agent.AgentError) as err:
        agent.Agent(kernel).handle({"op": "apply", "spec": spec(), "interface": "eth9"})
    assert err.value.code == "no-interface" and kernel.changes == []


def test_vip_is_released_only_with_its_last_managed_service(kernel):
    apply(kernel, port=80)
    apply(kernel, port=443)
    first = delete(kernel, port=80)
    assert (
        first == {"deleted": True, "removedVip": False} and (2, "203.0.113.201") in kernel.addresses
    )
    second = delete(kernel, port=443)
    assert second == {"deleted": True, "removedVip": True} and kernel.addresses == set()
    assert kernel.services == {}


def test_a_vip_bound_by_someone_else_is_used_but_never_removed(kernel):
    kernel.addresses.add((2, "203.0.113.201"))
    apply(kernel)
    delete(kernel)
    assert (2, "203.0.113.201") in kernel.addresses and not any(
        c.startswith("unbind") for c in kernel.changes
    )


def test_manual_drift_is_repaired_with_only_the_needed_changes(kernel):
    apply(kernel)
    svc = kernel.services[("tcp", "203.0.113.201", 80)]
    kernel.services[("tcp", "203.0.113.201", 80)] = dataclasses.replace(
        svc, dests=(model.LiveDest("203.0.113.11", 80, 9),)
    )
    kernel.changes.clear()
    result = apply(kernel)
    assert result["changes"] == [
        "set-dest tcp/203.0.113.201:80 -> 203.0.113.11:80 weight 1 Route",
        "add-dest tcp/203.0.113.201:80 -> 203.0.113.12:80 weight 1 Route",
    ]


def test_director_lock_serializes_holders(kernel):
    order = []

    def hold(name):
        with agent.director_lock():
            order.append(f"{name}+")
            time.sleep(0.1)
            order.append(f"{name}-")

    threads = [threading.Thread(target=hold, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert order in (["a+", "a-", "b+", "b-"], ["b+", "b-", "a+", "a-"])


def test_lock_wait_is_bounded_with_a_clear_error(kernel):
    with agent.director_lock():
        with pytest.raises(agent.AgentError) as err:
            with agent.director_lock(wait=0.2):
                pass
    assert err.value.code == "busy"


def _runtime_connection(make_handler):
    listener = api.Api("v9", make_handler, port=0, allowed=lambda conn: True)
    conn = socket.create_connection(("127.0.0.1", listener.port), timeout=10)
    return listener, conn, conn.makefile("r"), conn.makefile("w")


def test_json_lines_protocol_keeps_serving_after_errors(kernel):
    # The runtime's listener with the real Agent on the in-memory kernel.
    listener, conn, r, w = _runtime_connection(lambda: (agent.Agent(kernel).handle, lambda: None))
    requests = [
        {"id": 1, "op": "hello"},
        {"id": 2, "op": "nope"},
        {"id": 3, "op": "apply", "spec": spec(), "interface": "eth0"},
    ]
    with conn:
        for request in requests:
            w.write(json.dumps({**request, "version": "v9"}) + "\n")
        w.flush()
        lines = [json.loads(r.readline()) for _ in range(4)]
    listener.close(wait=0)
    assert lines[0]["ready"] is True and lines[0]["version"] == "v9"
    assert lines[1]["ok"] and lines[1]["result"]["agent"] == agent.PROTOCOL_VERSION
    assert lines[2] == {"id": 2, "ok": False, "code": "bad-request", "error": "unknown op 'nope'"}
    assert lines[3]["ok"] and lines[3]["result"]["touched"] == 4


def test_a_kernel_interface_that_cannot_open_is_reported_in_the_greeting():
    def no_pyroute2():
        raise agent.AgentError(
            "pyroute2-missing", "python3 cannot import pyroute2 (No module named 'pyroute2')"
        )

    listener, conn, r, w = _runtime_connection(lambda: api.kernel_handler(no_pyroute2))
    with conn:
        greeting = json.loads(r.readline())
        assert r.readline() == ""  # and the connection ends
    listener.close(wait=0)
    assert greeting == {
        "ready": False,
        "code": "pyroute2-missing",
        "error": "python3 cannot import pyroute2 (No module named 'pyroute2')",
    }


@pytest.mark.parametrize(
    ("version", "new_enough"),
    [
        ("0.9.7", True),
        ("0.9.5", True),
        ("0.9.5.post1", True),
        ("1.0", True),
        ("0.10.0", True),
        ("0.7.2", False),
        ("0.9.4", False),
        ("0.9.4rc5", False),  # once read as 0.9.45
        ("0.9.5rc1", False),  # a pre-release comes before its release
        ("0.9.5.dev3", False),
        ("0.9.45", True),
        ("garbage", False),
        ("", False),
    ],
)
def test_version_comparison(version, new_enough):
    assert (agent._version_tuple(version) >= agent.MIN_PYROUTE2) is new_enough


def test_failed_create_leaves_no_vip_answering_for_nothing(kernel):
    kernel.fail_on = "add-service"
    with pytest.raises(agent.AgentError):
        apply(kernel)
    assert kernel.addresses == set() and agent.Ownership.load().addresses == {}


def test_failed_delete_keeps_the_record_so_a_retry_finishes_it(kernel):
    apply(kernel)
    a = agent.Agent(kernel)
    request = {"op": "delete", "protocol": "tcp", "vip": "203.0.113.201", "port": 80}
    request |= {"owner": OWNER, "adopt": True}
    kernel.fail_on = "del-service"
    with pytest.raises(agent.AgentError):
        a.handle(request)
    assert "tcp/203.0.113.201:80" in agent.Ownership.load().services
    kernel.fail_on = None
    assert a.handle(request) == {"deleted": True, "removedVip": True}
    assert kernel.services == {} and kernel.addresses == set()


def test_changed_interface_moves_the_vip(kernel):
    apply(kernel)
    kernel.route_oif = 3  # the nodes are now reached through eth1
    result = agent.Agent(kernel).handle({"op": "apply", "spec": spec(), "interface": "eth1"})
    assert kernel.addresses == {(3, "203.0.113.201")}
    assert kernel.changes[-2:] == ["unbind 203.0.113.201@2", "bind 203.0.113.201@3"]
    assert result["touched"] == 2
    delete(kernel)
    assert kernel.addresses == set()


def test_dry_run_loads_nothing_and_lists_every_pending_change(kernel):
    kernel.loaded = False
    result = agent.Agent(kernel).handle({"op": "plan", "spec": spec(), "interface": "eth0"})
    assert result["changes"][:2] == ["load ip_vs ip_vs_wlc", "set net.ipv4.ip_forward=1"]
    assert kernel.changes == [] and not kernel.loaded and not kernel.forwarding


def test_destinations_at_another_port_added_by_hand_converge(kernel):
    apply(kernel)
    svc = kernel.services[("tcp", "203.0.113.201", 80)]
    by_hand = (model.LiveDest("203.0.113.99", 8080, 1), model.LiveDest("203.0.113.11", 8080, 1))
    kernel.services[("tcp", "203.0.113.201", 80)] = dataclasses.replace(
        svc, dests=svc.dests + by_hand
    )
    result = apply(kernel)
    assert sorted(result["changes"]) == [
        "del-dest tcp/203.0.113.201:80 -> 203.0.113.11:8080 Route",
        "del-dest tcp/203.0.113.201:80 -> 203.0.113.99:8080 Route",
    ]
    assert kernel.table() == [("203.0.113.11", 80, 1, 3), ("203.0.113.12", 80, 1, 3)]
    assert apply(kernel)["touched"] == 0


def test_conn_reuse_mode_gains_bit_2_and_keeps_the_others(tmp_path):
    """DR: a new SYN that matches an old FIN_WAIT entry must be scheduled anew (kernel docs,
    conn_reuse_mode bit 2), or a client reusing a port reaches a drained real server."""
    from providers.agent import reschedule_fin_wait

    mode = tmp_path / "conn_reuse_mode"
    mode.write_text("1\n")
    assert reschedule_fin_wait(str(mode)) is True and mode.read_text() == "3\n"
    assert reschedule_fin_wait(str(mode)) is False and mode.read_text() == "3\n"
    mode.write_text("0\n")
    assert reschedule_fin_wait(str(mode)) is True and mode.read_text() == "2\n"
    assert reschedule_fin_wait(str(tmp_path / "absent")) is False  # no IPVS sysctl: nothing
