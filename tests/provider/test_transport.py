"""Transport failure modes that need no director: timeouts and bad keys give one clear line."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time

import pytest

from providers import api, model, transport
from tests.provider.sshd import FakeSSHD, fake_runtime, installer_exec

HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMUmmSK6gtVhUmYnKSwP+B/ZoYbs1FkFCtqNm4AxvOq"


@pytest.fixture
def private_key(tmp_path) -> str:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")], check=True
    )
    return (tmp_path / "k").read_text()


@pytest.fixture
def silent_server():
    """Accepts TCP on loopback and never says a word: an sshd that hangs."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    accepted = []
    threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True).start()
    yield listener.getsockname()[1]
    for conn, _ in accepted:
        conn.close()
    listener.close()


def test_a_director_that_never_answers_times_out_with_one_line(
    silent_server, private_key, monkeypatch
):
    monkeypatch.setattr(transport, "CONNECT_TIMEOUT", 1.0)
    director = model.Director(host="127.0.0.1", port=silent_server, host_key=HOST_KEY)
    session = transport.RuntimeSession(director, private_key)
    started = time.monotonic()
    with pytest.raises(transport.DirectorError) as err:
        session.request("hello")
    assert time.monotonic() - started < 10  # bounded by the 1 s timeouts, not the OS default
    msg = str(err.value)
    assert (
        msg.startswith(f"director 127.0.0.1:{silent_server} is unreachable (") and "\n" not in msg
    )
    assert msg.endswith("check director.host, director.port, and that sshd runs there")


def test_nothing_listening_is_unreachable(private_key):
    with socket.socket() as probe:  # a free port: bound, then released
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    session = transport.RuntimeSession(
        model.Director(host="127.0.0.1", port=port, host_key=HOST_KEY), private_key
    )
    with pytest.raises(
        transport.DirectorError, match=r"^director 127\.0\.0\.1:\d+ is unreachable \("
    ):
        session.request("hello")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not a key",
        "-----BEGIN OPENSSH PRIVATE KEY-----\ngarbage\n-----END OPENSSH PRIVATE KEY-----\n",
    ],
)
def test_unreadable_private_keys_say_how_to_set_one(text):
    with pytest.raises(transport.DirectorError) as err:
        transport.load_private_key(text)
    assert str(err.value).startswith("ipvs-ingress:sshPrivateKey ")
    assert "pulumi config set --secret sshPrivateKey <" in str(err.value)


def test_passphrase_protected_keys_are_refused(tmp_path):
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "pw", "-f", str(tmp_path / "k")], check=True
    )
    with pytest.raises(transport.DirectorError, match="unencrypted"):
        transport.load_private_key((tmp_path / "k").read_text())


