"""The on-director agent: the only code that talks to the kernel.

Runs on the director (stdlib + pyroute2) inside the runtime (providers/runtime.py), one Agent
per provider connection (providers/api.py). Protocol: one JSON document per line. The runtime
greets with {"ready": ...}, then each request {"id", "op", ...} is answered with
{"id", "ok": true, "result"} or {"id", "ok": false, "code", "error"}. Every change is made under an flock on the director, so parallel resources and
other stacks cannot interleave, and ownership is recorded in a state file so that nothing
ipvs-ingress did not create is ever changed or removed.
"""

from __future__ import annotations

import dataclasses
import errno
import importlib.util
import ipaddress
import json
import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
import types
from contextlib import contextmanager

from providers import model
from providers.ownership import AgentError, Ownership, director_lock

# The runtime's health state (providers/probing.HealthKeeper) when this agent runs inside the
# runtime process, which sets it at start; None elsewhere (tests, the old per-connection agent).
# With it, an apply plans against health's weights (a drained real server stays at weight 0:
# `pulumi up` never undoes a drain) and replies say each real server's health.
HEALTH = None

# The runtime's VRRP handover (providers/vrrp.Vrrp.hand_over) when this agent runs inside the
# runtime process, which sets it at start; None elsewhere. A delete of the last service of a
# VIP that keepalived holds here hands the VIP over before the service goes.
VRRP_HANDOVER = None

PROTOCOL_VERSION = 1
MIN_PYROUTE2 = (0, 9, 5, 1)  # 0.9.5, final: _version_tuple form
IP_VS_SVC_F_PERSISTENT = 0x1
PROTO_NUMBERS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}
PROTO_NAMES = {v: k for k, v in PROTO_NUMBERS.items()}


def _version_tuple(text: str) -> tuple[int, ...]:
    """(major, minor, micro, final) of a PEP 440 version; a pre-release sorts before its release.

    "0.9.4rc5" is (0, 9, 4, 0), never 0.9.45; anything unreadable is (0,), which is too old.
    """
    found = re.fullmatch(r"(\d+)\.(\d+)(?:\.(\d+))?((?:a|b|rc|\.dev|dev)\d*)?(\.post\d+)?", text)
    if found is None:
        return (0,)
    major, minor, micro, pre, _post = found.groups()
    return int(major), int(minor), int(micro or 0), 0 if pre else 1


def _load_pyroute2():
    """Import only what the agent uses: pyroute2's package __init__ imports every protocol it
    supports, which takes seconds on a small or emulated director (measured: 1.9-2.9 s vs 1.4 s
    under qemu TCG). A bare package module stands in for it; anything unexpected falls back to
    the plain import, so an old or unusual pyroute2 is still recognised and reported."""
    spec = importlib.util.find_spec("pyroute2")
    if spec is None:
        raise AgentError(
            "pyroute2-missing", "python3 cannot import pyroute2 (No module named 'pyroute2')"
        )
    try:
        package = types.ModuleType("pyroute2")
        package.__path__ = list(spec.submodule_search_locations or [])
        package.__spec__ = spec
        sys.modules["pyroute2"] = package
        from pyroute2.config.version import __version__ as version
    except ImportError:
        del sys.modules["pyroute2"]
        try:
            import pyroute2
        except ImportError as err:
            raise AgentError(
                "pyroute2-missing", f"python3 cannot import pyroute2 ({err})"
            ) from None
        version = getattr(pyroute2, "__version__", "0")
    # The version first: an old pyroute2 fails the IPVS import below with a vaguer error.
    if _version_tuple(version) < MIN_PYROUTE2:
        raise AgentError("pyroute2-old", f"pyroute2 {version} has no IPVS support (needs >= 0.9.5)")
    from pyroute2.iproute.linux import IPRoute
    from pyroute2.ipvs import IPVS, IPVSDest, IPVSService
    from pyroute2.netlink.exceptions import NetlinkError

    return version, IPVS, IPRoute, IPVSDest, IPVSService, NetlinkError


# In Direct Routing the director sees only the client's half of a connection, so FIN_WAIT is the
# last state its entry reaches, and that entry lives 2 minutes. A client that reuses a source port
# within them had its new connection follow the old entry to the old real server, even a drained
# (weight 0) one: seen in the lab as requests reaching a drained or removed node. Bit 2 of
# conn_reuse_mode makes IPVS schedule such a SYN anew (the kernel's documented setting for DR).
# Best effort, like ip_forward a setting the director needs: a kernel without it changes nothing.
CONN_REUSE_MODE = "/proc/sys/net/ipv4/vs/conn_reuse_mode"


def reschedule_fin_wait(path: str = CONN_REUSE_MODE) -> bool:
    """Set bit 2 of conn_reuse_mode (keeping the others); True if it was written."""
    try:
        with open(path) as f:
            mode = int(f.read().strip())
        if mode & 2:
            return False
        with open(path, "w") as f:
            f.write(f"{mode | 2}\n")
        return True
    except (OSError, ValueError):
        return False


