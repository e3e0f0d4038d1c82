"""A tiny SSH server on loopback (paramiko) whose exec requests a test scripts, and whose
direct-tcpip channels to the runtime's address reach a real providers.api.Api listening on a
loopback port of the test's: for the transport's paths that need a real SSH handshake but no
director."""

from __future__ import annotations

import base64
import json
import socket
import threading
from collections.abc import Callable

import paramiko

from providers import api

Exec = Callable[[paramiko.Channel, str], None]


class _Server(paramiko.ServerInterface):
    def __init__(self, client_key: paramiko.PKey, on_exec: Exec, sshd: FakeSSHD):
        self.client_key, self.on_exec, self.sshd = client_key, on_exec, sshd
        self.tcpip: dict[int, socket.socket] = {}

    def get_allowed_auths(self, username):
        return "publickey"

    def check_auth_publickey(self, username, key):
        ok = key.asbytes() == self.client_key.asbytes()
        return paramiko.AUTH_SUCCESSFUL if ok else paramiko.AUTH_FAILED

    def check_channel_request(self, kind, chanid):
        return (
            paramiko.OPEN_SUCCEEDED
            if kind == "session"
            else paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
        )

    def check_channel_direct_tcpip_request(self, chanid, origin, destination):
        # As sshd: connect to the destination on the client's behalf, or fail the open.
        if self.sshd.forwarding_prohibited:
            return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
        if tuple(destination) != (api.HOST, api.PORT) or self.sshd.runtime_port is None:
            return paramiko.OPEN_FAILED_CONNECT_FAILED
        try:
            self.tcpip[chanid] = socket.create_connection(("127.0.0.1", self.sshd.runtime_port))
        except OSError:
            return paramiko.OPEN_FAILED_CONNECT_FAILED
        self.sshd.tcpip_opens += 1
        return paramiko.OPEN_SUCCEEDED

    def check_channel_exec_request(self, channel, command):
        self.sshd.execs += 1
        # After paramiko has answered the exec request, as sshd's process starts only then: a
        # handler that closes at once must not close the channel before the answer goes out.
        timer = threading.Timer(0.05, self.on_exec, args=(channel, command.decode()))
        timer.daemon = True
        timer.start()
        return True


class FakeSSHD:
    """`runtime_port`: where a channel to the runtime's address goes (None: nothing listens);
    `forwarding_prohibited`: sshd_config's AllowTcpForwarding no."""

    def __init__(self, client_key: paramiko.PKey, on_exec: Exec, runtime_port: int | None = None):
        self.runtime_port = runtime_port
        self.forwarding_prohibited = False
        self.tcpip_opens = 0
        self.execs = 0
        self.host_key = paramiko.RSAKey.generate(2048)
        self.host_key_line = f"ssh-rsa {base64.b64encode(self.host_key.asbytes()).decode()}"
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen()
        self.port = self._listener.getsockname()[1]
        self._client_key, self._on_exec = client_key, on_exec
        self._transports: list[paramiko.Transport] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            t = paramiko.Transport(conn)
            t.add_server_key(self.host_key)
            server = _Server(self._client_key, self._on_exec, self)
            t.start_server(server=server)
            self._transports.append(t)
            threading.Thread(target=self._channels, args=(t, server), daemon=True).start()

    def _channels(self, t: paramiko.Transport, server: _Server) -> None:
        """Pump each accepted direct-tcpip channel to its socket, both ways."""
        while t.is_active():
            channel = t.accept(0.5)
            if channel is None or channel.get_id() not in server.tcpip:
                continue
            sock = server.tcpip.pop(channel.get_id())
            for src, dst in ((channel, sock), (sock, channel)):
                threading.Thread(target=_pump, args=(src, dst), daemon=True).start()

    def close(self):
        self._listener.close()
        for t in self._transports:
            t.close()


def _pump(src, dst) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except (OSError, EOFError):
        pass
    for end in (dst, src):
        try:
            end.close()
        except (OSError, EOFError):
            pass


class Relay:
    """A loopback TCP relay in front of `port` that can be made to drop everything silently.

    `blackhole()` stops forwarding in both directions while every socket stays open: no FIN,
    no RST, like a link or firewall that starts dropping packets mid-session.
    """

    def __init__(self, port: int):
        self._port = port
        self._dropping = threading.Event()
        self._sockets: list[socket.socket] = []
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen()
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def blackhole(self) -> None:
        self._dropping.set()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self._port))
            except OSError:
                client.close()
                continue
            self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if not self._dropping.is_set():
                    dst.sendall(data)
            if not self._dropping.is_set():
                dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self._listener.close()
        for s in self._sockets:
            s.close()


class _ChannelOut:
    """A process's stdout on an SSH channel (what sshd's pipe is on a real director)."""

    def __init__(self, channel: paramiko.Channel):
        self._channel = channel

    def write(self, text: str) -> None:
        self._channel.sendall(text.encode())

    def flush(self) -> None:
        pass


def fake_runtime(
    handle: Callable[[dict], dict],
    exited: threading.Event | None = None,
    version: str | None = None,
) -> api.Api:
    """The real request listener (providers.api.Api, the real line loop) on an ephemeral
    loopback port, with `handle` in place of the kernel-backed Agent; `exited` is set when a
    connection's loop ends."""
    from providers import transport

    def make_handler():
        return handle, (exited.set if exited is not None else lambda: None)

    return api.Api(
        version or transport.VERSION, make_handler, port=0, allowed=lambda conn: True,
        greeting={"pyroute2": "0.9.7"},
    )  # fmt: skip


def installer_exec(sshd_ref: list, runtime: api.Api, installed: list) -> Exec:
    """An exec handler standing in for providers/install.py: reads the sources, 'installs'
    (points the sshd's runtime port at `runtime`) and answers as the installer does."""

    def run(channel: paramiko.Channel, command: str) -> None:
        modules = json.loads(channel.makefile("r").readline())
        installed.append(dict(modules))
        sshd_ref[0].runtime_port = runtime.port
        channel.sendall(
            (
                json.dumps({"ready": True, "installed": runtime.version, "restarted": True}) + "\n"
            ).encode()
        )
        channel.send_exit_status(0)
        channel.close()

    return run
