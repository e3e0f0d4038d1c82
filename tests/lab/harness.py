"""The director lab: an IPVS director VM and Kubernetes-node stand-ins in network namespaces.

Topology (names unique to the run, so concurrent runs never collide; every packet stays inside
namespaces this lab created):

    lab-<id>        br0 203.0.113.1/24, tap0 (director VM eth0 203.0.113.2), v-cli, v-n1..
                    with `directors=2` also tap1 (director 2's eth0 203.0.113.3)
    lab-<id>-cli    eth0 203.0.113.10                       (the client)
    lab-<id>-n<i>   eth0 203.0.113.(10+i), kube-proxy's rules for the VIP, its healthz :10256
    lab-<id>-p<i>   node i's pod 198.51.100.(10+i): HTTP server on :8080 saying "node<i>"

The VIP is bound on no node: only the director answers ARP for it, as in the article. The nodes,
their externalTrafficPolicy and the ways they fail are `lab.nodes` (tests/lab/nodes.py).

Director n (1 or 2) is its own VM: its tap and MAC (vm.py), its files (vm.json, logs, disk,
known_hosts, ssh master socket) in `director_dir(run_dir, n)`, its qemu tracked as
`qemu_what(n)`. Both VMs share the lab's pinned host key: the key is a lab artifact either way
(any process of this host can read both), and each known_hosts pins it to one address; which
VM answered is checked by what it says (its own address), not by the key.
"""

from __future__ import annotations

import atexit
import ipaddress
import json
import os
import re
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.lab import capture, provision, state, vm
from tests.lab import nodes as nodes_mod

NODE_PORT = nodes_mod.POD_PORT  # node:8080 reaches its pod's server (a hostPort)
HOST_PYTHON = nodes_mod.HOST_PYTHON  # stdlib only; fast to start, independent of any venv
BOOT_TIMEOUT = 120.0
SHUTDOWN_TIMEOUT = 60.0  # `systemctl reboot` until qemu exits (-no-reboot); seen: 4-5 s
# Two VMs under TCG already share the machine's 2 cores (~400 MB RSS each); more is unmeasured.
MAX_DIRECTORS = 2
# VRRP priorities of the lab stack's directors (ipvs-ingress:directors): director 1 first.
PRIORITIES = (150, 100)


def director_address(n: int) -> str:
    """Director n's address on the segment: .2, .3 (the client is .10, the nodes .11 on)."""
    return f"203.0.113.{1 + n}"


def director_dir(run_dir: Path, n: int) -> Path:
    """Director n's files: the run directory itself for director 1 (as in a one-director lab),
    a folder of it for the others."""
    return Path(run_dir) if n == 1 else Path(run_dir) / f"director{n}"


def qemu_what(n: int) -> str:
    """How a run's state names director n's qemu ("qemu" for director 1, as ever)."""
    return "qemu" if n == 1 else f"qemu director{n}"


def master_what(n: int) -> str:
    return "ssh master" if n == 1 else f"ssh master director{n}"


_CLIENT = """
import json, sys, urllib.request
url, count, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # ignore *_proxy
out = []
for _ in range(count):
    try:
        with opener.open(url, timeout=timeout) as reply:
            out.append({"ok": True, "body": reply.read().decode().strip()})
    except Exception as exc:
        out.append({"ok": False, "error": repr(exc)})
print(json.dumps(out))
"""


class LabError(subprocess.CalledProcessError):
    def __str__(self) -> str:
        cmd = self.cmd if isinstance(self.cmd, str) else " ".join(map(str, self.cmd))
        return (
            f"`{cmd}` exited {self.returncode}\nstdout: {self.stdout or ''}\n"
            f"stderr: {self.stderr or ''}"
        )