class Kernel:
    """IPVS, addresses and routes through pyroute2's netlink API (never ipvsadm output)."""

    def __init__(self):
        version, IPVS, IPRoute, IPVSDest, IPVSService, NetlinkError = _load_pyroute2()
        self.version = version
        self.IPVSService, self.IPVSDest, self.NetlinkError = IPVSService, IPVSDest, NetlinkError
        self._IPVS = IPVS
        self._ipvs = None
        self.ipr = IPRoute()
        # Per connection (one deployment): interface indexes and routes to the real servers
        # do not change under a running `pulumi up`, and looking them up is most of an apply.
        self._ifindex: dict[str, int] = {}
        self._routes: dict[str, tuple[int | None, str | None]] = {}
        self._prefixes: dict[int, list] = {}

    def close(self) -> None:
        for sock in (self._ipvs, self.ipr):
            try:
                if sock is not None:
                    sock.close()
            except Exception:  # closing a dead socket must not fail a disconnect
                pass
        self._ipvs = None

    # -- modules and sysctls --
    @staticmethod
    def missing_modules(scheduler: str | None = None) -> list[str]:
        wanted = ["ip_vs"] + ([f"ip_vs_{scheduler}"] if scheduler else [])
        return [m for m in wanted if not os.path.isdir(f"/sys/module/{m}")]

    def ensure_ipvs(self, scheduler: str | None = None) -> None:
        """Load ip_vs (and the scheduler's module, when about to use it)."""
        for module in self.missing_modules(scheduler):
            proc = subprocess.run(["modprobe", module], capture_output=True, text=True)
            if proc.returncode != 0 and module == "ip_vs" and not os.path.exists("/proc/net/ip_vs"):
                detail = (proc.stderr or proc.stdout).strip().splitlines()
                raise AgentError(
                    "ipvs-missing",
                    f"the kernel has no IPVS (modprobe ip_vs: {detail[-1] if detail else proc.returncode})",
                )
        self.open_ipvs()

    def open_ipvs(self) -> None:
        if self._ipvs is None:
            try:
                self._ipvs = self._IPVS()
            except Exception as err:  # the generic netlink family is absent
                raise AgentError(
                    "ipvs-missing", f"the kernel has no IPVS netlink family ({err})"
                ) from None

    # Only IPv4's: turning on IPv6 forwarding would make the director a router and stop it
    # accepting router advertisements; IPVS transmits DR packets without it.
    _FORWARD = "/proc/sys/net/ipv4/ip_forward"

    def forwarding_on(self) -> bool:
        with open(self._FORWARD) as f:
            return f.read().strip() == "1"

    def ensure_forwarding(self) -> None:
        if not self.forwarding_on():
            with open(self._FORWARD, "w") as f:
                f.write("1\n")
        reschedule_fin_wait()

    # -- interfaces, addresses, routes --
    def ifindex(self, name: str) -> int:
        if name not in self._ifindex:
            found = self.ipr.link_lookup(ifname=name)
            if not found:
                raise AgentError(
                    "no-interface", f"interface {name!r} does not exist on the director"
                )
            self._ifindex[name] = found[0]
        return self._ifindex[name]

    def has_address(self, index: int, vip: str) -> bool:
        family = socket.AF_INET6 if ":" in vip else socket.AF_INET
        for msg in self.ipr.addr("dump", index=index, family=family):
            if msg.get("IFA_ADDRESS") == vip or msg.get("IFA_LOCAL") == vip:
                return True
        return False

    def bound_addresses(self, index: int) -> set[str]:
        """Every address on the interface, in one dump (the runtime's pass over many VIPs)."""
        return {
            a
            for msg in self.ipr.addr("dump", index=index)
            for a in (msg.get("IFA_ADDRESS"), msg.get("IFA_LOCAL"))
            if a
        }

    def table_text(self) -> str:
        """The kernel's own text of the IPVS table ("" without ip_vs): a few ms to read where the
        netlink reads of 39 services with 10 real servers take 1.5 s under emulation. The
        runtime only compares it with itself to notice a change; its values are never parsed."""
        try:
            with open("/proc/net/ip_vs") as f:
                return f.read()
        except OSError:
            return ""

    def add_address(self, index: int, vip: str) -> None:
        prefix = 128 if ":" in vip else 32
        try:
            self.ipr.addr("add", index=index, address=vip, prefixlen=prefix)
        except self.NetlinkError as err:
            raise AgentError(
                "kernel-refused",
                f"vip: {vip}: the kernel refused to bind it on interface {index} ({os.strerror(err.code)}): check director.interface",
            ) from None

    def del_address(self, index: int, vip: str) -> None:
        prefix = 128 if ":" in vip else 32
        try:
            self.ipr.addr("del", index=index, address=vip, prefixlen=prefix)
        except self.NetlinkError as err:
            if err.code != errno.EADDRNOTAVAIL:
                raise

    def route_via(self, address: str) -> tuple[int | None, str | None]:
        """(output interface, gateway) the director would use to reach `address`."""
        if address not in self._routes:
            try:
                msg = self.ipr.route("get", dst=address)[0]
                self._routes[address] = msg.get("RTA_OIF"), msg.get("RTA_GATEWAY")
            except self.NetlinkError:
                return None, None
        return self._routes[address]

    # -- IPVS --
    def _service_key(self, protocol: str, vip: str, port: int):
        return self.IPVSService(addr=vip, port=port, protocol=PROTO_NUMBERS[protocol])

    def _service_full(self, spec: model.VirtualServiceSpec):
        flags = IP_VS_SVC_F_PERSISTENT if spec.persistence_seconds else 0
        fields = dict(
            addr=spec.vip,
            port=spec.port,
            protocol=PROTO_NUMBERS[spec.protocol],
            sched_name=spec.scheduler,
            timeout=spec.persistence_seconds,
            flags={"flags": flags, "mask": 0xFFFFFFFF},
        )
        if ":" in spec.vip:
            # The kernel wants a prefix length for IPv6 in a u32; pyroute2 encodes the
            # attribute as an IPv4 address, whose bytes 80 00 00 00 read back as 128.
            fields["netmask"] = "128.0.0.0"
        return self.IPVSService(**fields)

    def get_service(self, protocol: str, vip: str, port: int) -> model.LiveService | None:
        key = self._service_key(protocol, vip, port)
        try:
            msgs = self._ipvs.service("get", service=key)
        except self.NetlinkError as err:
            if err.code in (errno.ESRCH, errno.ENOENT):
                return None
            raise
        svc = msgs[0].get("IPVS_CMD_ATTR_SERVICE")
        flags = (svc.get("IPVS_SVC_ATTR_FLAGS") or {}).get("flags", 0)
        timeout = svc.get("IPVS_SVC_ATTR_TIMEOUT") or 0
        dests = []
        for msg in self._ipvs.dest("dump", service=key):
            d = msg.get("IPVS_CMD_ATTR_DEST")
            dests.append(
                model.LiveDest(
                    address=str(ipaddress.ip_address(d.get("IPVS_DEST_ATTR_ADDR"))),
                    port=d.get("IPVS_DEST_ATTR_PORT"),
                    weight=d.get("IPVS_DEST_ATTR_WEIGHT"),
                    forwarding=d.get("IPVS_DEST_ATTR_FWD_METHOD") & 0x7,
                )
            )
        return model.LiveService(
            protocol=protocol,
            vip=vip,
            port=port,
            scheduler=svc.get("IPVS_SVC_ATTR_SCHED_NAME"),
            persistence_seconds=timeout if flags & IP_VS_SVC_F_PERSISTENT else 0,
            dests=tuple(sorted(dests, key=lambda x: ipaddress.ip_address(x.address))),
        )

    def apply(self, spec: model.VirtualServiceSpec, op: model.Op) -> None:
        try:
            self._apply(spec, op)
        except self.NetlinkError as err:
            if op.action == "add-service" and err.code == errno.ENOENT:
                raise AgentError(
                    "no-scheduler",
                    f"the kernel has no IPVS scheduler {spec.scheduler!r} (module ip_vs_{spec.scheduler})",
                ) from None
            raise refusal(spec, op, err.code) from None

    def _apply(self, spec: model.VirtualServiceSpec, op: model.Op) -> None:
        # pyroute2 0.9.7: "update" sends DEL (it deletes); "set" is the real change command.
        svc_key = self._service_key(spec.protocol, spec.vip, spec.port)
        if op.action in ("add-service", "set-service"):
            command = "add" if op.action == "add-service" else "set"
            self._ipvs.service(command, service=self._service_full(spec))
        elif op.action == "del-service":
            self._ipvs.service("del", service=svc_key)
        elif op.action in ("add-dest", "set-dest"):
            dest = self.IPVSDest(
                addr=op.address, port=op.port, weight=op.weight, fwd_method=model.ROUTE
            )
            self._ipvs.dest("add" if op.action == "add-dest" else "set", service=svc_key, dest=dest)
        elif op.action == "del-dest":
            self._ipvs.dest(
                "del", service=svc_key, dest=self.IPVSDest(addr=op.address, port=op.port)
            )
        else:
            raise AgentError("bad-request", f"unknown change {op.action!r}")

    def prefixes(self, index: int) -> list:
        """The networks of the interface's own addresses (e.g. 203.0.113.0/24)."""
        if index not in self._prefixes:
            self._prefixes[index] = [
                ipaddress.ip_interface(f"{msg.get('IFA_ADDRESS')}/{msg['prefixlen']}").network
                for msg in self.ipr.addr("dump", index=index)
            ]
        return self._prefixes[index]


