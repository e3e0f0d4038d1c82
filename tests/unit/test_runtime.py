"""The director runtime on the in-memory kernel of test_agent_logic (destinations keyed by
(address, port), the kernel's own refusals): restore after a reboot, each kind of drift repaired
in one pass with its log line, nothing foreign touched, repair off per stack, pending records,
the director lock, the status file and command, systemd's notify protocol.

Records are written by the real agent (Agent.handle apply), as on a director. Expected tables
and log lines are written out literally, never computed with model.plan.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from providers import agent, model, ownership, runtime
from tests import hostile
from tests.unit.test_agent_logic import OWNER, Crash, MemoryKernel, spec

VIP, VIP2 = "203.0.113.201", "203.0.113.202"
KEY = f"tcp/{VIP}:80"
TABLE = [("203.0.113.11", 80, 1, 3), ("203.0.113.12", 80, 1, 3)]  # (address, port, weight, fwd)
OTHER = "team-b/prod"


@pytest.fixture
def paths(tmp_path, monkeypatch):
    monkeypatch.setattr(ownership, "STATE_PATH", str(tmp_path / "state.json"))
    monkeypatch.setattr(ownership, "LOCK_PATH", str(tmp_path / "run" / "lock"))
    return tmp_path


def apply(kernel, **kw):
    request = {"op": "apply", "spec": spec(**kw), "interface": "eth0"}
    return agent.Agent(kernel).handle(json.loads(json.dumps(request)))


def make_runtime(kernel, paths, restoring=False, config=None):
    if config is not None:
        (paths / "runtime.json").write_text(json.dumps(config))
    logged: list[str] = []
    rt = runtime.Runtime(
        kernel,
        config_path=str(paths / "runtime.json"),
        status_path=str(paths / "run" / "status.json"),
        log=logged.append,
        health_path=str(paths / "lib" / "health.json"),
        probes_path=str(paths / "lib" / "probes.json"),
        sysctl_root=str(paths / "sys"),
    )
    rt.restoring = restoring
    rt.logged = logged
    return rt


def settled(kernel, vips=((2, VIP),)):
    assert kernel.table() == TABLE
    svc = kernel.services[("tcp", VIP, 80)]
    assert (svc.scheduler, svc.persistence_seconds) == ("wlc", 0)
    assert kernel.addresses == set(vips)
    assert kernel.forwarding and kernel.loaded


def test_restores_everything_from_an_empty_kernel(paths):
    apply(MemoryKernel())
    apply(MemoryKernel(), port=443)  # the record holds both; the "kernels" are throwaway
    rebooted = MemoryKernel()
    rebooted.loaded = False  # after a reboot: no ip_vs, no table, no VIP, ip_forward 0
    rt = make_runtime(rebooted, paths, restoring=True)
    lines = rt.reconcile()
    assert lines == [
        "restored modules: load ip_vs ip_vs_wlc",
        "restored net.ipv4.ip_forward: 0 -> 1",
        f"restored {KEY}: add-service wlc",
        f"restored {KEY}: add-dest 203.0.113.11:80 weight 1",
        f"restored {KEY}: add-dest 203.0.113.12:80 weight 1",
        f"restored tcp/{VIP}:443: add-service wlc",
        f"restored tcp/{VIP}:443: add-dest 203.0.113.11:443 weight 1",
        f"restored tcp/{VIP}:443: add-dest 203.0.113.12:443 weight 1",
        f"restored VIP {VIP}: bind on eth0",
    ]
    assert rt.logged == lines
    settled(rebooted)
    assert rebooted.table(port=443) == [("203.0.113.11", 443, 1, 3), ("203.0.113.12", 443, 1, 3)]
    assert rebooted.changes[-1] == f"bind {VIP}@2"  # the VIP last, once the services exist
    changes = list(rebooted.changes)
    assert rt.reconcile() == [] and rebooted.changes == changes  # then nothing to do


def _dests(k, fn):
    svc = k.services[("tcp", VIP, 80)]
    k.services[("tcp", VIP, 80)] = dataclasses.replace(svc, dests=tuple(fn(list(svc.dests))))


def _set(k, address, **changes):
    _dests(k, lambda ds: [dataclasses.replace(d, **changes) if d.address == address else d for d in ds])  # fmt: skip


def _svc(k, **changes):
    k.services[("tcp", VIP, 80)] = dataclasses.replace(k.services[("tcp", VIP, 80)], **changes)


def _unload(k):
    k.services.clear()  # rmmod ip_vs takes the table with it
    k.loaded = False


R = f"repaired {KEY}: "
DRIFT = {
    "flush (ipvsadm -C)": (
        lambda k: k.services.clear(),
        [
            R + "add-service wlc",
            R + "add-dest 203.0.113.11:80 weight 1",
            R + "add-dest 203.0.113.12:80 weight 1",
        ],  # fmt: skip
    ),
    "destination deleted": (
        lambda k: _dests(k, lambda ds: [d for d in ds if d.address != "203.0.113.12"]),
        [R + "add-dest 203.0.113.12:80 weight 1"],
    ),
    "destination added": (
        lambda k: _dests(k, lambda ds: ds + [model.LiveDest("203.0.113.13", 80, 1)]),
        [R + "del-dest 203.0.113.13:80 (not recorded)"],
    ),
    "a recorded node at another port": (
        lambda k: _dests(k, lambda ds: ds + [model.LiveDest("203.0.113.11", 8080, 1)]),
        [R + "del-dest 203.0.113.11:8080 (not recorded)"],
    ),
    "weight changed": (
        lambda k: _set(k, "203.0.113.11", weight=5),
        [R + "set-dest 203.0.113.11:80 weight 5 -> 1"],
    ),
    "forwarding method changed": (
        lambda k: _set(k, "203.0.113.12", forwarding=0),
        [R + "set-dest 203.0.113.12:80 forwarding Masq -> Route"],
    ),
    "scheduler changed": (
        lambda k: _svc(k, scheduler="rr"),
        [R + "set-service scheduler rr -> wlc"],
    ),
    "persistence turned on": (
        lambda k: _svc(k, persistence_seconds=300),
        [R + "set-service persistence 300 -> 0"],
    ),
    "VIP deleted": (lambda k: k.addresses.clear(), [f"repaired VIP {VIP}: bind on eth0"]),
    "ip_forward turned off": (
        lambda k: setattr(k, "forwarding", False),
        ["repaired net.ipv4.ip_forward: 0 -> 1"],
    ),
    "ip_vs unloaded": (
        _unload,
        ["repaired modules: load ip_vs ip_vs_wlc"]
        + [
            R + "add-service wlc",
            R + "add-dest 203.0.113.11:80 weight 1",
            R + "add-dest 203.0.113.12:80 weight 1",
        ],  # fmt: skip
    ),
}


@pytest.mark.parametrize("case", list(DRIFT))
def test_each_drift_is_repaired_in_one_pass_with_its_log_line(case, paths):  # a drift case
    kernel = MemoryKernel()
    apply(kernel)
    rt = make_runtime(kernel, paths)
    assert rt.reconcile() == []  # in sync: a pass changes nothing
    drift, expected = DRIFT[case]
    drift(kernel)
    assert rt.reconcile() == expected
    assert rt.logged == expected
    settled(kernel)
    assert rt.reconcile() == []
    assert rt.status()["repairs"][-1]["line"] == expected[-1]
    hostile.record(drift_cases=1)


def test_foreign_services_and_addresses_are_never_touched(paths):
    kernel = MemoryKernel()
    # Someone else's service, another port on our VIP, an address of theirs, and a VIP they
    # had bound before our apply (keepalived's, say): none of it is in the record.
    foreign = model.LiveService("tcp", "203.0.113.250", 8080, "rr", 0, (model.LiveDest("203.0.113.11", 8080, 3, 0),))  # fmt: skip
    same_vip = model.LiveService("tcp", VIP, 8080, "sh", 60, (model.LiveDest("203.0.113.99", 8080, 1),))  # fmt: skip
    kernel.services[("tcp", "203.0.113.250", 8080)] = foreign
    kernel.services[("tcp", VIP, 8080)] = same_vip
    kernel.addresses |= {(2, "203.0.113.99"), (2, VIP2)}
    apply(kernel)
    apply(kernel, vip=VIP2, port=443)
    assert json.loads(Path(ownership.STATE_PATH).read_text())["addresses"] == {
        VIP: {"interface": "eth0"}
    }
    rt = make_runtime(kernel, paths)
    kernel.services.pop(("tcp", VIP, 80))
    kernel.addresses.discard((2, VIP2))  # their VIP went away (a failover): not ours to bind
    lines = rt.reconcile()
    assert [line.split(":")[0] for line in lines] == [f"repaired {KEY.split(':')[0]}"] * 3
    assert kernel.services[("tcp", "203.0.113.250", 8080)] is foreign
    assert kernel.services[("tcp", VIP, 8080)] is same_vip
    assert kernel.addresses == {(2, VIP), (2, "203.0.113.99")}
    assert not any(VIP2 in line and "bind" in line for line in rt.logged)
    assert rt.reconcile() == []


def test_repair_off_for_one_stack_leaves_its_drift_and_repairs_the_other(paths):
    kernel = MemoryKernel()
    apply(kernel)
    apply(kernel, vip=VIP2, port=443, owner=OTHER)
    rt = make_runtime(kernel, paths, config={"intervalSeconds": 1, "repair": {OTHER: False}})
    assert rt.reconcile() == []
    _set(kernel, "203.0.113.11", weight=5)
    kernel.services.pop(("tcp", VIP2, 443))
    kernel.addresses.clear()
    assert rt.reconcile() == [
        f"repaired {KEY}: set-dest 203.0.113.11:80 weight 5 -> 1",
        f"repaired VIP {VIP}: bind on eth0",  # VIP2 only serves the stack left alone
    ]
    settled(kernel)
    assert ("tcp", VIP2, 443) not in kernel.services and (3, VIP2) not in kernel.addresses
    left = f"left tcp/{VIP2}:443 ({OTHER}): repair is off for stack {OTHER}"
    assert left in rt.logged
    status = rt.status()["services"][f"tcp/{VIP2}:443"]
    assert (status["inSync"], status["kept"], status["live"]) == (False, False, [])
    assert status["drift"][0] == "add-service wlc"
    rt.logged.clear()
    assert rt.reconcile() == [] and rt.logged == []  # said once, not every pass


def test_repair_off_still_restores_at_boot_but_not_after_a_process_restart(paths):
    kernel = MemoryKernel()
    apply(kernel, owner=OTHER)
    config = {"repair": {OTHER: False}}
    first = make_runtime(kernel, paths, config=config)
    first.restoring = runtime.Runtime(kernel, status_path=first.status_path).restoring
    assert first.restoring  # no status of this boot: the first start since boot
    kernel.services.clear()
    assert first.reconcile()[0] == f"restored {KEY}: add-service wlc"
    assert kernel.table() == TABLE
    # Killed and restarted by systemd: the status file of this boot is there.
    again = runtime.Runtime(kernel, config_path=first.config_path, status_path=first.status_path)
    assert not again.restoring
    assert again.repairs[-1]["line"] == f"restored {KEY}: add-dest 203.0.113.12:80 weight 1"
    kernel.services.clear()
    assert again.reconcile() == [] and ("tcp", VIP, 80) not in kernel.services


def test_pending_services_are_left_for_the_next_apply_and_said_once(paths):
    kernel = MemoryKernel()
    apply(kernel, port=443)
    kernel.crash_after = kernel.steps + 1  # killed after ip_forward, before add-service
    with pytest.raises(Crash):
        apply(kernel)
    kernel.crash_after = None
    assert json.loads(Path(ownership.STATE_PATH).read_text())["services"][KEY]["state"] == "pending"
    rt = make_runtime(kernel, paths)
    before = list(kernel.changes)
    assert rt.reconcile() == [] and kernel.changes == before  # nothing made for it
    note = f"left {KEY} ({OWNER}): recorded as 'pending' (an apply was interrupted): the stack's next pulumi up completes it"  # fmt: skip
    assert rt.logged == [note]
    assert rt.status()["services"][KEY]["kept"] is False
    assert rt.reconcile() == [] and rt.logged == [note]  # once
    apply(kernel)  # the stack's next apply completes it; from then on the runtime keeps it
    kernel.services[("tcp", VIP, 80)] = dataclasses.replace(
        kernel.services[("tcp", VIP, 80)], dests=()
    )
    assert rt.reconcile() == [
        f"repaired {KEY}: add-dest 203.0.113.11:80 weight 1",
        f"repaired {KEY}: add-dest 203.0.113.12:80 weight 1",
    ]
    assert rt.logged[-1] == f"resolved: {note}"


def test_adopted_records_without_a_spec_are_left_alone(paths):
    kernel = MemoryKernel()
    apply(kernel)
    os.unlink(ownership.STATE_PATH)  # lost; a refresh re-adopts the live service without spec
    agent.Agent(kernel).handle(
        {"op": "read", "protocol": "tcp", "vip": VIP, "port": 80, "interface": "eth0"}
        | {"owner": OWNER, "adopt": True}
    )
    rt = make_runtime(kernel, paths)
    kernel.services.clear()
    assert rt.reconcile() == [] and kernel.services == {}
    assert (
        rt.logged
        == [
            f"left {KEY} ({OWNER}): adopted without a recorded spec: the stack's next pulumi up records it"  # fmt: skip
        ]
    )


def test_a_provider_apply_holding_the_lock_is_never_interleaved(paths):
    kernel = MemoryKernel()
    apply(kernel)
    rt = make_runtime(kernel, paths, config={"intervalSeconds": 0.5})
    kernel.services.clear()
    with ownership.director_lock():
        assert rt.reconcile() == [] and kernel.services == {}
        assert rt.logged == []  # a long apply is no news
        assert rt.reconcile() == rt.reconcile() == [] and kernel.services == {}
    assert rt.logged[-1].startswith("the director lock is busy (a provider apply is running)")
    assert len(rt.reconcile()) == 3
    assert rt.logged[-1].startswith("resolved: the director lock is busy")
    settled(kernel)


def test_a_record_changed_meanwhile_is_read_again_under_the_lock(paths, monkeypatch):
    """The provider deletes the service between the runtime's look and its repair."""
    kernel = MemoryKernel()
    apply(kernel)
    rt = make_runtime(kernel, paths)
    kernel.services.clear()
    real_lock = ownership.director_lock

    def provider_delete_first(*args, **kw):
        agent.Agent(kernel).handle(
            {"op": "delete", "protocol": "tcp", "vip": VIP, "port": 80, "owner": OWNER}
        )
        return real_lock(*args, **kw)

    monkeypatch.setattr(runtime, "director_lock", provider_delete_first)
    assert rt.reconcile() == []
    assert kernel.services == {} and kernel.addresses == set()


