"""The director runtime: keeps the kernel equal to the ownership record, at boot and continuously.

Runs on the director under systemd (unit `ipvs-ingress.service`, see `unit_text`), stdlib +
pyroute2 only, through the agent's own Kernel; `python3 -m providers.runtime run` with the
sources' folder on PYTHONPATH, installed and upgraded by the provider (providers/install.py).
It is also the provider's request path: providers/api.py answers create/read/update/delete/plan
on 127.0.0.1:747 with an Agent per connection, in this process.

Desired state: the record the agent writes ahead of every change, /var/lib/ipvs-ingress/state.json
(services with owner stack, spec, interface, state and repair; the VIPs ipvs-ingress bound). The
runtime never writes it: it only makes the kernel hold what it says.
- At start it restores everything: ip_vs and the schedulers' modules, net.ipv4.ip_forward=1, every
  recorded service and its real servers, then the recorded VIPs on their interfaces (the VIP last,
  as the agent does: answering ARP before the service exists would blackhole it).
- Then every `intervalSeconds` it compares and repairs the same things: a flush, a destination
  deleted or added, a changed weight, scheduler, persistence or forwarding method, an unbound VIP,
  ip_forward turned off, a module unloaded. The changes are model.plan's, made by Kernel.apply:
  one implementation with the provider's applies.
- Every change is made under the director lock with the record read again under it, so it never
  interleaves with a provider's apply; a lock held longer than the interval skips the pass.
- Only what the record holds is touched: services of other keys and addresses it does not list
  are never changed, nothing is ever deleted but destinations that are not in a recorded spec.
  A VIP bound by someone else (absent from the record's addresses, e.g. keepalived's) is left to
  its owner, bound or not.
- Left alone, and named once in the log and in status: services recorded `pending` (an apply was
  interrupted: the kernel is half-way to a spec Pulumi never confirmed, and the stack's next
  `pulumi up` completes it or replaces it) and services adopted without a spec (a lost record
  re-adopted by `pulumi refresh`: the stack's next `up` records its spec).
- Stopping the runtime (or killing it) leaves the table and VIPs as they are.

Repair per stack: a service is repaired when its record says so (`"repair": true`, written by
every apply from the stack config ipvs-ingress:repair, default true; records from before it have
none and mean true) and /etc/ipvs-ingress/runtime.json does not turn its owner stack off: the
operator on the director can only turn a stack off, never on against its config. A stack with
repair off keeps its drift (status and `pulumi refresh` show it: read returns the recorded
desired table next to the live one) until its next `pulumi up`, except at boot: the first start
after a boot restores every stack (a reboot is not an operator's change), pass after pass until
one finds everything in place (the lock was free, the VIPs' interfaces exist). Status says per stack
whether it is repaired and what turned it off.

Health (issue 9; providers/probing.py): every recorded service with a health check has its real
servers probed at their own interval by a probe thread (kubeProxy: GET node:port/healthz; vip:
a connect to VIP:port through the node's probe service, providers/probe_services.py, which each
pass keeps in place with accept_local; a stack with repair off is probed and reported, not drained).
A real server failing `fall` probes in a row is drained (weight 0; established connections
finish), one back after `rise` successes gets its configured weight again; depoolThreshold
keeps a share of each service pooled however many fail (each one held says so, in the log
once and in status). These weights are the runtime's desired ones (a drain is not drift), and
the provider's applies in this process plan against them too (agent.HEALTH). The state is in
/var/lib/ipvs-ingress/health.json, written on every change and read at start: a drained
server stays drained across a restart or reboot until `rise` successes. A drain or undrain
wakes the next pass at once.

Settings: /etc/ipvs-ingress/runtime.json, read again when it changes, e.g.
    {"intervalSeconds": 2, "repair": {"team-a/prod": false}}
intervalSeconds: 0.5..3600, default 2. repair: per owner stack ("<project>/<stack>"), false turns
that stack's repair off (true changes nothing). A bad setting is one log line naming it, and its
default is used.

Log: one line per change on stdout (journald), e.g.
    repaired tcp/203.0.113.201:80: add-dest 203.0.113.11:80 weight 1
("restored" in the first pass after boot). Status: /run/ipvs-ingress/status.json, written
atomically every pass; `ipvs-ingress status` (the installer's command for
`python3 -m providers.runtime status`) prints it with the live table.

HA (issue 10; providers/vrrp.py): services recorded with `vrrp` have their VIP held by keepalived,
never bound or unbound by the runtime (so never "VIP not bound" drift). Each pass renders
/etc/ipvs-ingress/keepalived.conf from them, keeps both IPVS sync daemons running, writes the ready
file keepalived tracks ("1" only when the table equals the record and the backup sync daemon has
run 3 s), starts ipvs-ingress-keepalived.service once ready, reloads it on a change, and stops it
(after handing the VIPs over) with the last VRRP service.

Uninstall (after `pulumi destroy` of the stacks that use the director):
    systemctl disable --now ipvs-ingress.service
    systemctl stop ipvs-ingress-keepalived.service  # if a VRRP service was left: hands over
    rm -f /etc/systemd/system/ipvs-ingress.service /usr/local/sbin/ipvs-ingress
    rm -f /etc/systemd/system/ipvs-ingress-keepalived.service
    systemctl daemon-reload
    rm -rf /usr/local/lib/ipvs-ingress /etc/ipvs-ingress /run/ipvs-ingress /var/lib/ipvs-ingress
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import hashlib
import ipaddress
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from providers import agent, api, health, model, ownership, probe_services, probing, vrrp
from providers.agent import Kernel
from providers.ownership import AgentError, Ownership, director_lock

UNIT_NAME = "ipvs-ingress.service"
INSTALL_DIR = "/usr/local/lib/ipvs-ingress"
CONFIG_PATH = "/etc/ipvs-ingress/runtime.json"
STATUS_NAME = "status.json"  # in ownership.RUN_DIR: /run is new at every boot
DEFAULT_INTERVAL = 2.0
INTERVAL_RANGE = (0.5, 3600.0)
KEEP_REPAIRS = 20
BUSY_PASSES_NOTED = 3  # passes in a row without the director lock before the log says so
# A pass reads the table over netlink (1.5 s for 39 services x 10 real servers under qemu TCG)
# only when its cheap mark changed, and at least this often anyway.
FULL_PASS_SECONDS = 60.0
# Full passes wait while a provider's requests keep coming, but at most this many in a row: a
# director busy for long (a long `pulumi up`, refresh loops) still gets its repairs, about this
# many intervals late (a full pass works under the director lock, so it is safe at any time).
DEFER_MAX_PASSES = 3
# The director side, as the provider ships it: the runtime's version is a hash of exactly these.
SOURCE_FILES = (
    "__init__.py", "model.py", "ownership.py", "agent.py", "runtime.py", "api.py", "install.py",
    "health.py", "probing.py", "probe_services.py", "keepalived.py", "vrrp.py",
)  # fmt: skip
BOOT_ID = "/proc/sys/kernel/random/boot_id"


def _signature(path: str) -> tuple | None:
    """When the settings file changed: it is parsed (and its problems logged) once per change."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size


