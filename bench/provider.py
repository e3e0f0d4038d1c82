"""ipvs-ingress phases: the dynamic provider behind the SDK's gRPC server, as `pulumi` drives it.

Each phase gets its own provider process, because each `pulumi up` / `pulumi refresh` starts
one: the phase pays its SSH handshake and its channel to the director's runtime (and, the first
time, installing the runtime: an interpreter started on the director), and the provider's
connection log (set with IPVS_INGRESS_LOG) says how many of each it took, which runtime process
answered and which kernel changes it made.
Requests go out all at once, as the engine's default (unbounded) parallelism sends them; the
SDK's server answers them with its 4 worker threads.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import grpc

from bench.results import BenchError, Phase
from bench.workload import Workload
from providers.virtual_service import PRIVATE_KEY_CONFIG
from tests.provider.grpc_client import ProviderServer

RPC_TIMEOUT = 600.0  # a request may queue behind all the others on the one channel
_STAMP = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) "
_HANDSHAKE = re.compile(_STAMP + r"connected to director ", re.M)
_INSTALL = re.compile(_STAMP + r"director \S+: .*, installing runtime ", re.M)
_ATTACH = re.compile(_STAMP + r"attached to runtime \S+ on director \S+ \(pid (\d+)\)", re.M)
_APPLIED = re.compile(_STAMP + r"applied (\S+) on \S+: (\d+) kernel change", re.M)


@dataclass(frozen=True)
class ConnectionLog:
    """What one provider process logged: handshakes, installs, runtime pids, kernel changes."""

    handshakes: int
    installs: int  # interpreters the provider started on the director (install or upgrade)
    runtime_pids: tuple[int, ...]  # the runtime process each attach reached
    changes: dict[str, int]  # service key -> kernel objects its applies touched
    connected: datetime | None  # first SSH handshake done
    attached: datetime | None  # first runtime greeting of the right version

    @classmethod
    def read(cls, path: Path) -> ConnectionLog:
        text = path.read_text() if path.exists() else ""
        changes: dict[str, int] = {}
        for _, key, n in _APPLIED.findall(text):
            changes[key] = changes.get(key, 0) + int(n)
        connected, attached = _HANDSHAKE.findall(text), _ATTACH.findall(text)
        return cls(
            handshakes=len(connected),
            installs=len(_INSTALL.findall(text)),
            runtime_pids=tuple(int(pid) for _, pid in attached),
            changes=changes,
            connected=_stamp(connected[0]) if connected else None,
            attached=_stamp(attached[0][0]) if attached else None,
        )


def _stamp(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f")


@contextmanager
def provider_process(lab, log: Path) -> Iterator[ProviderServer]:
    """A fresh `python -m pulumi.dynamic`, configured with the lab's key, as `pulumi` starts it."""
    server = ProviderServer(env={"IPVS_INGRESS_LOG": str(log)})
    try:
        server.configure({PRIVATE_KEY_CONFIG: lab.private_key_pem})
        yield server
    finally:
        server.close()


def _all_at_once(call: Callable, items: Sequence) -> list:
    """Every request in flight at once, as the engine sends independent resources."""
    try:
        with ThreadPoolExecutor(max_workers=len(items)) as pool:
            return list(pool.map(call, items))
    except grpc.RpcError as err:
        raise BenchError(f"provider request failed: {err.code().name}: {err.details()}") from None


def _measured(
    lab, log: Path, name: str, what: str, prepare: Callable, send: Callable
) -> tuple[Phase, list, ConnectionLog]:
    """Run one provider phase; only `send` (the RPCs) is timed, `prepare` (pure Check) is not."""
    with provider_process(lab, log) as server:
        work = prepare(server)
        wall_start = datetime.now()  # the provider log's clock
        started = time.monotonic()
        replies = send(server, work)
        seconds = time.monotonic() - started
    conn = ConnectionLog.read(log)

    def since_start(stamp: datetime | None) -> float | None:
        return None if stamp is None else max((stamp - wall_start).total_seconds(), 0.0)

    phase = Phase(
        name,
        what,
        seconds,
        handshakes=conn.handshakes,
        installs=conn.installs,
        runtime_pids=conn.runtime_pids,
        kernel_changes=sum(conn.changes.values()),
        requests=len(work),
        connected_seconds=since_start(conn.connected),
        ready_seconds=since_start(conn.attached),
    )
    return phase, replies, conn


def _checked(server: ProviderServer, props: list[dict]) -> list[dict]:
    inputs = []
    for p in props:
        checked, failures = server.check(p)
        if failures:
            raise BenchError(f"provider Check refused the benchmark's input: {failures[0]}")
        inputs.append(checked)
    return inputs


def install_runtime(lab, workload: Workload, log: Path) -> Phase:
    """A first `pulumi refresh` on a director without the runtime: one Read (of a service not
    there yet), and the provider installs the runtime before it answers."""
    props = workload.props(lab.director_config())[:1]
    phase, reads, conn = _measured(
        lab, log, "(0) install", "ipvs-ingress Read x1, installs the runtime",
        lambda server: _checked(server, props),
        lambda server, inputs: [server.read("bench-install", inputs[0], timeout=RPC_TIMEOUT)],
    )  # fmt: skip
    if conn.installs != 1:
        raise BenchError(f"the install phase installed {conn.installs} times, expected 1")
    return phase


def create_all(lab, workload: Workload, log: Path) -> tuple[Phase, list[tuple[str, dict]]]:
    """(a) Create every virtual service; returns the phase and each resource's (id, outputs)."""
    props = workload.props(lab.director_config())
    phase, created, conn = _measured(
        lab, log, "(a) create", f"ipvs-ingress Create x{len(props)}",
        lambda server: _checked(server, props),
        lambda server, inputs: _all_at_once(
            lambda i: server.create(i, timeout=RPC_TIMEOUT), inputs),
    )  # fmt: skip
    if len(conn.changes) != len(props):
        raise BenchError(f"create applied {len(conn.changes)} services, expected {len(props)}")
    return phase, created


def refresh_all(lab, created: list[tuple[str, dict]], log: Path, name: str = "refresh") -> Phase:
    """A no-op `pulumi refresh`: Read of every resource with its stored outputs."""
    phase, reads, _ = _measured(
        lab, log, name, f"ipvs-ingress Read x{len(created)}",
        lambda server: created,
        lambda server, work: _all_at_once(
            lambda item: server.read(*item, timeout=RPC_TIMEOUT), work),
    )  # fmt: skip
    for (id_, _), (read_id, outs) in zip(created, reads, strict=True):
        if read_id != id_ or outs.get("inSync") is not True:
            raise BenchError(f"refresh of {id_} did not find it in sync: {read_id!r} {outs}")
    return phase


def change_one(lab, workload: Workload, created: list[tuple[str, dict]], log: Path) -> Phase:
    """`pulumi up` after one weight changed: Update of that one resource."""
    id_, olds = created[0]
    news = workload.props(lab.director_config(), changed=True)[0]
    phase, _, conn = _measured(
        lab, log, "one change", "ipvs-ingress Update x1",
        lambda server: _checked(server, [news]),
        lambda server, inputs: [server.update(id_, olds, inputs[0], timeout=RPC_TIMEOUT)],
    )  # fmt: skip
    if len(conn.changes) != 1:
        raise BenchError(f"the one change applied {len(conn.changes)} services, expected 1")
    return phase
