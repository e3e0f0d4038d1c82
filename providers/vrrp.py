"""The runtime's VRRP side (issue 10): keepalived for the VIPs, the IPVS sync daemons, the ready file.

Director side, stdlib only (runs inside the runtime, providers/runtime.py). Each pass:
- `converge(owners)`, before the table is judged: from the record's services that carry `vrrp`
  (the agent refuses disagreeing ones), keepalived.conf is rendered (providers/keepalived.render:
  one Group per virtualRouterId with every VIP of it), checked with `keepalived -t`, written
  atomically to CONF_PATH and, if keepalived runs, reloaded (SIGHUP: no VIP flap). Both IPVS
  sync daemons are started. With no vrrp service left: the handover (below), then everything
  this module started is stopped and removed.
- `finish(in_sync)`, after it: the ready file (keepalived.READY_FILE) is "1" only when the pass
  found the table equal to the record, both sync daemons run, the backup daemon has run for
  SYNC_SETTLE seconds, and a keepalived.conf is installed (a newer one refused leaves the older
  running, said in the notes); else "0". keepalived is started only once ready is "1": the order on a
  director is IPVS rules, sync daemons, then VRRP, so keepalived never starts into FAULT, and a
  VIP the runtime bound before (a one-director stack gaining a second director) stays bound
  until keepalived itself decides.

keepalived runs under its own unit UNIT_NAME (providers/install.py writes it from `unit_text`;
no [Install]: the runtime starts it after its restore at boot), with its own config and pid
files: the distribution's keepalived.service and /etc/keepalived are never touched.

Sync daemons: `ipvsadm --start-daemon master|backup --mcast-interface IF --syncid 0` (pyroute2
0.9.7 has the IPVS_CMD_*_DAEMON numbers but no attribute layout for them), an argv list, never a
shell. syncid 0: the kernel runs one master and one backup daemon per director, so one id per
virtual router is impossible for a director in two; a backup with syncid 0 accepts every id.
SYNC_SETTLE is 3 s: the master flushes its buffered sync messages every 2 s
(IPVS_SYNC_FLUSH_TIME in net/netfilter/ipvs/ip_vs_sync.c), so a backup running for 3 s has
received every connection that changed state since it started.

What this module started is recorded first in STATE_PATH (write-ahead): a kill at any step is
converged by the next pass, and sync daemons it did not start (an operator's) are left alone.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from collections.abc import Callable

from providers import keepalived, ownership
from providers.ownership import AgentError

UNIT_NAME = "ipvs-ingress-keepalived.service"
UNIT_PATH = f"/etc/systemd/system/{UNIT_NAME}"
CONF_PATH = "/etc/ipvs-ingress/keepalived.conf"
STATE_PATH = "/var/lib/ipvs-ingress/vrrp.json"
PID_DIR = keepalived.READY_DIR
SYNC_ID = 0
SYNC_SETTLE = 3.0  # seconds the backup daemon runs before ready (2 s flush + margin)
HANDOVER_WAIT = 3.0  # seconds, bounded: ready 0 until the VIPs left, then keepalived stops
CONVERT_WAIT = 120.0  # seconds a VIP bound before VRRP waits for a peer's master (see below)
LISTEN_SECONDS = 0.5  # per pass, for a peer's advert (sent every advert interval, 0.1 s)
VRRP_PROTO = 112
IPVSADM = "/usr/sbin/ipvsadm"
ROLES = ("master", "backup")
_DAEMON_LINE = re.compile(r"(master|backup) sync daemon \(mcast=([^,]+), syncid=(\d+)")


def unit_text(conf: str = CONF_PATH, binary: str = keepalived.KEEPALIVED) -> str:
    """keepalived under the project's own unit; its config and pid files are the project's."""
    pids = " ".join(
        f"{flag}={PID_DIR}/keepalived{suffix}.pid"
        for flag, suffix in (
            ("--pid", ""),
            ("--vrrp_pid", "-vrrp"),
            ("--checkers_pid", "-checkers"),
        )  # fmt: skip
    )
    return f"""[Unit]
Description=ipvs-ingress: keepalived holding the VIPs by VRRP (started by ipvs-ingress.service)
Documentation=file:///usr/local/lib/ipvs-ingress/current/providers/vrrp.py
# Not After=ipvs-ingress.service: the runtime (Type=notify) starts this unit from its passes, and
# a start job ordered after the runtime's own start job would wait for it: a deadlock.
After=network.target
ConditionPathExists={conf}