# --- version, unit ------------------------------------------------------------------------------


def version_of(sources: Mapping[str, bytes]) -> str:
    """The version of a set of director sources (file name -> bytes): 16 hex digits of sha256.
    The provider can compute it from the files it ships, without pyroute2."""
    digest = hashlib.sha256()
    for name in SOURCE_FILES:
        digest.update(name.encode() + b"\0" + sources[name] + b"\0")
    return digest.hexdigest()[:16]


def source_version(directory: str | os.PathLike | None = None) -> str:
    """The version of the sources in `directory` (default: the installed ones, through the
    `current` link as it is now: what the status command compares the runtime's version with)."""
    folder = Path(directory) if directory else Path(__file__).parent
    try:
        return version_of({name: (folder / name).read_bytes() for name in SOURCE_FILES})
    except OSError as err:
        return f"unknown ({err.strerror}: {err.filename})"


def running_version(module_file: str | os.PathLike) -> str:
    """The version of the code a module was loaded from. Resolved: the installer's `current`
    link leads to versions/<v>/providers, and a later swap of the link (an upgrade, before it
    restarts the runtime) must not change what the running process reports."""
    return source_version(Path(module_file).resolve().parent)


# Once, at import: the code this process runs (source_version() reads the installed sources).
RUNNING_VERSION = running_version(__file__)


def unit_text(install_dir: str = INSTALL_DIR, python: str = "/usr/bin/python3") -> str:
    """The systemd unit for sources installed in `install_dir` (holding providers/)."""
    return f"""[Unit]
Description=ipvs-ingress director runtime: restores and keeps the IPVS table and VIPs
Documentation=file://{install_dir}/providers/runtime.py
# Early, in parallel with the rest of boot: after local file systems and sysctl.d (which
# could turn ip_forward off again), blocking nothing (never the network: ssh must come up
# whatever the runtime does). The interface may not exist yet: the runtime retries every
# interval, it does not fail.
DefaultDependencies=no
After=local-fs.target systemd-modules-load.service systemd-sysctl.service
Before=shutdown.target
Conflicts=shutdown.target
RequiresMountsFor={os.path.dirname(ownership.STATE_PATH)} {install_dir}
StartLimitIntervalSec=0

[Service]
# READY=1 once the first pass restored the record.
Type=notify
Environment=PYTHONPATH={install_dir} PYTHONUNBUFFERED=1
ExecStart={python} -m providers.runtime run
Restart=always
RestartSec=1
# Ahead of the rest of boot for the CPU: restoring the table is what brings traffic back.
Nice=-10
TimeoutStartSec=120
# A stop lets a provider's request in flight finish (providers/api.py DRAIN_SECONDS).
TimeoutStopSec=90

[Install]
WantedBy=multi-user.target
"""


# --- settings -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    interval: float = DEFAULT_INTERVAL
    repair: Mapping[str, bool] = dataclasses.field(default_factory=dict)

    def repairs(self, owner: str | None) -> bool:
        return self.repair.get(owner or "", True)


