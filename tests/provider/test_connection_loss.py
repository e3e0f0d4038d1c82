"""A silently dropped connection is detected in tens of seconds, and named; the runtime closes
a connection soon after its session dies; a long apply is never cut.

A real SSH session (paramiko server on loopback) reaches the runtime's real listener and line
loop (providers.api.Api, providers.agent.serve) behind a TCP relay that can start dropping
everything silently.
"""

from __future__ import annotations

import subprocess
import threading
import time

import pytest

from providers import agent, model, transport
from tests.provider.sshd import FakeSSHD, Relay, fake_runtime


@pytest.fixture
def private_key(tmp_path) -> str:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")], check=True
    )
    return (tmp_path / "k").read_text()


def handle(request: dict) -> dict:
    """Stands in for the kernel-backed Agent: an op that takes as long as it is asked to."""
    if request["op"] == "sleep":
        time.sleep(request["seconds"])
        return {"slept": request["seconds"]}
    return {"pong": request["op"]}


class Director:
    """sshd + runtime behind a relay; `exited` is set when a connection's loop returns."""

    def __init__(self, private_key: str):
        self.exited = threading.Event()
        self.runtime = fake_runtime(handle, self.exited)
        self.sshd = FakeSSHD(
            transport.load_private_key(private_key), _no_exec, runtime_port=self.runtime.port
        )
        self.relay = Relay(self.sshd.port)
        self.model = model.Director(
            host="127.0.0.1", port=self.relay.port, host_key=self.sshd.host_key_line
        )
        self.session = transport.RuntimeSession(self.model, private_key)

    def close(self) -> None:
        self.session.close()
        self.relay.close()
        self.sshd.close()
        self.runtime.close(wait=0)


def _no_exec(channel, command):
    raise AssertionError(f"a process was started on the director: {command[:40]}")


@pytest.fixture
def director(private_key):
    made = []

    def make() -> Director:
        made.append(Director(private_key))
        return made[-1]

    yield make
    for d in made:
        d.close()


def test_the_shipped_bounds_fit_together():
    # The runtime answers faster than the provider gives up, and hears pings faster than it quits.
    assert agent.HEARTBEAT_SECONDS * 3 <= transport.SILENCE_SECONDS <= 30
    assert transport.PING_SECONDS * 3 <= agent.IDLE_EXIT_SECONDS <= 60


def test_a_dropped_connection_is_named_within_the_shipped_bound(director):
    """With the shipped numbers: 20 s of silence during a request, 30 s for the agent."""
    d = director()
    assert d.session.request("hello") == {"pong": "hello"}
    d.relay.blackhole()
    dropped = time.monotonic()
    with pytest.raises(transport.DirectorError) as err:
        d.session.request("apply")
    detected = time.monotonic() - dropped
    assert transport.SILENCE_SECONDS - 1 <= detected <= transport.SILENCE_SECONDS + 5
    msg = str(err.value)
    assert msg.startswith(f"lost the connection to director root@127.0.0.1:{d.relay.port}: ")
    assert "\n" not in msg and "load and python3" not in msg
    # The runtime on the other side heard nothing since the drop: it closes on its own.
    assert d.exited.wait(agent.IDLE_EXIT_SECONDS + 5 - (time.monotonic() - dropped))
    print(f"\nconnection loss detected after {detected:.1f} s")


@pytest.fixture
def fast(monkeypatch):
    """The same protocol with the numbers scaled down 20x."""
    monkeypatch.setattr(transport, "SILENCE_SECONDS", 1.0)
    monkeypatch.setattr(transport, "PING_SECONDS", 0.25)
    monkeypatch.setattr(agent, "HEARTBEAT_SECONDS", 0.25)
    monkeypatch.setattr(agent, "IDLE_EXIT_SECONDS", 1.5)


def test_a_request_longer_than_the_silence_bound_is_not_cut(fast, director):
    d = director()
    assert d.session.request("sleep", seconds=3.0) == {"slept": 3.0}  # 3x the silence bound
    # Pings during the request kept the connection: the same one answers the next request.
    time.sleep(0.5)
    assert d.session.request("hello") == {"pong": "hello"}
    assert (d.session.handshakes, d.session.attaches, d.session.installs) == (1, 1, 0)
    assert not d.exited.is_set()


def test_idle_sessions_are_kept_alive_by_pings(fast, director):
    d = director()
    d.session.request("hello")
    time.sleep(3 * agent.IDLE_EXIT_SECONDS)
    assert not d.exited.is_set()
    assert d.session.request("hello") == {"pong": "hello"} and d.session.attaches == 1


def test_two_hundred_requests_at_once_are_not_cut(fast, director):
    # As the engine applies 200 services in parallel: they queue on one session for ~4 s,
    # four times the silence bound, and each answer comes back.
    d = director()
    answers: list[dict] = []
    errors: list[Exception] = []

    def apply(i: int) -> None:
        try:
            answers.append(d.session.request("sleep", seconds=0.02))
        except Exception as err:
            errors.append(err)

    threads = [threading.Thread(target=apply, args=(i,)) for i in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == [] and len(answers) == 200
    assert (d.session.handshakes, d.session.attaches, d.session.installs) == (1, 1, 0)


def test_a_drop_during_a_long_request(fast, director):
    d = director()
    d.session.request("hello")
    failed: list[tuple[float, str]] = []

    def apply() -> None:
        try:
            d.session.request("sleep", seconds=2.5)
        except transport.DirectorError as err:
            failed.append((time.monotonic(), str(err)))

    worker = threading.Thread(target=apply)
    worker.start()
    time.sleep(0.5)  # the agent is inside the request, heartbeating
    d.relay.blackhole()
    dropped = time.monotonic()
    worker.join(timeout=10)
    assert failed and failed[0][1].startswith("lost the connection to director ")
    assert failed[0][0] - dropped <= transport.SILENCE_SECONDS + 3
    # The runtime finishes the running request first (2 s more), then closes: silent since.
    assert d.exited.wait(5)
    assert time.monotonic() - dropped >= 1.5


def test_a_drop_while_the_runtime_installs_is_named_within_the_silence_bound(
    fast, monkeypatch, private_key
):
    # No runtime listens; the installer began (its first heartbeat came), then nothing more.
    monkeypatch.setattr(transport, "INSTALL_START_TIMEOUT", 60.0)

    def starts_then_silent(channel, command):
        channel.makefile("r").readline()
        channel.sendall(b'{"id":null,"working":true}\n')

    sshd = FakeSSHD(transport.load_private_key(private_key), starts_then_silent)
    try:
        director = model.Director(host="127.0.0.1", port=sshd.port, host_key=sshd.host_key_line)
        started = time.monotonic()
        with pytest.raises(transport.DirectorError) as err:
            transport.RuntimeSession(director, private_key).request("hello")
        assert time.monotonic() - started < transport.SILENCE_SECONDS + 3  # not the 60 s
        assert str(err.value).startswith(
            f"lost the connection to director root@127.0.0.1:{sshd.port}: "
        )
        assert "while installing the runtime" in str(err.value)
    finally:
        sshd.close()