def test_an_unreadable_record_changes_nothing(paths):
    kernel = MemoryKernel()
    apply(kernel)
    Path(ownership.STATE_PATH).write_text("{not json")
    rt = make_runtime(kernel, paths)
    kernel.services.clear()
    assert rt.reconcile() == [] and kernel.services == {}
    assert rt.logged[0].startswith(f"{ownership.STATE_PATH} is not valid JSON")
    assert rt.logged[0].endswith("the runtime changes nothing meanwhile")


def test_a_missing_interface_is_retried_not_fatal(paths):
    kernel = MemoryKernel()
    apply(kernel)
    kernel.addresses.clear()
    kernel.interfaces = {"eth1": 3}  # eth0 not there yet (the driver is still loading)
    rt = make_runtime(kernel, paths, config={"intervalSeconds": 3})
    assert rt.reconcile() == []
    assert rt.logged == [f"VIP {VIP}: interface 'eth0' does not exist (yet): retrying every 3 s"]
    kernel.interfaces = {"eth0": 2, "eth1": 3}
    assert rt.reconcile() == [f"repaired VIP {VIP}: bind on eth0"]
    settled(kernel)


def test_settings_bad_values_are_one_line_each_and_defaults_are_used(tmp_path):
    path = tmp_path / "runtime.json"
    path.write_text(json.dumps({"intervalSeconds": "fast", "repair": {"a/b": "no"}, "x": 1}))
    config, problems = runtime.read_config(str(path))
    assert config == runtime.Config(2.0, {})
    assert (
        problems
        == [
            f"{path}: intervalSeconds: 'fast' is not a number of seconds from 0.5 to 3600: fix it; using 2",  # fmt: skip
            f"{path}: repair: {{'a/b': 'no'}} is not an object of stack: true/false: fix it; repairing every stack",  # fmt: skip
            f"{path}: unknown setting 'x': use intervalSeconds or repair",
        ]
    )
    path.write_text("[")
    assert runtime.read_config(str(path))[0] == runtime.Config()
    path.write_text(json.dumps({"intervalSeconds": 5, "repair": {"a/b": False}}))
    assert runtime.read_config(str(path)) == (runtime.Config(5.0, {"a/b": False}), [])
    assert runtime.read_config(str(tmp_path / "absent.json")) == (runtime.Config(), [])