def _run(argv: list[str], check: bool, timeout: float, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise LabError(proc.returncode, argv, proc.stdout, proc.stderr)
    return proc


class Lab:
    director_ip = "203.0.113.2"
    ssh_port = 22
    ssh_user = "root"
    interface = "eth0"
    vip = "203.0.113.201"
    bridge_ip = "203.0.113.1"
    client_ip = "203.0.113.10"

    def __init__(
        self,
        nodes: int = 2,
        artifacts: provision.Artifacts | None = None,
        persistent: bool = False,
        init: str = "systemd",
        directors: int = 1,
    ) -> None:
        """`init="systemd"` (default): the director runs systemd as PID 1 on a disk of its own
        that survives `reboot()` and `power_cut()`, as the provider's runtime needs (unit,
        install and state directories). `init="busybox"` boots faster (~10 s against ~24 s)
        and has no systemd: for the raw kernel, and for the provider's no-systemd error.
        `directors=2`: two director VMs (203.0.113.2 and .3) booted side by side, for VRRP."""
        if not 2 <= nodes <= 50:
            raise ValueError("a lab has 2..50 nodes")
        if not 1 <= directors <= MAX_DIRECTORS:
            raise ValueError(f"a lab has 1..{MAX_DIRECTORS} directors, not {directors}")
        if init not in vm.INITS:
            raise ValueError(f"init {init!r} is not one of {', '.join(vm.INITS)}")
        self.art = artifacts or provision.provision()
        self.persistent = persistent
        self.init = init
        self.director_count = directors
        self.director_ips = [director_address(n) for n in range(1, directors + 1)]
        self.id = f"{os.getpid()}-{secrets.token_hex(2)}"
        self.lab_ns = f"lab-{self.id}"
        self.client_ns = f"{self.lab_ns}-cli"
        self.node_ns = [f"{self.lab_ns}-n{i}" for i in range(1, nodes + 1)]
        self.node_ips = [f"203.0.113.{10 + i}" for i in range(1, nodes + 1)]
        self.node_names = [f"node{i}" for i in range(1, nodes + 1)]
        self.pod_ns = [f"{self.lab_ns}-p{i}" for i in range(1, nodes + 1)]
        self.private_key_path = self.art.client_key
        self.private_key_pem = self.art.client_key.read_text()
        self.host_key_line = " ".join(self.art.host_key.with_suffix(".pub").read_text().split()[:2])
        self.proxy_command = f"ip netns exec {self.lab_ns} socat - TCP:%h:%p"
        self.run_dir = self.art.cache / "runs" / self.id
        self.known_hosts = self.run_dir / "known_hosts"
        self.control_path = self.run_dir / "ssh.sock"  # see _ssh_master_opts
        self.boot_seconds: float | None = None
        self.director_boot_seconds: float | None = None  # first qemu start -> all ssh answer
        self.director_boot_times: dict[int, float] = {}  # n: its qemu start -> its ssh answers
        self.stale_cleaned: list[str] = []  # ids of dead runs' labs removed by start()
        self._state: state.RunState | None = None
        self._creator = os.getpid()
        self._closed = False
        self.nodes = nodes_mod.Nodes(self)

    # -- life cycle ---------------------------------------------------------------------------

    def start(self, wait_ready: bool = True) -> Lab:
        """Build the namespaces, start the servers and the VM; with `wait_ready`, until ssh
        to the director works (teardown tests skip that wait)."""
        started = time.monotonic()
        with provision.cache_lock(self.art.cache):
            self.stale_cleaned = state.cleanup_stale(self.art.cache)
        self.run_dir.mkdir(parents=True)
        self._state = state.RunState(
            id=self.id,
            dir=str(self.run_dir),
            owner=state.Proc.of(os.getpid(), "lab owner"),
            persistent=self.persistent,
            namespaces=[*self.node_ns, *self.pod_ns, self.client_ns, self.lab_ns],
        )
        self._state.save()  # before anything exists, so a crash from here on is cleanable
        if not self.persistent:
            atexit.register(self.close)
            self._install_signal_handlers()
        try:
            self._build_network()
            self.nodes.start()
            self._boot_directors(wait_ready)
        except BaseException:
            self.close()
            raise
        self.boot_seconds = time.monotonic() - started
        self._state.info = self.describe()
        self._state.save()
        return self

    def adopt_by_vm(self) -> None:
        """A lab left up by `python -m tests.lab up` lives exactly as long as its VM."""
        self._state.owner = [p for p in self._state.procs if p.what == "qemu"][-1]
        self._state.save()

    def reboot(self, n: int = 1) -> Restart:
        """`systemctl reboot` on director n (systemd lab only); back when ssh works."""
        return restart_director(self._state, self.describe(), clean=True, n=n)

    def power_cut(self, n: int = 1) -> Restart:
        """Kill director n's qemu with SIGKILL and start it again on the same disk."""
        return restart_director(self._state, self.describe(), clean=False, n=n)

    def crash(self, n: int) -> float:
        """Kill director n's qemu with SIGKILL and leave it dead (`start_director` boots it
        again); seconds until qemu was gone."""
        return stop_director(self._state, self.describe(), n, clean=False)

    def start_director(self, n: int) -> float:
        """Boot director n again on its own disk (after `crash`); seconds from qemu's start
        until ssh works."""
        took = start_director(self._state, self.describe(), n)
        self.director_boot_times[n] = took
        return took

    def live_directors(self) -> list[int]:
        """The directors whose VM runs (booted, or booting)."""
        return live_directors(self._state, self.director_count)

    def close(self) -> None:
        if self._closed or os.getpid() != self._creator or self._state is None:
            return
        self._closed = True
        state.teardown(self._state)

    def __enter__(self) -> Lab:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGHUP):
            previous = signal.getsignal(sig)

            def handler(signum: int, frame: object, previous=previous) -> None:
                self.close()
                signal.signal(signum, previous)
                os.kill(os.getpid(), signum)  # die (or go on) as we would have without a lab

            signal.signal(sig, handler)

    # -- topology -----------------------------------------------------------------------------

    def _build_network(self) -> None:
        ip = lambda ns, *args: _run(["ip", "-n", ns, *args], True, 30)  # noqa: E731
        for ns in self._state.namespaces:
            _run(["ip", "netns", "add", ns], True, 30)
            ip(ns, "link", "set", "lo", "up")
            # No IPv6 chatter (router solicitations, MLD) in captures.
            self.in_ns(
                ns,
                [
                    "sysctl",
                    "-qw",
                    "net.ipv6.conf.all.disable_ipv6=1",
                    "net.ipv6.conf.default.disable_ipv6=1",
                ],
            )
        ip(
            self.lab_ns,
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "stp_state",
            "0",
            "forward_delay",
            "0",
        )
        ip(self.lab_ns, "addr", "add", f"{self.bridge_ip}/24", "dev", "br0")
        ip(self.lab_ns, "link", "set", "br0", "up")
        # Each tap exists before its qemu, inside lab_ns, already on the bridge.
        for n in range(1, self.director_count + 1):
            ip(self.lab_ns, "tuntap", "add", "dev", vm.tap(n), "mode", "tap")
            ip(self.lab_ns, "link", "set", vm.tap(n), "master", "br0", "up")
        nodes = zip(self.node_ns, self.node_ips, strict=True)
        hosts = [("cli", self.client_ns, self.client_ip)]
        hosts += [(f"n{i}", ns, addr) for i, (ns, addr) in enumerate(nodes, 1)]
        for short, ns, addr in hosts:
            # Created in lab_ns with the peer born in the host's namespace: no end in the root.
            ip(
                self.lab_ns,
                "link",
                "add",
                f"v-{short}",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns,
            )
            ip(self.lab_ns, "link", "set", f"v-{short}", "master", "br0", "up")
            ip(ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            ip(ns, "link", "set", "eth0", "up")
        self.nodes.build()
        self.expose(self.vip, 80)

    def expose(self, vip: str, port: int, protocol: str = "tcp") -> None:
        """kube-proxy's externalIPs stand-in: every node sends vip:port to a pod (idempotent),
        under the nodes' externalTrafficPolicy and failures (`lab.nodes`)."""
        self.nodes.expose(vip, port, protocol)

    def _boot_directors(self, wait_ready: bool) -> None:
        """Every director's VM at once (they boot side by side), then wait for all."""
        booting = {n: self._launch(n) for n in range(1, self.director_count + 1)}
        if not wait_ready:
            return
        self.director_boot_times = _wait_for_directors(self._state, self.describe(), booting)
        first = min(started for _proc, started in booting.values())
        self.director_boot_seconds = time.monotonic() - first

    def _launch(self, n: int) -> tuple[subprocess.Popen, float]:
        folder = director_dir(self.run_dir, n)
        folder.mkdir(exist_ok=True)
        host = director_address(n)
        (folder / "known_hosts").write_text(f"{host} {self.host_key_line}\n")
        disk = vm.make_disk(folder) if self.init == "systemd" else None
        name = f"ipvs-ingress-lab-{self.id}" + ("" if n == 1 else f"-director{n}")
        argv = vm.qemu_argv(self.art, folder, f"{host}/24", name, init=self.init, disk=disk, n=n)
        vm.save_config(folder, self.init, argv)
        started = time.monotonic()
        proc = vm.start(self.lab_ns, argv, folder)
        self._state.add_proc(proc.pid, qemu_what(n))
        return proc, started

    # -- running things -----------------------------------------------------------------------

    def in_ns(
        self, ns: str, argv: list[str] | str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess:
        cmd = ["sh", "-c", argv] if isinstance(argv, str) else list(argv)
        return _run(["ip", "netns", "exec", ns, *cmd], check, timeout)

    def ssh_argv(self, cmd: str, n: int = 1) -> list[str]:
        return ssh_argv(director_info(self.describe(), n), cmd)

    def _ssh_master_opts(self) -> list[str]:
        return _ssh_master_opts(Path(self.describe()["runDir"]))

    def director(
        self, cmd: str, check: bool = True, timeout: float = 60, n: int = 1
    ) -> subprocess.CompletedProcess:
        """Run a shell command on director n over real ssh with the pinned host key."""
        return _run(self.ssh_argv(cmd, n), check, timeout)

    def ipvsadm_ln(self, n: int = 1) -> str:
        """The independent oracle. Note ipvsadm loads ip_vs itself when it is missing."""
        return self.director("ipvsadm -Ln", n=n).stdout

    def ipvsadm_sn(self, n: int = 1) -> str:
        return self.director("ipvsadm -Sn", n=n).stdout

    def vip_holders(self) -> dict[str, list[int]]:
        """{vip: [n, ...]}: the directors that have each exposed VIP bound (`ip addr` on each
        live director, read now); a VIP no director holds maps to []."""
        vips = [vip for vip, _port, _proto in self.nodes.exposed]
        return vip_holders(self._state, self.describe(), vips)

    def service_counters(
        self, vip: str, port: int, min_conns: int = 1
    ) -> tuple[int, int, int, str]:
        """(connections, InPkts, OutPkts, raw) of a TCP service from `ipvsadm -Ln --stats`.

        The kernel folds per-CPU counters into these every 2 s (estimator): poll, bounded.
        """
        pattern = re.compile(rf"TCP\s+{re.escape(vip)}:{port}\s+(\d+)\s+(\d+)\s+(\d+)")
        for _ in range(20):
            stats = self.director(f"ipvsadm -Ln --stats --exact -t {vip}:{port}").stdout
            conns, inpkts, outpkts = map(int, pattern.search(stats).groups())
            if conns >= min_conns:
                break
            time.sleep(0.5)
        return conns, inpkts, outpkts, stats

    def http_from_client(self, url: str, count: int, timeout: float = 3) -> list[str]:
        """`count` sequential GETs from the client namespace; the body of each, or raise."""
        proc = self.in_ns(
            self.client_ns,
            [HOST_PYTHON, "-c", _CLIENT, url, str(count), str(timeout)],
            timeout=count * (timeout + 1) + 15,
        )
        results = json.loads(proc.stdout)
        failed = [(i, r["error"]) for i, r in enumerate(results) if not r["ok"]]
        if failed:
            raise RuntimeError(
                f"{len(failed)}/{count} GETs of {url} failed: {failed[:5]}; "
                f"answers: {[r.get('body') for r in results]}"
            )
        return [r["body"] for r in results]

    def mac_of(self, ns: str, iface: str = "eth0") -> str:
        return json.loads(self.in_ns(ns, ["ip", "-j", "link", "show", iface]).stdout)[0]["address"]

    @contextmanager
    def capture(
        self, ns: str, iface: str, bpf: str = "", max_packets: int = 10000
    ) -> Iterator[capture.Capture]:
        """tcpdump on `iface` in `ns` for the duration of the block, at most `max_packets`."""
        proc = capture.start(ns, iface, bpf, max_packets)
        cap = capture.Capture(ns, iface, bpf)
        tracked = self._state.add_proc(proc.pid, f"tcpdump {ns}/{iface}")
        try:
            yield cap
        finally:
            capture.stop(proc, cap)
            self._state.procs.remove(tracked)
            self._state.save()

    def capture_on_director_tap(
        self, bpf: str = "", max_packets: int = 10000, n: int = 1
    ) -> AbstractContextManager[capture.Capture]:
        """Everything on the wire between director n's VM and the bridge."""
        return self.capture(self.lab_ns, vm.tap(n), bpf, max_packets)

    def capture_on_client(
        self, bpf: str = "", max_packets: int = 10000
    ) -> AbstractContextManager[capture.Capture]:
        return self.capture(self.client_ns, "eth0", bpf, max_packets)

    # -- teardown evidence --------------------------------------------------------------------

    def footprint(self) -> dict:
        """What this lab holds right now, in a form `leftovers` can check after teardown."""
        return {
            "id": self.id,
            "run_dir": str(self.run_dir),
            "namespaces": list(self._state.namespaces),
            "netns": [
                list(_ns_key(state.NETNS_DIR / ns))
                for ns in self._state.namespaces
                if state.namespace_exists(ns)
            ],
            "procs": [vars(p) for p in self._state.procs],
        }

    # -- for people ---------------------------------------------------------------------------

    def director_config(self, n: int = 1) -> dict:
        """Director n as the product's `ipvs-ingress:director` config (reached via ProxyCommand)."""
        return director_config(director_info(self.describe(), n))

    def directors_config(self) -> list[dict]:
        """Every director as the product's `ipvs-ingress:directors` config (issue 10)."""
        return directors_config(self.describe())

    def describe(self) -> dict:
        return {
            "id": self.id,
            "host": self.director_ip,
            "port": self.ssh_port,
            "user": self.ssh_user,
            "keyPath": str(self.private_key_path),
            "hostKey": self.host_key_line,
            "interface": self.interface,
            "proxyCommand": self.proxy_command,
            "vip": self.vip,
            "nodes": dict(zip(self.node_names, self.node_ips, strict=True)),
            "namespaces": {
                "lab": self.lab_ns,
                "client": self.client_ns,
                "nodes": self.node_ns,
                "pods": self.pod_ns,
            },
            "runDir": str(self.run_dir),
            "knownHosts": str(self.known_hosts),
            "init": self.init,
            # What differs per director (director_info); the keys above are director 1's.
            "directors": [
                {
                    "host": director_address(n),
                    "runDir": str(director_dir(self.run_dir, n)),
                    "knownHosts": str(director_dir(self.run_dir, n) / "known_hosts"),
                }
                for n in range(1, self.director_count + 1)
            ],
        }


# -- booting and rebooting the director (also for `python -m tests.lab reboot`) ---------------


@dataclass(frozen=True)
class Restart:
    """Seconds of one director restart: until the old VM was gone, and from starting the new
    qemu until ssh worked (sshd runs under systemd, so ssh working means systemd got that far)."""

    down: float
    up: float

    @property
    def total(self) -> float:
        return self.down + self.up


def director_info(info: dict, n: int = 1) -> dict:
    """The lab `info` (Lab.describe) as director n's: its host, run directory and known_hosts in
    place of director 1's. A lab described before labs had several directors has director 1."""
    count = director_count(info)
    if not 1 <= n <= count:
        raise ValueError(f"director {n} is not in this lab: its directors are 1..{count}")
    return {**info, **(info.get("directors") or [{}])[n - 1]}


def director_count(info: dict) -> int:
    return len(info.get("directors") or [{}])


def directors_config(info: dict) -> list[dict]:
    """The `ipvs-ingress:directors` config for the lab `info` describes: each director's
    `ipvs-ingress:director` config, its VRRP priority (director 1 highest, PRIORITIES) and its
    own address on the segment (VRRP's unicast source and peer)."""
    out = []
    for n in range(1, director_count(info) + 1):
        mine = director_info(info, n)
        out.append(
            {**director_config(mine), "priority": PRIORITIES[n - 1], "address": mine["host"]}
        )
    return out


def live_directors(run: state.RunState, count: int) -> list[int]:
    """The directors of `run` whose qemu runs (booted, or still booting)."""
    return [n for n in range(1, count + 1) if _live_qemu(run, n) is not None]


def _live_qemu(run: state.RunState, n: int) -> state.Proc | None:
    running = [p for p in run.procs if p.what == qemu_what(n) and p.alive()]
    return running[-1] if running else None


def _wait_ready(info: dict, proc: subprocess.Popen) -> float:
    """Until the director `info` describes answers ssh; when it did (time.monotonic)."""
    run_dir = Path(info["runDir"])
    deadline = time.monotonic() + BOOT_TIMEOUT
    vm.wait_console_ready(proc, run_dir, BOOT_TIMEOUT)
    while True:  # sshd was started; wait until it accepts us
        probe = _run(ssh_argv(info, "true"), False, 15)
        if probe.returncode == 0:
            return time.monotonic()
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(
                f"no ssh to the director at {info['host']}: {probe.stderr}\n"
                f"{vm.serial_tail(run_dir)}"
            )
        time.sleep(0.3)


def _wait_for_ssh(run: state.RunState, info: dict, proc: subprocess.Popen, n: int = 1) -> None:
    _wait_ready(info, proc)
    _start_ssh_master(run, info, n)


def _wait_for_directors(
    run: state.RunState, info: dict, booting: dict[int, tuple[subprocess.Popen, float]]
) -> dict[int, float]:
    """Wait for directors booting side by side; {n: seconds from its qemu start to ssh}. Threads
    only poll (each its own files); the run's state is written here, by one thread."""
    with ThreadPoolExecutor(max_workers=len(booting)) as pool:
        ready = {
            n: pool.submit(_wait_ready, director_info(info, n), proc)
            for n, (proc, _started) in booting.items()
        }
        took = {n: ready[n].result() - started for n, (_proc, started) in booting.items()}
    for n in booting:
        _start_ssh_master(run, director_info(info, n), n)
    return took


def _start_ssh_master(run: state.RunState, info: dict, n: int = 1) -> None:
    run_dir = Path(info["runDir"])
    if not _ssh_master_opts(run_dir):
        return
    argv = ssh_argv(info, "")[:-2]
    argv[argv.index("ControlMaster=no")] = "ControlMaster=yes"
    proc = subprocess.Popen(
        [*argv, "-N", f"{info['user']}@{info['host']}"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    run.add_proc(proc.pid, master_what(n))
    control_path = run_dir / "ssh.sock"
    deadline = time.monotonic() + 15
    while not control_path.exists() and proc.poll() is None:
        if time.monotonic() > deadline:
            raise RuntimeError("ssh master connection to the director did not come up")
        time.sleep(0.05)


def _forget(run: state.RunState, what: str) -> None:
    """Kill (if alive) and stop tracking the run's processes called `what`."""
    for proc in [p for p in run.procs if p.what == what]:
        state.kill(proc)
        run.procs.remove(proc)
    run.save()


def restart_director(run: state.RunState, info: dict, clean: bool, n: int = 1) -> Restart:
    """Reboot director n's VM of a systemd lab and wait until ssh works again: `clean` asks
    systemd (qemu exits on the guest's reboot: -no-reboot), otherwise qemu is killed with
    SIGKILL, a power cut. qemu then starts again on the same disk, with the same command line."""
    config = vm.load_config(director_dir(Path(run.dir), n))
    if config["init"] != "systemd":
        raise ValueError(
            "its director runs the busybox init, which has no disk to reboot to: "
            "start the lab without --init busybox (`./dev lab down && ./dev lab up`)"
        )
    down = stop_director(run, info, n, clean)
    return Restart(down=down, up=start_director(run, info, n))


def stop_director(run: state.RunState, info: dict, n: int, clean: bool) -> float:
    """Stop director n's VM: `clean` asks systemd to reboot (qemu then exits), otherwise its
    qemu gets SIGKILL (a crash, a power cut). Its ssh master goes too and the run stops
    tracking its qemu: it is dead until `start_director`. Seconds until qemu was gone."""
    mine = director_info(info, n)
    run_dir = director_dir(Path(run.dir), n)
    qemu = _live_qemu(run, n)
    if qemu is None:
        raise RuntimeError(
            f"director {n}'s VM is not running (`./dev lab start {n}` boots it again, "
            "`./dev lab down` cleans up)"
        )
    if run.owner == qemu:  # a lab left up by the CLI lives as long as any VM of it
        others = [_live_qemu(run, m) for m in range(1, director_count(info) + 1) if m != n]
        others = [q for q in others if q is not None]
        run.owner = others[0] if others else state.Proc.of(os.getpid(), "lab restart")
        run.save()
    started = time.monotonic()
    if clean:
        # The ssh session may end with the connection (255); qemu's exit is the evidence.
        _run(ssh_argv(mine, "systemctl reboot"), False, 30)
    else:
        os.kill(qemu.pid, signal.SIGKILL)
    deadline = time.monotonic() + (SHUTDOWN_TIMEOUT if clean else 10)
    while qemu.alive():
        if time.monotonic() > deadline:
            raise RuntimeError(f"qemu (pid {qemu.pid}) did not exit\n{vm.serial_tail(run_dir)}")
        state.reap(qemu.pid)
        time.sleep(0.1)
    # A multithreaded qemu is a zombie until its last thread ended: reap it for good (our
    # child), or let init do it (a lab left up by the CLI), so its pid is gone, not a zombie.
    while Path(f"/proc/{qemu.pid}").exists() and time.monotonic() < deadline:
        state.reap(qemu.pid)
        time.sleep(0.02)
    down = time.monotonic() - started
    _forget(run, master_what(n))  # its connection died with the VM; a power cut leaves it hanging
    (run_dir / "ssh.sock").unlink(missing_ok=True)
    run.procs.remove(qemu)
    run.save()
    return down


def start_director(run: state.RunState, info: dict, n: int) -> float:
    """Boot director n's VM again with its recorded command line (on its own disk: what was
    synced before it went is there) and wait until ssh works; seconds from qemu's start."""
    mine = director_info(info, n)
    run_dir = director_dir(Path(run.dir), n)
    if _live_qemu(run, n) is not None:
        raise RuntimeError(f"director {n}'s VM runs already (`./dev lab crash {n}` stops it)")
    config = vm.load_config(run_dir)
    if not config["argv"]:
        raise RuntimeError(f"director {n} has no recorded VM to start ({run_dir}/vm.json)")
    # What a VM that died by itself left: its dead qemu's record, its hanging ssh master.
    _forget(run, qemu_what(n))
    _forget(run, master_what(n))
    (run_dir / "ssh.sock").unlink(missing_ok=True)
    vm.rotate_logs(run_dir)
    started = time.monotonic()
    proc = vm.start(info["namespaces"]["lab"], config["argv"], run_dir)
    new = run.add_proc(proc.pid, qemu_what(n))
    if run.persistent and not (run.owner.alive() and run.owner.what.startswith("qemu")):
        run.owner = new  # the lab (up by the CLI) lives as long as a VM of it again
        run.save()
    _wait_for_ssh(run, mine, proc, n)
    return time.monotonic() - started


def bound_addresses(info: dict, n: int) -> set[str]:
    """Every address bound on director n, on any interface, read now (`ip -j addr`)."""
    out = _run(ssh_argv(director_info(info, n), "ip -j addr show"), True, 30).stdout
    return {
        str(ipaddress.ip_address(addr["local"]))
        for link in json.loads(out)
        for addr in link.get("addr_info", [])
        if "local" in addr
    }


def vip_holders(run: state.RunState, info: dict, vips: list[str]) -> dict[str, list[int]]:
    """{vip: [n, ...]}: which live directors have each of `vips` bound (two: a split brain)."""
    live = live_directors(run, director_count(info))
    return holders_of(vips, {n: bound_addresses(info, n) for n in live})


def holders_of(vips: list[str], bound: dict[int, set[str]]) -> dict[str, list[int]]:
    """{vip: the directors (ascending) among `bound` ({n: its addresses}) that hold it}."""
    return {
        vip: sorted(
            n for n, addresses in bound.items() if str(ipaddress.ip_address(vip)) in addresses
        )
        for vip in dict.fromkeys(vips)
    }


def _ssh_master_opts(run_dir: Path) -> list[str]:
    # Multiplexed over one master connection: a fresh ssh handshake costs ~1 s under TCG.
    # Without the master's socket, ssh quietly connects directly.
    control_path = run_dir / "ssh.sock"
    if len(str(control_path)) > 100:  # sun_path limit
        return []
    return ["-o", "ControlMaster=no", "-o", f"ControlPath={control_path}"]


def director_config(info: dict) -> dict:
    """The `ipvs-ingress:director` config for the director `info` (from `Lab.describe`, or
    `director_info` for director n) describes."""
    return {k: info[k] for k in ("host", "port", "user", "hostKey", "interface", "proxyCommand")}


def ssh_argv(info: dict, cmd: str) -> list[str]:
    """ssh to the director of the lab `info` describes, from inside its lab namespace."""
    return [
        "ip",
        "netns",
        "exec",
        info["namespaces"]["lab"],
        "ssh",
        "-F",
        "/dev/null",
        "-i",
        info["keyPath"],
        "-p",
        str(info["port"]),
        "-o",
        "BatchMode=yes",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        f"UserKnownHostsFile={info['knownHosts']}",
        "-o",
        "GlobalKnownHostsFile=/dev/null",
        "-o",
        "ConnectTimeout=10",
        "-o",
        "ServerAliveInterval=5",
        "-o",
        "ServerAliveCountMax=3",
        "-o",
        "LogLevel=ERROR",
        *_ssh_master_opts(Path(info["runDir"])),
        f"{info['user']}@{info['host']}",
        cmd,
    ]


def _ns_key(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def leftovers(footprint: dict) -> list[str]:
    """Everything of a torn-down lab that still exists (empty when teardown was complete)."""
    found = [f"namespace {ns}" for ns in footprint["namespaces"] if state.namespace_exists(ns)]
    found += [
        f"{p['what']} (pid {p['pid']})" for p in footprint["procs"] if state.Proc(**p).alive()
    ]
    # A process can keep a deleted namespace (and the tap or veths in it) alive.
    held = {tuple(k) for k in footprint["netns"]}
    for proc_dir in Path("/proc").glob("[0-9]*"):
        try:
            key = _ns_key(proc_dir / "ns" / "net")
            cmdline = (proc_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if state.start_time(int(proc_dir.name)) is None:
            continue
        if key in held or footprint["id"] in cmdline:
            found.append(f"pid {proc_dir.name}: {cmdline.strip()}")
    if Path(footprint["run_dir"]).exists():
        found.append(f"run directory {footprint['run_dir']}")
    return found
