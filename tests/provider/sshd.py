"""A tiny SSH server on loopback (paramiko) whose exec requests a test scripts: for the
transport's failure paths that need a real SSH handshake but no director."""

from __future__ import annotations

import base64
import socket
import threading
from collections.abc import Callable

import paramiko

Exec = Callable[[paramiko.Channel, str], None]


class _Server(paramiko.ServerInterface):
    def __init__(self, client_key: paramiko.PKey, on_exec: Exec):
        self.client_key, self.on_exec = client_key, on_exec

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

    def check_channel_exec_request(self, channel, command):
        threading.Thread(target=self.on_exec, args=(channel, command.decode()), daemon=True).start()
        return True


class FakeSSHD:
    def __init__(self, client_key: paramiko.PKey, on_exec: Exec):
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
            t.start_server(server=_Server(self._client_key, self._on_exec))
            self._transports.append(t)

    def close(self):
        self._listener.close()
        for t in self._transports:
            t.close()


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
    """The agent's stdout on an SSH channel (what sshd's pipe is on a real director)."""

    def __init__(self, channel: paramiko.Channel):
        self._channel = channel

    def write(self, text: str) -> None:
        self._channel.sendall(text.encode())

    def flush(self) -> None:
        pass


def agent_exec(handle: Callable[[dict], dict], exited: threading.Event) -> Exec:
    """An exec handler that runs the real agent line loop (providers.agent.serve) with `handle`
    in place of the kernel-backed Agent; `exited` is set when the loop returns."""
    from providers import agent

    def run(channel: paramiko.Channel, command: str) -> None:
        reader = channel.makefile("r")
        reader.readline()  # the agent's sources, as the boot program reads them
        out = _ChannelOut(channel)
        out.write('{"ready": true, "pyroute2": "0.9.7"}\n')
        try:
            agent.serve(handle, stdin=reader, out=out)
        finally:
            exited.set()
            try:
                channel.close()  # sshd closes the channel when the agent exits
            except EOFError:  # the client already went away
                pass

    return run
