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
