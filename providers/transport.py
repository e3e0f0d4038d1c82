"""SSH to the director: pinned host key, key auth from the secret, one connection per director,
and through it the director's runtime.

The runtime (providers/runtime.py, a systemd service) answers every request: the provider opens
an SSH `direct-tcpip` channel to it (127.0.0.1:747 on the director, providers/api.py), so no
process starts on the director for a request, a resource or a `pulumi` run. Only when the
runtime is missing or greets with another version than the sources this provider ships does
the provider start one interpreter there, to install them (providers/install.py); it then
attaches again, and mismatched code is never sent a request.
"""

from __future__ import annotations

import base64
import hashlib
import io
import itertools
import json
import logging
import os
import re
import select
import shlex
import threading
from pathlib import Path

import paramiko

from providers import api, install, model, runtime

log = logging.getLogger("ipvs_ingress.transport")
if os.environ.get("IPVS_INGRESS_LOG"):
    # The engine swallows a dynamic provider's stderr: an operator (or the benchmark) asks for a
    # file with the connection log, e.g. to confirm one SSH handshake per director per run.
    logging.basicConfig(
        filename=os.environ["IPVS_INGRESS_LOG"],
        level=logging.INFO,
        format="%(asctime)s %(message)s",
    )

CONNECT_TIMEOUT = 15.0
INSTALL_START_TIMEOUT = 120.0  # python3 start and the pyroute2 check; slow on small hosts
# A dead connection is told from a long apply by the line protocol, not by a request timeout:
# while a request runs the runtime sends {"id", "working": true} every 5 s
# (agent.HEARTBEAT_SECONDS), so SILENCE_SECONDS without a byte means the connection is lost,
# however long the apply takes. The provider pings every PING_SECONDS while the session is
# open; the runtime closes a connection silent for 30 s (agent.IDLE_EXIT_SECONDS).
SILENCE_SECONDS = 20.0
PING_SECONDS = 5.0
_PING = b'{"op":"ping"}\n'
# Sent as a tiny `python3 -c` program; it reads the sources from the first stdin line.
_BOOT = (
    "import json,sys,types\n"
    "S=json.loads(sys.stdin.readline())\n"
    "for n,s in S:\n"
    " m=types.ModuleType(n);m.__file__='<ipvs-ingress:'+n+'>';m.__path__=[];sys.modules[n]=m\n"
    " exec(compile(s,m.__file__,'exec'),m.__dict__)\n"
    "sys.exit(sys.modules['providers.install'].main(S))\n"
)
_HERE = Path(__file__).parent
# The director's sources in import order (each module's imports come before it).
_MODULES = (
    "__init__", "model", "health", "ownership", "agent", "probing", "probe_services", "api",
    "keepalived", "vrrp", "runtime", "install",
)  # fmt: skip
_SOURCES = [
    (
        "providers" if m == "__init__" else f"providers.{m}",
        (_HERE / f"{m}.py").read_bytes().decode(),
    )
    for m in _MODULES
]
VERSION = runtime.version_of({install.module_file(n): text.encode() for n, text in _SOURCES})
_FIXES = {
    "ipvs-missing": "use a kernel with CONFIG_IP_VS (Debian's stock kernel has it) or set director.bootstrap: true",
    "pyroute2-missing": "install it on the director (pip install pyroute2==0.9.7) or set director.bootstrap: true",
    "pyroute2-old": "upgrade it on the director (pip install pyroute2==0.9.7) or set director.bootstrap: true",
    "no-interface": "set director.interface to the NIC on the nodes' segment (see 'ip -br link' on the director)",
    "no-scheduler": "choose another scheduler or load the module on the director",
    "no-systemd": "run the director on a systemd distribution (Debian's default init) so that the runtime can keep the table",
}


class DirectorError(Exception):
    """An expected operational failure: shown to the user as one line, never a traceback."""