def read_config(path: str) -> tuple[Config, list[str]]:
    """The settings in `path` and one line per bad field (whose default is used instead)."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read().decode())
    except FileNotFoundError:
        return Config(), []
    except (OSError, ValueError) as err:
        return Config(), [f"{path}: unreadable ({str(err)[:60]}): fix it; using the defaults"]
    if not isinstance(data, dict):
        return Config(), [f"{path}: {model._short(data)} is not an object: give {{\"intervalSeconds\": 2}}; using the defaults"]  # fmt: skip
    problems, interval, repair = [], DEFAULT_INTERVAL, {}
    lo, hi = INTERVAL_RANGE
    value = data.get("intervalSeconds", DEFAULT_INTERVAL)
    if isinstance(value, int | float) and not isinstance(value, bool) and lo <= value <= hi:
        interval = float(value)
    else:
        problems.append(f"{path}: intervalSeconds: {model._short(value)} is not a number of seconds from {lo:g} to {hi:g}: fix it; using {DEFAULT_INTERVAL:g}")  # fmt: skip
    value = data.get("repair", {})
    if isinstance(value, dict) and all(isinstance(v, bool) for v in value.values()):
        repair = dict(value)
    else:
        problems.append(f"{path}: repair: {model._short(value)} is not an object of stack: true/false: fix it; repairing every stack")  # fmt: skip
    for key in sorted(set(data) - {"intervalSeconds", "repair"}):
        problems.append(f"{path}: unknown setting {model._short(key)}: use intervalSeconds or repair")  # fmt: skip
    return Config(interval, repair), problems


# --- what the record wants and what the kernel has ---------------------------------------------


@dataclasses.dataclass
class Service:
    key: str
    owner: str | None
    state: str | None
    interface: str | None
    spec: model.VirtualServiceSpec | None
    kept: bool  # restored/repaired in this pass
    left: str | None = None  # why not, if recorded but not kept
    repair: bool = True  # the record's own setting (the stack's ipvs-ingress:repair)
    live: model.LiveService | None = None
    ops: list[model.Op] = dataclasses.field(default_factory=list)
    health: dict | None = None  # the recorded health check (None: none)
    target: model.VirtualServiceSpec | None = None  # the spec with health's weights: planned
    real_servers: list[dict] = dataclasses.field(default_factory=list)  # health per real server
    repair_off: bool = False  # left because its stack's repair is off (health does not drain it)

    @property
    def in_sync(self) -> bool | None:
        return None if self.spec is None else not self.ops


@dataclasses.dataclass
class Vip:
    address: str
    interface: str
    kept: bool  # some kept service uses it
    bound: bool | None  # None: the interface does not exist


@dataclasses.dataclass
class View:
    """The record against the kernel at one moment; reading it changes nothing."""

    services: list[Service]
    vips: list[Vip]
    missing_modules: list[str]
    forwarding: bool

    @property
    def kept(self) -> list[Service]:
        return [s for s in self.services if s.kept]

    @property
    def drift(self) -> bool:
        if not self.kept:
            return False
        return bool(
            self.missing_modules
            or not self.forwarding
            or any(s.ops for s in self.kept)
            or any(v.kept and not v.bound for v in self.vips)
        )


def observe(
    kernel, owners: Ownership, config: Config, restoring: bool = False, keeper=None
) -> View:
    """Read-only: what each recorded service and VIP should be and is. Loads no module.
    With `keeper` (probing.HealthKeeper), a service's weights are health's: a drained
    real server should be at weight 0, and that is not drift."""
    services = sorted(
        (_service(key, entry, config, restoring) for key, entry in owners.services.items()),
        key=_order,
    )
    kept = [s for s in services if s.kept]
    schedulers = sorted({s.spec.scheduler for s in kept}) or [None]
    missing = sorted({m for sched in schedulers for m in kernel.missing_modules(sched)})
    ipvs = "ip_vs" not in missing
    if ipvs and any(s.spec for s in services):
        kernel.open_ipvs()
    for s in services:
        if s.spec is not None:
            s.live = kernel.get_service(s.spec.protocol, s.spec.vip, s.spec.port) if ipvs else None
            s.target = keeper.effective(s.spec, s.health) if keeper else s.spec
            s.ops = model.plan(s.live, s.target)
            if keeper is not None:
                s.real_servers = keeper.report(s.spec, s.health)
    vips = []
    on = _bound_by_interface(kernel, owners)
    # keepalived's (HA): never bound by the runtime, whatever else the record says of it (a
    # stack converting between one director and several has both kinds for a moment).
    held = {e.get("vip") for e in owners.services.values() if e.get("vrrp")}
    for address, entry in sorted(owners.addresses.items()):
        interface = entry["interface"]
        bound = None if on[interface] is None else address in on[interface]
        wanted = address not in held and any(s.spec.vip == address for s in kept)
        vips.append(Vip(address, interface, wanted, bound))
    return View(services, vips, missing, kernel.forwarding_on())


def _bound_by_interface(kernel, owners: Ownership) -> dict[str, set[str] | None]:
    """The addresses on each interface the record binds VIPs on (None: no such interface)."""
    on: dict[str, set[str] | None] = {}
    for interface in sorted({e["interface"] for e in owners.addresses.values()}):
        try:
            on[interface] = kernel.bound_addresses(kernel.ifindex(interface))
        except AgentError:  # the interface does not exist (yet)
            on[interface] = None
    return on


def mark(kernel, owners: Ownership, config: Config, restoring: bool, health: int = 0) -> str:
    """Everything a pass judges by, cheaply read: the kernel's IPVS text (without the
    connection counters, which move with traffic), the addresses on the record's interfaces,
    ip_forward, the modules, the record and the settings. Equal marks mean equal inputs, so a
    pass whose mark equals that of a pass that found everything in sync has nothing to do."""
    table = [
        " ".join(line.split()[:4]) if line.startswith("  ->") else line
        for line in kernel.table_text().splitlines()
    ]
    schedulers = sorted({e["spec"]["scheduler"] for e in owners.services.values() if isinstance(e.get("spec"), dict) and isinstance(e["spec"].get("scheduler"), str)})  # fmt: skip
    bound = _bound_by_interface(kernel, owners)
    return json.dumps(
        [
            table,
            {k: sorted(v) if v is not None else None for k, v in bound.items()},
            kernel.forwarding_on(),
            sorted({m for sched in schedulers or [None] for m in kernel.missing_modules(sched)}),
            owners.services,
            owners.addresses,
            config.interval,
            sorted(config.repair.items()),
            restoring,
            health,  # the keeper's generation: a drain or undrain is judged in full
        ],
        sort_keys=True,
        default=str,
    )


def _order(s: Service) -> tuple:
    """VIP (as an address), port, protocol: the same order in every pass, log and status."""
    vip = s.spec.vip if s.spec else str(s.key.split("/", 1)[1].rsplit(":", 1)[0].strip("[]"))
    port = s.spec.port if s.spec else 0
    return ipaddress.ip_address(vip).version, ipaddress.ip_address(vip), port, s.key


def _service(key: str, entry: dict, config: Config, restoring: bool) -> Service:
    owner, state = entry.get("owner"), entry.get("state")
    spec, left = None, None
    if isinstance(entry.get("spec"), dict):
        try:
            spec = model.spec_from_dict(entry["spec"])
        except (KeyError, TypeError, ValueError) as err:
            left = f"its recorded spec is unreadable ({type(err).__name__}: {str(err)[:40]})"
    else:
        left = "adopted without a recorded spec: the stack's next pulumi up records it"
    if left is None and state != "applied":
        left = f"recorded as {state!r} (an apply was interrupted): the stack's next pulumi up completes it"  # fmt: skip
    recorded = entry.get("repair", True) is not False  # records from before it: on
    repair_off = False
    if left is None and not restoring:
        if not recorded:
            left = f"repair is off for stack {owner} (its config ipvs-ingress:repair is false)"
        elif not config.repairs(owner):  # the operator's override in runtime.json
            left = f"repair is off for stack {owner}"
        repair_off = left is not None
    checked = None
    if spec is not None and isinstance(entry.get("health"), dict):
        normal, problems = model.check_health(entry["health"], spec.protocol)
        checked = None if problems else normal  # unreadable: not probed (the next up records it)
    service = Service(key, owner, state, entry.get("interface"), spec, left is None, left, recorded)
    service.health = checked
    service.repair_off = repair_off
    return service


# --- the runtime ---------------------------------------------------------------------------------


def _now_text(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _boot_id() -> str:
    try:
        with open(BOOT_ID) as f:
            return f.read().strip()
    except OSError:
        return ""


class Runtime:
    """One reconcile pass at a time; `run` loops it. Paths default to the agent's."""

    def __init__(
        self,
        kernel,
        state_path: str | None = None,
        config_path: str = CONFIG_PATH,
        status_path: str | None = None,
        lock_path: str | None = None,
        log: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.time,
        idle: Callable[[], float] = lambda: float("inf"),
        health_path: str | None = None,
        probers: Mapping[str, probing.Prober] | None = None,
        probes_path: str | None = None,
        sysctl_root: str = probe_services.SYSCTL_ROOT,
        vrrp_manager: vrrp.Vrrp | None = None,
    ):
        self.kernel = kernel
        self.state_path = state_path or ownership.STATE_PATH
        self.config_path = config_path
        self.status_path = status_path or os.path.join(ownership.RUN_DIR, STATUS_NAME)
        self.lock_path = lock_path
        self.log = log or _print
        self.clock = clock
        self.idle = idle  # seconds since a provider's request last ran (api.Api.idle_seconds)
        # Health: loaded before the first pass, so a drained server is never restored to its
        # configured weight by it (health.json survives restart and reboot).
        self.probes = probe_services.ProbeServices(
            kernel, probes_path or probe_services.PROBES_PATH, self.log, sysctl_root
        )
        if probers is None:
            probers = {
                "kubeProxy": probing.KubeProxyProber(self.probes.source),
                "vip": probing.VipProber(self.probes.route, self.probes.why_not),
            }
        self.health = probing.HealthKeeper(
            health_path or probing.HEALTH_PATH, probers, self.log, clock
        )
        # HA: keepalived, the sync daemons and the ready file (providers/vrrp.py).
        self.vrrp = vrrp_manager or vrrp.Vrrp(log=self.log, bound=self._bound)
        self.wake = threading.Event()  # set when health changed what the kernel should hold
        self.deferred_passes = 0
        self.deferred_in_a_row = 0
        self.version = RUNNING_VERSION
        self.started = clock()
        self.config = Config()
        self._config_signature: object = ()
        self.notes: dict[str, str] = {}  # standing conditions, logged when they appear
        self.view: View | None = None
        self.last_reconcile: float | None = None
        self.busy_passes = 0
        self.pass_seconds: float | None = None
        self.steady: str | None = None  # the mark of the last pass that found all in sync
        self.full_due = 0.0
        self.full_passes = 0
        previous = _read_json(self.status_path) or {}
        self.boot_id = _boot_id()
        # The first pass after a boot restores every stack, repair off or not; a restart of the
        # process (kill, upgrade) is not a boot: /run survives it, and the boot id says so.
        self.restoring = previous.get("bootId") != self.boot_id or not self.boot_id
        kept = previous.get("repairs") if not self.restoring else None
        self.repairs = collections.deque(
            [r for r in kept if _is_repair(r)] if isinstance(kept, list) else [],
            maxlen=KEEP_REPAIRS,
        )

    def _bound(self, interface: str) -> set[str] | None:
        try:
            return self.kernel.bound_addresses(self.kernel.ifindex(interface))
        except AgentError:  # no such interface (yet)
            return None

    def reload_config(self) -> Config:
        signature = _signature(self.config_path)
        if signature != self._config_signature:
            self._config_signature = signature
            self.config, problems = read_config(self.config_path)
            for line in problems:
                self.log(line)
        return self.config

    def reconcile(self) -> list[str]:
        """One pass: compare the kernel with the record, repair what differs; the lines logged."""
        began = time.monotonic()
        config = self.reload_config()
        notes: dict[str, str] = {}
        lines: list[str] = []
        try:
            owners = Ownership.load(self.state_path)
        except AgentError as err:
            notes["record"] = f"{err}; the runtime changes nothing meanwhile"
            self.view = None
        else:
            self._sync_probes(self._configure_health(owners, config), notes)
            # Before the table is judged: a teardown lets keepalived drop a VIP that this
            # pass then binds (a stack back to one director).
            self._vrrp(lambda: self.vrrp.converge(owners), notes)
            seen = mark(self.kernel, owners, config, self.restoring, self.health.generation)
            full = self.steady != seen or self.view is None or time.monotonic() >= self.full_due
            # While a provider applies, its changes move the mark, and reading the whole table
            # would only take the director's CPU from it (39 services: 1.5 s per pass under
            # emulation): the first pass after it has been quiet for an interval judges all,
            # or the one after DEFER_MAX_PASSES deferred in a row.
            busy = self.idle() < config.interval and self.deferred_in_a_row < DEFER_MAX_PASSES
            if full and self.view is not None and not self.restoring and busy:
                self.deferred_passes += 1
                self.deferred_in_a_row += 1
            elif full:
                self.deferred_in_a_row = 0
                view = observe(self.kernel, owners, config, self.restoring, self.health)
                if view.drift:
                    view, lines = self._repair_locked(config, notes) or (view, [])
                # Marked steady only when this pass found it in sync and changed nothing.
                self.steady = seen if not view.drift and not lines else None
                self.full_due = time.monotonic() + FULL_PASS_SECONDS
                self.full_passes += 1
                self.view = view
                # The boot restore lasts until a pass finds it all in place: a first pass kept
                # from the lock, or before the VIP's interface existed, must not end it.
                self.restoring = self.restoring and view.drift
            view = self.view
            for s in view.services:
                if s.left:
                    notes[f"left {s.key}"] = f"left {s.key} ({s.owner}): {s.left}"
            for key, line in self.health.unprobed().items():
                notes[f"unprobed {key}"] = line
            with self.health.lock:
                not_sent = dict(self.health.not_sent)
            for (key, rs), why in sorted(not_sent.items()):
                notes[f"not sent {key} {rs}"] = f"{key} {rs}: {why}"
            for s in view.services:
                for line in self.health.held(s.key):
                    notes[f"held {line.split(' kept in service')[0]}"] = line
            for v in view.vips:
                if v.kept and v.bound is None:
                    notes[f"vip {v.address}"] = f"VIP {v.address}: interface {v.interface!r} does not exist (yet): retrying every {config.interval:g} s"  # fmt: skip
            # Ready (keepalived may hold the VIPs) only when the kernel equals the record for
            # every VRRP service, repaired or not (repair off: its drift is not in view.drift).
            # A pending one is a provider's apply in flight, not drift: judging it would hand
            # the VIPs over at every `pulumi up` that changes a table.
            in_sync = not view.drift and not any(
                s.ops
                for s in view.services
                if s.key in vrrp_keys(owners) and s.spec and s.state != "pending"
            )
            self._vrrp(lambda: self.vrrp.finish(in_sync), notes)
        self._settle_notes(notes)
        self.last_reconcile = self.clock()
        self.pass_seconds = time.monotonic() - began
        self.write_status()
        return lines

    def _vrrp(self, step: Callable[[], None], notes: dict) -> None:
        try:
            step()
        except (OSError, AgentError) as err:  # e.g. /etc read-only: said, retried next pass
            notes["vrrp"] = f"VRRP: {_one_line(err)}"
        for name, line in self.vrrp.problems.items():
            notes[f"vrrp {name}"] = line

    def _configure_health(self, owners: Ownership, config: Config) -> None:
        """The keeper probes every recorded service with a spec and a health check, kept or
        not: a service recorded `pending` for the moment of a provider's apply, or a stack with
        repair off, must not lose its drains (a provider's apply plans against them too)."""
        services = [_service(key, entry, config, self.restoring) for key, entry in owners.services.items()]  # fmt: skip
        self.health.configure(
            ((s.key, s.spec, s.health) for s in services if s.spec),
            passive=[s.key for s in services if s.repair_off],
        )
        return services

    def _sync_probes(self, services: list[Service], notes: dict) -> None:
        """A probe service for every node a `vip` check probes, accept_local on the interfaces
        of their VIPs, expire_quiescent_template while a persistent service is checked; none
        of it before ip_vs is loaded (the restore loads it first)."""
        checked = [s for s in services if s.spec and s.health and s.health["check"] != "none"]
        vip = [s for s in checked if s.health["check"] == "vip"]
        if "ip_vs" in self.kernel.missing_modules():
            return
        sysctls = {}
        for s in vip:
            name = probe_services.sysctl_name("net/ipv4/conf", s.interface or "", "accept_local")
            if name and ":" not in s.spec.vip:
                sysctls[name] = "1"
        if any(s.spec.persistence_seconds for s in checked):
            sysctls["net/ipv4/vs/expire_quiescent_template"] = "1"
        self.probes.sync(
            {r.address for s in vip for r in s.spec.real_servers},
            sysctls,
            probed={r.address for s in checked for r in s.spec.real_servers},
            vips={s.spec.vip for s in services if s.spec},
        )
        for name, line in self.probes.problems.items():
            notes[f"probe {name}"] = line

    def probe(self, now: float | None = None) -> bool:
        """Probe the targets that are due; True (and the next pass woken) when a real server
        was drained or got its weight back."""
        changed = self.health.probe_due(now)
        if changed:
            self.wake.set()
        return changed

    def _repair_locked(self, config: Config, notes: dict) -> tuple[View, list[str]] | None:
        try:
            with director_lock(self.lock_path, wait=config.interval):
                self.busy_passes = 0
                # Again under the lock: a provider's apply may have changed the record.
                owners = Ownership.load(self.state_path)
                self._configure_health(owners, config)  # the probe services: the pass's own
                before = observe(self.kernel, owners, config, self.restoring, self.health)
                lines = self._repair(before, notes)
                return observe(self.kernel, owners, config, self.restoring, self.health), lines
        except AgentError as err:
            if err.code != "busy":
                raise
            # A long `pulumi up` holds it for a while: said only when it lasts several passes.
            self.busy_passes += 1
            if self.busy_passes >= BUSY_PASSES_NOTED:
                notes["lock"] = f"the director lock is busy (a provider apply is running): {err}"
            return None

    def _repair(self, view: View, notes: dict) -> list[str]:
        """Modules, ip_forward, services, then VIPs; one line per change."""
        if not view.drift:
            return []
        k, lines = self.kernel, []
        verb = "restored" if self.restoring else "repaired"
        with self.health.lock:
            changed, self.health.changed = self.health.changed, set()

        def done(line: str) -> None:
            lines.append(f"{verb} {line}")
            self.repairs.append({"time": self.clock(), "line": f"{verb} {line}"})
            self.log(f"{verb} {line}")

        if view.missing_modules:
            try:
                for sched in sorted({s.spec.scheduler for s in view.kept}):
                    k.ensure_ipvs(sched)
                done(f"modules: load {' '.join(view.missing_modules)}")
            except AgentError as err:
                notes["modules"] = f"modules: {err}"
                return lines  # no IPVS: nothing else can be restored
        if not view.forwarding:
            k.ensure_forwarding()
            done("net.ipv4.ip_forward: 0 -> 1")
        present = set()
        for s in view.kept:
            if not s.ops and s.live is not None and not view.missing_modules:
                present.add(s.spec.vip)  # in sync as just read under the lock: not read again
                continue
            live = k.get_service(s.spec.protocol, s.spec.vip, s.spec.port)
            try:
                for op in model.plan(live, s.target or s.spec):
                    k.apply(s.spec, op)
                    line = f"{s.key}: {describe(op, live, s.spec)}"
                    if (s.key, health.rs_key(op.address or "", op.port or 0)) in changed:
                        lines.append(f"health {line}")  # a drain or undrain, not a repair
                        self.log(f"health {line}")
                    else:
                        done(line)
            except AgentError as err:
                notes[f"service {s.key}"] = f"{s.key} ({s.owner}): {err}"
            if k.get_service(s.spec.protocol, s.spec.vip, s.spec.port) is not None:
                present.add(s.spec.vip)
        for v in view.vips:
            # Only once a service on it exists: answering ARP before would blackhole the VIP.
            if v.kept and not v.bound and v.address in present:
                try:
                    k.add_address(k.ifindex(v.interface), v.address)
                    done(f"VIP {v.address}: bind on {v.interface}")
                except AgentError as err:
                    notes[f"vip {v.address}"] = f"VIP {v.address}: {err}"
        return lines

    def _settle_notes(self, notes: dict[str, str]) -> None:
        for name, line in notes.items():
            if self.notes.get(name) != line:
                self.log(line)
        for name in set(self.notes) - set(notes):
            self.log(f"resolved: {self.notes[name]}")
        self.notes = notes

    def status(self) -> dict:
        view = self.view
        return {
            "version": self.version,
            "pid": os.getpid(),
            "bootId": self.boot_id,
            "started": self.started,
            "lastReconcile": self.last_reconcile,
            "lastPassSeconds": self.pass_seconds,
            "fullPasses": self.full_passes,
            "deferredPasses": self.deferred_passes,
            "intervalSeconds": self.config.interval,
            "repair": dict(self.config.repair),
            "inSync": view is not None and not view.drift,
            "services": {s.key: _service_status(s) for s in view.services} if view else {},
            "vips": [dataclasses.asdict(v) for v in view.vips] if view else [],
            "repairs": list(self.repairs),
            "notes": sorted(self.notes.values()),
            "probeServices": self.probes.status(),
            "probesSent": self.health.sent,
            "vrrp": self.vrrp.status() if self.vrrp.vips else None,
        }

    def write_status(self) -> None:
        os.makedirs(os.path.dirname(self.status_path), exist_ok=True)
        tmp = f"{self.status_path}.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(json.dumps(self.status(), sort_keys=True))
        os.replace(tmp, self.status_path)  # readers see the old file or the new, never half