def _recorded(entry: dict) -> dict:
    """What the record holds for a service, for read and apply replies: `desired`, its spec as
    ipvsadm lines ([] when none is recorded: unknown, or adopted without one), `repair` (absent
    in records from before the setting: true), `recordState` (pending: an apply was cut),
    `health` (the recorded health check; absent when none is) and `vrrp` (the recorded VRRP
    part, None for a VIP this director binds itself; absent without a record)."""
    try:
        desired = model.ipvsadm_lines(model.spec_from_dict(entry["spec"]))
    except (KeyError, TypeError, ValueError):  # none recorded, or unreadable: nothing desired
        desired = []
    state = entry.get("state", "applied") if entry else None
    health = {"health": entry["health"]} if "health" in entry else {}  # none recorded: absent
    # The recorded VRRP part (None: this director binds the VIP itself); absent: no record.
    health.update({"vrrp": entry.get("vrrp")} if entry else {})
    reply = {"desired": desired, "repair": entry.get("repair", True), "recordState": state, **health}  # fmt: skip
    if HEALTH is not None and desired:
        spec = model.spec_from_dict(entry["spec"])
        checked, problems = None, []
        if isinstance(entry.get("health"), dict):
            checked, problems = model.check_health(entry["health"], spec.protocol)
        checked = None if problems else checked  # unreadable: not probed
        reply["realServerHealth"] = HEALTH.report(spec, checked)
    return reply


