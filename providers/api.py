"""The runtime's request path: the provider's create/read/update/delete/plan, answered by the
resident runtime, so no interpreter starts on the director per resource or per `pulumi` run.

Runs on the director inside the runtime (stdlib + pyroute2). It listens on 127.0.0.1:PORT; the
provider reaches it through its SSH connection (a `direct-tcpip` channel: sshd connects on the
provider's behalf, as the logged-in user, and starts no process). The port is below 1024, so no
other user can listen on it while the runtime restarts. Loopback TCP is open to every local
user, so a connection is served only when the peer socket, established, belongs to uid 0 (the
kernel's own account of it, /proc/net/tcp): what root may do through the runtime, only root may
ask.

Per connection: a greeting {"ready": true, "version", ...}, then the agent's line protocol
(agent.serve: requests, replies, heartbeats, pings; a connection silent for 30 s is closed).
Each connection has its own Agent and netlink sockets; changes are serialized by the director
lock, as before. A request that names another version is refused: mismatched code never drives
the director.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable

from providers import agent
from providers.ownership import AgentError

HOST = "127.0.0.1"
PORT = 747  # privileged: only root can bind it (paramiko has no unix-socket forwarding)
_ESTABLISHED = "01"
ALLOWED_UIDS = frozenset({0})
DRAIN_SECONDS = 60.0  # a stop waits this long for requests in flight (an apply finishes)
_PROC_TCP = "/proc/net/tcp"


def socket_uid(table: str, local: tuple[str, int], remote: tuple[str, int]) -> int | None:
    """The uid owning the established IPv4 socket bound to `local` and connected to `remote`,
    from the text of /proc/net/tcp; None if there is none. A socket its owner closed lives on
    as an entry of uid 0 and inode 0 (TIME_WAIT, FIN_WAIT...): never taken for root's."""
    want = (_hex_endpoint(*local), _hex_endpoint(*remote))
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 9 and (fields[1], fields[2]) == want:
            if fields[3] != _ESTABLISHED or fields[9] == "0":
                return None
            return int(fields[7])
    return None


def _hex_endpoint(address: str, port: int) -> str:
    # /proc/net/tcp writes the address as the 32-bit word in host order (little-endian here).
    packed = socket.inet_aton(address)
    return f"{int.from_bytes(packed, 'little'):08X}:{port:04X}"


def peer_uid(conn: socket.socket, proc_tcp: str = _PROC_TCP) -> int | None:
    """The uid of the process side of an accepted loopback connection: its socket is the one
    whose local end is our peer's address and whose remote end is ours."""
    try:
        with open(proc_tcp) as f:
            table = f.read()
        return socket_uid(table, conn.getpeername(), conn.getsockname())
    except OSError:
        return None


class Api:
    """The listener and its connections; `close` stops taking new ones and lets requests in
    flight finish (bounded), so a stop or an upgrade never cuts an apply half-way."""

    def __init__(
        self,
        version: str,
        make_handler: Callable[[], tuple[Callable[[dict], dict], Callable[[], None]]],
        port: int = PORT,
        host: str = HOST,
        allowed: Callable[[socket.socket], bool] | None = None,
        greeting: dict | None = None,
    ):
        self.version = version
        self.make_handler = make_handler
        self.allowed = allowed or (lambda conn: peer_uid(conn) in ALLOWED_UIDS)
        self.greeting = greeting or {}
        self.busy = 0
        self.last_active = float("-inf")  # monotonic end of the last request
        self._idle = threading.Condition()
        self._closing = False
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, port))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, name="api-accept", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(conn,), name="api-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            if not self.allowed(conn):
                return  # not root: closed without a word
            rfile, wfile = (
                conn.makefile("r", encoding="utf-8"),
                conn.makefile("w", encoding="utf-8"),
            )
            try:
                handle, done = self.make_handler()
            except AgentError as err:
                agent._emit({"ready": False, "code": err.code, "error": str(err)}, wfile)
                return
            try:
                agent._emit({"ready": True, "agent": agent.PROTOCOL_VERSION, "version": self.version, "pid": os.getpid(), **self.greeting}, wfile)  # fmt: skip
                agent.serve(self._guarded(handle), stdin=rfile, out=wfile)
            except OSError:
                pass  # the provider went away
            finally:
                done()
                # The file objects hold the socket open: shut it down so that the provider (and
                # the loop's reader thread) see the end now, not when sshd gives up on it.
                for end in (lambda: conn.shutdown(socket.SHUT_RDWR), rfile.close, wfile.close):
                    try:
                        end()
                    except OSError:
                        pass

    def _guarded(self, handle: Callable[[dict], dict]) -> Callable[[dict], dict]:
        def guarded(request: dict) -> dict:
            theirs = request.get("version")
            if theirs != self.version:
                raise AgentError(
                    "version",
                    f"the runtime runs version {self.version}, the request comes from {agent_text(theirs)}",
                )
            with self._idle:
                while self._closing:
                    # Never answered: the process ends, the connection drops, and the provider
                    # sends this request again to the runtime that comes up next.
                    self._idle.wait()
                self.busy += 1
            try:
                return handle(request)
            finally:
                with self._idle:
                    self.busy -= 1
                    self.last_active = time.monotonic()
                    self._idle.notify_all()

        return guarded

    def idle_seconds(self) -> float:
        """Since the last request ended; 0 while one runs."""
        with self._idle:
            return 0.0 if self.busy else time.monotonic() - self.last_active

    def close(self, wait: float = DRAIN_SECONDS) -> bool:
        """Stop listening; True when no request was left running after `wait`."""
        try:
            # shutdown first: a close alone leaves the thread blocked in accept() and the
            # port listening, on Linux.
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        deadline = time.monotonic() + wait
        with self._idle:
            self._closing = True
            while self.busy and time.monotonic() < deadline:
                self._idle.wait(deadline - time.monotonic())
            return self.busy == 0


def agent_text(version) -> str:
    return f"version {version}" if isinstance(version, str) else "a provider that sent no version"


def kernel_handler(kernel_factory) -> tuple[Callable[[dict], dict], Callable[[], None]]:
    """An Agent of its own for one connection, and how to close its netlink sockets."""
    kernel = kernel_factory()
    return agent.Agent(kernel).handle, kernel.close