def vrrp_keys(owners: Ownership) -> set[str]:
    return {k for k, e in owners.services.items() if e.get("vrrp")}


def _service_status(s: Service) -> dict:
    return {
        "owner": s.owner,
        "state": s.state,
        "interface": s.interface,
        "kept": s.kept,
        "left": s.left,
        "inSync": s.in_sync,
        "repair": s.repair,
        "desired": model.ipvsadm_lines(s.spec) if s.spec else [],
        "live": model.ipvsadm_lines(s.live) if s.live else [],
        "drift": [describe(op, s.live, s.spec) for op in s.ops],
        "health": s.real_servers,
    }


def describe(op: model.Op, live: model.LiveService | None, spec: model.VirtualServiceSpec) -> str:
    """One change in the log's words, with the value it replaced."""
    hostport = model._hostport(op.address, op.port) if op.address else ""
    old = {(d.address, d.port): d for d in live.dests} if live else {}
    if op.action == "add-service":
        persistent = f" persistent {spec.persistence_seconds}" if spec.persistence_seconds else ""
        return f"add-service {spec.scheduler}{persistent}"
    if op.action == "set-service":
        changes = [
            f"{what} {was} -> {now}"
            for what, was, now in (
                ("scheduler", live.scheduler, spec.scheduler),
                ("persistence", live.persistence_seconds, spec.persistence_seconds),
            )
            if was != now
        ]
        return f"set-service {', '.join(changes)}"
    if op.action == "add-dest":
        return f"add-dest {hostport} weight {op.weight}"
    dest = old.get((op.address, op.port))
    if op.action == "set-dest":
        changes = []
        if dest.weight != op.weight:
            changes.append(f"weight {dest.weight} -> {op.weight}")
        if dest.forwarding != model.ROUTE:
            was = model.FORWARDING.get(dest.forwarding, dest.forwarding)
            changes.append(f"forwarding {was} -> Route")
        return f"set-dest {hostport} {', '.join(changes)}"
    return f"del-dest {hostport} (not recorded)"