def _health(raw, protocol: str) -> dict | None:
    """A request's `health` (absent: none, a provider from before it), checked by the model's
    own rules and normalized, or one line naming what is wrong before anything is touched."""
    if raw is None:
        return None
    health, problems = model.check_health(raw, protocol)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise AgentError("bad-request", f"{problems[0]}{more}")
    return health


def _vrrp(raw, vip: str) -> dict | None:
    """A request's `vrrp` (absent: one director, the VIP is ours to bind), checked by the
    model's own rules and normalized, or one line naming what is wrong before anything is done."""
    if raw is None:
        return None
    vrrp, problems = model.check_vrrp(raw, model.plain_ip(vip))
    if problems or vrrp is None:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        first = problems[0] if problems else f"vrrp: {model._short(raw)} is not known yet"
        raise AgentError("bad-request", f"{first}{more}")
    return vrrp


# One keepalived per director renders every VRRP service of it from one router (address,
# priority, interface) and one set of timers (providers/keepalived.render: one Director and one
# Settings), so these must agree between all of them; peers only within a virtual router.
_DIRECTOR_WIDE = ("address", "priority", "advertSeconds", "preemptDelaySeconds")


def vrrp_conflict(owners: Ownership, spec, interface: str, vrrp: dict | None) -> str | None:
    """One line naming the field if `vrrp` for `spec` disagrees with another recorded service on
    this director, else None. Services of one VIP are all VRRP's or none (across stacks; within
    one stack, the moment of its conversion is allowed: the runtime leaves such a VIP to
    keepalived)."""
    for key, entry in sorted(owners.services.items()):
        if key == spec.key:
            continue
        theirs = entry.get("vrrp")
        whose = f"{key} (stack {entry.get('owner') or 'unnamed'})"
        if entry.get("vip") == spec.vip:
            if (theirs is None) != (vrrp is None) and entry.get("owner") != spec.owner:
                held = "is held by VRRP" if theirs else "is bound without VRRP"
                return f"vrrp: {spec.vip} {held} for {whose} on this director: give every service of one VIP the same directors"  # fmt: skip
            if theirs and vrrp and theirs["virtualRouterId"] != vrrp["virtualRouterId"]:
                return f"vrrp.virtualRouterId: {vrrp['virtualRouterId']} differs from {theirs['virtualRouterId']} of {whose} on the same VIP: a VIP is in one virtual router; use {theirs['virtualRouterId']}"  # fmt: skip
        if not (theirs and vrrp):
            continue
        for field in _DIRECTOR_WIDE:
            if theirs.get(field) != vrrp.get(field):
                return f"vrrp.{field}: {model._short(vrrp.get(field))} differs from {model._short(theirs.get(field))} of {whose}: one keepalived per director has one {field}; use {model._short(theirs.get(field))}"  # fmt: skip
        if entry.get("interface") != interface:
            return f"director.interface: {interface} differs from {entry.get('interface')} of {whose}: VRRP runs on one interface per director; use {entry.get('interface')}"  # fmt: skip
        same = theirs["virtualRouterId"] == vrrp["virtualRouterId"]
        if same and theirs["peers"] != vrrp["peers"]:
            return f"vrrp.peers: {model._short(vrrp['peers'])} differ from {model._short(theirs['peers'])} of {whose} in virtual router {vrrp['virtualRouterId']}: one virtual router has one set of directors; use the same directors or another virtualRouterId"  # fmt: skip
    return None


