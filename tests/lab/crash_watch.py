"""Runs ON the director (stdlib only, sent over ssh as `python3 -u - VIP PORT AFTER SECONDS PID`).

Kills process PID (the ipvs-ingress runtime that serves the provider's apply) with SIGKILL as
soon as the kernel shows that it made at least AFTER changes to the IPVS service VIP:PORT
(service added or removed = 1, each destination added, removed or changed = 1), counted against
the table when this script started. The kernel's own table (/proc/net/ip_vs) is the trigger, not
the runtime's word, so the kill lands between two kernel changes of a running apply.

Prints `READY <pid>` once it watches, then `KILLED <pid> <changes seen>` at once (so the caller
can kill the provider too) and `FINAL <changes after the kill>`, or `TIMEOUT <changes>`. Only
PID is killed: the runtime systemd starts in its place is left alone.
"""

import ipaddress
import os
import signal
import sys
import time


def _hex_endpoint(vip: str, port: int) -> str:
    return f"{int(ipaddress.IPv4Address(vip)):08X}:{port:04X}"


def table(service: str) -> dict | None:
    """{dest: (forward, weight)} of `service` in /proc/net/ip_vs, or None when it is absent."""
    found, dests = False, {}
    with open("/proc/net/ip_vs") as f:
        for line in f:
            parts = line.split()
            if line.startswith(("TCP", "UDP")):
                if found:
                    break
                found = parts[1] == service
            elif found and parts and parts[0] == "->":
                dests[parts[1]] = (parts[2], parts[3])
    return dests if found else None


def changes(before: dict | None, now: dict | None) -> int:
    if (before is None) != (now is None):
        return 1 + len(before or now or {})
    before, now = before or {}, now or {}
    keys = set(before) | set(now)
    return sum(before.get(k) != now.get(k) for k in keys)


def main() -> None:
    vip, port, after, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    service = _hex_endpoint(vip, port)
    start = table(service) if os.path.exists("/proc/net/ip_vs") else None
    targets = [int(sys.argv[5])]
    print("READY " + ",".join(map(str, targets)), flush=True)
    deadline = time.monotonic() + seconds
    seen = 0
    while time.monotonic() < deadline:
        if os.path.exists("/proc/net/ip_vs"):
            seen = changes(start, table(service))
        if seen >= after:
            for pid in targets:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            print(f"KILLED {','.join(map(str, targets))} {seen}", flush=True)
            time.sleep(0.2)  # the kernel is final once the killed runtime is gone
            print(f"FINAL {changes(start, table(service))}", flush=True)
            return
        time.sleep(0.001)  # one CPU on the lab director: let the runtime run
    print(f"TIMEOUT {seen}", flush=True)


main()