def _is_repair(item: object) -> bool:
    return (
        isinstance(item, dict)
        and isinstance(item.get("time"), int | float)
        and isinstance(item.get("line"), str)
    )


def _print(line: str) -> None:
    print(line, flush=True)


def _read_json(path: str) -> dict | None:
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read().decode())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# --- the kernel, for a process that lives for months ------------------------------------------


class RuntimeKernel(Kernel):
    """The agent's Kernel with nothing cached across passes: an interface that comes back (a
    driver reload) has a new index, and a reloaded ip_vs registers its netlink family anew."""

    def ifindex(self, name: str) -> int:
        self._ifindex.pop(name, None)
        return super().ifindex(name)

    def ensure_ipvs(self, scheduler: str | None = None) -> None:
        if "ip_vs" in self.missing_modules():
            self.reset()
        super().ensure_ipvs(scheduler)

    # -- probe services (providers/probe_services.py): fwmark services, one node each --
    def _fwmark_key(self, mark: int, node: str):
        return self.IPVSService(af=socket.AF_INET6 if ":" in node else socket.AF_INET, fwmark=mark)

    def add_probe_service(self, mark: int, node: str, scheduler: str) -> None:
        """`-A -f MARK -s rr`, then `-a -r node:0 -g -w 1`. A service already at the mark is
        someone else's (the plan found none there): refused, never joined."""
        self.open_ipvs()
        six = ":" in node
        service = self.IPVSService(
            af=socket.AF_INET6 if six else socket.AF_INET,
            fwmark=mark,
            sched_name=scheduler,
            timeout=0,
            flags={"flags": 0, "mask": 0xFFFFFFFF},
            netmask="128.0.0.0" if six else "255.255.255.255",  # see Kernel._service_full
        )
        self._ipvs.service("add", service=service)
        self.add_probe_dest(mark, node)

    def add_probe_dest(self, mark: int, node: str) -> None:
        """The destination of a probe service a kill left without it (what exists is kept)."""
        self.open_ipvs()
        dest = self.IPVSDest(addr=node, port=0, weight=1, fwd_method=model.ROUTE)
        try:
            self._ipvs.dest("add", service=self._fwmark_key(mark, node), dest=dest)
        except self.NetlinkError as err:
            if err.code != errno.EEXIST:
                raise

    def del_probe_service(self, mark: int, node: str) -> None:
        self.open_ipvs()
        try:
            self._ipvs.service("del", service=self._fwmark_key(mark, node))
        except self.NetlinkError as err:
            if err.code not in (errno.ESRCH, errno.ENOENT):
                raise

    def local_addresses(self) -> set[str]:
        """Every address on the director, in one dump."""
        return {
            a
            for msg in self.ipr.addr("dump")
            for a in (msg.get("IFA_ADDRESS"), msg.get("IFA_LOCAL"))
            if a
        }

    def source_for(self, node: str, exclude: set[str] | frozenset = frozenset()) -> str | None:
        """The director's own address toward `node`: the kernel's choice unless it is one of
        `exclude` (the VIPs: an IPv6 VIP bound as /128 wins the kernel's source selection for a
        node in its prefix), else a global, settled address of the route's interface."""
        try:
            msg = self.ipr.route("get", dst=node)[0]
        except self.NetlinkError:
            return None
        chosen = msg.get("RTA_PREFSRC")
        if chosen and chosen not in exclude:
            return chosen
        family = socket.AF_INET6 if ":" in node else socket.AF_INET
        unsettled = 0x08 | 0x20 | 0x40  # IFA_F_DADFAILED, IFA_F_DEPRECATED, IFA_F_TENTATIVE
        for a in self.ipr.addr("dump", index=msg.get("RTA_OIF"), family=family):
            address = a.get("IFA_ADDRESS")
            flags = a.get("IFA_FLAGS") or a.get("flags", 0)
            if address and address not in exclude and a.get("scope", 0) == 0 and not flags & unsettled:  # fmt: skip
                return address
        return None

    def reset(self) -> None:
        if self._ipvs is not None:
            try:
                self._ipvs.close()
            except Exception:  # a dead socket: it goes anyway
                pass
            self._ipvs = None


