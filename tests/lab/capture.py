"""Bounded tcpdump captures inside a lab namespace, parsed into link + IP headers."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import time
from dataclasses import dataclass, field

# `tcpdump -t -n -e` line of an IPv4 TCP/UDP packet:
# 52:54:00:a0:00:02 > 02:..:01, ethertype IPv4 (0x0800), length 74: 203.0.113.10.4711 > 203...
_LINE = re.compile(
    r"^(?P<src_mac>[0-9a-f:]{17}) > (?P<dst_mac>[0-9a-f:]{17}), ethertype IPv4 \(0x0800\), "
    r"length \d+: (?P<src>\d+\.\d+\.\d+\.\d+)(?:\.(?P<sport>\d+))? > "
    r"(?P<dst>\d+\.\d+\.\d+\.\d+)(?:\.(?P<dport>\d+))?:"
)


@dataclass(frozen=True)
class Packet:
    src_mac: str
    dst_mac: str
    src: str
    sport: int | None
    dst: str
    dport: int | None


def parse(line: str) -> Packet | None:
    m = _LINE.match(line)
    if m is None:
        return None
    port = lambda v: int(v) if v else None  # noqa: E731
    return Packet(
        m["src_mac"], m["dst_mac"], m["src"], port(m["sport"]), m["dst"], port(m["dport"])
    )


@dataclass
class Capture:
    """Filled in when the `with` block that produced it ends."""

    ns: str
    iface: str
    bpf: str
    lines: list[str] = field(default_factory=list)
    stderr: str = ""

    @property
    def packets(self) -> list[Packet]:
        return [p for p in map(parse, self.lines) if p is not None]

    def __str__(self) -> str:
        head = "\n".join(self.lines[:20])
        return f"capture on {self.ns}/{self.iface} [{self.bpf}]: {len(self.lines)} lines\n{head}"


def start(ns: str, iface: str, bpf: str, max_packets: int) -> subprocess.Popen:
    argv = [
        "ip",
        "netns",
        "exec",
        ns,
        "tcpdump",
        "-i",
        iface,
        "-t",
        "-n",
        "-e",
        "-l",
        "-c",
        str(max_packets),
        bpf,
    ]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    # Traffic sent before tcpdump attached its filter would be missed silently.
    deadline = time.monotonic() + 10
    seen = ""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], 0.2)
        if ready:
            # Raw reads: a buffered readline could swallow the line select() waits for.
            chunk = os.read(proc.stderr.fileno(), 4096).decode(errors="replace")
            seen += chunk
            if "listening on" in seen:
                return proc
            if not chunk:
                break
    proc.kill()
    proc.wait()
    raise RuntimeError(f"tcpdump did not start in {ns} on {iface}: {seen}")


def stop(proc: subprocess.Popen, cap: Capture, settle: float = 0.3) -> None:
    time.sleep(settle)  # let the last packets of the exchange reach the socket
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # tcpdump flushes what it holds on SIGINT
    try:
        out, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    cap.lines = out.splitlines()
    cap.stderr = err
