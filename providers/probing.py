"""Real-server probes on the director and the health state the runtime keeps from them.

Runs in the runtime process (stdlib only). `HealthKeeper` owns a health.Tracker configured from
each kept service's recorded `health`, probes each target at its own interval through a `Prober`
(injectable: tests script results), applies rise/fall, persists the tracker to
/var/lib/ipvs-ingress/health.json after every change (a drained server stays drained across a
restart or reboot until `rise` successes) and answers what weights the kernel should hold
(`effective`): the runtime's passes and the provider's applies (providers/agent.py HEALTH) both
plan against those, so a drain is never drift and never undone.

Probes: `kubeProxy` is an HTTP GET http://<node>:<kubeProxyPort>/healthz, 200 = up. `vip` is
the Seesaw DSR probe (VipProber): a connect to VIP:port with SO_MARK set to the node's probe
service (providers/probe_services.py), so IPVS sends it the clients' way to that one node. A
prober may answer "not probed" (None): no result is recorded, the target keeps its state.
Probes are spread over each interval (a fixed phase per target), not sent in bursts.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from providers import health, model

HEALTH_PATH = "/var/lib/ipvs-ingress/health.json"
MAX_WORKERS = 32  # probes in flight at once: a round of failing probes costs one timeout, not n


@dataclasses.dataclass(frozen=True)
class ProbeTarget:
    """One real server of one service, as a prober needs it."""

    key: str  # service key, "tcp/203.0.113.201:80"
    rs: str  # health.rs_key: "203.0.113.11:80"
    address: str
    port: int
    vip: str
    check: str
    timeout: float
    interval: float
    kube_proxy_port: int
    http: Mapping | None = None


class Prober(Protocol):
    def probe(self, target: ProbeTarget) -> tuple[bool | None, str]:
        """(up, why not: one short line; "" when up); up None: not probed this time (nothing
        to record). Must return within about the timeout."""


class KubeProxyProber:
    """kube-proxy's own health: GET http://<node>:<kubeProxyPort>/healthz, 200 = up. It says
    whether the node's proxy rules are fresh, not whether the VIP works there. Sent from the
    director's own address toward the node (`source(address)`, never a VIP) when known."""

    def __init__(self, source: Callable[[str], str | None] = lambda _address: None):
        self.source = source

    def probe(self, target: ProbeTarget) -> tuple[bool | None, str]:
        where = f"kubeProxy healthz {model._hostport(target.address, target.kube_proxy_port)}"
        http = {"path": "/healthz", "expectStatus": 200}
        return _exchange(
            where,
            target,
            (target.address, target.kube_proxy_port),
            self.source(target.address),
            0,
            http,  # fmt: skip
        )


SO_MARK = getattr(socket, "SO_MARK", 36)
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
# Errors that are the director's, not the node's: such a probe is "not probed", never a failure
# that could drain a healthy node (a renumbered director, exhausted ports or memory).
LOCAL_ERRORS = frozenset(
    {
        errno.EADDRNOTAVAIL, errno.EADDRINUSE, errno.EMFILE, errno.ENFILE, errno.ENOBUFS,
        errno.ENOMEM, errno.EPERM, errno.EACCES, errno.ENETUNREACH, errno.EINVAL,
    }
)  # fmt: skip


class VipProber:
    """The Seesaw DSR probe's socket side: connect to VIP:port with SO_MARK set to the mark of
    a one-destination fwmark IPVS service that routes to exactly this node, from the director's
    own address (`source`, never the VIP), then optionally GET `http.path` expecting
    `http.expectStatus`. `route(address) -> (mark, source) or None` names the probe service
    (probe_services.ProbeServices.route); None, no such service in place (a mark without one
    would fall through to the VIP's own service and answer for another node), is "not probed",
    never a guess: the runtime's next pass creates the service, and says why if it cannot."""

    def __init__(
        self,
        route: Callable[[str], tuple[int, str] | None],
        why_not: Callable[[str], str] = lambda _address: "no probe service (fwmark) in place",
    ):
        self.route, self.why_not = route, why_not

    def probe(self, target: ProbeTarget) -> tuple[bool | None, str]:
        where = f"vip probe {model._hostport(target.vip, target.port)} via {target.address}"
        routed = self.route(target.address)
        if routed is None:
            return None, f"{where}: not sent: {self.why_not(target.address)}"
        mark, source = routed
        return _exchange(where, target, (target.vip, target.port), source, mark, target.http)