def _vrrp_line(vrrp: dict | None) -> str:
    if vrrp is None:
        return "none (this director binds the VIP)"
    preempt = vrrp.get("preemptDelaySeconds")
    return (
        f"vrid {vrrp['virtualRouterId']} priority {vrrp['priority']} peers {','.join(vrrp['peers'])}"
        f" advert {vrrp['advertSeconds']:g}s"
        + (f" preempt after {preempt}s" if preempt is not None else " nopreempt")
    )


def _health_line(health: dict | None) -> str:
    """A recorded health check in a dry run's list, e.g. "vip every 1s, rise 2 fall 2"."""
    if health is None or health["check"] == "none":
        return "none"
    http = health.get("http")
    how = f"{health['check']} GET {http['path']}" if http else health["check"]
    return (
        f"{how} every {health['intervalSeconds']:g}s, rise {health['rise']} fall {health['fall']}"
    )


def refusal(spec: model.VirtualServiceSpec, op: model.Op, code: int) -> AgentError:
    """A kernel refusal as one line naming the property and value it came from."""
    why = os.strerror(code) if code else "refused"
    if op.action.endswith("dest"):
        what = f"realServers: {op.address}: the kernel refused {op.action} {spec.key} -> {model._hostport(op.address, op.port)} ({why})"
        fix = "list the nodes' own unicast addresses"
    else:
        what = f"vip: {spec.key}: the kernel refused {op.action} (scheduler {spec.scheduler}, persistenceSeconds {spec.persistence_seconds}: {why})"
        fix = "check the VIP, scheduler and persistence"
    return AgentError("kernel-refused", f"{what}: {fix}")


