"""The runtime's VRRP side (issue 10, contract section 5): keepalived.conf from the record,
checked by the real `keepalived -t`, keepalived under its own unit, both sync daemons, the
ready file, the handover and teardown, crash safety, status.

The stand-ins do not share the code's assumptions: the fake keepalived reads the installed file
with its own parser (instances, VIP lines) and holds the VIPs of what it parsed on the in-memory
kernel; the fake ipvsadm keeps the kernel's daemons and prints them as ipvsadm 1.31 does.
Records are written by the real agent."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from providers import agent, keepalived, ownership, runtime, vrrp
from tests import hostile
from tests.unit.test_agent_logic import OWNER, Crash, MemoryKernel, spec

VIP, VIP2, VIP3 = "203.0.113.201", "203.0.113.202", "203.0.113.203"
COMMAND = ("/usr/bin/python3", "-m", "providers.runtime", "run")
VRRP = {
    "virtualRouterId": 51,
    "priority": 150,
    "address": "203.0.113.2",
    "peers": ["203.0.113.3"],
    "advertSeconds": 0.1,
}
needs_keepalived = pytest.mark.skipif(
    shutil.which("keepalived") is None and not shutil.os.path.exists(keepalived.KEEPALIVED),
    reason="keepalived is not installed",
)


def parse_conf(text: str) -> dict[int, dict]:
    """vrid -> {priority, interface, vips}: what keepalived would hold, read independently."""
    out: dict[int, dict] = {}
    for block in re.findall(r"vrrp_instance \S+ \{(.*?)\n\}", text, re.S):
        vrid = int(re.search(r"virtual_router_id (\d+)", block).group(1))
        vips = re.findall(r"^\s+([0-9a-f.:]+)/\d+ dev (\S+)$", block, re.M)
        out[vrid] = {
            "priority": int(re.search(r"\n\s+priority (\d+)", block).group(1)),
            "interface": re.search(r"\n\s+interface (\S+)", block).group(1),
            "vips": sorted(v for v, _dev in vips),
            "peers": re.findall(r"^\s+(\S+) min_ttl 255$", block, re.M),
        }
    return out


class FakeHost(vrrp.Host):
    """keepalived (as master, holding what it parsed), ipvsadm's sync daemons, a clock."""

    def __init__(self, kernel: MemoryKernel, conf_path: str, ready_file: str):
        self.kernel, self.conf_path, self.ready_file = kernel, conf_path, ready_file
        self.running = False
        self.parsed: dict[int, dict] = {}
        self.daemons: dict[str, tuple[str, int]] = {}
        self.calls: list[tuple] = []
        self.now = 1000.0
        self.crash_after: int | None = None
        self.steps = 0

    def step(self, what):
        if self.crash_after is not None and self.steps >= self.crash_after:
            raise Crash(what)
        self.steps += 1

    def _hold(self, vips):
        for vip in vips:
            self.kernel.addresses.add((2, vip))

    def _release(self):
        for conf in self.parsed.values():
            for vip in conf["vips"]:
                self.kernel.addresses.discard((2, vip))

    def systemctl(self, *args):
        if args[0] != "is-active":
            self.step(args)
            self.calls.append(("systemctl", *args))
        code = 0
        if args[0] == "is-active":
            code = 0 if self.running else 3
        elif args[0] in ("start", "reload"):
            if args[0] == "reload" and not self.running:
                code = 1
            else:
                self._release()
                with open(self.conf_path) as f:
                    self.parsed = parse_conf(f.read())
                self.running = True
                self._hold(v for c in self.parsed.values() for v in c["vips"])
        elif args[0] == "stop":
            self._release()  # keepalived removes its VIPs when it stops
            self.running, self.parsed = False, {}
        return subprocess.CompletedProcess(args, code, "", "")

    def ipvsadm(self, *args):
        if args[:2] == ("--list", "--daemon"):
            text = "".join(
                f"{role} sync daemon (mcast={i}, syncid={n})\n"
                for role, (i, n) in sorted(self.daemons.items())
            )
            return subprocess.CompletedProcess(args, 0, text, "")
        self.step(args)
        self.calls.append(("ipvsadm", *args))
        if args[0] == "--start-daemon":
            role, interface, syncid = args[1], args[3], int(args[5])
            if role in self.daemons:
                return subprocess.CompletedProcess(args, 2, "", "File exists")
            self.daemons[role] = (interface, syncid)
        elif args[0] == "--stop-daemon":
            self.daemons.pop(args[1], None)
        return subprocess.CompletedProcess(args, 0, "", "")

    def hostname(self):
        return "director one!"  # not a router_id as it is

    heard: str | None = None  # a peer whose advert arrives while keepalived's start waits

    def heard_master(self, peers, vrids, seconds):
        self.now += seconds
        self.calls.append(("listen", tuple(peers), tuple(vrids)))
        return self.heard

    def monotonic(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds
        with open(self.ready_file) as f:  # keepalived sees the ready file (inotify)
            if f.read().strip() == "0":
                self._release()  # FAULT: it gives the VIPs away


@pytest.fixture
def director(tmp_path, monkeypatch):
    monkeypatch.setattr(ownership, "STATE_PATH", str(tmp_path / "state.json"))
    monkeypatch.setattr(ownership, "LOCK_PATH", str(tmp_path / "run" / "lock"))
    kernel = MemoryKernel()
    conf, ready = str(tmp_path / "etc" / "keepalived.conf"), str(tmp_path / "run" / "ready")
    host = FakeHost(kernel, conf, ready)
    manager = vrrp.Vrrp(
        host=host,
        conf_path=conf,
        state_path=str(tmp_path / "vrrp.json"),
        ready_file=ready,
        command=COMMAND,
    )
    logged: list[str] = []
    rt = runtime.Runtime(
        kernel,
        config_path=str(tmp_path / "runtime.json"),
        status_path=str(tmp_path / "run" / "status.json"),
        log=logged.append,
        health_path=str(tmp_path / "lib" / "health.json"),
        probes_path=str(tmp_path / "lib" / "probes.json"),
        sysctl_root=str(tmp_path / "sys"),
        vrrp_manager=manager,
    )
    manager.bound = rt._bound
    manager.log = logged.append
    rt.logged = logged
    rt.host, rt.paths = host, tmp_path
    return rt


def apply(rt, vrrp_part=VRRP, **kw):
    request = {"op": "apply", "spec": spec(**kw), "interface": "eth0"}
    if vrrp_part is not None:
        request["vrrp"] = vrrp_part
    return agent.Agent(rt.kernel).handle(json.loads(json.dumps(request)))


def delete(rt, vip=VIP, port=80):
    request = {"op": "delete", "protocol": "tcp", "vip": vip, "port": port, "owner": OWNER}
    return agent.Agent(rt.kernel).handle(request)


def ready(rt) -> str | None:
    try:
        return (rt.paths / "run" / "ready").read_text()
    except FileNotFoundError:
        return None


def settle(rt, seconds=vrrp.SYNC_SETTLE):
    rt.host.now += seconds
    rt.reconcile()


@needs_keepalived
def test_a_vrrp_service_gets_keepalived_sync_daemons_and_ready_in_that_order(director):
    rt, host = director, director.host
    apply(rt)
    assert rt.kernel.addresses == set()  # the agent bound nothing
    rt.reconcile()
    conf = (rt.paths / "etc" / "keepalived.conf").read_text()
    assert parse_conf(conf) == {
        51: {"priority": 150, "interface": "eth0", "vips": [VIP], "peers": ["203.0.113.3"]}
    }
    assert "router_id director-one-" in conf
    assert 'process "/usr/bin/python3" "-m" "providers.runtime" "run"' in conf
    assert host.daemons == {"master": ("eth0", 0), "backup": ("eth0", 0)}
    # The backup daemon has not caught up yet: not ready, keepalived not started.
    assert ready(rt) == "0\n" and not host.running
    assert rt.kernel.addresses == set()  # never bound by the runtime, and no drift for it
    assert not any("VIP" in n and "bind" in n for n in rt.logged)
    settle(rt, vrrp.SYNC_SETTLE - 0.5)
    assert ready(rt) == "0\n" and not host.running
    settle(rt, 0.5)
    assert ready(rt) == "1\n" and host.running
    assert rt.kernel.addresses == {(2, VIP)}  # keepalived's, as master
    assert [c[1] for c in host.calls] == ["--start-daemon", "--start-daemon", "start"]
    status = json.loads((rt.paths / "run" / "status.json").read_text())
    assert status["vrrp"]["syncDaemons"] == {"backup": "eth0 syncid 0", "master": "eth0 syncid 0"}
    assert status["vrrp"]["vips"] == {VIP: True} and status["vrrp"]["ready"] == "1"
    assert status["inSync"] is True


@needs_keepalived
def test_groups_per_virtual_router_and_a_change_is_a_reload(director):
    rt, host = director, director.host
    apply(rt)
    rt.reconcile()
    settle(rt)
    apply(rt, vip=VIP2)
    apply(rt, vrrp_part={**VRRP, "virtualRouterId": 52, "peers": ["203.0.113.4"]}, vip=VIP3)
    rt.reconcile()
    assert {vrid: c["vips"] for vrid, c in host.parsed.items()} == {51: [VIP, VIP2], 52: [VIP3]}
    assert host.parsed[52]["peers"] == ["203.0.113.4"]
    assert [c[1] for c in host.calls if c[0] == "systemctl"] == ["start", "reload"]
    before = len(host.calls)
    rt.reconcile()  # nothing changed: no reload
    assert len(host.calls) == before


def test_keepalived_t_refusing_the_file_installs_nothing_and_says_so(director):
    rt, host = director, director.host
    host.config_test = lambda text: "exit 1: (ipvs_ingress_51) interface eth0 does not exist"
    apply(rt)
    rt.reconcile()
    settle(rt)
    assert not (rt.paths / "etc" / "keepalived.conf").exists() and not host.running
    assert ready(rt) == "0\n"
    notes = json.loads((rt.paths / "run" / "status.json").read_text())["notes"]
    assert any("keepalived -t: exit 1" in n for n in notes)


@needs_keepalived
def test_a_table_out_of_sync_is_not_ready(director):
    rt = director
    (rt.paths / "runtime.json").write_text(json.dumps({"repair": {OWNER: False}}))
    apply(rt)
    rt.reconcile()
    settle(rt)
    assert ready(rt) == "1\n"
    del rt.kernel.services[("tcp", VIP, 80)]  # flushed by hand, repair off: drift stays
    settle(rt)
    assert ready(rt) == "0\n"


@needs_keepalived
def test_the_last_vrrp_service_gone_hands_over_then_stops_everything_it_started(director):
    rt, host = director, director.host
    host.daemons["master"] = ("eth1", 7)  # an operator's: never ipvs-ingress's to stop
    apply(rt)
    rt.reconcile()
    settle(rt)
    assert host.daemons == {"master": ("eth1", 7), "backup": ("eth0", 0)}
    notes = json.loads((rt.paths / "run" / "status.json").read_text())["notes"]
    assert any("sync daemon master runs on eth1 syncid 7" in n for n in notes)
    assert ready(rt) == "0\n"  # no master daemon of ours: not ready
    host.daemons.pop("master")  # the operator stops theirs
    settle(rt)
    assert ready(rt) == "1\n" and host.running
    delete(rt)
    rt.reconcile()
    assert not host.running and rt.kernel.addresses == set()
    assert host.daemons == {}
    for name in ("etc/keepalived.conf", "vrrp.json", "run/ready"):
        assert not (rt.paths / name).exists(), name
    # ready 0 came before the stop, and the VIP left before it (the handover).
    assert [c[1] for c in host.calls[-3:]] == ["stop", "--stop-daemon", "--stop-daemon"]
    assert json.loads((rt.paths / "run" / "status.json").read_text())["vrrp"] is None


def _run(rt, steps):
    apply(rt)
    for _ in range(steps):
        settle(rt)


def _final(rt) -> tuple:
    return (
        rt.host.running,
        sorted(rt.host.daemons.items()),
        ready(rt),
        sorted(rt.kernel.addresses),
        (rt.paths / "etc" / "keepalived.conf").exists(),
    )


@needs_keepalived
def test_a_kill_at_any_step_converges_on_the_next_passes(director, tmp_path_factory, monkeypatch):
    """Set up, then tear down, killed after each side effect in turn; a new runtime (same
    files, same kernel, same keepalived) converges to what an uninterrupted run reaches."""
    crash_points = 0
    for phase in ("up", "down"):
        for n in range(30):
            root = tmp_path_factory.mktemp(f"crash-{phase}-{n}")
            rt = _fresh(root, monkeypatch)
            if phase == "down":
                _run(rt, 2)
                delete(rt)
            else:
                apply(rt)
            rt.host.crash_after = rt.host.steps + n
            try:
                for _ in range(3):
                    settle(rt)
            except Crash:
                crash_points += 1
            else:
                break
            again = _fresh(root, monkeypatch, rt.kernel, rt.host)
            again.host.crash_after = None
            for _ in range(3):
                settle(again)
            if phase == "up":
                assert _final(again) == (
                    True,
                    [("backup", ("eth0", 0)), ("master", ("eth0", 0))],
                    "1\n",
                    [(2, VIP)],
                    True,  # fmt: skip
                ), n
            else:
                assert _final(again) == (False, [], None, [], False), n
    assert crash_points >= 6
    hostile.record(crash_points=crash_points)


_ATOMIC, _REMOVE = vrrp._atomic, vrrp._remove


def _fresh(root, monkeypatch, kernel=None, host=None):
    monkeypatch.setattr(ownership, "STATE_PATH", str(root / "state.json"))
    monkeypatch.setattr(ownership, "LOCK_PATH", str(root / "run" / "lock"))
    kernel = kernel or MemoryKernel()
    conf, ready_file = str(root / "etc" / "keepalived.conf"), str(root / "run" / "ready")
    host = host or FakeHost(kernel, conf, ready_file)
    write, remove = _ATOMIC, _REMOVE

    def atomic(path, data, mode):  # every file written or removed is a crash point too
        host.step(f"write {path}")
        write(path, data, mode)

    def unlink(path):
        host.step(f"remove {path}")
        remove(path)

    monkeypatch.setattr(vrrp, "_atomic", atomic)
    monkeypatch.setattr(vrrp, "_remove", unlink)
    manager = vrrp.Vrrp(
        host=host, conf_path=conf, state_path=str(root / "vrrp.json"), ready_file=ready_file,
        command=COMMAND,
    )  # fmt: skip
    rt = runtime.Runtime(
        kernel,
        config_path=str(root / "runtime.json"),
        status_path=str(root / "run" / "status.json"),
        log=lambda _line: None,
        health_path=str(root / "lib" / "health.json"),
        probes_path=str(root / "lib" / "probes.json"),
        sysctl_root=str(root / "sys"),
        vrrp_manager=manager,
    )
    manager.bound = rt._bound
    rt.host, rt.paths = host, root
    return rt


@needs_keepalived
def test_back_to_one_director_the_runtime_binds_the_vip_keepalived_let_go(director):
    rt, host = director, director.host
    apply(rt)
    rt.reconcile()
    settle(rt)
    assert rt.kernel.addresses == {(2, VIP)} and host.running
    apply(rt, vrrp_part=None)  # the stack has one director again
    rt.reconcile()
    assert not host.running  # keepalived stopped (it removed the VIP) ...
    assert rt.kernel.addresses == {(2, VIP)}  # ... and the same pass bound it again
    assert any(line == f"repaired VIP {VIP}: bind on eth0" for line in rt.logged)


@needs_keepalived
def test_status_command_says_who_holds_each_vip_the_daemons_and_ready(director):
    rt, host = director, director.host
    apply(rt)
    apply(rt, vip=VIP2)
    rt.reconcile()
    settle(rt)
    rt.kernel.addresses.discard((2, VIP2))  # (as if) held elsewhere
    out = io.StringIO()
    runtime.print_status(
        rt.kernel,
        status_path=str(rt.paths / "run" / "status.json"),
        config_path=str(rt.paths / "runtime.json"),
        out=out,
        health_path=str(rt.paths / "lib" / "health.json"),
        vrrp_host=host,
        ready_file=str(rt.paths / "run" / "ready"),
    )
    lines = out.getvalue().splitlines()
    assert f"VRRP: keepalived running ({vrrp.UNIT_NAME}), ready 1" in lines
    assert f"VIP {VIP} on eth0 (VRRP router 51): held by this director (master)" in lines
    assert f"VIP {VIP2} on eth0 (VRRP router 51): not held here (backup)" in lines
    assert "sync daemons: backup on eth0 syncid 0, master on eth0 syncid 0" in lines


def test_router_id_and_unit():
    assert vrrp.router_id("dir-1.example.org") == "dir-1.example.org"
    assert vrrp.router_id("_ bad host$") == "bad-host-"
    assert vrrp.router_id("") == "ipvs-ingress"
    unit = vrrp.unit_text()
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit
    assert "ExecStartPre=/bin/mkdir -p /run/ipvs-ingress" in unit
    assert "--use-file=/etc/ipvs-ingress/keepalived.conf" in unit
    assert "/etc/keepalived" not in unit and "[Install]" not in unit
    assert "After=network.target\n" in unit  # never after the runtime's own start job
    # Realtime, so adverts every 0.1 s never wait behind the runtime (Nice=-10) on a busy CPU.
    assert "CPUSchedulingPolicy=rr\nCPUSchedulingPriority=10\n" in unit


def test_the_shipped_sources_load_in_their_order_as_the_director_loads_them():
    """The transport's own boot loader (each module exec'd in order into a bare package, no
    files): a module imported before it is loaded fails there, as it did on the lab director
    ("cannot import name 'vrrp' from 'providers'")."""
    from providers import transport

    loader = transport._BOOT.replace(
        "sys.exit(sys.modules['providers.install'].main(S))\n",
        "print(sorted(n for n in sys.modules if n.startswith('providers')))\n",
    )
    done = subprocess.run(
        [sys.executable, "-c", loader],
        input=json.dumps(transport._SOURCES) + "\n",
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert done.returncode == 0, done.stderr[-400:]
    assert "'providers.vrrp'" in done.stdout and "'providers.keepalived'" in done.stdout


@needs_keepalived
def test_a_vip_bound_before_vrrp_stays_until_a_peer_is_master(director):
    """The conversion: keepalived would remove the bound VIP at its start (BACKUP) and add it
    back only once elected; so it starts only after a peer's advert, the VIP bound meanwhile."""
    rt, host = director, director.host
    apply(rt, vrrp_part=None)
    rt.reconcile()
    assert rt.kernel.addresses == {(2, VIP)}  # the runtime's, one director
    apply(rt)  # the stack gained a second director
    rt.reconcile()
    settle(rt)
    settle(rt)
    assert ready(rt) == "1\n" and not host.running
    assert rt.kernel.addresses == {(2, VIP)}  # still bound: clients reach it
    assert ("listen", ("203.0.113.3",), (51,)) in host.calls
    host.heard = "203.0.113.3"
    settle(rt)
    assert host.running
    assert any(line == "keepalived starts: a master at 203.0.113.3" for line in rt.logged)


@needs_keepalived
def test_without_a_peer_keepalived_starts_after_the_bounded_wait(director):
    rt, host = director, director.host
    apply(rt, vrrp_part=None)
    rt.reconcile()
    apply(rt)
    rt.reconcile()
    settle(rt)
    assert not host.running
    settle(rt, vrrp.CONVERT_WAIT)
    assert host.running
    assert any("no peer's advert in 120 s" in line for line in rt.logged)


def test_a_vrrp_advert_is_heard_on_a_raw_socket():
    """The real kernel path, on loopback only: a VRRPv3 advert (version 3, type 1, vrid 51,
    priority 100) sent to 127.0.0.1 is heard; one of another vrid, or priority 0, is not."""
    if os.geteuid() != 0:
        pytest.skip("raw sockets need root")
    host = vrrp.Host()

    def send(vrid, priority):
        with socket.socket(socket.AF_INET, socket.SOCK_RAW, 112) as out:
            for _ in range(10):
                out.sendto(bytes([0x31, vrid, priority, 1, 0, 10, 0, 0, 203, 0, 113, 201]), ("127.0.0.1", 0))  # fmt: skip
                time.sleep(0.02)

    for vrid, priority, want in ((51, 100, "127.0.0.1"), (52, 100, None), (51, 0, None)):
        sender = threading.Timer(0.1, send, (vrid, priority))
        sender.start()
        try:
            assert host.heard_master(["127.0.0.1"], [51], 0.6) == want, (vrid, priority)
        finally:
            sender.join()


@needs_keepalived
def test_a_reload_cut_or_refused_is_retried_on_the_next_pass(director):
    """The new file is installed, then the reload fails (or the runtime is killed before it):
    the next pass finds the file as it wants it, and must still make keepalived load it."""
    rt, host = director, director.host
    apply(rt)
    rt.reconcile()
    settle(rt)
    assert host.running and set(host.parsed) == {51}
    real = host.systemctl
    refused = []

    def refuse_reload(*args):
        if args[0] == "reload" and not refused:
            refused.append(args)
            return subprocess.CompletedProcess(args, 1, "", "Job for unit failed")
        return real(*args)

    host.systemctl = refuse_reload
    apply(rt, vrrp_part={**VRRP, "virtualRouterId": 52}, vip=VIP2)
    rt.reconcile()
    assert refused and set(host.parsed) == {51}  # keepalived still runs the old file
    rt.reconcile()
    assert set(host.parsed) == {51, 52}  # retried: keepalived holds VIP2 too
    assert (2, VIP2) in rt.kernel.addresses
    # And cut by a kill between the file and the reload: a new runtime reloads it.
    host.systemctl = real
    apply(rt, vrrp_part={**VRRP, "virtualRouterId": 53}, vip=VIP3)
    host.crash_after = host.steps  # the reload is the next step
    with pytest.raises(Crash):
        rt.reconcile()
    host.crash_after = None
    assert set(host.parsed) == {51, 52}
    again = vrrp.Vrrp(
        host=host, conf_path=rt.vrrp.conf_path, state_path=rt.vrrp.state_path,
        ready_file=rt.vrrp.ready_file, command=COMMAND, bound=rt._bound,
    )  # fmt: skip
    rt.vrrp = again
    rt.reconcile()
    assert set(host.parsed) == {51, 52, 53}


@needs_keepalived
def test_a_backup_daemon_found_running_after_a_reboot_is_timed_from_now(director):
    """vrrp.json keeps backupSince, a monotonic time, across a reboot; after it, a sync daemon
    started by the distribution's ipvsadm service at boot is found running. The time from the
    previous boot (larger than any now) must not hold the ready file at 0 until the clock
    passes it (days)."""
    rt, host = director, director.host
    apply(rt)
    rt.reconcile()
    settle(rt)
    assert ready(rt) == "1\n"
    # A reboot: the clock starts again, keepalived is not running, the daemons run again.
    state = json.loads((rt.paths / "vrrp.json").read_text())
    (rt.paths / "vrrp.json").write_text(json.dumps({**state, "backupSince": host.now + 86400}))
    host.now, host.running, host.parsed = 50.0, False, {}
    rt.kernel.addresses.clear()
    (rt.paths / "run" / "ready").unlink()
    rt.vrrp = vrrp.Vrrp(
        host=host, conf_path=rt.vrrp.conf_path, state_path=rt.vrrp.state_path,
        ready_file=rt.vrrp.ready_file, command=COMMAND, bound=rt._bound,
    )  # fmt: skip
    rt.reconcile()
    settle(rt)
    assert ready(rt) == "1\n" and host.running


@needs_keepalived
def test_a_new_file_keepalived_t_refuses_leaves_the_running_one_holding_the_vips(director):
    """Both directors render the same file from the same stack, so `keepalived -t` refuses it
    on both (e.g. a director's keepalived older than the template): the ready file must not
    go to 0 for that, or both directors drop every VIP while the running config is sound."""
    rt, host = director, director.host
    apply(rt)
    rt.reconcile()
    settle(rt)
    assert ready(rt) == "1\n" and rt.kernel.addresses == {(2, VIP)}
    host.config_test = lambda text: "exit 5: (ipvs_ingress_51) unknown keyword 'init_file'"
    apply(rt, vip=VIP2)
    settle(rt)
    settle(rt)
    assert ready(rt) == "1\n" and (2, VIP) in rt.kernel.addresses
    notes = json.loads((rt.paths / "run" / "status.json").read_text())["notes"]
    assert any("keepalived -t: exit 5" in n for n in notes)  # said, and retried each pass


@needs_keepalived
def test_deleting_the_last_service_of_a_vip_this_director_holds_hands_it_over_first(
    director, monkeypatch
):
    """A director removed from the stack (or a VIP from it): its services are deleted while
    its keepalived may be master. Deleting the service first would leave the VIP answering
    here with no service behind it (connections refused) until a later pass hands it over;
    the VIP leaves first (ready 0: FAULT, a priority 0 advert, the peer takes it)."""
    rt, host = director, director.host
    monkeypatch.setattr(agent, "VRRP_HANDOVER", rt.vrrp.hand_over)
    apply(rt)
    apply(rt, port=443)
    apply(rt, vrrp_part={**VRRP, "virtualRouterId": 52}, vip=VIP2)
    rt.reconcile()
    settle(rt)
    assert host.running and rt.kernel.addresses == {(2, VIP), (2, VIP2)}
    at_delete = []
    real = rt.kernel.apply

    def watch(spec_, op):
        if op.action == "del-service":
            at_delete.append((spec_.vip, spec_.port, (2, spec_.vip) in rt.kernel.addresses))
        return real(spec_, op)

    monkeypatch.setattr(rt.kernel, "apply", watch)
    delete(rt, VIP, 443)  # port 80 still serves the VIP: nothing handed over
    assert at_delete == [(VIP, 443, True)] and ready(rt) == "1\n"
    delete(rt, VIP, 80)  # the VIP's last service: it left this director before the delete
    assert at_delete[-1] == (VIP, 80, False)
    rt.reconcile()  # the next pass: keepalived reloaded without VIP, this director ready again
    settle(rt)
    assert ready(rt) == "1\n" and host.parsed[52]["vips"] == [VIP2] and 51 not in host.parsed
