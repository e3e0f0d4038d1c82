"""The director's side of the line protocol (providers.agent.serve, which the runtime runs per
connection), as a local process on stdin/stdout.

The loop ends soon after the provider falls silent (no request, no ping), but never in the
middle of a request, which heartbeats while it runs. An unexpected error in one request is
answered and the loop keeps serving. The installer heartbeats while it works.
"""

from __future__ import annotations

import io
import json
import queue
import subprocess
import sys
import threading
import time

from providers import agent, install
from tests.provider.grpc_client import REPO

HEARTBEAT, IDLE = 0.25, 1.5  # the shipped 5 s / 30 s, scaled down 20x

# The loop with its timing scaled down.
_PROGRAM = """
import sys, time
from providers import agent
agent.HEARTBEAT_SECONDS, agent.IDLE_EXIT_SECONDS = float(sys.argv[1]), float(sys.argv[2])
def handle(request):
    if request["op"] == "sleep":
        time.sleep(request["seconds"])
    return {"pong": request["op"]}
print('{"ready": true}', flush=True)
sys.exit(agent.serve(handle))
"""


class AgentProcess:
    def __init__(self, mode: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-u", "-c", _PROGRAM, str(HEARTBEAT), str(IDLE), mode],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[tuple[float, dict]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put((time.monotonic(), json.loads(line)))

    def send(self, doc: dict) -> float:
        self.proc.stdin.write(json.dumps(doc) + "\n")
        self.proc.stdin.flush()
        return time.monotonic()

    def next(self, timeout: float = 30) -> tuple[float, dict]:
        return self.lines.get(timeout=timeout)

    def exited_at(self, timeout: float) -> float:
        self.proc.wait(timeout=timeout)
        return time.monotonic()

    def close(self) -> str:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self.proc.stdin.close()
        err = self.proc.stderr.read()
        self.proc.stdout.close()
        self.proc.stderr.close()
        return err


def test_the_loop_ends_when_the_provider_falls_silent():
    # stdin stays open, as a TCP connection does when the network drops: only silence tells.
    a = AgentProcess("stub")
    try:
        _, greeting = a.next()
        assert greeting["ready"] is True, greeting
        last = a.send({"id": 1, "op": "hello"})
        _, reply = a.next()
        assert reply == {"id": 1, "ok": True, "result": {"pong": "hello"}}
        quiet = a.exited_at(timeout=IDLE + 10) - last
    finally:
        stderr = a.close()
    assert a.proc.returncode == 0, stderr
    assert "no word from the provider for 1.5 s: exiting" in stderr
    assert IDLE <= quiet <= IDLE + 5, quiet  # slack: interpreter exit on a loaded machine


def test_pings_keep_the_agent_and_it_exits_once_they_stop():
    a = AgentProcess("stub")
    try:
        a.next()
        until = time.monotonic() + 3 * IDLE
        while time.monotonic() < until:
            last = a.send({"op": "ping"})
            time.sleep(HEARTBEAT)
        assert a.proc.poll() is None  # 3x the idle bound, kept by pings alone
        assert a.lines.empty()  # pings get no reply
        assert a.exited_at(timeout=IDLE + 10) - last <= IDLE + 5
    finally:
        a.close()


def test_a_request_longer_than_the_idle_bound_heartbeats_and_finishes():
    a = AgentProcess("stub")
    try:
        a.next()
        sent = a.send({"id": 7, "op": "sleep", "seconds": 2 * IDLE})  # and no pings at all
        beats = []
        while True:
            at, line = a.next()
            if not line.get("working"):
                break
            assert line == {"id": 7, "working": True}
            beats.append(at)
        assert line == {"id": 7, "ok": True, "result": {"pong": "sleep"}}
        assert at - sent >= 2 * IDLE  # not cut by the idle bound
        assert len(beats) >= 2 * IDLE / HEARTBEAT - 3
        gaps = [b - a for a, b in zip([sent, *beats], [*beats, at], strict=True)]
        assert max(gaps) <= 4 * HEARTBEAT  # never silent long enough to look dead
        # Silent since the request came in: it exits right after answering.
        assert a.exited_at(timeout=10) - at <= 3.0
    finally:
        a.close()


def test_an_unexpected_error_is_answered_and_the_agent_keeps_serving():
    def handle(request: dict) -> dict:
        if request["op"] == "boom":
            raise KeyError("protocol")
        return {"pong": request["op"]}

    stdin = io.StringIO(
        '{"id": 1, "op": "boom"}\nnot json\n[1, 2]\n{"op": "ping"}\n\n{"id": 2, "op": "hello"}\n'
    )
    out = io.StringIO()
    assert agent.serve(handle, stdin=stdin, out=out) == 0  # stdin ended: the session closed
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert lines == [
        {"id": 1, "ok": False, "code": "internal", "error": "KeyError: 'protocol'"},
        {
            "id": None,
            "ok": False,
            "code": "bad-request",
            "error": "unreadable request (Expecting value: line 1 column 1 (char 0))",
        },
        {
            "id": None,
            "ok": False,
            "code": "bad-request",
            "error": "unreadable request (not a JSON object)",
        },
        {"id": 2, "ok": True, "result": {"pong": "hello"}},
    ]


def test_the_installer_heartbeats_while_it_works(monkeypatch):
    def slow_install(sources, director):
        time.sleep(4 * HEARTBEAT)  # pyroute2 checked, files written, systemctl restart waits
        return {"installed": "v", "restarted": True, "previous": None}

    monkeypatch.setattr(agent, "HEARTBEAT_SECONDS", HEARTBEAT)
    monkeypatch.setattr(install, "install", slow_install)
    out = io.StringIO()
    assert install.main([("providers", "")], out=out, director_factory=lambda: None) == 0
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert len(lines) >= 3 and lines[-1] == {"ready": True, "installed": "v", "restarted": True, "previous": None}  # fmt: skip
    assert lines[:-1] == [{"id": None, "working": True}] * (len(lines) - 1)