def host_key_fingerprint(blob: bytes) -> str:
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def load_private_key(text: str) -> paramiko.PKey:
    if not isinstance(text, str) or "PRIVATE KEY" not in text:
        raise DirectorError(
            "ipvs-ingress:sshPrivateKey is not a private key: set it with "
            "'pulumi config set --secret sshPrivateKey < ~/.ssh/id_ed25519'"
        )
    errors = []
    for cls in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
        try:
            return cls.from_private_key(io.StringIO(text))
        except (paramiko.SSHException, ValueError) as err:
            errors.append(f"{cls.__name__}: {err}")
    raise DirectorError(
        "ipvs-ingress:sshPrivateKey could not be read as an unencrypted ed25519, ECDSA or RSA key: "
        "set an unencrypted OpenSSH private key with 'pulumi config set --secret sshPrivateKey < KEYFILE'"
    )


# An install restarts the director's runtime, and while no runtime process runs keepalived there
# gives up its VIPs (providers/keepalived.py: vrrp_track_process). Pulumi applies the resources
# of a stack's directors in parallel: installing on two at once would leave a VIP on neither.
# One at a time, each install returns once its new runtime answers (Type=notify), so the
# director restarted first is back in VRRP (backup, ready) before the next one lets go.
_INSTALLING = threading.Lock()