class Agent:
    def __init__(self, kernel: Kernel):
        self.kernel = kernel

    def handle(self, request: dict) -> dict:
        op = request.get("op")
        handler = {
            "hello": self.hello,
            "read": self.read,
            "apply": self.reconcile,
            "plan": self.reconcile,
            "delete": self.delete,
        }.get(op)
        if handler is None:
            raise AgentError("bad-request", f"unknown op {op!r}")
        return handler(request)

    def hello(self, _request: dict) -> dict:
        return {"agent": PROTOCOL_VERSION, "pyroute2": self.kernel.version, "pid": os.getpid()}

    def read(self, request: dict) -> dict:
        protocol, vip, port = request["protocol"], request["vip"], int(request["port"])
        key, owner = model.service_key(protocol, vip, port), request.get("owner", "")
        interface = request.get("interface")
        owners = Ownership.load()  # a corrupt record is named before anything is done
        k, live = self.kernel, None
        # A refresh changes nothing on the director, so it loads no module: no ip_vs, no service.
        if "ip_vs" not in k.missing_modules():
            k.open_ipvs()
            live = k.get_service(protocol, vip, port)
        former = request.get("formerOwner") or ""
        standing = owners.standing(key, owner, bool(request.get("adopt")), live, former)
        old_format = standing == "ours" and not owners.services[key].get("owner")
        if live is not None and owner and (standing == "adopt" or old_format):
            # The stack's state holds it: re-adopt it (record lost) or claim it (old record).
            owners, standing = self._adopt(key, live, owner, interface)
        entry = owners.services.get(key) or {}
        return {
            "live": live.to_dict() if live else None,
            "owned": live is not None and standing == "ours",
            "owner": entry.get("owner"),
            "vipBound": bool(interface) and self._bound(interface, vip),
            "ipForward": k.forwarding_on(),
            **_recorded(entry),
        }

    def _bound(self, interface: str, vip: str) -> bool:
        try:
            return self.kernel.has_address(self.kernel.ifindex(interface), vip)
        except AgentError:  # the interface is gone: nothing is bound on it
            return False

    def _adopt(self, key: str, live, owner: str, interface) -> tuple[Ownership, str]:
        with director_lock():
            owners = Ownership.load()  # again, under the lock: another stack may have written
            standing = owners.standing(key, owner, True, live)
            if standing not in ("ours", "adopt"):
                return owners, standing
            entry = owners.services.get(key) or {}
            spec = model.VirtualServiceSpec(
                live.vip, live.port, live.protocol, live.scheduler, live.persistence_seconds
            )
            iface = entry.get("interface") or interface or ""
            repair, health = entry.get("repair", True), entry.get("health")
            spec = dataclasses.replace(spec, owner=owner)
            owners.record(key, spec, iface, "applied", "", repair, health, entry.get("vrrp"))
            owners.services[key].pop("spec")  # the live table is not this stack's intent
            # The VIP is not claimed, bound or not: whoever bound it (keepalived, an operator)
            # may not be ipvs-ingress, and a destroy removes only addresses recorded as ours.
            owners.save()
            return owners, "ours"

    def reconcile(self, request: dict) -> dict:
        """Make the kernel hold exactly `spec`; with op "plan", only say what that would take."""
        spec = model.spec_from_dict(request["spec"])
        interface, dry_run = request["interface"], request["op"] == "plan"
        repair = request.get("repair", True)  # a provider from before the setting: on
        if not isinstance(repair, bool):
            raise AgentError("bad-request", f"repair: {model._short(repair)} is not true or false")
        health = _health(request.get("health"), spec.protocol)
        vrrp = _vrrp(request.get("vrrp"), spec.vip)
        with director_lock():
            owners = Ownership.load()  # a corrupt record refuses before anything is touched
            k = self.kernel
            missing = k.missing_modules(spec.scheduler)
            if dry_run:
                if "ip_vs" not in missing:
                    k.open_ipvs()
            else:
                k.ensure_ipvs(spec.scheduler)
            index = k.ifindex(interface)
            # Every refusal comes before the first change, so a refused request changes nothing.
            self._refuse_unusable_real_servers(spec, interface, index)
            live = None if "ip_vs" in missing else k.get_service(spec.protocol, spec.vip, spec.port)
            former = request.get("formerOwner") or ""  # update: the stack's name before a rename
            standing = owners.standing(
                spec.key, spec.owner, bool(request.get("adopt")), live, former
            )
            if standing == "foreign":
                raise AgentError(
                    "foreign",
                    f"{spec.key} already exists on the director and was not created by ipvs-ingress; remove it by hand (ipvsadm -D) or choose another VIP/port",
                )
            if standing == "other":
                raise AgentError(
                    "owned",
                    f"vip: {spec.key} belongs to stack {owners.services[spec.key]['owner']} on this director: choose another VIP/port, or destroy it in that stack first",
                )
            if standing == "legacy":  # only a request carrying the resource's id may adopt it
                raise AgentError(
                    "owned",
                    f"vip: {spec.key} was recorded by an ipvs-ingress too old to name its stack: run pulumi refresh in the stack that holds it (it adopts it), or choose another VIP/port",
                )
            conflict = vrrp_conflict(owners, spec, interface, vrrp)
            if conflict:
                raise AgentError("vrrp-conflict", conflict)
            # Health's weights (a drained real server at 0) when the runtime keeps them.
            ops = model.plan(live, HEALTH.effective(spec, health) if HEALTH else spec)
            # A VIP we bound on another interface (director.interface changed) moves with it.
            recorded = owners.addresses.get(spec.vip, {}).get("interface")
            move_from = recorded if recorded not in (None, interface) else None
            # HA (vrrp): keepalived holds the VIP, the agent never binds or unbinds it. A VIP
            # we bound is handed over in place (released from the record, still bound), so
            # keepalived finds it where clients reach it; back to one director, the VIP
            # keepalived held is claimed as ours, so the runtime keeps it once keepalived lets go.
            release = vrrp is not None and recorded == interface
            entry = owners.services.get(spec.key)
            claim = vrrp is None and bool(entry and entry.get("vrrp")) and recorded is None
            # A VIP bound by anyone else is not claimed.
            bind = vrrp is None and not k.has_address(index, spec.vip)
            if dry_run:
                turned = entry is not None and entry.get("repair", True) != repair
                checks = entry is not None and entry.get("health") != health
                roles = entry is not None and entry.get("vrrp") != vrrp
                changes = (
                    [f"load {' '.join(missing)}"] * bool(missing)
                    + ["set net.ipv4.ip_forward=1"] * (not k.forwarding_on())
                    + [o.describe(spec) for o in ops]
                    + [f"unbind {spec.vip} from {move_from}"] * bool(move_from)
                    + [f"bind {spec.vip} on {interface}"] * bind
                    + [f"hand {spec.vip} over to keepalived (VRRP), bound as it is"] * release
                    + [f"take {spec.vip} back from keepalived (VRRP)"] * claim
                    + [f"record repair {'on' if repair else 'off'} (no kernel change)"] * turned
                    + [f"record health {_health_line(health)} (no kernel change)"] * checks
                    + [f"record vrrp {_vrrp_line(vrrp)} (keepalived's config)"] * roles
                )
                return {"changes": changes, "live": live.to_dict() if live else None}
            moves = (move_from, bind, release, claim)
            self._apply(owners, spec, interface, live, ops, moves, former, (repair, health, vrrp))
            now = k.get_service(spec.protocol, spec.vip, spec.port)
        return {
            "live": now.to_dict() if now else None,
            "changes": [o.describe(spec) for o in ops],
            "touched": len(ops) + int(bind) + int(bool(move_from)),
            "vipBound": self._bound(interface, spec.vip),
            "ipForward": k.forwarding_on(),
            **_recorded(owners.services.get(spec.key) or {}),
        }

    def _refuse_unusable_real_servers(self, spec, interface: str, index: int) -> None:
        k = self.kernel
        off_link = [
            f"{rs.address} (via {gw or 'no route'})"
            for rs in spec.real_servers
            for oif, gw in [k.route_via(rs.address)]
            if gw is not None or oif != index
        ]
        if off_link:
            raise AgentError(
                "off-link",
                f"real server(s) {', '.join(off_link)} are not on-link on {interface}: direct routing rewrites only the MAC, so real servers must share the director's L2 segment",
            )
        # The kernel refuses these (EINVAL) only after the service exists: say so first.
        for i, rs in enumerate(spec.real_servers):
            addr = ipaddress.ip_address(rs.address)
            for net in k.prefixes(index):
                if net.version == addr.version == 4 and net.prefixlen < 31:
                    which = {net.network_address: "network", net.broadcast_address: "broadcast"}
                    if addr in which:
                        raise AgentError(
                            "not-a-host",
                            f"realServers[{i}].address: {rs.address} is the {which[addr]} address of {net} on {interface}, not a node: list the nodes' own addresses",
                        )

    def _apply(self, owners, spec, interface, live, ops, moves, former, kept) -> None:
        """The changes, each preceded by its record on disk (write-ahead). `kept`: the request's
        (repair, health, vrrp), recorded for the runtime; a change of them alone is a change of
        the record alone: no kernel object is touched. `moves`: (move_from, bind, release,
        claim) of the VIP; release and claim change only the record of who holds it."""
        k, entry = self.kernel, owners.services.get(spec.key)
        repair, health, vrrp = kept
        move_from, bind, release, claim = moves
        settled = (
            not (ops or move_from or bind or release or claim)
            and k.forwarding_on()
            and entry is not None
            and entry.get("state") == "applied"
            and entry.get("spec") == model.spec_to_dict(spec)
            and entry.get("interface") == interface
            and entry.get("repair", True) == repair
            and entry.get("health") == health
            and entry.get("vrrp") == vrrp
        )
        if settled:
            return
        # A renamed stack's record keeps the old name too: that stack's state still holds it
        # until this reply lands, so its refresh and destroy must still find the service.
        owners.record(spec.key, spec, interface, "pending", former, repair, health, vrrp)
        if (bind and not move_from) or claim:
            owners.addresses[spec.vip] = {"interface": interface}
        if release:  # keepalived's from now on: bound as it is, never removed by us
            owners.addresses.pop(spec.vip, None)
        owners.save()
        k.ensure_forwarding()
        try:
            for op in ops:
                k.apply(spec, op)
        except Exception:
            if live is None:
                self._roll_back(owners, spec, bind)
            raise
        # The VIP last: until the service exists, answering ARP for it would blackhole it.
        if move_from:
            # Recorded on the new interface only once gone from the old one, so a kill in
            # between leaves it recorded where it still is.
            k.del_address(k.ifindex(move_from), spec.vip)
            if bind:
                owners.addresses[spec.vip] = {"interface": interface}
            else:  # someone else (or keepalived) has it on the new interface: not ours there
                owners.addresses.pop(spec.vip, None)
            owners.save()
        if bind:
            k.add_address(k.ifindex(interface), spec.vip)
        owners.services[spec.key]["state"] = "applied"
        owners.save()

    def _roll_back(self, owners: Ownership, spec, bind: bool) -> None:
        """A create failed part-way: take away what it made, so no half service is left."""
        try:
            if self.kernel.get_service(spec.protocol, spec.vip, spec.port) is not None:
                self.kernel.apply(spec, model.Op("del-service"))
            del owners.services[spec.key]
            if bind:  # recorded ahead of a bind that never came
                owners.addresses.pop(spec.vip, None)
            owners.save()
        except Exception:  # it stays recorded as this stack's: the next apply converges from it
            pass

    def _hand_over(self, owners: Ownership, key: str, entry: dict | None, vip: str) -> None:
        """Before the last VRRP service of `vip` on this director goes (a director removed from
        its stack, or the VIP): if keepalived holds the VIP here, it leaves first (bounded), so
        clients never reach this director for a service it no longer has."""
        if VRRP_HANDOVER is None or not (entry and entry.get("vrrp")):
            return
        if any(e.get("vip") == vip for k, e in owners.services.items() if k != key):
            return  # another service still serves the VIP here
        interface = entry.get("interface") or ""
        VRRP_HANDOVER(vip, lambda: self._bound(interface, vip))

    def delete(self, request: dict) -> dict:
        protocol, vip, port = request["protocol"], request["vip"], int(request["port"])
        key = model.service_key(protocol, vip, port)
        with director_lock():
            owners = Ownership.load()
            k = self.kernel
            entry = owners.services.get(key)
            if entry is None and not request.get("adopt"):
                return {"deleted": False, "reason": "not managed by ipvs-ingress"}
            k.ensure_ipvs()
            live = k.get_service(protocol, vip, port)
            owner = request.get("owner") or ""
            standing = owners.standing(key, owner, True, live, request.get("formerOwner") or "")
            if standing == "other":  # never another stack's service: and say so, not a no-op
                raise AgentError(
                    "owned",
                    f"vip: {key} belongs to stack {entry['owner']} on this director, not to {owner or 'this stack'}: nothing was deleted; if this stack should not hold it, pulumi state delete its URN",
                )
            if standing != "ours" and live is None:
                return {"deleted": False, "reason": "not on the director"}
            if live is not None:
                self._hand_over(owners, key, entry, vip)
                k.apply(model.VirtualServiceSpec(vip, port, protocol), model.Op("del-service"))
            # Forget the service only once the kernel let go of it, so a failed delete retries.
            owners.services.pop(key, None)
            removed_vip = False
            # The VIP goes with the last service of any stack on it, and only if we bound it.
            if vip in owners.addresses and not owners.vip_in_use(vip, k):
                k.del_address(k.ifindex(owners.addresses[vip]["interface"]), vip)
                owners.addresses.pop(vip)
                removed_vip = True
            owners.save()
        return {"deleted": True, "removedVip": removed_vip}


