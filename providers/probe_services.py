"""Probe services: one fwmark IPVS service per node, so that a health probe sent to VIP:port
takes the clients' own path (IPVS, Direct Routing, the node's kube-proxy rule) to that node.

This is Google Seesaw's DSR probe (engine/healthcheck.go, healthcheck/dial.go). For every node
a `vip` check probes, the runtime keeps `-f MARK -s rr` with the one destination node:0 (port
0: each probe keeps its own destination port), forwarding route, weight 1; drains change the
VIP's own service only, never these. probing.VipProber sets SO_MARK=MARK on its socket.

- The record (/var/lib/ipvs-ingress/probes.json) is written before a service is created, and a
  record that cannot be written stops that node's kernel change: a kill or a full disk between
  the two leaves a record whose service the next pass creates, or finds, never a service without
  a record.
- A fwmark service the record does not hold is someone else's: never changed, never chosen. A
  mark is "confirmed" only while its service is seen in place: one found missing (a flush, a
  reboot) is unconfirmed before it is created again, and a service at a mark that does not lead
  to our node is someone else's: given up, never replaced. Only a service of our exact shape is
  ever deleted; a confirmed one still leading to its node but edited (weight, scheduler, another
  destination) is put back.
- `route` answers a mark only while its service is in place in the table as read within the
  last tick: a mark without its service falls through to the VIP's own service, which would
  answer for whichever node it picks (a false success).
- The probe's source is the director's own address toward the node, never a VIP (an IPv6 VIP
  bound as /128 would win the kernel's source selection): resolved each pass while missing or no
  longer local. The replies come from the VIP, a local address, to that address: Linux drops them
  as martians unless net.ipv4.conf.<interface>.accept_local=1 on the VIP's interface; `route`
  answers only while it reads 1. That, and
  net.ipv4.vs.expire_quiescent_template=1 while a persistent service is checked (so persistent
  clients leave a drained server), are set only while needed; the record keeps each one's
  previous value, written back when it is no longer needed.

`plan` and `parse_table` are pure; ProbeServices does the file and kernel work.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping

PROBES_PATH = "/var/lib/ipvs-ingress/probes.json"
FORMAT = 1
# Marks 0x49490001..0x49493fff ("II"), on the director only (it runs no kube-proxy or CNI):
# the low half stays clear of kube-proxy's 0x4000 and 0x8000 bits should one ever run there.
MARK_FIRST = 0x49490001
MARK_LAST = 0x49493FFF
SCHEDULER = "rr"
SYSCTL_ROOT = "/proc/sys"
ROUTE_FRESH_SECONDS = 0.2  # how old the table behind a probe's route may be
SYSCTL_NAME = re.compile(r"net/ipv4/(conf/(?!\.\.?/)[A-Za-z0-9_.:@-]{1,15}/accept_local|vs/expire_quiescent_template)")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Live:
    """One fwmark service as /proc/net/ip_vs shows it."""

    mark: int
    scheduler: str
    persistent: bool
    dests: tuple[tuple[str, int, str, int], ...]  # (address, port, forwarding, weight)


def parse_table(text: str) -> dict[int, Live]:
    """The fwmark services of the kernel's own /proc/net/ip_vs text (format since Linux 2.6:
    `FWM  %08X sched ...` then `  -> %08X:%04X Route weight ...` or `  -> [v6]:%04X ...`)."""
    out: dict[int, Live] = {}
    current: list | None = None
    for line in text.splitlines():
        words = line.split()
        if not words:
            continue
        if line.startswith("  ->"):
            if current is not None and len(words) >= 4 and words[1] != "RemoteAddress:Port":
                address = _address(words[1])
                if address is not None:
                    current[3].append((*address, words[2], _int(words[3])))
            continue
        if current is not None:
            out[current[0]] = Live(current[0], current[1], current[2], tuple(sorted(current[3])))
            current = None
        if words[0] == "FWM" and len(words) >= 3:
            try:
                mark = int(words[1], 16)
            except ValueError:
                continue
            current = [mark, words[2], "persistent" in words, []]
    if current is not None:
        out[current[0]] = Live(current[0], current[1], current[2], tuple(sorted(current[3])))
    return out


def _address(text: str) -> tuple[str, int] | None:
    try:
        host, port = text.rsplit(":", 1)
        if host.startswith("["):
            return str(ipaddress.IPv6Address(host.strip("[]"))), int(port, 16)
        return str(ipaddress.IPv4Address(int(host, 16))), int(port, 16)
    except ValueError:
        return None


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return -1


def ours(live: Live, node: str) -> bool:
    """The exact shape ipvs-ingress gives a probe service for `node`."""
    return (
        live.scheduler == SCHEDULER
        and not live.persistent
        and live.dests == ((node, 0, "Route", 1),)
    )


def _half_made(live: Live) -> bool:
    """Our service as a kill between adding it and adding its destination leaves it."""
    return live.scheduler == SCHEDULER and not live.persistent and not live.dests


@dataclasses.dataclass(frozen=True)
class Step:
    action: str  # record, create, complete, confirm, unconfirm, replace, delete, forget
    node: str
    mark: int


def plan(
    wanted: Iterable[str], record: Mapping[str, Mapping], live: Mapping[int, Live]
) -> list[Step]:
    """The steps that give every wanted node a probe service in place and leave no other of
    ours; `record` is {node: {"mark": int, "confirmed": bool}}."""
    wanted = set(wanted)
    steps: list[Step] = []
    taken = set(live) | {int(e["mark"]) for e in record.values()}
    need = sorted(wanted - set(record), key=ipaddress.ip_address)
    for node in sorted(record, key=ipaddress.ip_address):
        mark, confirmed = int(record[node]["mark"]), bool(record[node].get("confirmed"))
        svc = live.get(mark)
        if node not in wanted:
            if svc is not None and (ours(svc, node) or _half_made(svc)):
                steps.append(Step("delete", node, mark))
            steps.append(Step("forget", node, mark))  # anything else there is not ours to delete
        elif svc is None:
            if confirmed:  # gone (a flush, a reboot): no longer ours until seen in place again
                steps.append(Step("unconfirm", node, mark))
            steps.append(Step("create", node, mark))
        elif ours(svc, node):
            if not confirmed:
                steps.append(Step("confirm", node, mark))
        elif not confirmed and _half_made(svc):
            steps.append(Step("complete", node, mark))  # killed between its two kernel calls
        elif confirmed and node in {d[0] for d in svc.dests}:
            steps.append(Step("replace", node, mark))  # ours, edited while it existed
        else:  # someone else's service under a mark we only meant to use
            steps.append(Step("forget", node, mark))
            need.append(node)
    mark = MARK_FIRST
    for node in need:
        while mark in taken:
            mark += 1
        if mark > MARK_LAST:
            break  # said by the caller: nodes without a mark are not probed
        taken.add(mark)
        steps += [Step("record", node, mark), Step("create", node, mark)]
    return steps


def sysctl_steps(
    wanted: Mapping[str, str],
    record: Mapping[str, Mapping],
    current: Callable[[str], str | None],
) -> list[tuple[str, str, str | None]]:
    """(action, name, value): `remember` a setting's previous value before the first `set` of
    it; `restore` one no longer wanted to its previous value, unless someone changed it since
    (then it is only forgotten). A setting already as wanted is neither set nor recorded."""
    out: list[tuple[str, str, str | None]] = []
    for name in sorted(wanted):
        now = current(name)
        if now is None:
            continue  # not there (ip_vs not loaded, no such interface): next pass
        if now != wanted[name]:
            if name not in record:
                out.append(("remember", name, now))
            out.append(("set", name, wanted[name]))
    for name in sorted(set(record) - set(wanted)):
        ours = current(name) == record[name]["value"]
        out.append(("restore" if ours else "forget", name, record[name]["previous"]))
    return out


class ProbeServices:
    """The record, the kernel's probe services and `route` for VipProber. `sync` runs in the
    runtime's pass thread (the only one using the kernel's netlink sockets); `route` and `source`
    run in probe threads and read only /proc."""

    def __init__(
        self,
        kernel,
        path: str = PROBES_PATH,
        log: Callable[[str], None] = print,
        sysctl_root: str = SYSCTL_ROOT,
    ):
        self.kernel = kernel
        self.path = path
        self.log = log
        self.sysctl_root = sysctl_root
        self.lock = threading.Lock()
        self.record, problem = self._load()
        if problem:
            self.log(problem)
        self.sources: dict[str, str] = {}  # node -> the director's own address toward it
        self.live: dict[int, Live] = {}
        self.accepting = True  # every wanted accept_local reads 1 (as of `read_at`)
        self.read_at = 0.0
        self.problems: dict[str, str] = {}
        self.wanted: dict[str, str] = {}

    # --- the record ---

    def _load(self) -> tuple[dict, str]:
        empty = {"version": FORMAT, "marks": {}, "sysctls": {}}
        try:
            with open(self.path, "rb") as f:
                data = json.loads(f.read().decode())
        except FileNotFoundError:
            return empty, ""
        except (OSError, ValueError) as err:
            return empty, f"{self.path}: unreadable ({str(err)[:80]}): probe services start afresh"
        if not _well_formed(data):
            return empty, f"{self.path}: not a probes record: probe services start afresh"
        return data, ""

    def _commit(self, change: Callable[[dict], None]) -> None:
        """Apply `change` to a copy of the record, write it atomically and durably, and only then
        hold it in memory: a write that fails changes nothing, here or on disk."""
        record = json.loads(json.dumps(self.record))
        change(record)
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(json.dumps(record, sort_keys=True))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fd = os.open(os.path.dirname(self.path) or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self.record = record

    # --- the pass ---

    def sync(
        self,
        nodes: Iterable[str],
        sysctls: Mapping[str, str],
        probed: Iterable[str] = (),
        vips: Iterable[str] = (),
    ) -> list[str]:
        """Probe services for exactly `nodes` (those a vip check probes), `sysctls` in place, and
        the director's source address toward each of `nodes` and `probed` (every node any check
        probes), never one of `vips`; one log line per change."""
        lines: list[str] = []
        problems: dict[str, str] = {}
        nodes = set(nodes)
        self.wanted = dict(sysctls)
        failed: set[str] = set()
        for step in plan(nodes, self.record["marks"], parse_table(self.kernel.table_text())):
            if step.node in failed:
                continue  # its record was not written: no kernel change without it
            try:
                line = self._do(step)
            except Exception as err:  # a refusal or a full disk: said, and the next pass retries
                failed.add(step.node)
                problems[step.node] = f"probe service {step.node} (mark {step.mark:#x}): {step.action} failed: {str(err)[:120]}"  # fmt: skip
                continue
            if line:
                lines.append(line)
        for node in nodes - set(self.record["marks"]) - failed:
            problems[node] = f"probe service {node}: no free fwmark in {MARK_FIRST:#x}..{MARK_LAST:#x}: its vip probes are not sent"  # fmt: skip
        skip: set[str] = set()
        for action, name, value in sysctl_steps(sysctls, self.record["sysctls"], self._read):
            if name in skip:
                continue
            try:
                lines += self._sysctl(action, name, value)
            except OSError as err:
                skip.add(name)  # not remembered: not set either
                problems[name] = (
                    f"{name.replace('/', '.')}: cannot {action} ({err.strerror or err})"
                )
        self._resolve_sources(nodes | set(probed), set(vips))
        self._refresh()
        self.problems = problems
        for line in lines:
            self.log(line)
        return lines

    def _resolve_sources(self, nodes: set[str], vips: set[str]) -> None:
        """Looked up for a node without one, or whose address is no longer the director's (a
        renumbering): a failed lookup is retried next pass, never kept."""
        local = self.kernel.local_addresses() if nodes else set()
        sources = {}
        for node in sorted(nodes):
            source = self.sources.get(node)
            if not source or source not in local or source in vips:
                source = self.kernel.source_for(node, vips)
            if source:
                sources[node] = source
        self.sources = sources

    def _do(self, step: Step) -> str:
        node, mark = step.node, step.mark
        entry = {"mark": mark, "confirmed": False}
        if step.action == "record":
            self._commit(lambda r: r["marks"].__setitem__(node, entry))
        elif step.action == "unconfirm":
            self._commit(lambda r: r["marks"].__setitem__(node, entry))
        elif step.action == "forget":
            self._commit(lambda r: r["marks"].pop(node, None))
        elif step.action == "delete":
            self.kernel.del_probe_service(mark, node)
        elif step.action == "replace":
            self.kernel.del_probe_service(mark, node)
            self.kernel.add_probe_service(mark, node, SCHEDULER)
        elif step.action == "create":
            self.kernel.add_probe_service(mark, node, SCHEDULER)
        elif step.action == "complete":
            self.kernel.add_probe_dest(mark, node)
        if step.action in ("create", "complete", "confirm", "replace"):
            if not self.record["marks"][node].get("confirmed"):
                self._commit(lambda r: r["marks"].__setitem__(node, {"mark": mark, "confirmed": True}))  # fmt: skip
        verb = {"create": "created", "complete": "created", "replace": "repaired", "delete": "deleted"}  # fmt: skip
        return f"{verb[step.action]} probe service fwmark {mark:#x} -> {node} (route)" if step.action in verb else ""  # fmt: skip

    def _read(self, name: str) -> str | None:
        try:
            with open(os.path.join(self.sysctl_root, name)) as f:
                return f.read().strip()
        except OSError:
            return None

    def _sysctl(self, action: str, name: str, value: str | None) -> list[str]:
        dotted = name.replace("/", ".")
        if action == "remember":
            entry = {"previous": value, "value": self.wanted[name]}
            self._commit(lambda r: r["sysctls"].__setitem__(name, entry))
            return []
        if action in ("restore", "forget"):
            if action == "restore":
                self._write(name, value)
            self._commit(lambda r: r["sysctls"].pop(name, None))
            return [f"{dotted}: back to {value} (no checked service needs it)"] if action == "restore" else []  # fmt: skip
        before = self._read(name)
        self._write(name, value)
        return [f"{dotted}: {before} -> {value} (for health checks)"]

    def _write(self, name: str, value: str) -> None:
        with open(os.path.join(self.sysctl_root, name), "w") as f:
            f.write(f"{value}\n")

    # --- for probes ---

    def _refresh(self) -> None:
        """The table and the accept_local settings the probes rely on, read now."""
        with self.lock:
            self._refresh_locked()

    def _refresh_locked(self) -> None:
        self.live = parse_table(self.kernel.table_text())
        self.accepting = all(
            self._read(n) == v for n, v in self.wanted.items() if n.endswith("/accept_local")
        )
        self.read_at = time.monotonic()

    def route(self, node: str) -> tuple[int, str] | None:
        """(mark, the director's own address toward `node`) while the node's probe service is
        in place and accept_local is on, as read at most ROUTE_FRESH_SECONDS ago; else None."""
        entry = self.record["marks"].get(node)
        source = self.sources.get(node)
        if entry is None or not source:
            return None
        with self.lock:  # one reader per tick: 32 probe threads must not each parse the table
            if time.monotonic() - self.read_at > ROUTE_FRESH_SECONDS:
                self._refresh_locked()
            svc, accepting = self.live.get(int(entry["mark"])), self.accepting
        if svc is None or not ours(svc, node) or not accepting:
            return None
        return int(entry["mark"]), source

    def source(self, node: str) -> str | None:
        """The director's own address toward `node` (for kube-proxy's healthz too)."""
        return self.sources.get(node) or None

    def why_not(self, node: str) -> str:
        """Why `route` answers None for `node`, in a few words (for status)."""
        entry = self.record["marks"].get(node)
        if entry is None:
            return "no probe service recorded yet"
        if not self.sources.get(node):
            return "no address of the director's own toward it (no route?)"
        if not self.accepting:
            return "accept_local is not 1 on the VIP's interface"
        return f"probe service fwmark {int(entry['mark']):#x} not in place"

    def status(self) -> dict:
        with self.lock:
            live = dict(self.live)
        return {
            node: {
                "mark": f"{int(e['mark']):#x}",
                "inPlace": int(e["mark"]) in live and ours(live[int(e["mark"])], node),
                "source": self.sources.get(node, ""),
            }
            for node, e in sorted(self.record["marks"].items())
        }


def _well_formed(data) -> bool:
    if not isinstance(data, dict) or data.get("version") != FORMAT:
        return False
    marks, sysctls = data.get("marks"), data.get("sysctls")
    if not isinstance(marks, dict) or not isinstance(sysctls, dict):
        return False
    for node, entry in marks.items():
        try:
            ipaddress.ip_address(node)
        except ValueError:
            return False
        if not isinstance(entry, dict) or not isinstance(entry.get("mark"), int):
            return False
        if not MARK_FIRST <= entry["mark"] <= MARK_LAST:
            return False
    return all(
        SYSCTL_NAME.fullmatch(k) and isinstance(v, dict) and isinstance(v.get("previous"), str)
        and isinstance(v.get("value"), str)
        for k, v in sysctls.items()
    )  # fmt: skip


def sysctl_name(*parts: str) -> str | None:
    """`net/ipv4/conf/<interface>/accept_local` and the like, or None for a part that could
    leave /proc/sys (an interface name is at most 15 characters, no '/', never '.' or '..')."""
    name = "/".join(parts)
    return name if SYSCTL_NAME.fullmatch(name) else None