def status_text(kernel, rt, paths) -> tuple[int, list[str]]:
    out = io.StringIO()
    code = runtime.print_status(
        kernel, status_path=rt.status_path, config_path=rt.config_path, out=out
    )
    return code, out.getvalue().splitlines()


def test_status_prints_desired_against_live_the_repairs_version_and_stacks(paths):
    kernel = MemoryKernel()
    apply(kernel)
    rt = make_runtime(kernel, paths)
    _set(kernel, "203.0.113.12", weight=9)
    rt.reconcile()
    saved = json.loads(Path(rt.status_path).read_text())
    assert saved["version"] == runtime.source_version() and saved["pid"] == os.getpid()
    assert saved["services"][KEY]["inSync"] is True and saved["inSync"] is True
    assert 0 < saved["lastPassSeconds"] < 5
    code, lines = status_text(kernel, rt, paths)
    assert code == 0
    assert lines[0] == f"runtime: running, pid {os.getpid()}, version {runtime.source_version()}"
    assert lines[1].startswith("last reconcile: 20") and lines[1].endswith("s ago; every 2 s)")
    assert lines[2:8] == [
        f"stacks: {OWNER} (repair on)",
        f"{KEY} [{OWNER}] applied: in sync",
        f"  desired TCP {VIP}:80 wlc -> 203.0.113.11:80 Route 1",
        f"  desired TCP {VIP}:80 wlc -> 203.0.113.12:80 Route 1",
        f"  live    TCP {VIP}:80 wlc -> 203.0.113.11:80 Route 1",
        f"  live    TCP {VIP}:80 wlc -> 203.0.113.12:80 Route 1",
    ]
    assert lines[8:10] == [f"VIP {VIP} on eth0: bound", "last repairs: "]
    assert lines[10].endswith(f"Z repaired {KEY}: set-dest 203.0.113.12:80 weight 9 -> 1")
    # Drift the runtime has not seen yet: status reads the kernel now.
    _set(kernel, "203.0.113.11", weight=4)
    kernel.addresses.clear()
    code, lines = status_text(kernel, rt, paths)
    assert code == 1
    assert f"{KEY} [{OWNER}] applied: DRIFT: set-dest 203.0.113.11:80 weight 4 -> 1" in lines
    assert f"  live    TCP {VIP}:80 wlc -> 203.0.113.11:80 Route 4" in lines
    assert f"VIP {VIP} on eth0: NOT BOUND" in lines


