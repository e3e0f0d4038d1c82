"""The lab with two directors (`Lab(directors=2)`, `./dev lab up --directors 2`, issue 10 item 8):
two director VMs on the nodes' segment, each with its own address, tap, MAC, disk and files,
crashed the hard way and booted again on its disk, and the lab stack written with both.

The lab tests boot a module lab of their own (two VMs) and tear it down at the end; marked
`slow_lab` too: `-m "not slow_lab"` skips them, `-m slow_lab` runs them alone. The others boot
nothing: qemu is replaced by a stand-in process carrying qemu's command line.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from components import config as stack_config
from tests.conftest import _say, own_lab
from tests.lab import __main__ as lab_cli
from tests.lab import harness, provision, state, vm

HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMUmmSK6gtVhUmYnKSwP+B/ZoYbs1FkFCtqNm4AxvOq"
TOKEN_PATH = "/var/lib/lab-directors-token"  # /var/lib is on the director's own disk


def slow_lab(test):
    return pytest.mark.lab(pytest.mark.slow_lab(test))


# -- no VM: qemu replaced by a stand-in process -----------------------------------------------


def _artifacts(tmp_path: Path) -> provision.Artifacts:
    (tmp_path / "k").write_text("not a key: the stand-ins never ssh\n")
    (tmp_path / "h.pub").write_text(f"{HOST_KEY} root@lab\n")
    files = {name: tmp_path / name for name in ("vmlinux", "initrd", "s2", "s2sd", "sshd", "py")}
    return provision.Artifacts(
        cache=tmp_path,
        kernel_version="6.1.0-0-amd64",
        kernel_tree=tmp_path / "kernel",
        vmlinux=files["vmlinux"],
        initrd=files["initrd"],
        stage2=files["s2"],
        stage2_systemd=files["s2sd"],
        sshd_config=files["sshd"],
        pyroute2_dir=files["py"],
        vm_site_packages="/usr/lib/python3/dist-packages",
        client_key=tmp_path / "k",
        host_key=tmp_path / "h",
        elapsed=0.0,
    )


# Sleeps; a SIGTERM (a polite stop) leaves a mark, a SIGKILL (the hard way) cannot.
_STAND_IN = """
import signal, sys, time
def polite(*_):
    open(sys.argv[1], "w").write("SIGTERM")
    sys.exit(0)
signal.signal(signal.SIGTERM, polite)
time.sleep(120)
"""


class StandIns:
    """vm.start's stand-in: a sleeping process whose command line holds qemu's (as the real one
    does, so leftovers() would find it by the lab id), no network, no VM."""

    def __init__(self, marks: Path) -> None:
        self.marks = marks
        self.started: list[tuple[str, list[str], Path, subprocess.Popen]] = []

    def __call__(self, lab_ns: str, argv: list[str], run_dir: Path) -> subprocess.Popen:
        mark = self.marks / f"stand-in-{len(self.started)}.term"
        proc = subprocess.Popen(
            [sys.executable, "-c", _STAND_IN, str(mark), *argv],
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.started.append((lab_ns, argv, run_dir, proc))
        return proc

    def stopped_politely(self, i: int) -> bool:
        return (self.marks / f"stand-in-{i}.term").exists()

    def stop(self) -> None:
        for *_, proc in self.started:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def stand_ins(monkeypatch, tmp_path_factory):
    """A two-director lab's life cycle without namespaces, nodes or VMs."""
    fake = StandIns(tmp_path_factory.mktemp("marks"))
    monkeypatch.setattr(harness.vm, "start", fake)
    monkeypatch.setattr(harness.Lab, "_build_network", lambda self: None)
    monkeypatch.setattr(harness.nodes_mod.Nodes, "start", lambda self: None)
    yield fake
    fake.stop()