[Service]
Type=simple
# keepalived drops a track_file whose folder is missing at its start.
ExecStartPre=/bin/mkdir -p {keepalived.READY_DIR}
ExecStart={binary} --dont-fork --log-console --vrrp --use-file={conf} {pids}
ExecReload=/bin/kill -HUP $MAINPID
Restart=on-failure
RestartSec=1
# Adverts every 0.1 s must not wait behind the runtime (Nice=-10) on a busy director: a starved
# keepalived made the directors flap ("forcing new election") once in the lab on one vCPU.
CPUSchedulingPolicy=rr
CPUSchedulingPriority=10
"""


class Host:
    """The director's side effects, in one place so that tests can stand in for them."""

    def run(self, argv: list[str], timeout: float = 30.0) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as err:
            return subprocess.CompletedProcess(argv, 127, "", f"{argv[0]}: {err}")

    def systemctl(self, *args: str) -> subprocess.CompletedProcess:
        return self.run(["systemctl", *args], timeout=120)

    def ipvsadm(self, *args: str) -> subprocess.CompletedProcess:
        return self.run([IPVSADM, *args])

    def config_test(self, text: str) -> str | None:
        return keepalived.config_test(text)

    def hostname(self) -> str:
        return socket.gethostname()

    def heard_master(self, peers: list[str], vrids: list[int], seconds: float) -> str | None:
        """The address of a peer heard sending a VRRPv3 advert (priority > 0: not one leaving)
        for one of `vrids` within `seconds`, else None. A raw socket sees a copy of every VRRP
        packet that reaches this host (adverts are unicast to it), keepalived running or not."""
        if not peers:
            return None
        v6 = ":" in peers[0]
        try:
            sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_RAW, VRRP_PROTO)  # fmt: skip
        except OSError:
            return None
        deadline = time.monotonic() + seconds
        with sock:
            while (left := deadline - time.monotonic()) > 0:
                sock.settimeout(left)
                try:
                    data, source = sock.recvfrom(2048)
                except (TimeoutError, OSError):
                    return None
                # IPv4 raw sockets deliver the IP header (its length in the low nibble x 4).
                vrrp = data if v6 else data[(data[0] & 0x0F) * 4 :]
                if source[0] in peers and _is_advert(vrrp, vrids):
                    return source[0]
        return None

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


def own_command() -> tuple[str, ...]:
    """This process's command line as keepalived's process tracker sees it (/proc/PID/cmdline)."""
    with open("/proc/self/cmdline", "rb") as f:
        words = f.read().split(b"\0")
    return tuple(w.decode("utf-8", "replace") for w in words if w)


def router_id(hostname: str) -> str:
    """A keepalived router_id from the host name: one word of [A-Za-z0-9_.-], at most 64."""
    word = re.sub(r"[^A-Za-z0-9_.-]", "-", hostname or "")[:64].lstrip("_.-")
    return word or "ipvs-ingress"


def wanted(owners: ownership.Ownership) -> list[tuple[str, dict]]:
    """(key, entry) of every recorded service with vrrp, in key order."""
    return sorted((k, e) for k, e in owners.services.items() if isinstance(e.get("vrrp"), dict))


def plan(
    services: list[tuple[str, dict]], name: str, command: tuple[str, ...]
) -> tuple[keepalived.Director, list[keepalived.Group], keepalived.Settings]:
    """The inputs of keepalived.render: the director from the first service (the agent keeps
    the others equal), one Group per virtualRouterId with the VIPs of all its services."""
    first = services[0][1]
    vrrp = first["vrrp"]
    this = keepalived.Director(name, vrrp["address"], first["interface"], vrrp["priority"])
    groups: dict[int, tuple[tuple[str, ...], set]] = {}
    for _key, entry in services:
        v = entry["vrrp"]
        peers, vips = groups.setdefault(v["virtualRouterId"], (tuple(v["peers"]), set()))
        vips.add(keepalived.Vip(entry["vip"], entry["interface"]))
    out = [
        keepalived.Group(vrid, peers, tuple(sorted(vips, key=lambda x: (x.address, x.interface))))
        for vrid, (peers, vips) in sorted(groups.items())
    ]
    settings = keepalived.Settings(
        advert=vrrp["advertSeconds"],
        preempt_delay=vrrp.get("preemptDelaySeconds"),
        runtime_command=command,
    )
    return this, out, settings


