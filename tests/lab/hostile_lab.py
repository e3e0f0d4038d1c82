"""Helpers of the hostile lab tests: expectations computed here, the director's own tools as oracle.

Nothing here uses the model under test: the expected `ipvsadm -Sn` is written from the test's
inputs, and what is bound, forwarded and recorded is read with `ip`, `/proc` and `cat`.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from tests.lab import ops
from tests.provider.grpc_client import ProviderServer

STATE = ops.STATE
WATCHER = Path(__file__).with_name("crash_watch.py")


def props(lab, vip: str, port: int, servers, owner: str, **over) -> dict:
    """VirtualService inputs; `servers` is [(address, weight)]."""
    return {
        "director": lab.director_config(),
        "vip": vip,
        "port": port,
        "protocol": "tcp",
        "realServers": [{"address": a, "weight": w} for a, w in servers],
        "owner": owner,
        **over,
    }


def expected_sn(*services) -> list[str]:
    """`ipvsadm -Sn` lines (sorted) for services given as (vip, port, [(address, weight)])."""
    lines = []
    for vip, port, servers in services:
        lines.append(f"-A -t {vip}:{port} -s wlc")
        lines += [f"-a -t {vip}:{port} -r {a}:{port} -g -w {w}" for a, w in servers]
    return sorted(lines)


def table(lab) -> list[str]:
    return sorted(line for line in lab.ipvsadm_sn().splitlines() if line.strip())


def bound(lab) -> list[str]:
    """Addresses on the director's interface besides its own (i.e. VIPs), sorted."""
    out = lab.director(f"ip -o -4 addr show dev {lab.interface}").stdout
    found = [line.split()[3] for line in out.splitlines()]
    return sorted(a for a in found if a != f"{lab.director_ip}/24")


def ip_forward(lab) -> str:
    return lab.director("cat /proc/sys/net/ipv4/ip_forward").stdout.strip()


def state_text(lab) -> str | None:
    proc = lab.director(f"cat {STATE}", check=False)
    return proc.stdout if proc.returncode == 0 else None


def owner_of(lab, key: str) -> str | None:
    """The owner state.json records for service `key` (e.g. tcp/203.0.113.201:80), or None."""
    text = state_text(lab)
    try:
        entry = json.loads(text or "null")["services"][key]
    except (ValueError, TypeError, KeyError):
        return None
    return entry.get("owner") if isinstance(entry, dict) else None


def recorded(lab) -> dict:
    """state.json's services: {key: entry} ({} when there is no file)."""
    try:
        return json.loads(state_text(lab) or "{}").get("services", {})
    except ValueError:
        return {"<state.json is not JSON>": {}}


def reset(lab, vips=()) -> None:
    """No IPVS service, none of `vips` bound, no state.json: where every hostile test starts."""
    ops.clear(lab, vips)


def traffic(lab, vip: str, port: int = 80, count: int = 6) -> int:
    """`count` GETs through vip:port from the client namespace; every one must reach a node."""
    url = f"http://{vip}/" if port == 80 else f"http://{vip}:{port}/"
    answers = lab.http_from_client(url, count)
    assert len(answers) == count and set(answers) <= set(lab.node_names), answers
    return count


def one_line_error(call, *args, **kw) -> str:
    """The details of the gRPC error `call` must raise: one line, no traceback."""
    with pytest.raises(grpc.RpcError) as err:
        call(*args, **kw)
    msg = err.value.details()
    assert "\n" not in msg and "Traceback" not in msg and len(msg) <= 400, msg
    return msg


def runtime_serving(lab) -> int:
    """The runtime's pid once systemd has it active and no installer runs (after an install or
    a kill -9, systemd starts it again)."""
    deadline = time.monotonic() + 60
    while ops.interpreters(lab):
        assert time.monotonic() < deadline, f"installer still running: {ops.interpreters(lab)}"
        time.sleep(0.5)
    return int(ops.wait_active(lab)["MainPID"])


@contextmanager
def provider(lab):
    """A fresh provider process (one `pulumi up`), configured with the lab key; killed after."""
    srv = ProviderServer()
    try:
        srv.configure({"ipvs-ingress:sshPrivateKey": lab.private_key_pem})
        yield srv
    finally:
        srv.close()


class Watcher:
    """crash_watch.py on the director: kills process `pid` (the runtime) after `after` kernel
    changes to vip:port."""

    def __init__(self, lab, vip: str, port: int, after: int, pid: int, seconds: float = 120):
        script = WATCHER.read_text()
        argv = lab.ssh_argv(f"python3 -u - {shlex.quote(vip)} {port} {after} {seconds} {pid}")
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.proc.stdin.write(script)
        self.proc.stdin.close()
        ready = self.proc.stdout.readline().split()
        assert ready[:1] == ["READY"], (ready, self.proc.stderr.read() if not ready else "")
        self.targets = ready[1].split(",") if len(ready) > 1 else []

    def killed(self) -> int:
        """Block until the watcher killed the runtime; the number of changes it had seen."""
        line = self.proc.stdout.readline().split()
        assert line[:1] == ["KILLED"], f"the watcher did not kill the runtime: {line}"
        return int(line[2])

    def final(self, timeout: float = 30) -> int:
        """Kernel changes made by the killed apply, read once the runtime was gone."""
        line = self.proc.stdout.readline().split()
        self.proc.wait(timeout=timeout)
        assert line[:1] == ["FINAL"], line
        return int(line[1])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self.proc.stdout.close()
        self.proc.stderr.close()