# The line protocol's timing (the provider's side is in providers/transport.py): while a request
# runs, the runtime says {"id", "working": true} every HEARTBEAT_SECONDS, so the provider, which
# gives up after 20 s of silence, can tell a long apply from a dead connection. The provider
# pings every 5 s while its session is open; after IDLE_EXIT_SECONDS without a line from it the
# session is dead (a dropped network keeps the channel open for hours): the connection is closed.
HEARTBEAT_SECONDS = 5.0
IDLE_EXIT_SECONDS = 30.0

_EMIT_LOCK = threading.Lock()


def _emit(doc: dict, out=None) -> None:
    line = json.dumps(doc, separators=(",", ":")) + "\n"
    out = out or sys.stdout  # looked up per call: tests swap sys.stdout
    with _EMIT_LOCK:  # heartbeats come from another thread: lines must not interleave
        out.write(line)
        out.flush()


def serve(handle, stdin=None, out=None) -> int:
    """Answer request lines from `stdin` until it ends or the provider falls silent.

    Requests run one at a time on this thread; a reader thread takes lines off stdin so that
    silence can be timed. Silence is judged only between requests: a running request always
    finishes (and answers) first, so a kill never comes halfway through a change.
    """
    stdin = stdin or sys.stdin
    inbox: queue.Queue[str | None] = queue.Queue()
    heard = [time.monotonic()]

    def read() -> None:
        try:
            for line in stdin:
                heard[0] = time.monotonic()
                inbox.put(line)
        finally:
            inbox.put(None)

    threading.Thread(target=read, name="agent-stdin", daemon=True).start()
    while True:
        try:
            line = inbox.get(timeout=max(0.0, IDLE_EXIT_SECONDS - (time.monotonic() - heard[0])))
        except queue.Empty:
            if time.monotonic() - heard[0] < IDLE_EXIT_SECONDS:
                continue  # a line arrived just now
            print(f"ipvs-ingress agent: no word from the provider for {IDLE_EXIT_SECONDS:g} s: exiting", file=sys.stderr)  # fmt: skip
            return 0
        if line is None:
            return 0  # the provider closed the session
        if line.strip():
            try:
                _answer(handle, line, out)
            except OSError:  # stdout is gone with the session: nobody to answer
                return 0