class RuntimeSession:
    """One SSH connection to a director and one channel to its runtime on it; thread-safe."""

    def __init__(self, director: model.Director, private_key: str, install: bool = True):
        self.director = director
        self.may_install = install  # False for a dry run: it changes nothing, the runtime neither
        self._pkey = load_private_key(private_key)
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._client: paramiko.SSHClient | None = None
        self._channel = None
        self._out = None
        self._send_lock = threading.Lock()  # requests and pings share the channel
        self._stop_pings = threading.Event()
        self.handshakes = 0
        self.attaches = 0  # channels to the runtime: no process on the director
        self.installs = 0  # interpreters started on the director (install or upgrade)
        self.runtime_pid: int | None = None

    # -- connection --
    def _connect(self) -> None:
        if (
            self._client is None
            or not self._client.get_transport()
            or not self._client.get_transport().is_active()
        ):
            self._handshake()
        try:
            self._attach()
        except ConnectionError as err:  # the installer died at start: retrying would repeat it
            self.close()
            raise DirectorError(
                f"{err}: check that python3 runs for {self.director.user} on the director"
            ) from None
        except (OSError, paramiko.SSHException) as err:
            self.close()
            raise DirectorError(f"director {self.director.host} refused a session for the runtime ({err}): check sshd's limits and {self.director.user}'s shell") from None  # fmt: skip

    def _handshake(self) -> None:
        d = self.director
        kind, blob = model.parse_host_key(d.host_key)
        client = paramiko.SSHClient()
        # Only the pinned key is accepted: no known_hosts files, no trust on first use.
        name = d.host if d.port == 22 else f"[{d.host}]:{d.port}"
        client.get_host_keys().add(name, kind, paramiko.PKey.from_type_string(kind, blob))
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            sock = _proxy(d)
            client.connect(
                d.host, port=d.port, username=d.user, pkey=self._pkey, sock=sock,
                timeout=CONNECT_TIMEOUT, banner_timeout=CONNECT_TIMEOUT, auth_timeout=CONNECT_TIMEOUT,
                allow_agent=False, look_for_keys=False,
            )  # fmt: skip
        except paramiko.BadHostKeyException as err:
            client.close()
            raise DirectorError(
                f"director {d.host}:{d.port} presented host key {host_key_fingerprint(err.key.asbytes())} "
                f"but director.hostKey pins {host_key_fingerprint(blob)}: if the director was rebuilt, "
                f"update director.hostKey from 'ssh-keyscan -t {kind.removeprefix('ssh-')} {d.host}' checked out of band; otherwise do not connect"
            ) from None
        except paramiko.AuthenticationException:
            client.close()
            raise DirectorError(
                f"director {d.label} refused the SSH key from ipvs-ingress:sshPrivateKey: add its public key "
                f"to ~{d.user}/.ssh/authorized_keys on the director or fix director.user"
            ) from None
        except (OSError, paramiko.SSHException, EOFError) as err:
            client.close()
            reason = str(err) or type(err).__name__
            if "host key" in reason.lower():
                raise DirectorError(
                    f"director {d.host}:{d.port} offers no {kind} host key, which director.hostKey pins: "
                    f"set director.hostKey to one of the director's keys (ssh-keyscan {d.host})"
                ) from None
            raise DirectorError(
                f"director {d.host}:{d.port} is unreachable ({reason.splitlines()[0]}): check director.host, "
                f"director.port{' and director.proxyCommand' if d.proxy_command else ''}, and that sshd runs there"
            ) from None
        self.handshakes += 1
        log.info("connected to director %s (handshake %d)", d.label, self.handshakes)
        self._client = client
        client.get_transport().set_keepalive(30)

    def _attach(self) -> None:
        """A channel to the runtime of this provider's version; installs it when missing or of
        another version, once."""
        d, installed = self.director, False
        while True:
            greeting = self._open_runtime()
            if greeting is not None and greeting.get("version") == VERSION:
                break
            found = "no runtime" if greeting is None else f"runtime {greeting.get('version')}"
            self._drop_channel()
            if not self.may_install:
                raise DirectorError(
                    f"director {d.host} runs {found}, this ipvs-ingress needs runtime {VERSION} "
                    "and a dry run installs nothing: run pulumi up (it installs it), or plan "
                    "with the ipvs-ingress version that applied the stack"
                )
            if installed:
                raise DirectorError(
                    f"director {d.host}: installed runtime {VERSION} but {found} answers: "
                    f"see 'journalctl -u {runtime.UNIT_NAME}' on the director"
                )
            log.info("director %s: %s, installing runtime %s", d.label, found, VERSION)
            with _INSTALLING:  # one director's runtime restarts at a time (see _INSTALLING)
                self._install()
            installed = True
        self.attaches += 1
        self.runtime_pid = greeting.get("pid")
        log.info(
            "attached to runtime %s on director %s (pid %s)", VERSION, d.label, self.runtime_pid
        )
        self._channel.settimeout(SILENCE_SECONDS)
        self._stop_pings.set()  # a previous connection's pinger, if that one died on its own
        self._stop_pings = stop = threading.Event()
        threading.Thread(
            target=self._ping, args=(self._channel, stop), name=f"ping {d.label}", daemon=True
        ).start()

    def _open_runtime(self) -> dict | None:
        """The runtime's greeting on a new channel to it; None when nothing listens there."""
        d = self.director
        try:
            channel = self._client.get_transport().open_channel(
                "direct-tcpip", (api.HOST, api.PORT), ("127.0.0.1", 0), timeout=CONNECT_TIMEOUT
            )
        except paramiko.ChannelException as err:
            if err.code == paramiko.OPEN_FAILED_CONNECT_FAILED:
                return None  # sshd could not connect: no runtime listens
            raise DirectorError(
                f"director {d.host}: sshd refused a channel to the runtime at {api.HOST}:{api.PORT} "
                f"({err.text or err.code}): allow it for {d.user} in sshd_config "
                "('AllowTcpForwarding local', the default is yes) and reload sshd"
            ) from None
        self._channel, self._out = channel, channel.makefile("rb")
        channel.settimeout(CONNECT_TIMEOUT)
        try:
            line = self._out.readline()
        except TimeoutError:
            line = b""
        if not line:  # closed without a word: the runtime serves root only
            self._drop_channel()
            if d.user != "root":
                raise DirectorError(
                    f"director {d.host}: the runtime closed the channel without a greeting: it "
                    f"answers root only, so set director.user to root (it is {d.user})"
                )
            raise DirectorError(
                f"director {d.host}: the runtime closed the channel without a greeting: see "
                f"'journalctl -u {runtime.UNIT_NAME}' on the director"
            )
        greeting = self._parse(line, "greeting")
        if not greeting.get("ready"):
            code = greeting.get("code", "runtime")
            self._drop_channel()
            raise DirectorError(
                f"director {d.host}: {greeting.get('error')}: {_FIXES.get(code, 'see the director')}"
            )
        return greeting

    def _install(self) -> None:
        """One interpreter on the director: providers/install.py with this provider's sources."""
        d = self.director
        channel = self._client.get_transport().open_session(timeout=CONNECT_TIMEOUT)
        self._channel, self._out = channel, channel.makefile("rb")
        channel.settimeout(INSTALL_START_TIMEOUT)
        channel.exec_command("exec python3 -u -c " + _shell_quote(_BOOT))
        try:
            channel.sendall((json.dumps(_SOURCES) + "\n").encode())
        except (OSError, EOFError, paramiko.SSHException):
            pass  # it exited before reading them all (no python3): its stderr below says why
        self.installs += 1
        doing = f"installing the runtime on director {d.host} (python3 -u -c ...)"
        reply = self._read_line(doing)
        while reply.get("working"):  # it runs: pyroute2 checked, files written, restarting
            channel.settimeout(SILENCE_SECONDS)
            reply = self._read_line(doing, heartbeating=True)
        self._drop_channel()
        if not reply.get("ready"):
            code = reply.get("code", "install")
            raise DirectorError(
                f"director {d.host}: {reply.get('error')}: {_FIXES.get(code, 'see the director')}"
            )
        log.info(
            "director %s: runtime %s installed (was %s, restarted %s)",
            d.label, reply.get("installed"), reply.get("previous"), reply.get("restarted"),
        )  # fmt: skip

    def _ping(self, channel, stop: threading.Event) -> None:
        """Tell the runtime the session is alive; a failed send ends it (the next request sees why)."""
        while not stop.wait(PING_SECONDS):
            try:
                with self._send_lock:
                    channel.sendall(_PING)
            except (OSError, EOFError, paramiko.SSHException):
                return

    def _read_line(self, doing: str, heartbeating: bool = False) -> dict:
        try:
            line = self._out.readline()
        except TimeoutError:
            self.close()
            if heartbeating:  # the runtime heartbeats while it works: this silence is the network
                raise DirectorError(
                    f"lost the connection to director {self.director.label}: nothing came back for "
                    f"{SILENCE_SECONDS:.0f} s while {doing} (the network dropped it or the director "
                    "stopped): check the path to the director and run again"
                ) from None
            raise DirectorError(f"director {self.director.host} did not answer while {doing}: check its load and python3") from None  # fmt: skip
        if not line:
            detail = self._stderr_tail()
            self.close()
            raise ConnectionError(f"the runtime on director {self.director.host} closed the channel while {doing}{': ' + detail if detail else ''}")  # fmt: skip
        return self._parse(line, doing)

    def _parse(self, line: bytes, doing: str) -> dict:
        try:
            doc = json.loads(line)
            if isinstance(doc, dict):
                return doc
        except ValueError:
            pass
        self.close()
        raise DirectorError(
            f"director {self.director.host} printed {line[:40]!r} instead of the runtime's answer while {doing}: "
            "a login script that writes to stdout (e.g. ~/.bashrc) breaks non-interactive sessions; make it silent"
        ) from None

    def _stderr_tail(self) -> str:
        try:
            if self._channel is not None and self._channel.recv_stderr_ready():
                return (
                    self._channel.recv_stderr(4096)
                    .decode(errors="replace")
                    .strip()
                    .splitlines()[-1]
                )
        except (OSError, IndexError):
            pass
        return ""

    # -- requests --
    def request(self, op: str, **fields) -> dict:
        """Send one request; reconnect once if the pooled connection has gone away."""
        with self._lock:
            for attempt in (1, 2):
                try:
                    if self._channel is None or self._channel.closed:
                        self._connect()
                    return self._exchange(op, fields)
                except ConnectionError:
                    self.close()
                    if attempt == 2:
                        raise DirectorError(f"lost the connection to director {self.director.host} twice during {op}: check the director") from None  # fmt: skip
        raise AssertionError("unreachable")

    def _exchange(self, op: str, fields: dict) -> dict:
        rid = next(self._ids)
        doc = {"id": rid, "op": op, "version": VERSION, **fields}
        try:
            with self._send_lock:
                self._channel.sendall((json.dumps(doc) + "\n").encode())
        except OSError as err:
            raise ConnectionError(str(err)) from None
        reply = self._read_line(f"running {op}", heartbeating=True)
        while reply.get("working"):  # a heartbeat: the runtime is alive and busy, keep waiting
            reply = self._read_line(f"running {op}", heartbeating=True)
        if reply.get("id") != rid:
            self.close()
            raise DirectorError(
                f"the runtime on director {self.director.host} answered out of turn: retry"
            )
        if not reply.get("ok"):
            code = reply.get("code", "runtime")
            fix = _FIXES.get(code)
            raise DirectorError(
                f"director {self.director.host}: {reply.get('error')}{': ' + fix if fix else ''}"
            )
        return reply["result"]

    def _drop_channel(self) -> None:
        self._stop_pings.set()
        try:
            if self._channel is not None:
                self._channel.close()
        except Exception:  # closing a dead channel must not mask the real error
            pass
        self._channel = self._out = None

    def close(self) -> None:
        self._drop_channel()
        try:
            if self._client is not None:
                self._client.close()
        except Exception:  # closing a dead connection must not mask the real error
            pass
        self._client = None