def test_status_says_when_the_runtime_is_not_running_or_runs_other_sources(paths):
    kernel = MemoryKernel()
    apply(kernel)
    rt = make_runtime(kernel, paths)
    code, lines = status_text(kernel, rt, paths)
    assert code == 1 and lines[0].startswith("runtime: not running (no status file)")
    rt.reconcile()
    saved = json.loads(Path(rt.status_path).read_text())
    child = os.fork()
    if child == 0:
        os._exit(0)
    os.waitpid(child, 0)  # a pid that surely ended
    garbage = ["x", {"time": "noon"}, {"time": 1.0}]  # a damaged file is shown, not a traceback
    saved |= {"pid": child, "version": "0123", "repairs": garbage}
    Path(rt.status_path).write_text(json.dumps(saved))
    code, lines = status_text(kernel, rt, paths)
    assert code == 1 and "last repairs: none" in lines
    assert lines[0] == (
        f"runtime: not running, pid {child}, version 0123 "
        f"(installed sources: {runtime.source_version()}: restart it)"
    )


def test_version_is_a_hash_of_the_director_sources(tmp_path):
    src = Path(runtime.__file__).parent
    copy = tmp_path / "providers"
    copy.mkdir()
    for name in runtime.SOURCE_FILES:
        shutil.copy(src / name, copy / name)
    assert runtime.source_version(copy) == runtime.source_version()
    assert len(runtime.source_version()) == 16
    (copy / "model.py").write_text((src / "model.py").read_text() + "\n# changed\n")
    assert runtime.source_version(copy) != runtime.source_version()
    (copy / "agent.py").unlink()
    assert runtime.source_version(copy).startswith("unknown (")


