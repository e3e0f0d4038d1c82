"""The runtime's request listener (providers/api.py) on real loopback sockets."""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest

from providers import api

# /proc/net/tcp as the kernel writes it: the address is the 32-bit word in host (little-endian)
# order, so 127.0.0.1 is 0100007F; ports are big hex. 7463 = 0x1D27, 41000 = 0xA028.
PROC_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1D27 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1001 1
   1: 0100007F:A028 0100007F:1D27 01 00000000:00000000 00:00000000 00000000  1000        0 1002 1
   2: 0100007F:1D27 0100007F:A028 01 00000000:00000000 00:00000000 00000000     0        0 1003 1
   3: 0100007F:A029 0100007F:1D27 06 00000000:00000000 03:00001770 00000000     0        0 0 3
   4: 0100007F:A02A 0100007F:1D27 08 00000000:00000000 00:00000000 00000000     0        0 1004 1
"""


def test_the_uid_is_the_one_of_the_socket_with_the_peer_as_its_local_end():
    # The runtime's own accepted socket (row 2) is root's; the peer (row 1) is uid 1000.
    assert api.socket_uid(PROC_TCP, ("127.0.0.1", 41000), ("127.0.0.1", 7463)) == 1000
    assert api.socket_uid(PROC_TCP, ("127.0.0.1", 7463), ("127.0.0.1", 41000)) == 0
    assert api.socket_uid(PROC_TCP, ("127.0.0.1", 41001), ("127.0.0.1", 7463)) is None
    # A peer that closed already: TIME_WAIT (06) shows uid 0 and inode 0; CLOSE_WAIT (08): not
    # established. Neither is root's connection.
    assert api.socket_uid(PROC_TCP, ("127.0.0.1", 41001 + 1), ("127.0.0.1", 7463)) is None
    assert api.socket_uid(PROC_TCP, ("127.0.0.1", 41002 + 1), ("127.0.0.1", 7463)) is None


def test_peer_uid_of_a_real_loopback_connection_is_this_process_uid():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        conn, _ = listener.accept()
        with client, conn:
            assert api.peer_uid(conn) == os.getuid()


def as_nobody(child) -> bytes:
    """Run `child()` in a forked process as uid/gid 65534; the bytes it returns, via a pipe."""
    "127.0.0.1".encode("idna")  # the codec, imported while root can still read the library
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setgid(65534)
            os.setuid(65534)
            os.write(write, child())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    try:
        return os.read(read, 4096)
    finally:
        os.close(read)


def handler(calls: list):
    def handle(request: dict) -> dict:
        calls.append(request)
        if request["op"] == "sleep":
            time.sleep(request["seconds"])
        return {"op": request["op"]}

    return lambda: (handle, lambda: None)


@pytest.fixture
def listening():
    made = []

    def make(**kw) -> tuple[api.Api, list]:
        calls: list = []
        made.append(api.Api("v1", handler(calls), port=0, greeting={"pyroute2": "x"}, **kw))
        return made[-1], calls

    yield make
    for a in made:
        a.close(wait=0)


def _talk(port: int):
    conn = socket.create_connection(("127.0.0.1", port), timeout=5)
    return conn, conn.makefile("r"), conn.makefile("w")


def _send(w, doc: dict) -> None:
    w.write(json.dumps(doc) + "\n")
    w.flush()


def test_greets_with_its_version_and_answers_requests_of_that_version(listening):
    a, calls = listening(allowed=lambda conn: True)
    conn, r, w = _talk(a.port)
    with conn:
        greeting = json.loads(r.readline())
        assert greeting == {"ready": True, "agent": 1, "version": "v1", "pid": os.getpid(), "pyroute2": "x"}  # fmt: skip
        _send(w, {"id": 1, "op": "read", "version": "v1"})
        assert json.loads(r.readline()) == {"id": 1, "ok": True, "result": {"op": "read"}}


@pytest.mark.parametrize("version", ["v0", None])
def test_a_request_of_another_version_is_refused_unhandled(listening, version):
    a, calls = listening(allowed=lambda conn: True)
    conn, r, w = _talk(a.port)
    with conn:
        r.readline()
        _send(w, {"id": 7, "op": "apply", **({"version": version} if version else {})})
        reply = json.loads(r.readline())
    assert reply["ok"] is False and reply["code"] == "version"
    assert reply["error"].startswith("the runtime runs version v1, the request comes from ")
    assert calls == []


def test_the_default_check_serves_this_uid_only_when_it_is_root(listening):
    a, calls = listening()  # the real check: the peer socket's uid must be 0
    conn, r, w = _talk(a.port)
    with conn:
        line = r.readline()
    if os.getuid() == 0:
        assert json.loads(line)["ready"] is True
    else:
        assert line == ""  # closed without a word


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to connect as another uid")
def test_a_connection_from_another_uid_is_closed_without_a_word(listening):
    a, _ = listening()

    def connect() -> bytes:
        with socket.create_connection(("127.0.0.1", a.port), timeout=5) as conn:
            return b"heard:" + conn.makefile("rb").readline()

    assert as_nobody(connect) == b"heard:"


def test_close_lets_a_request_in_flight_finish_and_answer(listening):
    a, calls = listening(allowed=lambda conn: True)
    conn, r, w = _talk(a.port)
    with conn:
        r.readline()
        _send(w, {"id": 1, "op": "sleep", "seconds": 0.6, "version": "v1"})
        time.sleep(0.2)  # it is running
        started = time.monotonic()
        assert a.close(wait=5) is True
        assert 0.2 < time.monotonic() - started < 2  # waited for it, not for the bound
        lines = [json.loads(r.readline()) for _ in range(1)]
        assert lines[-1] == {"id": 1, "ok": True, "result": {"op": "sleep"}}
        # A request after the close is never handled: the connection ends with the process,
        # and the provider sends it again to the runtime that comes up next.
        _send(w, {"id": 2, "op": "apply", "version": "v1"})
        conn.settimeout(0.5)
        with pytest.raises(TimeoutError):
            r.readline()
    assert [c["op"] for c in calls] == ["sleep"]
    with pytest.raises(OSError):  # no longer listening
        socket.create_connection(("127.0.0.1", a.port), timeout=1).close()


def test_connections_are_served_in_parallel(listening):
    a, calls = listening(allowed=lambda conn: True)
    results: list = []

    def one(i: int) -> None:
        conn, r, w = _talk(a.port)
        with conn:
            r.readline()
            _send(w, {"id": i, "op": "sleep", "seconds": 0.5, "version": "v1"})
            results.append(json.loads(r.readline())["ok"])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == [True] * 4
    assert time.monotonic() - started < 1.5  # not 4 x 0.5 s one after the other


def test_idle_seconds_say_how_long_since_a_request_ran(listening):
    a, _ = listening(allowed=lambda conn: True)
    assert a.idle_seconds() == float("inf")  # none yet: a new runtime is quiet
    conn, r, w = _talk(a.port)
    with conn:
        r.readline()
        _send(w, {"id": 1, "op": "sleep", "seconds": 0.5, "version": "v1"})
        time.sleep(0.2)
        assert a.idle_seconds() == 0.0  # one is running
        r.readline()
        time.sleep(0.1)
        assert 0.05 < a.idle_seconds() < 1.0


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to connect as another uid")
def test_another_uid_that_sends_and_closes_at_once_gets_nothing_handled(listening):
    """The reviewer's attack: connect, send a request, close before the lookup (the closed
    socket shows as uid 0 in /proc/net/tcp). Bounded: 3 s of tries."""
    a, calls = listening()

    def attack() -> bytes:
        sent = 0
        line = json.dumps({"id": 1, "op": "apply", "version": "v1"}).encode() + b"\n"
        until = time.monotonic() + 3
        while time.monotonic() < until:
            sock = socket.socket()
            try:
                sock.connect(("127.0.0.1", a.port))
                sock.sendall(line)
                sent += 1
            except OSError:
                pass
            finally:
                sock.close()
        return str(sent).encode()

    sent = int(as_nobody(attack) or b"0")
    time.sleep(0.5)
    assert sent >= 20  # the attack ran
    assert calls == []


def test_a_connection_closed_for_silence_ends_for_the_provider_too(listening, monkeypatch):
    from providers import agent

    monkeypatch.setattr(agent, "IDLE_EXIT_SECONDS", 0.5)
    a, _ = listening(allowed=lambda conn: True)
    conn, r, w = _talk(a.port)
    with conn:
        r.readline()
        conn.settimeout(5)
        started = time.monotonic()
        assert r.readline() == ""  # end of file, not a wait until sshd gives up
        assert time.monotonic() - started < 3


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to open as another uid")
def test_the_director_lock_is_root_only(tmp_path):
    from providers import ownership

    path = tmp_path / "run" / "lock"
    path.parent.mkdir()
    path.write_text("")
    path.chmod(0o644)  # left readable by an older version
    os.chmod(tmp_path, 0o755)
    with ownership.director_lock(str(path), wait=1):
        pass
    assert path.stat().st_mode & 0o777 == 0o600

    def open_it() -> bytes:
        try:
            os.open(str(path), os.O_RDONLY)
            return b"opened"
        except PermissionError:
            return b"refused"

    assert as_nobody(open_it) == b"refused"