def _proxy(d: model.Director) -> paramiko.ProxyCommand | None:
    if not d.proxy_command:
        return None
    try:
        return _ProxyCommand(proxy_command_line(d))
    except (OSError, ValueError, paramiko.SSHException) as err:
        # The value and the OS's reason (which may quote the program) are cut to a few words.
        reason = " ".join(str(err).split())
        reason = reason if len(reason) <= 80 else reason[:77] + "..."
        raise DirectorError(
            f"director.proxyCommand {model._short(d.proxy_command)} cannot start ({reason}): "
            "fix the command"
        ) from None


class _ProxyCommand(paramiko.ProxyCommand):
    """paramiko's ProxyCommand, except that a command that exited reads as end of file.

    paramiko's own recv loops on a closed pipe until its timeout, busy: 15 s of a CPU before
    "unreachable" for a proxy that failed at once.
    """

    def recv(self, size: int) -> bytes:
        try:
            ready, _, _ = select.select([self.process.stdout], [], [], self.timeout)
            if not ready:
                raise TimeoutError()
            return os.read(self.process.stdout.fileno(), size)  # b"" at EOF: paramiko's EOFError
        except OSError as err:
            if isinstance(err, TimeoutError):
                raise
            raise paramiko.ProxyCommandFailure(" ".join(self.cmd), err.strerror) from None