# --- systemd ------------------------------------------------------------------------------------


def sd_notify(message: str) -> bool:
    """Tell systemd (Type=notify) e.g. READY=1; False when not run by systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(address)
            sock.sendall(message.encode())
        except OSError:
            return False
    return True


def run(runtime: Runtime, stop: threading.Event) -> int:
    """Reconcile every interval until `stop`; the table stays as it is when it ends.

    Passes start every interval (not an interval after the last one ended), so a change is
    seen at most one interval after it was made; a pass that overran starts the next at once."""
    ready, due = False, time.monotonic()
    prober = threading.Thread(target=_probe_loop, args=(runtime, stop), name="probe", daemon=True)
    prober.start()
    while not stop.is_set():
        runtime.wake.clear()
        try:
            runtime.reconcile()
        except Exception as err:  # one bad pass must not end the runtime: log, try again
            runtime.log(f"reconcile failed: {type(err).__name__}: {str(err)[:200]}")
            if isinstance(runtime.kernel, RuntimeKernel):
                runtime.kernel.reset()
        if not ready:
            ready = True
            sd_notify("READY=1")
        in_sync = runtime.view is not None and not runtime.view.drift and not runtime.notes
        sd_notify(f"STATUS={'in sync' if in_sync else 'see: ipvs-ingress status'}")
        due = max(due + runtime.config.interval, time.monotonic())
        # A drain or undrain wakes the next pass at once: it is applied within a tick. Cleared
        # before the pass starts, so a drain signalled during a pass wakes the next one.
        runtime.wake.wait(max(0.0, due - time.monotonic()))
    runtime.health.close()
    runtime.log("stopping: the IPVS table and VIPs stay as they are")
    return 0


PROBE_TICK = 0.1  # the probe thread starts what is due every tick (the lab: spread, not bursts)


def _probe_loop(runtime: Runtime, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            runtime.probe()
        except Exception as err:  # e.g. health.json unwritable: said, and probing goes on
            runtime.log(f"probing failed: {type(err).__name__}: {str(err)[:200]}")
            stop.wait(runtime.config.interval)
        stop.wait(PROBE_TICK)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    command = args[0] if args else ""
    if command == "run":
        return _main_run()
    if command == "status":
        return print_status()
    if command == "unit":
        print(unit_text(*args[1:2]), end="")
        return 0
    if command == "version":
        print(source_version())
        return 0
    print(
        "usage: python3 -m providers.runtime run|status|version|unit [INSTALL_DIR]",
        file=sys.stderr,
    )
    return 2


def _main_run() -> int:
    stop = threading.Event()
    runtime_box: list[Runtime] = []

    def stopping(*_) -> None:
        stop.set()
        for r in runtime_box:
            r.wake.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stopping)
    try:
        kernel = RuntimeKernel()
    except AgentError as err:
        _print(f"ipvs-ingress runtime cannot start: {err}")
        return 1
    runtime = Runtime(kernel)
    runtime_box.append(runtime)
    runtime.reload_config()
    # The provider's applies in this process plan against health's weights: never undo a drain.
    agent.HEALTH = runtime.health
    # A delete of the last service of a VIP keepalived holds here hands the VIP over first.
    agent.VRRP_HANDOVER = runtime.vrrp.hand_over
    try:
        # Listening before the first pass: a provider that connects while the table is
        # restored waits on the director lock, it is not refused.
        listener = api.Api(
            runtime.version,
            lambda: api.kernel_handler(RuntimeKernel),
            greeting={"pyroute2": kernel.version},
        )
        runtime.idle = listener.idle_seconds
    except OSError as err:
        _print(f"ipvs-ingress runtime cannot listen on {api.HOST}:{api.PORT}: {err.strerror}")
        return 1
    _print(
        f"ipvs-ingress runtime {runtime.version} started (pid {os.getpid()}): keeping "
        f"{runtime.state_path} every {runtime.config.interval:g} s, requests on "
        f"{api.HOST}:{api.PORT}"
        + ("; first start since boot: restoring every stack" if runtime.restoring else "")
    )
    code = run(runtime, stop)
    if not listener.close():
        _print("stopping with a request still running: its next run converges from the record")
    return code


# --- status for operators ----------------------------------------------------------------------


def print_status(
    kernel=None,
    state_path: str | None = None,
    status_path: str | None = None,
    config_path: str = CONFIG_PATH,
    out=None,
    now: Callable[[], float] = time.time,
    health_path: str | None = None,
    vrrp_host: vrrp.Host | None = None,
    ready_file: str = vrrp.keepalived.READY_FILE,
) -> int:
    """Desired against live per service (read now), the runtime's last reconcile and repairs,
    its version and the owning stacks; with VRRP services, which VIPs this director holds now,
    the sync daemons and the ready file. Exit 0 when the runtime runs and everything it keeps is
    in sync, 1 otherwise. Changes nothing."""
    out = out or sys.stdout
    write = lambda line="": out.write(line + "\n")  # noqa: E731
    status_path = status_path or os.path.join(ownership.RUN_DIR, STATUS_NAME)
    saved = _read_json(status_path)
    config, _ = read_config(config_path)
    running = _describe_runtime(saved, config, now(), write)
    try:
        owners = Ownership.load(state_path or ownership.STATE_PATH)
    except AgentError as err:
        write(f"record: {err}")
        return 1
    except OSError as err:  # e.g. not root
        write(f"record: unreadable ({_one_line(err)}): run it as root")
        return 1
    try:
        kernel = kernel or Kernel()
        keeper = probing.HealthKeeper(health_path or probing.HEALTH_PATH, log=lambda _line: None)
        keeper.save = lambda: None  # status changes nothing
        keeper.configure(
            (s.key, s.spec, s.health)
            for s in (_service(k, e, config, False) for k, e in owners.services.items())
            if s.kept and s.spec
        )
        view = observe(kernel, owners, config, keeper=keeper)
    except AgentError as err:
        write(f"live table: unreadable ({err})")
        return 1
    except Exception as err:  # not root: netlink's IPVS commands are refused (NetlinkError, EPERM)
        write(f"live table: unreadable ({_one_line(err)}): run it as root")
        return 1
    write(f"stacks: {', '.join(_stack_repair(view.services, config, config_path)) or 'none'}")
    if view.kept and view.missing_modules:
        write(f"modules missing: {' '.join(view.missing_modules)}")
    if view.kept and not view.forwarding:
        write("net.ipv4.ip_forward: 0 (wanted 1)")
    for s in view.services:
        _write_service(s, write)
    for v in view.vips:
        where = "bound" if v.bound else ("NOT BOUND" if v.bound is False else "interface missing")
        write(f"VIP {v.address} on {v.interface}: {where}{'' if v.kept else ' (not kept)'}")
    _write_vrrp(owners, kernel, vrrp_host or vrrp.Host(), ready_file, write)
    repairs = [r for r in (saved or {}).get("repairs", []) if _is_repair(r)]
    write(f"last repairs: {'none' if not repairs else ''}")
    for r in repairs[-10:]:
        write(f"  {_now_text(r['time'])} {r['line']}")
    _write_probes(saved or {}, write)
    for note in (saved or {}).get("notes", []):
        write(f"note: {note}")
    return 0 if running and not view.drift else 1


def _write_vrrp(owners: Ownership, kernel, host: vrrp.Host, ready_file: str, write) -> None:
    """Read now: per VRRP VIP whether this director holds it, keepalived, sync daemons, ready."""
    services = vrrp.wanted(owners)
    if not services:
        return
    manager = vrrp.Vrrp(host=host)
    active = manager._unit_active()
    ready = vrrp._read(ready_file)
    write(f"VRRP: keepalived {'running' if active else 'NOT RUNNING'} ({vrrp.UNIT_NAME}), ready {ready if ready is not None else 'missing'}")  # fmt: skip
    for vip, interface, vrid in sorted({(e["vip"], e["interface"], e["vrrp"]["virtualRouterId"]) for _k, e in services}):  # fmt: skip
        try:
            held = vip in kernel.bound_addresses(kernel.ifindex(interface))
        except AgentError:
            held = False
        where = "held by this director (master)" if held else "not held here (backup)"
        write(f"VIP {vip} on {interface} (VRRP router {vrid}): {where}")
    daemons = manager.read_daemons()
    if daemons is None:
        write("sync daemons: unreadable (ipvsadm --list --daemon failed)")
    else:
        running = [f"{r} on {i} syncid {n}" for r, (i, n) in sorted(daemons.items())]
        write(f"sync daemons: {', '.join(running) or 'NONE RUNNING'}")


def _one_line(err: Exception, limit: int = 120) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())[:limit]


def _describe_runtime(saved: dict | None, config: Config, now: float, write) -> bool:
    installed = source_version()
    if not saved:
        write(f"runtime: not running (no status file); installed version {installed}")
        return False
    last = saved.get("lastReconcile") or 0
    alive = saved.get("bootId") == _boot_id() and _pid_alive(saved.get("pid"))
    fresh = now - last <= 3 * float(saved.get("intervalSeconds") or config.interval) + 5
    state = "running" if alive and fresh else ("stalled" if alive else "not running")
    version = saved.get("version")
    upgrade = "" if version == installed else f" (installed sources: {installed}: restart it)"
    write(f"runtime: {state}, pid {saved.get('pid')}, version {version}{upgrade}")
    every = float(saved.get("intervalSeconds") or config.interval)
    write(f"last reconcile: {_now_text(last)} ({now - last:.1f} s ago; every {every:g} s)")
    return state == "running"


def _stack_repair(services: list[Service], config: Config, config_path: str) -> list[str]:
    """Each owning stack with whether the runtime repairs it, and what says so: the stack's
    config (ipvs-ingress:repair, recorded per service by its last apply) or this director's
    runtime.json, which can only turn a stack off."""
    out = []
    for stack in sorted({s.owner or "(no owner)" for s in services}):
        mine = [s for s in services if (s.owner or "(no owner)") == stack]
        off = sum(not s.repair for s in mine)
        if not config.repairs(stack if stack != "(no owner)" else None):
            out.append(f"{stack} (repair off: {config_path})")
        elif off == len(mine):
            out.append(f"{stack} (repair off: ipvs-ingress:repair false)")
        elif off:
            out.append(f"{stack} (repair off for {off} of {len(mine)} services: ipvs-ingress:repair false)")  # fmt: skip
        else:
            out.append(f"{stack} (repair on)")
    return out


def _write_probes(saved: dict, write) -> None:
    """The probe services the runtime keeps and how many probes it sent."""
    services, sent = saved.get("probeServices") or {}, saved.get("probesSent") or 0
    if not services and not sent:
        return
    up = max(1.0, (saved.get("lastReconcile") or 0) - (saved.get("started") or 0))
    write(f"probes: {sent} sent since the runtime started ({sent / up:.1f} per second)")
    for node, e in services.items():
        where = "in place" if e.get("inPlace") else "NOT IN PLACE"
        write(f"  probe service fwmark {e.get('mark')} -> {node} (route): {where}, probes from {e.get('source') or '?'}")  # fmt: skip


def _pid_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except OSError as err:
        return err.errno == errno.EPERM
    return True


def _write_service(s: Service, write) -> None:
    if s.spec is None:
        write(f"{s.key} [{s.owner or '(no owner)'}] {s.state}: {s.left}")
        return
    sync = "in sync" if s.in_sync else "DRIFT: " + "; ".join(describe(o, s.live, s.spec) for o in s.ops)  # fmt: skip
    left = f" ({s.left})" if s.left else ""
    write(f"{s.key} [{s.owner or '(no owner)'}] {s.state}: {sync}{left}")
    for line in model.ipvsadm_lines(s.spec):
        write(f"  desired {line}")
    for line in model.ipvsadm_lines(s.live) if s.live else ["(absent)"]:
        write(f"  live    {line}")
    for rs in s.real_servers:
        if rs["state"] in ("drained", "held"):
            since = f" since {_now_text(rs['since'])}" if rs["since"] else ""
            why = f": {rs['reason']}" if rs["reason"] else ""
            write(
                f"  health  {model._hostport(rs['address'], rs['port'])} {rs['state']}{since}{why}"
            )


if __name__ == "__main__":
    sys.exit(main())