def test_fingerprint_matches_ssh_keygen(tmp_path):
    (tmp_path / "k.pub").write_text(HOST_KEY + "\n")
    expected = subprocess.run(
        ["ssh-keygen", "-l", "-f", str(tmp_path / "k.pub")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()[1]
    _, blob = model.parse_host_key(HOST_KEY)
    assert transport.host_key_fingerprint(blob) == expected


@pytest.fixture
def sshd(private_key):
    servers = []

    def start(on_exec):
        server = FakeSSHD(transport.load_private_key(private_key), on_exec)
        servers.append(server)
        return model.Director(host="127.0.0.1", port=server.port, host_key=server.host_key_line)

    yield start
    for server in servers:
        server.close()


@pytest.mark.parametrize("reads", [0, 65536], ids=["exits-at-once", "exits-mid-sources"])
def test_an_installer_that_cannot_start_says_why_once(sshd, private_key, reads):
    # The shell fails before (or while) the sources arrive: the send may fail, the reason stands.
    def no_python(channel, command):
        if reads:
            channel.recv(reads)
        channel.send_stderr(b"sh: 1: exec: python3: not found\n")
        channel.send_exit_status(127)
        channel.close()

    session = transport.RuntimeSession(sshd(no_python), private_key)
    with pytest.raises(transport.DirectorError) as err:
        session.request("apply")
    msg = str(err.value)
    assert "python3: not found" in msg and msg.endswith(
        "check that python3 runs for root on the director"
    )
    assert session.handshakes == 1  # no second connection just to fail the same way


def test_login_script_noise_is_named(sshd, private_key):
    def chatty(channel, command):
        channel.send(b"Welcome to the director!\n")

    with pytest.raises(
        transport.DirectorError, match=r"printed b'Welcome to the director!\\n' instead of"
    ):
        transport.RuntimeSession(sshd(chatty), private_key).request("hello")


def test_a_proxy_command_that_cannot_start_is_one_line(private_key):
    director = model.Director(
        host="203.0.113.2", host_key=HOST_KEY, proxy_command="no-such-proxy-binary %h %p"
    )
    with pytest.raises(transport.DirectorError) as err:
        transport.RuntimeSession(director, private_key).request("hello")
    assert str(err.value).startswith(
        "director.proxyCommand 'no-such-proxy-binary %h %p' cannot start ("
    )
    assert str(err.value).endswith("fix the command")


@pytest.mark.parametrize(
    "proxy",
    ["ssh '" + "x" * 100_000, "n" * 100_000 + " %h %p"],  # unsplittable; a missing program
    ids=["unbalanced-quote", "long-program-name"],
)
def test_a_proxy_command_failure_echoes_a_bounded_value(private_key, proxy):
    # State written before check split proxyCommand can still hold such a value.
    director = model.Director(host="203.0.113.2", host_key=HOST_KEY, proxy_command=proxy)
    with pytest.raises(transport.DirectorError) as err:
        transport.RuntimeSession(director, private_key).request("hello")
    msg = str(err.value)
    assert msg.startswith(f"director.proxyCommand {proxy[:10]!r}"[:-1])
    assert msg.endswith("fix the command") and "\n" not in msg and len(msg) < 200, len(msg)


def _echo(request: dict) -> dict:
    return {"op": request["op"], "version": request.get("version")}


@pytest.fixture
def director_with(private_key):
    """An sshd whose runtime listener may be absent or of another version, and an installer
    (the exec path) that points it at a runtime of the provider's version."""
    made = []

    def make(runtime_version: str | None, installs_version: str | None = None):
        current = fake_runtime(_echo, version=installs_version or transport.VERSION)
        old = fake_runtime(_echo, version=runtime_version) if runtime_version else None
        ref, installed = [None], []
        sshd = FakeSSHD(
            transport.load_private_key(private_key),
            installer_exec(ref, current, installed),
            runtime_port=old.port if old else None,
        )
        ref[0] = sshd
        made.extend([sshd, current] + ([old] if old else []))
        d = model.Director(host="127.0.0.1", port=sshd.port, host_key=sshd.host_key_line)
        return d, sshd, installed

    yield make
    for thing in made:
        thing.close(**({"wait": 0} if hasattr(thing, "version") else {}))


def test_the_runtime_is_installed_once_then_every_run_only_attaches(director_with, private_key):
    director, sshd, installed = director_with(None)
    first = transport.RuntimeSession(director, private_key)
    assert [first.request("read")["op"] for _ in range(3)] == ["read"] * 3
    assert (first.handshakes, first.installs, first.attaches) == (1, 1, 1)
    assert sshd.execs == 1 and len(installed) == 1
    # The installer got every director source, the same the version is computed from.
    assert set(installed[0]) == {"providers"} | {f"providers.{m}" for m in ("model", "health", "ownership", "agent", "probing", "probe_services", "api", "runtime", "install", "keepalived", "vrrp")}  # fmt: skip
    first.close()
    for _ in range(2):  # two later `pulumi` runs: a handshake and a channel, no process
        later = transport.RuntimeSession(director, private_key)
        assert later.request("read") == {"op": "read", "version": transport.VERSION}
        assert (later.handshakes, later.installs, later.attaches) == (1, 0, 1)
        later.close()
    assert sshd.execs == 1


def test_a_runtime_of_another_version_is_upgraded_before_any_request(director_with, private_key):
    director, sshd, installed = director_with("0123456789abcdef")
    session = transport.RuntimeSession(director, private_key)
    assert session.request("apply")["version"] == transport.VERSION
    assert (session.installs, session.attaches, sshd.execs) == (1, 1, 1)
    session.close()


def test_a_runtime_that_keeps_another_version_after_the_install_never_gets_a_request(
    director_with, private_key
):
    director, sshd, _ = director_with("0123456789abcdef", installs_version="fedcba9876543210")
    session = transport.RuntimeSession(director, private_key)
    with pytest.raises(transport.DirectorError) as err:
        session.request("apply")
    msg = str(err.value)
    assert msg == (
        f"director 127.0.0.1: installed runtime {transport.VERSION} but runtime fedcba9876543210 "
        "answers: see 'journalctl -u ipvs-ingress.service' on the director"
    )
    assert session.installs == 1 and session.attaches == 0  # one try, no request sent


def test_sshd_that_forbids_forwarding_is_one_line_with_the_fix(director_with, private_key):
    director, sshd, _ = director_with(None)
    sshd.forwarding_prohibited = True
    with pytest.raises(transport.DirectorError) as err:
        transport.RuntimeSession(director, private_key).request("read")
    msg = str(err.value)
    assert msg.startswith(
        "director 127.0.0.1: sshd refused a channel to the runtime at 127.0.0.1:747"
    )
    assert "AllowTcpForwarding local" in msg and "\n" not in msg
    assert sshd.execs == 0  # nothing was installed through a path that cannot be used after


def test_a_director_without_systemd_is_one_line_with_the_fix(sshd, private_key):
    def busybox_installer(channel, command):
        channel.makefile("r").readline()
        reply = {"ready": False, "code": "no-systemd", "error": "the director runs no systemd (PID 1 is init): the runtime is a systemd service"}  # fmt: skip
        channel.sendall((json.dumps(reply) + "\n").encode())
        channel.close()

    with pytest.raises(transport.DirectorError) as err:
        transport.RuntimeSession(sshd(busybox_installer), private_key).request("read")
    assert str(err.value) == (
        "director 127.0.0.1: the director runs no systemd (PID 1 is init): the runtime is a "
        "systemd service: run the director on a systemd distribution (Debian's default init) "
        "so that the runtime can keep the table"
    )


def test_a_runtime_that_refuses_the_user_says_to_log_in_as_root(private_key):
    silent = api.Api(transport.VERSION, lambda: (_echo, lambda: None), port=0,
                     allowed=lambda conn: False)  # fmt: skip
    server = FakeSSHD(transport.load_private_key(private_key), None, runtime_port=silent.port)
    try:
        director = model.Director(
            host="127.0.0.1", port=server.port, user="deploy", host_key=server.host_key_line
        )
        with pytest.raises(transport.DirectorError) as err:
            transport.RuntimeSession(director, private_key).request("read")
        assert str(err.value) == (
            "director 127.0.0.1: the runtime closed the channel without a greeting: it answers "
            "root only, so set director.user to root (it is deploy)"
        )
    finally:
        server.close()
        silent.close(wait=0)


HOSTILE_HOST = "fe80::1%x;touch${{IFS}}{marker};true"  # item 11: shell text in an IPv6 scope id


def _run_proxy(director: model.Director, private_key: str) -> None:
    # The proxy command runs, prints nothing SSH can use and exits: the connection fails.
    with pytest.raises(transport.DirectorError, match="is unreachable"):
        transport.RuntimeSession(director, private_key).request("hello")


def test_proxy_command_values_cannot_run_a_command_in_a_shell_script(tmp_path, private_key):
    marker, out = tmp_path / "marker", tmp_path / "out"
    host = HOSTILE_HOST.format(marker=marker)
    director = model.Director(
        host=host, host_key=HOST_KEY, proxy_command=f"sh -c 'echo %h > {out}'"
    )
    _run_proxy(director, private_key)
    assert not marker.exists()
    assert out.read_text() == host + "\n"  # the value arrived whole, as one word


def test_proxy_command_values_cannot_run_a_command_on_a_bastion(tmp_path, private_key):
    # Like `ssh root@bastion nc %h %p`: ssh joins its arguments and the bastion's shell runs them.
    fake_ssh = tmp_path / "ssh"
    fake_ssh.write_text('#!/bin/sh\nshift\nexec sh -c "$*"\n')
    fake_ssh.chmod(0o755)
    marker, out = tmp_path / "marker", tmp_path / "out"
    host = HOSTILE_HOST.format(marker=marker)
    director = model.Director(
        host=host, port=2222, host_key=HOST_KEY,
        proxy_command=f"{fake_ssh} root@bastion echo %h %p > {out}",
    )  # fmt: skip
    _run_proxy(director, private_key)
    assert not marker.exists()
    assert out.read_text() == f"{host} 2222\n"


def test_proxy_command_fills_in_host_port_user_and_percent(tmp_path, private_key):
    out = tmp_path / "out"
    director = model.Director(
        host="2001:db8::2", port=2222, user="admin", host_key=HOST_KEY,
        proxy_command=f"sh -c 'echo %h %p %r 100%% %x > {out}'",
    )  # fmt: skip
    _run_proxy(director, private_key)
    assert out.read_text() == "2001:db8::2 2222 admin 100% %x\n"


def test_a_proxy_command_that_closes_its_output_fails_at_once(private_key):
    # Not after CONNECT_TIMEOUT of reading a closed pipe (paramiko's own ProxyCommand spins).
    director = model.Director(
        host="203.0.113.2", host_key=HOST_KEY, proxy_command="sh -c 'exec >&-; sleep 2'"
    )
    started = time.monotonic()
    _run_proxy(director, private_key)
    assert time.monotonic() - started < transport.CONNECT_TIMEOUT / 3


@pytest.mark.parametrize(
    ("host", "command", "argv"),
    [
        ("2001:db8::2", "-W %h:%p bastion", ["-W", "[2001:db8::2]:2222", "bastion"]),
        ("2001:db8::2", "-W [%h]:%p bastion", ["-W", "[2001:db8::2]:2222", "bastion"]),
        ("2001:db8::2", "bastion nc %h %p", ["bastion", "nc", "2001:db8::2", "2222"]),
        ("2001:db8::2", "bastion socat - TCP:%h:%p", ["bastion", "socat", "-", "TCP:[2001:db8::2]:2222"]),
        ("2001:db8::2", "-W %h:%%p %h:%r", ["-W", "2001:db8::2:%p", "2001:db8::2:admin"]),
        ("203.0.113.2", "-W %h:%p bastion", ["-W", "203.0.113.2:2222", "bastion"]),
        ("director.example.net", "-W %h:%p bastion", ["-W", "director.example.net:2222", "bastion"]),
    ],
)  # fmt: skip
def test_an_ipv6_host_in_host_colon_port_is_bracketed(tmp_path, private_key, host, command, argv):
    # The arguments as the proxy program receives them (no shell): what `ssh -W` would parse.
    fake_ssh, out = tmp_path / "ssh", tmp_path / "argv"
    fake_ssh.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {out}\n")
    fake_ssh.chmod(0o755)
    director = model.Director(
        host=host, port=2222, user="admin", host_key=HOST_KEY, proxy_command=f"{fake_ssh} {command}"
    )
    _run_proxy(director, private_key)
    assert out.read_text().splitlines() == argv


@pytest.mark.parametrize("runtime_version", [None, "0123456789abcdef"])
def test_a_dry_run_session_installs_nothing_and_says_why(
    director_with, private_key, runtime_version
):
    director, sshd, installed = director_with(runtime_version)
    session = transport.RuntimeSession(director, private_key, install=False)
    with pytest.raises(transport.DirectorError) as err:
        session.request("plan")
    found = "no runtime" if runtime_version is None else f"runtime {runtime_version}"
    assert str(err.value) == (
        f"director 127.0.0.1 runs {found}, this ipvs-ingress needs runtime {transport.VERSION} "
        "and a dry run installs nothing: run pulumi up (it installs it), or plan with the "
        "ipvs-ingress version that applied the stack"
    )
    assert sshd.execs == 0 and installed == []


def test_an_answer_out_of_turn_is_refused(private_key):
    """A runtime that answers with another request's id: the session does not take it."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            r, w = conn.makefile("r"), conn.makefile("w")
            w.write(json.dumps({"ready": True, "version": transport.VERSION, "pid": 1}) + "\n")
            w.flush()
            for line in r:
                request = json.loads(line)
                if request.get("op") != "ping":
                    w.write(json.dumps({"id": request["id"] + 1, "ok": True, "result": {}}) + "\n")  # fmt: skip
                    w.flush()

    threading.Thread(target=serve, daemon=True).start()
    server = FakeSSHD(
        transport.load_private_key(private_key), None, runtime_port=listener.getsockname()[1]
    )
    try:
        director = model.Director(host="127.0.0.1", port=server.port, host_key=server.host_key_line)
        with pytest.raises(transport.DirectorError, match="answered out of turn: retry$"):
            transport.RuntimeSession(director, private_key).request("read")
    finally:
        server.close()
        listener.close()


def test_runtime_installs_on_two_directors_never_overlap(private_key):
    """An install restarts the director's runtime, and keepalived there gives up its VIPs while
    no runtime process runs (vrrp_track_process): two directors of one stack restarted at once
    (Pulumi applies their resources in parallel) would leave each VIP on neither. The provider
    installs on one director at a time."""
    inside, most, count = [0], [0], threading.Lock()

    class Channel:
        def settimeout(self, _seconds):
            pass

    class Session(transport.RuntimeSession):
        installed = False

        def _open_runtime(self):
            if not self.installed:
                return None
            self._channel = Channel()
            return {"ready": True, "version": transport.VERSION, "pid": 1}

        def _drop_channel(self):
            pass

        def _install(self):  # the install's time on the director: the restart happens in it
            with count:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            time.sleep(0.3)
            with count:
                inside[0] -= 1
            self.installed = True

    sessions = [
        Session(model.Director(host=f"192.0.2.{n}", host_key=HOST_KEY), private_key) for n in (2, 3)
    ]
    start = threading.Barrier(len(sessions), timeout=10)

    def attach(session):
        start.wait()
        session._attach()
        session._stop_pings.set()

    threads = [threading.Thread(target=attach, args=(s,)) for s in sessions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert all(s.installed and s.attaches == 1 for s in sessions)
    assert most[0] == 1