class Vrrp:
    """keepalived, the sync daemons and the ready file of one director, converged per pass."""

    def __init__(
        self,
        host: Host | None = None,
        log: Callable[[str], None] = print,
        conf_path: str = CONF_PATH,
        state_path: str = STATE_PATH,
        ready_file: str = keepalived.READY_FILE,
        command: tuple[str, ...] | None = None,
        bound: Callable[[str], set[str] | None] = lambda _interface: None,
    ):
        self.host = host or Host()
        self.log = log
        self.conf_path, self.state_path, self.ready_file = conf_path, state_path, ready_file
        self.command = command
        self.bound = bound  # the addresses on an interface now (None: no such interface)
        self.problems: dict[str, str] = {}
        self.daemons: dict[str, tuple[str, int]] = {}
        self.active = False
        self.ready: str | None = None
        self.vips: list[str] = []
        self.peers: list[str] = []
        self.vrids: list[int] = []
        self.interface: str | None = None
        self.waiting_since: float | None = None  # keepalived's start waits for a peer (conversion)
        self.leaving: set[str] = set()  # VIPs handed over for a delete: not ready until reloaded

    # -- records ---------------------------------------------------------------------------
    def _state(self) -> dict:
        try:
            with open(self.state_path) as f:
                data = json.load(f)
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _save(self, data: dict) -> None:
        _atomic(self.state_path, json.dumps(data, sort_keys=True).encode(), 0o644)

    # -- each pass -------------------------------------------------------------------------
    def converge(self, owners: ownership.Ownership) -> None:
        """keepalived.conf, its reload, the sync daemons; or, with no vrrp service, teardown."""
        self.problems = {}
        services = wanted(owners)
        state = self._state()
        if not services:
            self.vips, self.interface = [], None
            # Nothing recorded and no file: nothing was started (the record comes first).
            if state or os.path.exists(self.conf_path):
                self._teardown(state)
            self.active, self.daemons = False, {}
            self.ready = None
            return
        command = self.command or own_command()
        name = router_id(self.host.hostname())
        this, groups, settings = plan(services, name, command)
        self.vips = sorted({v.address for g in groups for v in g.vips})
        self.peers = sorted({p for g in groups for p in g.peers})
        self.vrids = sorted(g.virtual_router_id for g in groups)
        self.interface = this.interface
        # A VIP handed over for its delete stays "not ready" while this record still has it
        # (a pass that loaded the record before the delete); after, _config reloads without it.
        self.leaving &= set(self.vips)
        record = {**state, "vips": self.vips, "interface": this.interface}
        if record != state:
            self._save(record)  # ahead of anything started: a kill leaves it findable
        self.active = self._unit_active()
        self._config(this, groups, settings)
        self._sync_daemons(this.interface, self._state())  # with _config's reload mark

    def finish(self, in_sync: bool) -> None:
        """The ready file from this pass's judgement; keepalived started once it is ready."""
        if not self.vips:
            return
        state, now = self._state(), self.host.monotonic()
        since = state.get("backupSince")
        if isinstance(since, int | float) and since > now and "backup" in self.daemons:
            # From an earlier boot (vrrp.json outlives it, the clock does not): a daemon found
            # running now (started at boot by someone else) is timed from now.
            since = now
            self._save({**state, "backupSince": now})
        settled = isinstance(since, int | float) and now - since >= SYNC_SETTLE
        # Both on the VRRP interface (an operator's daemon elsewhere syncs no peer).
        both = all(self.daemons.get(r) == (self.interface, SYNC_ID) for r in ROLES)
        # A new keepalived.conf that could not be installed leaves the one installed before
        # running: it is refused alike on every director (the same stack renders the same
        # file), so judging it would drop the VIPs on all of them. Only with none installed
        # yet is there nothing to be ready for.
        config = "config" not in self.problems or os.path.exists(self.conf_path)
        ready = "1" if in_sync and both and settled and config and not self.leaving else "0"
        if ready != _read(self.ready_file):
            _atomic(self.ready_file, f"{ready}\n".encode(), 0o644)
            self.log(f"VRRP ready: {ready}")
        self.ready = ready
        if ready == "1" and not self.active and os.path.exists(self.conf_path):
            if self._wait_for_a_peer():
                return
            done = self.host.systemctl("start", UNIT_NAME)
            if done.returncode != 0:
                self.problems["unit"] = f"keepalived: systemctl start {UNIT_NAME} failed ({_last(done)}): see journalctl -u {UNIT_NAME}"  # fmt: skip
            else:
                self.active = True
                self.log(f"keepalived started ({UNIT_NAME})")
                state = self._state()
                if "reload" in state:  # a start loads the file as it is: nothing owed
                    self._save({k: v for k, v in state.items() if k != "reload"})

    def _wait_for_a_peer(self) -> bool:
        """True while keepalived's start waits for a peer to take the VIPs over first.

        keepalived 2.2.7 removes a VIP that is already bound when it starts in BACKUP, and adds
        it back only once elected, 3-4 adverts later (measured: 364 ms at advert 0.1 s; 8-12
        failed requests at 20/s in the lab). Such a VIP is one the runtime bound before the
        service gained vrrp (a director joined a one-director stack): while it stays bound
        here, traffic flows. So keepalived starts on this director only once a peer's advert
        says a master exists (it took the VIPs over with gratuitous ARP, and this keepalived
        then starts as its backup), or after CONVERT_WAIT s without one (no peer up). The bound
        is long: a new director's first `up` (runtime install, first pass) took 29-40 s in the
        lab, and 15 s made the old director give its VIP up before the new one was there (8
        failed requests); meanwhile this director serves as it did alone."""
        bound_here = set(self.vips) & (self.bound(self.interface or "") or set())
        if not bound_here:
            self.waiting_since = None
            return False
        now = self.host.monotonic()
        if self.waiting_since is None:
            self.waiting_since = now
            self.log(f"keepalived waits for a peer to take over {' '.join(sorted(bound_here))} (bound here before VRRP), at most {CONVERT_WAIT:g} s")  # fmt: skip
        heard = self.host.heard_master(self.peers, self.vrids, LISTEN_SECONDS)
        if heard or self.host.monotonic() - self.waiting_since >= CONVERT_WAIT:
            why = f"a master at {heard}" if heard else f"no peer's advert in {CONVERT_WAIT:g} s"
            self.log(f"keepalived starts: {why}")
            self.waiting_since = None
            return False
        return True

    def hand_over(self, vip: str, held: Callable[[], bool]) -> None:
        """For the agent, before it deletes the last service of `vip` here: if keepalived holds
        it (master), ready 0 (FAULT: a priority 0 advert, the peer takes over at once) and wait,
        bounded, until it left. The next pass reloads keepalived without the VIP and writes
        ready again (nopreempt: the peer stays master). `held`: the agent's own view of the
        address (its netlink socket, not the runtime's: another thread)."""
        if not held() or not self._unit_active():
            return
        self.leaving.add(vip)
        _atomic(self.ready_file, b"0\n", 0o644)
        self.ready = "0"
        self.log(f"VRRP ready: 0 (hands {vip} over before its last service is deleted)")
        deadline = self.host.monotonic() + HANDOVER_WAIT
        while self.host.monotonic() < deadline and held():
            self.host.sleep(0.05)

    # -- keepalived.conf -------------------------------------------------------------------
    def _config(self, this, groups, settings) -> None:
        try:
            text = keepalived.render(this, groups, settings)
        except keepalived.InvalidConfig as err:
            self.problems["config"] = f"keepalived.conf not written: {err}"
            return
        if _read(self.conf_path, raw=True) == text:
            # A reload refused, or cut by a kill after the file was written: the file is as
            # wanted, but the running keepalived has not loaded it yet.
            if self.active and self._state().get("reload"):
                self._reload()
            return
        said = self.host.config_test(text)
        if said is not None:
            self.problems["config"] = f"keepalived.conf not installed: keepalived -t: {said}"
            return
        if self.active:  # write-ahead: the reload is owed until it succeeded
            self._save({**self._state(), "reload": True})
        _atomic(self.conf_path, text.encode(), 0o600)
        self.log(f"keepalived.conf written ({len(groups)} group(s), VIPs {' '.join(self.vips)})")
        if self.active:
            self._reload()

    def _reload(self) -> None:
        done = self.host.systemctl("reload", UNIT_NAME)
        if done.returncode != 0:
            self.problems["unit"] = f"keepalived: reload failed ({_last(done)}): retrying"
            return
        self._save({k: v for k, v in self._state().items() if k != "reload"})

    def _unit_active(self) -> bool:
        return self.host.systemctl("is-active", "--quiet", UNIT_NAME).returncode == 0

    # -- sync daemons ----------------------------------------------------------------------
    def read_daemons(self) -> dict[str, tuple[str, int]] | None:
        """role -> (interface, syncid) of the kernel's sync daemons, None if unreadable."""
        done = self.host.ipvsadm("--list", "--daemon")
        if done.returncode != 0:
            return None
        found = {}
        for line in done.stdout.splitlines():
            m = _DAEMON_LINE.search(line)
            if m:
                found[m.group(1)] = (m.group(2), int(m.group(3)))
        return found

    def _sync_daemons(self, interface: str, record: dict) -> None:
        running = self.read_daemons()
        if running is None:
            self.problems["sync"] = "sync daemons: ipvsadm --list --daemon failed: is ipvsadm installed?"  # fmt: skip
            self.daemons = {}
            return
        ours = set(record.get("daemons") or [])
        for role in ROLES:
            have = running.get(role)
            if have == (interface, SYNC_ID):
                continue
            if have is not None and role not in ours:
                self.problems[f"sync {role}"] = f"sync daemon {role} runs on {have[0]} syncid {have[1]}, not started by ipvs-ingress: left alone; stop it (ipvsadm --stop-daemon {role}) to let ipvs-ingress run it on {interface}"  # fmt: skip
                continue
            if role not in ours:
                record = {**record, "daemons": sorted(ours | {role})}
                ours.add(role)
                self._save(record)
            if have is not None:  # ours, on another interface: director.interface changed
                self.host.ipvsadm("--stop-daemon", role)
            done = self.host.ipvsadm(
                "--start-daemon", role, "--mcast-interface", interface, "--syncid", str(SYNC_ID)
            )
            if done.returncode != 0:
                self.problems[f"sync {role}"] = f"sync daemon {role}: ipvsadm --start-daemon failed ({_last(done)})"  # fmt: skip
            else:
                self.log(f"sync daemon {role} started on {interface} (syncid {SYNC_ID})")
                if role == "backup":
                    record = {**record, "backupSince": self.host.monotonic()}
                    self._save(record)
        self.daemons = {r: v for r, v in (self.read_daemons() or {}).items() if r in ROLES}
        if "backup" in self.daemons and not isinstance(record.get("backupSince"), int | float):
            # Found running (a restart): timed from now, as its start is not known.
            self._save({**record, "backupSince": self.host.monotonic()})

    # -- the last vrrp service went --------------------------------------------------------
    def _teardown(self, state: dict) -> None:
        """Hand over (ready 0: keepalived goes to FAULT, a master sends a priority 0 advert and
        drops the VIPs), wait bounded until they left, then stop keepalived and the sync
        daemons ipvs-ingress started and remove its files. Each step can be repeated."""
        vips = [v for v in state.get("vips") or [] if isinstance(v, str)]
        interface = state.get("interface")
        if self._unit_active():
            _atomic(self.ready_file, b"0\n", 0o644)
            deadline = self.host.monotonic() + HANDOVER_WAIT
            while self.host.monotonic() < deadline and isinstance(interface, str):
                held = self.bound(interface) or set()
                if not held & set(vips):
                    break
                self.host.sleep(0.05)
            done = self.host.systemctl("stop", UNIT_NAME)
            if done.returncode != 0:
                self.problems["unit"] = f"keepalived: systemctl stop {UNIT_NAME} failed ({_last(done)}): retrying"  # fmt: skip
                return
            self.log(f"keepalived stopped ({UNIT_NAME}): no VRRP service left")
        _remove(self.conf_path)
        running = self.read_daemons() or {}
        for role in state.get("daemons") or []:
            if role in ROLES and role in running:
                self.host.ipvsadm("--stop-daemon", role)
                self.log(f"sync daemon {role} stopped")
        _remove(self.ready_file)
        _remove(self.state_path)

    # -- status ----------------------------------------------------------------------------
    def status(self) -> dict:
        held = self.bound(self.interface) if self.interface else None
        return {
            "keepalived": "active" if self.active else "inactive",
            "unit": UNIT_NAME,
            "interface": self.interface,
            "vips": {v: (held is not None and v in held) for v in self.vips},
            "syncDaemons": {r: f"{i} syncid {s}" for r, (i, s) in sorted(self.daemons.items())},
            "ready": self.ready,
            "problems": sorted(self.problems.values()),
        }


def _is_advert(packet: bytes, vrids: list[int]) -> bool:
    """A VRRPv3 advertisement (version 3, type 1) for one of `vrids` with a priority above 0."""
    return len(packet) >= 8 and packet[0] == 0x31 and packet[1] in vrids and packet[2] > 0


def _read(path: str, raw: bool = False) -> str | None:
    try:
        with open(path) as f:
            text = f.read()
    except (OSError, UnicodeDecodeError):
        return None
    return text if raw else text.strip()


def _atomic(path: str, data: bytes, mode: int) -> None:
    """A whole old or a whole new file (a temporary file in the same folder, renamed over it)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _last(done: subprocess.CompletedProcess) -> str:
    lines = (done.stderr or done.stdout or "").strip().splitlines()
    return lines[-1][:120] if lines else f"exit {done.returncode}"


__all__ = ["AgentError", "Host", "Vrrp", "plan", "router_id", "unit_text", "wanted"]
