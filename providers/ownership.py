"""What ipvs-ingress made on a director, per stack, and the lock every change is made under.

Runs on the director inside the agent (stdlib only), shipped with it by the transport. The
record is /var/lib/ipvs-ingress/state.json: services by key (owner stack, intent, spec, state,
repair, health) and the VIPs ipvs-ingress bound. A change is recorded before it is made
(write-ahead).
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import time
from contextlib import contextmanager

from providers import model

RUN_DIR = "/run/ipvs-ingress" if os.path.isdir("/run") else "/tmp/ipvs-ingress"
LOCK_PATH = os.path.join(RUN_DIR, "lock")
STATE_PATH = "/var/lib/ipvs-ingress/state.json"
LOCK_WAIT_SECONDS = 300


class AgentError(Exception):
    """The director side's one error type: a code and one line for the user (re-exported by
    providers.agent, which answers it on the line protocol)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class Ownership:
    """What ipvs-ingress made on this director: services by key (owner stack, intent, spec) and
    the VIPs it bound. A change is recorded before it is made (write-ahead), so whatever step
    a crash hits, the next apply of the same stack finds the service recorded as its own."""

    @classmethod
    def load(cls, path: str | None = None) -> Ownership:
        """The record as it is on disk now. Always parsed afresh (about 1 ms for 200 services): a
        cache keyed on (inode, mtime, size) can miss another stack's write (inode reuse, a coarse
        mtime, an equal size), and saving that stale copy would drop the other stack's entry."""
        return cls(path)

    def __init__(self, path: str | None = None):
        self.path = path = path or STATE_PATH
        try:
            with open(path, "rb") as f:
                data = json.loads(f.read().decode())
        except FileNotFoundError:
            data = {}
        except ValueError as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise self._corrupt(f"is not valid JSON ({str(err)[:60]})") from None
        if not _well_formed(data):
            raise self._corrupt("is not an ipvs-ingress record")
        self.services: dict = data.get("services", {})
        self.addresses: dict = data.get("addresses", {})

    def _corrupt(self, what: str) -> AgentError:
        return AgentError(
            "corrupt-state",
            f"{self.path} {what}: nothing was changed; move it aside (mv {self.path} {self.path}.bad), then pulumi refresh re-adopts this stack's services",
        )

    def save(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = f"{self.path}.{os.getpid()}"
        # json.dumps, compact: the C encoder (json.dump and indent use the pure-Python one,
        # ~7x slower), as every apply writes the whole record of every stack.
        text = json.dumps(
            {"services": self.services, "addresses": self.addresses},
            separators=(",", ":"),
            sort_keys=True,
        )
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        # The rename is durable only once the directory is: without this a power cut soon after
        # an apply returned brings back the record before it (seen in the lab: 'pending').
        fd = os.open(os.path.dirname(self.path), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def standing(self, key: str, owner: str, adopt: bool, live, former: str = "") -> str:
        """Whose `key` is, for the stack `owner` (`former`: its name before a rename):
        ours    - recorded for this stack; or, for a request that carries the resource's id
                  (`adopt`: read, update, delete), recorded before owners existed, or under the
                  stack's former name (either side of a rename whose reply may have been lost);
        new     - nothing live: free to create, whatever a stale record says;
        adopt   - live, unrecorded, and the stack's own state holds it (the record was lost);
        legacy  - live, recorded before owners existed, and a create: nothing says whose it is;
        foreign - live and unrecorded: never ipvs-ingress's to change;
        other   - live and recorded for another stack."""
        entry = self.services.get(key)
        if entry is not None:
            recorded = entry.get("owner") or ""
            renamed = recorded == former or entry.get("formerOwner") == owner
            if recorded == owner or (adopt and (recorded == "" or renamed)):
                return "ours"
        if live is None:
            return "new"
        if entry is None:
            return "adopt" if adopt else "foreign"
        return "other" if entry.get("owner") else "legacy"

    def record(
        self,
        key,
        spec: model.VirtualServiceSpec,
        interface: str,
        state: str,
        former="",
        repair=True,
        health=None,
        vrrp=None,
    ):
        """`repair`: the stack's ipvs-ingress:repair, whether the director runtime keeps the
        kernel equal to this entry between applies (records from before it have none: true).
        `health`: how the runtime checks the real servers (model.check_health's normalized
        form); None is no check, written as no field, as in records from before it.
        `vrrp`: this director's part in the VRRP group holding the VIP (model.check_vrrp's
        normalized form); None: one director, the VIP is bound by ipvs-ingress itself."""
        self.services[key] = {
            "owner": spec.owner or None,
            "vip": spec.vip,
            "interface": interface,
            "state": state,
            "spec": model.spec_to_dict(spec),
            "repair": repair,
        }
        if health is not None:
            self.services[key]["health"] = health
        if vrrp is not None:  # HA: keepalived holds the VIP; the runtime renders its config
            self.services[key]["vrrp"] = vrrp
        if former and former != spec.owner:  # until the stack's state has the new name
            self.services[key]["formerOwner"] = former

    def vip_in_use(self, vip: str, kernel) -> bool:
        """Some recorded service, of any stack, on `vip` still exists in the kernel."""
        for key, entry in self.services.items():
            if entry.get("vip") == vip:
                protocol, rest = key.split("/", 1)
                _, port = rest.rsplit(":", 1)
                if kernel.get_service(protocol, vip, int(port)) is not None:
                    return True
        return False


def _well_formed(data) -> bool:
    """The shape the agent relies on, checked before anything is done: the agent splits service
    keys and hands VIPs and interfaces to the kernel, so a bad field found half-way through a
    delete would leave the kernel changed and the record unsaved, failing every retry."""
    if not isinstance(data, dict):
        return False
    services, addresses = data.get("services", {}), data.get("addresses", {})
    if not (isinstance(services, dict) and isinstance(addresses, dict)):
        return False
    return all(
        isinstance(e, dict)
        and isinstance(e.get("vip"), str)
        and _key_of(k, e["vip"])
        and _fields_ok(e)
        and _health_ok(k, e)
        and _vrrp_ok(e)
        for k, e in services.items()
    ) and all(
        _canonical_ip(vip) and isinstance(e, dict) and isinstance(e.get("interface"), str)
        for vip, e in addresses.items()
    )


# Pure functions of strings, cached: they are most of the time of a load (200 services: 2.4 ms
# uncached, vs 0.9 ms for the JSON itself), and the same keys come back on every request.
@functools.lru_cache(maxsize=4096)
def _canonical_ip(vip: str) -> bool:
    addr = model.plain_ip(vip)
    return addr is not None and str(addr) == vip


@functools.lru_cache(maxsize=4096)
def _key_of(key: str, vip: str) -> bool:
    """`key` is exactly model.service_key(protocol, vip, port): "tcp/203.0.113.201:80",
    "udp/[2001:db8::1]:53"."""
    protocol, _, rest = key.partition("/")
    port = rest.rpartition(":")[2]
    return (
        protocol in model.PROTOCOLS
        and _canonical_ip(vip)
        and port.isascii()
        and port.isdigit()
        and 0 < int(port) < 65536
        and key == model.service_key(protocol, vip, int(port))
    )


def _fields_ok(entry: dict) -> bool:
    """Optional fields (records from before owners lack them) of the types record() writes."""
    return (
        isinstance(entry.get("owner"), str | None)
        and isinstance(entry.get("formerOwner"), str | None)
        and entry.get("state", "applied") in ("pending", "applied")
        and isinstance(entry.get("spec", {}), dict)
        and isinstance(entry.get("interface", ""), str)
        and isinstance(entry.get("repair", True), bool)
    )


def _health_ok(key: str, entry: dict) -> bool:
    """No `health` (none), or settings that the model's own check passes for the service's
    protocol (the key's, "tcp/..."), in the normalized form record() writes."""
    if "health" not in entry:
        return True
    health = entry["health"]
    if not isinstance(health, dict):  # an explicit null is not what record() writes either
        return False
    try:
        text = json.dumps(health, sort_keys=True)  # hashable, for the cache
    except (TypeError, ValueError):
        return False
    return _health_text_ok(text, key.partition("/")[0])


@functools.lru_cache(maxsize=4096)
def _health_text_ok(text: str, protocol: str) -> bool:
    health, problems = model.check_health(json.loads(text), protocol)
    return not problems and health == json.loads(text)


def _vrrp_ok(entry: dict) -> bool:
    """No `vrrp`, or model.check_vrrp's normalized form of itself (the runtime renders it)."""
    if "vrrp" not in entry:
        return True
    vrrp = entry["vrrp"]
    if not isinstance(vrrp, dict):
        return False
    checked, problems = model.check_vrrp(vrrp, model.plain_ip(entry["vip"]))
    return not problems and checked == vrrp


@contextmanager
def director_lock(path: str | None = None, wait: float = LOCK_WAIT_SECONDS):
    path = path or LOCK_PATH
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    # Root's only (0600, also when it existed): flock works on a read-only descriptor, so a lock
    # file others can open is one any local user could hold, stopping every apply and repair.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, 0o600)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise AgentError(
                        "busy", f"another ipvs-ingress run has held {path} for over {wait:.0f} s"
                    ) from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
