"""Transport failure modes that need no director: timeouts and bad keys give one clear line."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time

import pytest

from providers import model, transport
from tests.provider.sshd import FakeSSHD

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
    session = transport.AgentSession(director, private_key)
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
    session = transport.AgentSession(
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


def test_agent_that_cannot_start_says_why_once(sshd, private_key):
    def no_python(channel, command):
        channel.recv(65536)
        channel.send_stderr(b"sh: 1: exec: python3: not found\n")
        channel.send_exit_status(127)
        channel.close()

    session = transport.AgentSession(sshd(no_python), private_key)
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
        transport.AgentSession(sshd(chatty), private_key).request("hello")


def test_a_proxy_command_that_cannot_start_is_one_line(private_key):
    director = model.Director(
        host="203.0.113.2", host_key=HOST_KEY, proxy_command="no-such-proxy-binary %h %p"
    )
    with pytest.raises(transport.DirectorError) as err:
        transport.AgentSession(director, private_key).request("hello")
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
        transport.AgentSession(director, private_key).request("hello")
    msg = str(err.value)
    assert msg.startswith(f"director.proxyCommand {proxy[:10]!r}"[:-1])
    assert msg.endswith("fix the command") and "\n" not in msg and len(msg) < 200, len(msg)


def test_the_agent_is_started_once_and_reused(sshd, private_key):
    starts = []

    def echo_agent(channel, command):
        starts.append(command)
        reader = channel.makefile("rb")
        reader.readline()  # the agent's sources
        channel.sendall(b'{"ready": true, "pyroute2": "0.9.7"}\n')
        for line in reader:
            rid = json.loads(line)["id"]
            channel.sendall(
                json.dumps({"id": rid, "ok": True, "result": {"n": rid}}).encode() + b"\n"
            )

    session = transport.AgentSession(sshd(echo_agent), private_key)
    assert [session.request("hello")["n"] for _ in range(3)] == [1, 2, 3]
    assert len(starts) == 1 and starts[0].startswith("exec python3 -u -c ")
    assert (session.handshakes, session.agent_starts) == (1, 1)
    session.close()


HOSTILE_HOST = "fe80::1%x;touch${{IFS}}{marker};true"  # item 11: shell text in an IPv6 scope id


def _run_proxy(director: model.Director, private_key: str) -> None:
    # The proxy command runs, prints nothing SSH can use and exits: the connection fails.
    with pytest.raises(transport.DirectorError, match="is unreachable"):
        transport.AgentSession(director, private_key).request("hello")


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