def _exchange(
    where: str,
    target: ProbeTarget,
    to: tuple[str, int],
    source: str | None,
    mark: int,
    http: Mapping | None,
) -> tuple[bool | None, str]:
    """Connect (and GET), all within `target.timeout` of wall-clock time however the peer
    trickles its bytes; always closed with RST (SO_LINGER 0): no TIME_WAIT or FIN_WAIT entry,
    here or in IPVS's table, that a later probe from the same port could follow elsewhere."""
    deadline = time.monotonic() + target.timeout
    family = socket.AF_INET6 if ":" in to[0] else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            if mark:
                sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
            if source:
                if family == socket.AF_INET:
                    sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((source, 0))
            sock.settimeout(target.timeout)
            sock.connect(to)
            if http:
                return _http_check(sock, http, model._hostport(*to), where, deadline)
    except TimeoutError:
        return False, f"{where}: timed out after {target.timeout:g} s"
    except OSError as err:
        why = err.strerror or type(err).__name__
        if err.errno in LOCAL_ERRORS:
            return None, f"{where}: not sent: the director's own error: {why}"
        return False, f"{where}: {why}"
    return True, ""


def _http_check(
    sock: socket.socket, http: Mapping, host: str, where: str, deadline: float
) -> tuple[bool, str]:
    path, expect = http.get("path", "/"), int(http.get("expectStatus", 200))
    sock.sendall(
        f"GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: ipvs-ingress\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n" not in head and len(head) < 1024:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        sock.settimeout(left)
        chunk = sock.recv(1024)
        if not chunk:
            break
        head += chunk
    line = head.split(b"\r\n", 1)[0].split() if b"\r\n" in head else []
    ok_line = len(line) >= 2 and line[0].startswith(b"HTTP/") and line[1].isdigit()
    if not ok_line:
        return False, f"{where}: no HTTP status line in the reply"
    status = int(line[1])
    if status != expect:
        return False, f"{where}: HTTP {status}, expected {expect}"
    return True, ""


def default_probers() -> dict[str, Prober]:
    """What needs no kernel: the runtime adds `vip` with its probe services' route."""
    return {"kubeProxy": KubeProxyProber()}


def _effective_spec(spec: model.VirtualServiceSpec, weights: Mapping[str, int]):
    servers = tuple(
        dataclasses.replace(r, weight=weights.get(health.rs_key(r.address, spec.port), r.weight))
        for r in spec.real_servers
    )
    return dataclasses.replace(spec, real_servers=servers)


class HealthKeeper:
    """The tracker, the probe schedule and health.json. Thread-safe: the runtime's passes, its
    probe thread and the provider's request threads all use it."""

    def __init__(
        self,
        path: str = HEALTH_PATH,
        probers: Mapping[str, Prober] | None = None,
        log: Callable[[str], None] = print,
        clock: Callable[[], float] = time.time,
    ):
        self.path = path
        self.probers = dict(default_probers() if probers is None else probers)
        self.log = log
        self.clock = clock
        self.lock = threading.RLock()
        self.services: dict[str, tuple[model.VirtualServiceSpec, dict]] = {}
        self.due: dict[tuple[str, str], float] = {}
        self.shown: dict[tuple[str, str], str] = {}  # last logged state: up/drained/held
        self.generation = 0  # moves with every change of what the kernel should hold
        self.sent = 0  # probes started since this process began (status: probes per second)
        self.passive: set[str] = set()  # keys whose drains are not applied (repair off)
        # Targets drained or undrained since the runtime last applied weights: their kernel
        # changes are health's, logged as such, not repairs of drift.
        self.changed: set[tuple[str, str]] = set()
        # Targets whose last probe was not sent, and why (the director's fault, not the node's).
        self.not_sent: dict[tuple[str, str], str] = {}
        self.save_problem: str | None = None
        self.tracker = self._load()
        self._executor: ThreadPoolExecutor | None = None

    # --- persistence ---

    def _load(self) -> health.Tracker:
        try:
            with open(self.path, "rb") as f:
                text = f.read().decode()
        except FileNotFoundError:
            return health.Tracker()
        except (OSError, UnicodeDecodeError) as err:
            self.log(f"{self.path}: unreadable ({str(err)[:80]}): every real server starts up")
            return health.Tracker()
        tracker, why = health.Tracker.from_json(text)
        if why:
            self.log(f"{self.path}: {why}")
        return tracker

    def save(self) -> None:
        """Atomically and durably: a kill or power cut leaves the old file or the new. A file
        that cannot be written is said once (drains then last only until a restart) and
        probing goes on."""
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            with open(tmp, "w") as f:
                f.write(self.tracker.to_json())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as err:
            line = f"{self.path}: cannot be written ({err.strerror or err}): drains are kept in memory only, until a restart"  # fmt: skip
            if line != self.save_problem:
                self.log(line)
            self.save_problem = line
        else:
            if self.save_problem:
                self.log(f"{self.path}: written again")
            self.save_problem = None

    # --- configuration, from the record, every pass ---

    def configure(
        self,
        services: Iterable[tuple[str, model.VirtualServiceSpec, dict | None]],
        passive: Iterable[str] = (),
    ):
        """The kept services with their recorded spec and health; targets of services or real
        servers no longer kept are forgotten (and health.json rewritten). `passive`: keys of
        services whose stack has repair off: probed and reported, never drained (the runtime
        changes nothing of theirs; status and outputs say "failing", not "drained")."""
        with self.lock:
            passive = set(passive)
            if passive != self.passive:
                self.generation += 1
            self.passive = passive
            wanted = {key: (spec, h) for key, spec, h in services if _checked(h)}
            before = self.tracker.to_json()
            for key in set(self.tracker.services) | set(self.services):
                if key not in wanted:
                    self.tracker.forget(key)
            for key, (spec, h) in wanted.items():
                self.tracker.configure(key, h)
                self.tracker.forget(key, [health.rs_key(r.address, spec.port) for r in spec.real_servers])  # fmt: skip
            if wanted != self.services:
                self.generation += 1
            self.services = wanted
            targets = {(t.key, t.rs): t for t in self.targets()}
            self.due = {k: v for k, v in self.due.items() if k in targets}
            self.not_sent = {k: v for k, v in self.not_sent.items() if k in targets}
            # A new target's first probe comes at its own phase of the interval: 500 targets
            # are a steady trickle, not a burst every interval.
            now = self.clock()
            for k, t in targets.items():
                self.due.setdefault(k, now + _phase(t) * t.interval)
            self.shown = {k: v for k, v in self.shown.items() if k in targets}
            if self.tracker.to_json() != before:
                self.save()
            for key in wanted:
                self._settle(key)

    def targets(self) -> list[ProbeTarget]:
        with self.lock:
            out = []
            for key, (spec, h) in sorted(self.services.items()):
                for r in spec.real_servers:
                    out.append(
                        ProbeTarget(
                            key, health.rs_key(r.address, spec.port), r.address, spec.port,
                            spec.vip, h["check"], float(h["timeoutSeconds"]),
                            float(h["intervalSeconds"]), int(h["kubeProxyPort"]), h.get("http"),
                        )
                    )  # fmt: skip
            return out

    def unprobed(self) -> dict[str, str]:
        """Services whose check this runtime cannot probe: one line each, for log and status."""
        with self.lock:
            return {
                key: f"{key}: check {h['check']} is not implemented in this runtime yet: its real servers are not probed (weights as configured)"  # fmt: skip
                for key, (_spec, h) in sorted(self.services.items())
                if h["check"] not in self.probers
            }

    # --- probing ---

    def probe_due(self, now: float | None = None) -> bool:
        """Probe every target whose interval has come (in parallel, bounded), apply the results;
        True when what the kernel should hold changed."""
        now = self.clock() if now is None else now
        with self.lock:
            due = []
            for t in self.targets():
                if t.check not in self.probers:
                    continue
                at = self.due.get((t.key, t.rs), 0.0)
                if at <= now:
                    due.append(t)
                    self.due[(t.key, t.rs)] = max(at + t.interval, now)
            self.sent += len(due)
        if not due:
            return False
        if len(due) == 1:
            results = [self._probe(due[0])]
        else:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(MAX_WORKERS, "probe")
            results = list(self._executor.map(self._probe, due))
        before = self.generation
        for t, (ok, reason) in zip(due, results, strict=True):
            with self.lock:
                if ok is None:
                    self.not_sent[(t.key, t.rs)] = reason
                else:
                    self.not_sent.pop((t.key, t.rs), None)
            if ok is not None:
                self.record(t.key, t.rs, ok, reason, self.clock())
        return self.generation != before

    def _probe(self, t: ProbeTarget) -> tuple[bool | None, str]:
        try:
            ok, reason = self.probers[t.check].probe(t)
        except Exception as err:  # a prober's own bug is a failed probe, said why, not a crash
            return False, f"probe error {type(err).__name__}: {str(err)[:80]}"
        return (None if ok is None else bool(ok)), str(reason)

    def record(self, key: str, rs: str, ok: bool, reason: str, now: float) -> bool:
        """One probe result; True (and health.json rewritten) when the target went up or down."""
        with self.lock:
            spec = self.services[key][0] if key in self.services else None
            if spec is None or rs not in {health.rs_key(r.address, spec.port) for r in spec.real_servers}:  # fmt: skip
                return False  # forgotten meanwhile (the service or this real server removed)
            changed = self.tracker.observe(key, rs, ok, reason, now)
            t = self.tracker.target(key, rs)
            if (t.up and t.failures) or (not t.up and t.successes):
                # Between states (HAProxy's fastinter): the next probe after half an interval,
                # so a failing server is drained about half an interval sooner.
                half = now + float(self.services[key][1]["intervalSeconds"]) / 2
                self.due[(key, rs)] = min(self.due.get((key, rs), half), half)
            if changed:
                self.changed.add((key, rs))
                self.generation += 1
                self.save()
                self._settle(key)
            return changed

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    # --- what the kernel should hold ---

    def effective(self, spec: model.VirtualServiceSpec, h: Mapping | None):
        """`spec` with the weights health gives it (drained: 0), for `h` its health settings."""
        with self.lock:
            if not _checked(h) or spec.key in self.passive:
                return spec
            weights, _ = health.effective_weights(spec, h, self.tracker.states(spec.key))
            return _effective_spec(spec, weights)

    def held(self, key: str) -> list[str]:
        with self.lock:
            if key not in self.services or key in self.passive:
                return []
            spec, h = self.services[key]
            return health.effective_weights(spec, h, self.tracker.states(key))[1]

    def report(self, spec: model.VirtualServiceSpec, h: Mapping | None) -> list[dict]:
        """Per real server: state up / drained / held (failing, kept in service by the depool
        threshold) / unprobed, since (epoch seconds or None), reason, weight (what the kernel
        should hold) and configured weight."""
        with self.lock:
            states = self.tracker.states(spec.key) if _checked(h) else {}
            configured = {health.rs_key(r.address, spec.port): r.weight for r in spec.real_servers}  # fmt: skip
            passive = spec.key in self.passive
            weights = (
                health.effective_weights(spec, h, states)[0]
                if _checked(h) and not passive
                else configured
            )
            probed = _checked(h) and h["check"] in self.probers
            out = []
            for r in spec.real_servers:
                rs = health.rs_key(r.address, spec.port)
                t = states.get(rs)
                state = _state(t, weights[rs], r.weight) if probed or t else "unprobed"
                if passive and state == "held":
                    state = "failing"  # not drained: its stack's repair is off
                if not _checked(h):
                    state = "unchecked"
                out.append(
                    {
                        "address": r.address,
                        "port": spec.port,
                        "state": state,
                        "since": t.since if t else None,
                        "reason": t.reason if t and not t.up else "",
                        "weight": weights[rs],
                        "configuredWeight": r.weight,
                    }
                )
            return out

    def _settle(self, key: str) -> None:
        """Log one line per real server whose drain state changed (under the lock)."""
        spec, h = self.services[key]
        for item in self.report(spec, h):
            rs = health.rs_key(item["address"], item["port"])
            state, was = item["state"], self.shown.get((key, rs), "up")
            self.shown[(key, rs)] = state
            if state == was or state == "held":  # held: the runtime's notes say it, once
                continue
            if state == "drained":
                self.log(f"drained {key} {rs} (weight 0): {item['reason'] or 'probe failed'}")
            elif state == "failing":
                self.log(f"failing {key} {rs}, not drained (its stack's repair is off): {item['reason'] or 'probe failed'}")  # fmt: skip
            elif state == "up" and was in ("drained", "held", "failing"):
                rise = self.tracker._counts.get(key, (2, 2))[0]
                self.log(f"undrained {key} {rs}: weight {item['configuredWeight']} back after {rise} successful probes")  # fmt: skip


def _phase(t: ProbeTarget) -> float:
    """A fixed fraction of the interval per target (the same in every run)."""
    return zlib.crc32(f"{t.key} {t.rs}".encode()) / 2**32


def _checked(h: Mapping | None) -> bool:
    return h is not None and h.get("check", "none") != "none"


def _state(t: health.Target | None, weight: int, configured: int) -> str:
    if t is None or t.up:
        return "up"
    return "drained" if weight == 0 else "held"