def _answer(handle, line: str, out) -> None:
    try:
        request = json.loads(line)
        if not isinstance(request, dict):
            raise ValueError("not a JSON object")
    except ValueError as err:
        _emit({"id": None, "ok": False, "code": "bad-request", "error": f"unreadable request ({err})"}, out)  # fmt: skip
        return
    if request.get("op") == "ping":
        return  # keepalive only: hearing it is the point
    rid = request.get("id")
    try:
        with _heartbeats(rid, out):
            reply = {"id": rid, "ok": True, "result": handle(request)}
    except AgentError as err:
        reply = {"id": rid, "ok": False, "code": err.code, "error": str(err)}
    except Exception as err:  # report, keep serving: one bad request must not kill the pool
        reply = {"id": rid, "ok": False, "code": "internal", "error": f"{type(err).__name__}: {err}"}  # fmt: skip
    _emit(reply, out)


@contextmanager
def _heartbeats(rid, out=None):
    """{"id": rid, "working": true} every HEARTBEAT_SECONDS until the block ends."""
    done = threading.Event()

    def beat() -> None:
        try:
            while not done.wait(HEARTBEAT_SECONDS):
                _emit({"id": rid, "working": True}, out)
        except OSError:  # the session is gone; the work still finishes
            pass

    thread = threading.Thread(target=beat, name="agent-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()  # no heartbeat after the answer