_TOKEN = re.compile(r"%(.)", re.DOTALL)


def proxy_command_line(d: model.Director) -> str:
    """director.proxyCommand with %h, %p and %r (and %% for a literal %) filled in.

    Each word of the command gets the values shell-quoted (shlex.quote) in place: a word that a
    shell reads later (the script of `sh -c '... %h'`, or the remote command of
    `ssh bastion nc %h %p`) sees each value as one word, never as shell text. paramiko splits
    the line it is given with shlex, so the words are joined back with shlex.join.
    """
    values = {"h": d.host, "p": str(d.port), "r": d.user}

    def fill(match: re.Match) -> str:
        token = match[1]
        if token == "%":
            return "%"
        if token == "h" and _host_of_hostport(match) and ":" in d.host:
            # `ssh -W %h:%p`: 2001:db8::2:22 is ambiguous, ssh (and socat) take [2001:db8::2]:22.
            return f"[{shlex.quote(d.host)}]"
        return shlex.quote(values[token]) if token in values else match[0]

    return shlex.join(_TOKEN.sub(fill, word) for word in shlex.split(d.proxy_command))


def _host_of_hostport(match: re.Match) -> bool:
    """This %h is written `%h:%p` in its word, not already bracketed as `[%h]:%p`."""
    word, start, end = match.string, match.start(), match.end()
    return word.startswith(":%p", end) and not word[:start].endswith("[")


def _shell_quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


class Pool:
    """Runtime sessions keyed by director and key; shared by all resources in the process."""

    def __init__(self):
        self._sessions: dict[tuple, RuntimeSession] = {}
        self._lock = threading.Lock()

    def session(self, director: model.Director, private_key: str) -> RuntimeSession:
        key = (director.host, director.port, director.user, director.host_key, director.proxy_command,
               hashlib.sha256(private_key.encode()).hexdigest())  # fmt: skip
        with self._lock:
            if key not in self._sessions:
                self._sessions[key] = RuntimeSession(director, private_key)
            return self._sessions[key]

    def close(self) -> None:
        with self._lock:
            for s in self._sessions.values():
                s.close()
            self._sessions.clear()


POOL = Pool()