def test_unit_text_restarts_always_and_runs_the_installed_sources():
    text = runtime.unit_text("/opt/ii", python="/usr/bin/python3")
    lines = text.splitlines()
    for wanted in (
        "Type=notify",
        "Restart=always",
        "RestartSec=1",
        "Nice=-10",
        "StartLimitIntervalSec=0",
        "Environment=PYTHONPATH=/opt/ii PYTHONUNBUFFERED=1",
        "ExecStart=/usr/bin/python3 -m providers.runtime run",
        "WantedBy=multi-user.target",
        "DefaultDependencies=no",
        "After=local-fs.target systemd-modules-load.service systemd-sysctl.service",
        "RequiresMountsFor=/var/lib/ipvs-ingress /opt/ii",
    ):
        assert wanted in lines, wanted
    sections = [line for line in lines if line.startswith("[")]
    assert sections == ["[Unit]", "[Service]", "[Install]"]


def test_run_notifies_systemd_once_ready_and_survives_a_failing_pass(paths, monkeypatch):
    sock_path = str(paths / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(sock_path)
    listener.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", sock_path)
    kernel = MemoryKernel()
    apply(kernel)
    rt = make_runtime(kernel, paths, config={"intervalSeconds": 0.5})
    stop, passes = threading.Event(), []
    real = kernel.get_service

    def flaky(*args):  # the second pass meets a kernel error; the third must still run
        passes.append(1)
        if len(passes) == 2:
            raise OSError(105, "No buffer space available")
        if len(passes) >= 4:
            stop.set()
        return real(*args)

    kernel.get_service = flaky
    kernel.services.clear()
    try:
        assert runtime.run(rt, stop) == 0
        messages = [listener.recv(4096).decode() for _ in range(3)]
    finally:
        listener.close()
    assert messages[0] == "READY=1"  # after the first pass restored the table
    assert messages[1].startswith("STATUS=")
    assert "reconcile failed: OSError: [Errno 105] No buffer space available" in rt.logged
    assert rt.logged[-1] == "stopping: the IPVS table and VIPs stay as they are"
    assert kernel.table() == TABLE  # restored, and kept after the failed pass


# --- the cheap mark: a steady pass reads no table over netlink ----------------------------------

# As the lab's kernel prints /proc/net/ip_vs (fields padded, lines end in spaces), with the
# first real server's counters to fill in.
REAL_TEXT = "".join(
    line + "\n"
    for line in (
        "IP Virtual Server version 1.2.1 (size=4096)",
        "Prot LocalAddress:Port Scheduler Flags",
        "  -> RemoteAddress:Port Forward Weight ActiveConn InActConn",
        "TCP  CB0071C9:0050 wlc ",
        "  -> CB00710B:0050      Route   1      {a:<10} {b:<10}",
        "  -> CB00710C:0050      Route   1      0          0         ",
    )
)


class CountingKernel(MemoryKernel):
    def __init__(self):
        super().__init__()
        self.netlink_reads = 0

    def get_service(self, protocol, vip, port):
        self.netlink_reads += 1
        return super().get_service(protocol, vip, port)


def test_the_mark_ignores_connection_counters_and_nothing_else():
    class Text(MemoryKernel):
        text = ""

        def table_text(self):
            return self.text

    k, owners, config = Text(), ownership.Ownership.__new__(ownership.Ownership), runtime.Config()
    owners.services, owners.addresses = {}, {}
    marks = []
    for text in (REAL_TEXT.format(a=0, b=0), REAL_TEXT.format(a=17, b=2300),
                 REAL_TEXT.format(a=0, b=0).replace("Route   1 ", "Route   2 "),
                 REAL_TEXT.format(a=0, b=0).replace("wlc", "rr "),
                 REAL_TEXT.format(a=0, b=0).replace("Route", "Masq ")):  # fmt: skip
        k.text = text
        marks.append(runtime.mark(k, owners, config, False))
    assert marks[0] == marks[1]  # traffic moved the counters: no change
    assert len(set(marks[1:])) == 4  # a weight, the scheduler, the forwarding method: changes


@pytest.mark.parametrize(
    "drift",
    ["flush", "weight", "dest deleted", "vip unbound", "ip_forward off", "ip_vs unloaded"],
)
def test_after_steady_passes_each_drift_is_still_repaired_in_one_pass(paths, drift):
    kernel = CountingKernel()
    apply(kernel)
    rt = make_runtime(kernel, paths)
    rt.reconcile()  # full: finds it in sync, marks it steady
    reads = kernel.netlink_reads
    for _ in range(5):
        assert rt.reconcile() == []
    assert kernel.netlink_reads == reads and rt.full_passes == 1  # steady: no netlink table read
    svc = kernel.services[("tcp", VIP, 80)]
    if drift == "flush":
        kernel.services.clear()
    elif drift == "weight":
        dests = (dataclasses.replace(svc.dests[0], weight=5), *svc.dests[1:])
        kernel.services[("tcp", VIP, 80)] = dataclasses.replace(svc, dests=dests)
    elif drift == "dest deleted":
        kernel.services[("tcp", VIP, 80)] = dataclasses.replace(svc, dests=svc.dests[1:])
    elif drift == "vip unbound":
        kernel.addresses.clear()
    elif drift == "ip_forward off":
        kernel.forwarding = False
    else:
        kernel.loaded, kernel.services = False, {}
    assert rt.reconcile() != []  # repaired in the very next pass
    settled(kernel)
    assert rt.full_passes == 2 and rt.reconcile() == [] and rt.full_passes == 3
    assert rt.reconcile() == [] and rt.full_passes == 3  # steady again


def steady(paths) -> tuple[CountingKernel, runtime.Runtime]:
    """A runtime that judged the table once in full and then found nothing changed."""
    kernel = CountingKernel()
    apply(kernel)
    rt = make_runtime(kernel, paths)
    rt.reconcile()
    rt.reconcile()
    assert rt.full_passes == 1
    return kernel, rt


def test_a_change_of_the_record_or_the_settings_is_judged_in_full(paths):
    kernel, rt = steady(paths)
    apply(kernel, port=443)  # a provider's apply: the record changed
    rt.reconcile()
    assert rt.full_passes == 2
    (paths / "runtime.json").write_text(json.dumps({"repair": {OWNER: False}}))
    rt.reconcile()
    assert rt.full_passes == 3 and rt.status()["services"][KEY]["kept"] is False


def test_a_full_pass_comes_at_least_every_minute_anyway(paths, monkeypatch):
    _, rt = steady(paths)
    monkeypatch.setattr(runtime.time, "monotonic", lambda: rt.full_due + 0.1)
    rt.reconcile()
    assert rt.full_passes == 2


def test_while_a_provider_applies_full_passes_wait_for_it_to_go_quiet(paths):
    kernel = CountingKernel()
    apply(kernel)
    rt = make_runtime(kernel, paths)
    rt.reconcile()
    quiet = [0.0]  # seconds since the provider's last request
    rt.idle = lambda: quiet[0]
    for port in (443, 444, 445):  # a create in progress: the record moves every pass
        apply(kernel, port=port)
        reads = kernel.netlink_reads
        rt.reconcile()
        assert kernel.netlink_reads == reads  # the pass read no table
    assert rt.deferred_passes == 3 and rt.full_passes == 1
    kernel.services.clear()  # drift meanwhile: the fourth busy pass in a row judges it anyway
    assert len(rt.reconcile()) == 12 and rt.full_passes == 2  # 4 services x (1 + 2 dests)
    settled(kernel)
    apply(kernel, port=446)
    assert rt.reconcile() == [] and (rt.deferred_passes, rt.full_passes) == (4, 2)
    kernel.services.clear()  # drift meanwhile: judged as soon as the provider is quiet
    quiet[0] = rt.config.interval
    assert len(rt.reconcile()) == 15 and (rt.deferred_passes, rt.full_passes) == (4, 3)
    settled(kernel)


def test_a_restore_at_boot_never_waits(paths):
    apply(MemoryKernel())
    rebooted = MemoryKernel()
    rebooted.loaded = False
    rt = make_runtime(rebooted, paths, restoring=True)
    rt.idle = lambda: 0.0
    assert rt.reconcile() != []
    settled(rebooted)


# --- the boot restore lasts until a pass finds everything in sync -------------------------------


def test_a_boot_restore_the_lock_held_off_is_done_by_the_next_free_pass(paths):
    kernel = MemoryKernel()
    apply(kernel, owner=OTHER)
    config = {"intervalSeconds": 0.5, "repair": {OTHER: False}}
    rt = make_runtime(kernel, paths, restoring=True, config=config)
    kernel.services.clear()  # as after a reboot; the stack's repair is off
    kernel.addresses.clear()
    with ownership.director_lock():  # a provider's apply holds the lock through the first pass
        assert rt.reconcile() == [] and kernel.services == {}
    assert rt.reconcile() == [
        f"restored {KEY}: add-service wlc",
        f"restored {KEY}: add-dest 203.0.113.11:80 weight 1",
        f"restored {KEY}: add-dest 203.0.113.12:80 weight 1",
        f"restored VIP {VIP}: bind on eth0",
    ]
    settled(kernel)
    kernel.services.clear()  # restored once: from now on the stack's repair is off again
    assert rt.reconcile() == [] and kernel.services == {}


def test_a_boot_restore_binds_a_vip_whose_interface_appears_later(paths):
    kernel = MemoryKernel()
    apply(kernel, owner=OTHER)
    rt = make_runtime(kernel, paths, restoring=True, config={"repair": {OTHER: False}})
    kernel.services.clear()
    kernel.addresses.clear()
    kernel.interfaces = {"eth1": 3}  # eth0's driver is still loading
    assert rt.reconcile() == [
        f"restored {KEY}: add-service wlc",
        f"restored {KEY}: add-dest 203.0.113.11:80 weight 1",
        f"restored {KEY}: add-dest 203.0.113.12:80 weight 1",
    ]
    kernel.interfaces = {"eth0": 2, "eth1": 3}
    assert rt.reconcile() == [f"restored VIP {VIP}: bind on eth0"]
    settled(kernel)
    kernel.addresses.clear()
    assert rt.reconcile() == [] and kernel.addresses == set()  # repair off from now on


# --- a busy provider delays full passes, boundedly ----------------------------------------------


def test_a_provider_busy_every_pass_delays_a_repair_by_three_passes_at_most(paths):
    kernel = CountingKernel()
    apply(kernel)
    rt = make_runtime(kernel, paths)
    rt.reconcile()
    rt.idle = lambda: 0.0  # a request ran within the interval before every pass
    flushed = [
        f"repaired {KEY}: add-service wlc",
        f"repaired {KEY}: add-dest 203.0.113.11:80 weight 1",
        f"repaired {KEY}: add-dest 203.0.113.12:80 weight 1",
    ]
    for round in (1, 2):  # the count of passes deferred in a row starts again after a full one
        kernel.services.clear()
        assert [rt.reconcile() for _ in range(4)] == [[], [], [], flushed]
        settled(kernel)
        assert (rt.deferred_passes, rt.full_passes) == (3 * round, 1 + round)


# --- the version reported is the running code's -------------------------------------------------


def test_the_version_is_the_running_codes_not_the_newly_installed_one(tmp_path):
    src = Path(runtime.__file__).parent
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(src, tmp_path / "versions" / "a" / "providers", ignore=ignore)
    shutil.copytree(src, tmp_path / "versions" / "b" / "providers", ignore=ignore)
    model_b = tmp_path / "versions" / "b" / "providers" / "model.py"
    model_b.write_text(model_b.read_text() + "\n# version b\n")
    a = runtime.source_version(tmp_path / "versions" / "a" / "providers")
    b = runtime.source_version(tmp_path / "versions" / "b" / "providers")
    assert a != b
    os.symlink("versions/a", tmp_path / "current")
    # Started from a; the installer swaps `current` to b before it restarts the runtime.
    script = (
        "import os, sys\n"
        "from providers import runtime\n"
        "os.symlink('versions/b', 'next'); os.replace('next', 'current')\n"
        "rt = runtime.Runtime(None, status_path='status.json', config_path='runtime.json')\n"
        "print(rt.version, runtime.source_version())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "current")}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    # The runtime reports a (it runs a's code); the status command's "installed sources": b.
    assert done.stdout.split() == [a, b]


# --- status without root ------------------------------------------------------------------------


class NoRootKernel(MemoryKernel):
    """The netlink IPVS commands of a user who is not root."""

    def __init__(self, where: str):
        super().__init__()
        self.where = where

    def open_ipvs(self):
        if self.where == "open_ipvs":
            raise PermissionError(1, "Operation not permitted")

    def get_service(self, protocol, vip, port):
        if self.where == "get_service":
            raise OSError(1, "Operation not permitted\n" + "netlink says no " * 20)
        return super().get_service(protocol, vip, port)


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        (
            "open_ipvs",
            "live table: unreadable (PermissionError: [Errno 1] Operation not permitted): run it as root",  # fmt: skip
        ),
        (
            "get_service",
            "live table: unreadable (PermissionError: [Errno 1] Operation not permitted netlink says no netlink says no netlink says no netlink says no netli): run it as root",  # fmt: skip
        ),
    ],
)
def test_status_without_root_is_one_line_not_a_traceback(paths, where, expected):
    kernel = MemoryKernel()
    apply(kernel)
    rt = make_runtime(kernel, paths)
    rt.reconcile()
    code, lines = status_text(NoRootKernel(where), rt, paths)
    assert code == 1
    assert lines[-1] == expected
    assert len(expected.split("(", 1)[1].rsplit(")", 1)[0]) <= 120


def test_status_with_an_unreadable_record_is_one_line_not_a_traceback(paths, monkeypatch):
    kernel = MemoryKernel()
    apply(kernel)
    rt = make_runtime(kernel, paths)
    rt.reconcile()

    def refused(path=None):  # /var/lib/ipvs-ingress/state.json to a user who is not root
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(runtime.Ownership, "load", refused)
    code, lines = status_text(kernel, rt, paths)
    assert code == 1
    assert lines[-1] == (
        f"record: unreadable (PermissionError: [Errno 13] Permission denied: "
        f"'{ownership.STATE_PATH}'"[: 120 + len("record: unreadable (")]
        + "): run it as root"
    )


def test_a_vip_is_not_bound_while_its_service_cannot_be_restored(paths):
    """Answering ARP for a VIP with no service behind it would blackhole it: the VIP waits."""
    apply(MemoryKernel())
    rebooted = MemoryKernel()
    rebooted.fail_on = "add-service"  # e.g. the scheduler's module is missing after the reboot
    rt = make_runtime(rebooted, paths, restoring=True)
    rt.reconcile()
    assert rebooted.services == {} and rebooted.addresses == set()
    rebooted.fail_on = None
    rt.reconcile()
    settled(rebooted)