def _option(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def _cmdline(argv: list[str]) -> list[str]:
    return _option(argv, "-append").split()


def test_two_directors_get_their_own_address_tap_mac_disk_and_files(tmp_path, stand_ins):
    lab = harness.Lab(artifacts=_artifacts(tmp_path), directors=2).start(wait_ready=False)
    try:
        run = lab.run_dir
        (ns1, argv1, dir1, _), (ns2, argv2, dir2, _) = stand_ins.started
        assert ns1 == ns2 == lab.lab_ns
        # Director 1 keeps the one-director lab's places; director 2 has a folder of its own.
        assert (dir1, dir2) == (run, run / "director2")
        assert lab.director_ips == ["203.0.113.2", "203.0.113.3"]
        for argv, addr, tap, mac, folder in (
            (argv1, "203.0.113.2", "tap0", "52:54:00:a0:00:02", run),
            (argv2, "203.0.113.3", "tap1", "52:54:00:a0:00:03", run / "director2"),
        ):
            assert f"lab_addr={addr}/24" in _cmdline(argv)
            assert _option(argv, "-netdev") == f"tap,id=n0,ifname={tap},script=no,downscript=no"
            assert _option(argv, "-device").startswith("virtio-9p-pci")  # the root, then the NIC
            assert f"virtio-net-pci,netdev=n0,mac={mac}" in argv
            assert _option(argv, "-drive").startswith(f"file={folder / 'disk.img'},format=raw")
            assert (folder / "disk.img").stat().st_size == vm.DISK_MIB * 1024 * 1024
            assert _option(argv, "-serial") == f"file:{folder / 'serial.log'}"
            assert json.loads((folder / "vm.json").read_text()) == {"init": "systemd", "argv": argv}
            assert (folder / "known_hosts").read_text() == f"{addr} {HOST_KEY}\n"
            assert lab.id in _option(argv, "-name")
        assert _option(argv1, "-name") != _option(argv2, "-name")

        # ssh to each: its address, its known_hosts (its own pinned line), its master socket.
        for n, addr, folder in ((1, "203.0.113.2", run), (2, "203.0.113.3", run / "director2")):
            argv = lab.ssh_argv("hostname", n=n)
            assert argv[-2:] == [f"root@{addr}", "hostname"]
            assert f"UserKnownHostsFile={folder / 'known_hosts'}" in argv
            assert f"ControlPath={folder / 'ssh.sock'}" in argv
            assert "StrictHostKeyChecking=yes" in argv
            assert lab.director_config(n)["host"] == addr
        assert lab.ssh_argv("x") == lab.ssh_argv("x", n=1)  # director(cmd) is director 1's
        with pytest.raises(ValueError, match="director 3 is not in this lab"):
            lab.ssh_argv("x", n=3)

        whats = [p["what"] for p in lab.footprint()["procs"]]
        assert whats == ["qemu", "qemu director2"]
        assert lab.live_directors() == [1, 2]
    finally:
        lab.close()


def test_teardown_kills_both_directors_stand_ins_and_leaves_nothing(tmp_path, stand_ins):
    lab = harness.Lab(artifacts=_artifacts(tmp_path), directors=2).start(wait_ready=False)
    footprint = lab.footprint()
    pids = sorted(p["pid"] for p in footprint["procs"])
    assert pids == sorted(proc.pid for *_, proc in stand_ins.started)
    assert len(pids) == 2
    assert harness.leftovers(footprint) != []  # the check sees them while they live
    lab.close()
    assert harness.leftovers(footprint) == []
    assert all(proc.poll() is not None for *_, proc in stand_ins.started)
    assert not lab.run_dir.exists()  # both disks with it


def test_crash_kills_one_director_and_start_boots_it_on_the_same_disk(
    tmp_path, stand_ins, monkeypatch
):
    lab = harness.Lab(artifacts=_artifacts(tmp_path), directors=2, persistent=True)
    lab.start(wait_ready=False)
    lab.adopt_by_vm()  # as `./dev lab up` does: the lab lives as long as its VMs
    try:
        first, second = (proc for *_, proc in stand_ins.started)
        assert lab._state.owner.pid == first.pid

        lab.crash(1)
        assert not Path(f"/proc/{first.pid}").exists()  # gone, and reaped
        assert not stand_ins.stopped_politely(0)  # SIGKILL: the hard way
        assert second.poll() is None  # director 2 untouched
        assert lab.live_directors() == [2]
        # Not stale while director 2 lives: it owns the lab now.
        assert lab._state.owner.pid == second.pid
        assert state.cleanup_stale(tmp_path) == []
        with pytest.raises(RuntimeError, match="director 1's VM is not running"):
            lab.crash(1)

        waited = []
        monkeypatch.setattr(harness, "_wait_for_ssh", lambda run, info, proc, n: waited.append(n))
        lab.start_director(1)
        (_, argv_again, dir_again, again) = stand_ins.started[-1]
        assert argv_again == stand_ins.started[0][1]  # same command line: the same disk
        assert dir_again == lab.run_dir
        assert waited == [1]
        assert lab.live_directors() == [1, 2]
        with pytest.raises(RuntimeError, match="director 1's VM runs already"):
            lab.start_director(1)
        whats = sorted(p["what"] for p in lab.footprint()["procs"])
        assert whats == ["qemu", "qemu director2"]  # the dead qemu is no longer tracked
        assert again.poll() is None
    finally:
        lab.close()
    assert all(proc.poll() is not None for *_, proc in stand_ins.started)


def test_directors_boot_side_by_side_and_each_is_timed(tmp_path, stand_ins, monkeypatch):
    def slow_ready(info: dict, proc: subprocess.Popen) -> float:
        time.sleep(0.6)  # a boot: both must be under way at once
        return time.monotonic()

    masters = []
    monkeypatch.setattr(harness, "_wait_ready", slow_ready)
    monkeypatch.setattr(harness, "_start_ssh_master", lambda run, info, n: masters.append(n))
    lab = harness.Lab(artifacts=_artifacts(tmp_path), directors=2).start()
    try:
        assert sorted(lab.director_boot_times) == [1, 2]
        assert all(t >= 0.6 for t in lab.director_boot_times.values())
        assert lab.director_boot_seconds < 1.15  # not 2 x 0.6 one after the other
        assert masters == [1, 2]
    finally:
        lab.close()


def test_one_director_lab_is_as_before(tmp_path, stand_ins):
    lab = harness.Lab(artifacts=_artifacts(tmp_path)).start(wait_ready=False)
    try:
        ((_, argv, folder, _),) = stand_ins.started
        assert folder == lab.run_dir
        assert "ifname=tap0," in _option(argv, "-netdev")
        assert "virtio-net-pci,netdev=n0,mac=52:54:00:a0:00:02" in argv
        assert [p["what"] for p in lab.footprint()["procs"]] == ["qemu"]
        assert not (lab.run_dir / "director2").exists()
        assert lab.ssh_argv("x")[-2:] == ["root@203.0.113.2", "x"]
    finally:
        lab.close()
    with pytest.raises(ValueError, match="a lab has 1..2 directors, not 3"):
        harness.Lab(artifacts=_artifacts(tmp_path), directors=3)


def test_keepalived_is_masked_in_the_systemd_directors(tmp_path):
    art = _artifacts(tmp_path)
    systemd = _cmdline(vm.qemu_argv(art, tmp_path, "203.0.113.3/24", "x", "systemd", tmp_path))
    assert "systemd.mask=keepalived.service" in systemd
    assert "systemd.mask=ssh.service" in systemd  # with the lab's other masks
    busybox = _cmdline(vm.qemu_argv(art, tmp_path, "203.0.113.3/24", "x", "busybox", n=2))
    assert not any(o.startswith("systemd.") for o in busybox)


def test_holders_are_the_directors_with_the_vip_bound():
    bound = {1: {"203.0.113.2", "203.0.113.201"}, 2: {"203.0.113.3", "2001:db8::1"}}
    assert harness.holders_of(["203.0.113.201", "2001:0db8:0::1", "203.0.113.202"], bound) == {
        "203.0.113.201": [1],
        "2001:0db8:0::1": [2],  # compared as addresses, not as text
        "203.0.113.202": [],
    }
    split = {2: {"203.0.113.201"}, 1: {"203.0.113.201"}}
    assert harness.holders_of(["203.0.113.201"], split) == {"203.0.113.201": [1, 2]}
    assert harness.holders_of(["203.0.113.201"], {}) == {"203.0.113.201": []}


def test_a_lab_described_before_it_had_directors_is_director_one():
    old = {"host": "203.0.113.2", "runDir": "/r", "knownHosts": "/r/known_hosts", "port": 22}
    assert harness.director_count(old) == 1
    assert harness.director_info(old, 1) == old
    with pytest.raises(ValueError, match="director 2 is not in this lab: its directors are 1..1"):
        harness.director_info(old, 2)


# -- the lab stack (`./dev lab up`) -----------------------------------------------------------


def _info(tmp_path: Path, directors: int) -> dict:
    tmp_path.mkdir(exist_ok=True)
    return harness.Lab(artifacts=_artifacts(tmp_path), directors=directors).describe()


ONE_DIRECTOR_STACK = """\
# Written by `./dev lab up` for the local director lab; not committed.
# kubernetes: false: the lab's nodes forward the VIP themselves, so the stack manages
# only the director and `pulumi up --stack lab` needs no cluster or kubeconfig.
config:
  ipvs-ingress:kubernetes: false
  ipvs-ingress:vips:
  - address: 203.0.113.201
    ports:
    - port: 80
      protocol: tcp
  ipvs-ingress:realServers:
  - address: 203.0.113.11
    weight: 1
  - address: 203.0.113.12
    weight: 1
  ipvs-ingress:director:
    host: 203.0.113.2
    port: 22
    user: root
    hostKey: {key}
    interface: eth0
    proxyCommand: ip netns exec {ns} socat - TCP:%h:%p
"""


def test_the_one_director_stack_file_is_unchanged(tmp_path, monkeypatch):
    monkeypatch.setattr(lab_cli, "STACK_FILE", tmp_path / "Pulumi.lab.yaml")
    monkeypatch.setattr(lab_cli.shutil, "which", lambda _name: None)
    info = _info(tmp_path, 1)
    lab_cli.write_lab_stack(info)
    expected = ONE_DIRECTOR_STACK.format(key=HOST_KEY, ns=info["namespaces"]["lab"])
    assert (tmp_path / "Pulumi.lab.yaml").read_text() == expected


def test_the_two_director_stack_lists_both_with_priority_and_address(tmp_path, monkeypatch):
    monkeypatch.setattr(lab_cli, "STACK_FILE", tmp_path / "Pulumi.lab.yaml")
    monkeypatch.setattr(lab_cli.shutil, "which", lambda _name: None)
    info = _info(tmp_path, 2)
    lab_cli.write_lab_stack(info)
    cfg = yaml.safe_load((tmp_path / "Pulumi.lab.yaml").read_text())["config"]
    proxy = f"ip netns exec {info['namespaces']['lab']} socat - TCP:%h:%p"
    common = {"port": 22, "user": "root", "hostKey": HOST_KEY, "interface": "eth0"}
    assert cfg["ipvs-ingress:directors"] == [
        {"host": "203.0.113.2", **common, "proxyCommand": proxy, "priority": 150,
         "address": "203.0.113.2"},
        {"host": "203.0.113.3", **common, "proxyCommand": proxy, "priority": 100,
         "address": "203.0.113.3"},
    ]  # fmt: skip
    assert "ipvs-ingress:director" not in cfg  # the config takes one or the other, never both
    assert cfg["ipvs-ingress:vips"] == [
        {"address": "203.0.113.201", "ports": [{"port": 80, "protocol": "tcp"}]}
    ]


@pytest.mark.skipif(
    not hasattr(stack_config, "HA_DIRECTOR_KEYS"),
    reason="ipvs-ingress:directors is parsed by components/config.py of the ha branch",
)
def test_the_two_director_stack_is_what_the_program_reads_as_directors(tmp_path, monkeypatch):
    monkeypatch.setattr(lab_cli, "STACK_FILE", tmp_path / "Pulumi.lab.yaml")
    monkeypatch.setattr(lab_cli.shutil, "which", lambda _name: None)
    lab_cli.write_lab_stack(_info(tmp_path, 2))
    raw = yaml.safe_load((tmp_path / "Pulumi.lab.yaml").read_text())["config"]
    cfg = stack_config.load_stack_file(raw)
    assert [(d.director.host, d.priority, d.address) for d in cfg.directors] == [
        ("203.0.113.2", 150, "203.0.113.2"),
        ("203.0.113.3", 100, "203.0.113.3"),
    ]
    assert cfg.vrrp


def _printed(info: dict, capsys) -> tuple[list[str], list]:
    """What `up`/`status` print about a lab: its lines, and the value the by-hand
    `pulumi config set` line gives."""
    lab_cli._print_info(info)
    lines = capsys.readouterr().out.splitlines()
    (by_hand,) = [line for line in lines if line.startswith("  pulumi config set ipvs-ingress:d")]
    return lines, [shlex.split(by_hand)[3], json.loads(shlex.split(by_hand)[4])]


def test_up_prints_each_director_and_the_config_for_a_stack_by_hand(tmp_path, capsys):
    lines, (key, value) = _printed(_info(tmp_path / "one", 1), capsys)
    assert "  director     root@203.0.113.2:22 (interface eth0)" in lines
    assert not any(line.startswith("  director 2") for line in lines)
    assert any(
        line.startswith("  nodes        node1=203.0.113.11 node2=203.0.113.12 (") for line in lines
    )
    assert key == "ipvs-ingress:director"
    assert value["host"] == "203.0.113.2"

    info = _info(tmp_path / "two", 2)
    lines, (key, value) = _printed(info, capsys)
    assert "  director 1   root@203.0.113.2:22 (interface eth0)" in lines
    assert "  director 2   root@203.0.113.3:22 (interface eth0, VRRP priority 100)" in lines
    examples = [shlex.split(line) for line in lines if line.startswith("  ssh -i ")]
    run_dir = Path(info["runDir"])
    assert [(e[-2], e[4]) for e in examples] == [
        ("root@203.0.113.2", f"UserKnownHostsFile={run_dir / 'known_hosts'}"),
        ("root@203.0.113.3", f"UserKnownHostsFile={run_dir / 'director2' / 'known_hosts'}"),
    ]
    assert key == "ipvs-ingress:directors"
    assert [(d["host"], d["priority"], d["address"]) for d in value] == [
        ("203.0.113.2", 150, "203.0.113.2"),
        ("203.0.113.3", 100, "203.0.113.3"),
    ]


@pytest.mark.skipif(os.geteuid() != 0, reason="the lab CLI refuses to run without root")
def test_the_cli_crashes_and_starts_a_director_of_a_lab_left_up(
    tmp_path, stand_ins, monkeypatch, capsys
):
    monkeypatch.setenv("IPVS_INGRESS_LAB_CACHE", str(tmp_path))
    lab = harness.Lab(artifacts=_artifacts(tmp_path), directors=2, persistent=True)
    lab.start(wait_ready=False)
    lab.adopt_by_vm()  # as `up` leaves it
    footprint = lab.footprint()
    first, second = (proc for *_, proc in stand_ins.started)
    monkeypatch.setattr(harness, "_wait_for_ssh", lambda run, info, proc, n: None)
    try:
        assert lab_cli.main(["crash", "2"]) == 0
        assert "director 2's VM killed (SIGKILL)" in capsys.readouterr().out
        assert not Path(f"/proc/{second.pid}").exists()
        assert not stand_ins.stopped_politely(1)
        assert first.poll() is None

        assert lab_cli.main(["crash", "2"]) == 1
        assert "director 2's VM is not running" in capsys.readouterr().err
        assert lab_cli.main(["crash", "3"]) == 1
        assert "director 3 is not in this lab: its directors are 1..2" in capsys.readouterr().err

        assert lab_cli.main(["start", "2"]) == 0
        assert "director 2 is back" in capsys.readouterr().out
        assert stand_ins.started[-1][1] == stand_ins.started[1][1]  # its own command line
        assert stand_ins.started[-1][3].poll() is None
    finally:
        assert lab_cli.main(["down"]) == 0
    assert harness.leftovers(footprint) == []
    assert all(proc.poll() is not None for *_, proc in stand_ins.started)


def test_the_cli_takes_one_or_two_directors():
    for argv in (["up", "--directors", "3"], ["up", "--directors", "0"], ["crash"], ["start"]):
        with pytest.raises(SystemExit) as exit_:
            lab_cli.main(argv)
        assert exit_.value.code == 2, argv


# -- two director VMs ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two(request: pytest.FixtureRequest):
    with own_lab(request, "two directors", directors=2) as lab:
        times = ", ".join(
            f"director {n} {t:.1f}s" for n, t in sorted(lab.director_boot_times.items())
        )
        _say(
            request,
            f"two directors: qemu start to sshd: {times}; both up {lab.director_boot_seconds:.1f}s",
        )
        yield lab


_qemus_seen: list[dict] = []


def _remember_qemus(lab: harness.Lab) -> None:
    _qemus_seen.extend(p for p in lab.footprint()["procs"] if p["what"].startswith("qemu"))


def _eth0_addresses(lab: harness.Lab, n: int) -> list[str]:
    out = json.loads(lab.director("ip -j -4 addr show dev eth0", n=n).stdout)
    return [a["local"] for link in out for a in link["addr_info"]]


@slow_lab
def test_both_directors_boot_and_answer_ssh_with_the_pinned_key(two, tmp_path):
    machine_ids = set()
    for n, addr in ((1, "203.0.113.2"), (2, "203.0.113.3")):
        assert _eth0_addresses(two, n) == [addr]  # the VM that answered is director n
        out = two.director(
            "cat /proc/1/comm /etc/machine-id; systemctl is-enabled keepalived.service; "
            "systemctl is-active keepalived.service",
            n=n,
            check=False,
        ).stdout.split()
        assert out[0] == "systemd"
        machine_ids.add(out[1])
        # Masked: whatever the host enables, only ipvs-ingress's runtime may start keepalived.
        assert out[2:] == ["masked-runtime", "inactive"], out
    assert len(machine_ids) == 2  # each on its own disk

    # The key is pinned: a known_hosts with another key for director 2 is refused. A directory
    # without the master socket, so this ssh does its own handshake.
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    wrong = tmp_path / "known_hosts"
    wrong.write_text("203.0.113.3 " + " ".join(other.with_suffix(".pub").read_text().split()[:2]))
    info = {**harness.director_info(two.describe(), 2), "knownHosts": str(wrong)}
    refused = subprocess.run(
        harness.ssh_argv({**info, "runDir": str(tmp_path)}, "true"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 255
    assert "Host key verification failed" in refused.stderr


# A TCP connect to the director's sshd and its banner (the machine has no ping): the address
# answers, and its MAC is in the caller's neighbour table.
_BANNER = """
import socket, sys
with socket.create_connection((sys.argv[1], 22), timeout=10) as conn:
    print(conn.recv(64).decode(errors="replace").strip())
"""


@slow_lab
def test_the_client_and_the_nodes_reach_both_directors(two):
    for ns in (two.client_ns, two.node_ns[0]):
        for n, addr in ((1, "203.0.113.2"), (2, "203.0.113.3")):
            banner = two.in_ns(ns, [harness.HOST_PYTHON, "-c", _BANNER, addr]).stdout
            assert banner.startswith("SSH-2.0-"), (ns, addr, banner)
            neigh = two.in_ns(ns, ["ip", "-j", "neigh", "show", addr]).stdout
            assert [e["lladdr"] for e in json.loads(neigh)] == [vm.mac(n)], (ns, addr)


def _status(lab: harness.Lab, capsys) -> list[str]:
    """What `./dev lab status` prints for this lab."""
    capsys.readouterr()
    code = lab_cli.show(lab._state)
    out = capsys.readouterr().out
    assert code == 0, out
    return out.splitlines()


@slow_lab
def test_crash_kills_only_that_director_and_start_brings_it_back_on_its_disk(two, request, capsys):
    vip = two.vip
    token = secrets.token_hex(16)
    two.director(f"printf %s {token} > {TOKEN_PATH} && sync {TOKEN_PATH} /var/lib", n=2)
    machine_id = two.director("cat /etc/machine-id", n=2).stdout
    boot_id = two.director("cat /proc/sys/kernel/random/boot_id", n=2).stdout
    # Who holds the VIP is read from the directors themselves.
    assert two.vip_holders() == {vip: []}
    two.director(f"ip addr add {vip}/32 dev eth0", n=2)
    assert two.vip_holders() == {vip: [2]}
    two.director(f"ip addr add {vip}/32 dev eth0", n=1)
    assert two.vip_holders() == {vip: [1, 2]}
    two.director(f"ip addr del {vip}/32 dev eth0", n=1)
    assert two.vip_holders() == {vip: [2]}
    status = _status(two, capsys)
    assert "IPVS on director 1 (203.0.113.2):" in status
    assert "IPVS on director 2 (203.0.113.3):" in status
    assert f"  {vip}: director 2" in status

    _remember_qemus(two)
    qemus = {p["what"]: p for p in two.footprint()["procs"] if p["what"].startswith("qemu")}
    down = two.crash(2)
    assert not state.Proc(**qemus["qemu director2"]).alive()
    assert not Path(f"/proc/{qemus['qemu director2']['pid']}").exists()
    assert state.Proc(**qemus["qemu"]).alive()
    assert two.live_directors() == [1]
    assert _eth0_addresses(two, 1) == ["203.0.113.2"]  # director 1 still answers
    assert two.vip_holders() == {vip: []}  # the VIP went with director 2
    status = _status(two, capsys)
    assert "director 2 (203.0.113.3): its VM is down (`start 2` boots it again)" in status
    assert f"  {vip}: no director" in status
    unreachable = two.director("true", n=2, check=False, timeout=60)
    assert unreachable.returncode == 255

    up = two.start_director(2)
    _say(request, f"two directors: crash of director 2 {down:.2f}s, its boot again {up:.1f}s")
    assert _eth0_addresses(two, 2) == ["203.0.113.3"]
    assert two.director(f"cat {TOKEN_PATH}", n=2).stdout == token  # synced before: kept
    assert two.director("cat /etc/machine-id", n=2).stdout == machine_id  # the same disk
    assert two.director("cat /proc/sys/kernel/random/boot_id", n=2).stdout != boot_id
    assert two.vip_holders() == {vip: []}  # an address is not on the disk
    assert state.Proc(**qemus["qemu"]).alive()  # director 1 was never touched
    assert two.live_directors() == [1, 2]


@slow_lab
def test_teardown_kills_both_directors_and_leaves_nothing(two):
    _remember_qemus(two)
    footprint = two.footprint()
    disks = [two.run_dir / "disk.img", two.run_dir / "director2" / "disk.img"]
    assert all(disk.exists() for disk in disks)
    two.close()
    assert harness.leftovers(footprint) == []
    assert not any(disk.exists() for disk in disks)
    assert len({p["pid"] for p in _qemus_seen}) >= 3  # both first qemus and the restarted one
    assert [p for p in _qemus_seen if state.Proc(**p).alive()] == []
