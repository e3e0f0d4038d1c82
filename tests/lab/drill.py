"""Failover drills on a two-director lab (issue 10's measured proof), shared by the by-hand
VRRP test and the real-path HA test.

- `under_load(lab, event)`: the paced client (RATE GETs/s from the client namespace, each in its
  own thread) around `event(at)`; returns `Figures` (requests, failed and how, the gap).
- `figures(results, event)`: the pure computation behind it (tested in tests/unit/).
- `Download`: one slow GET through the VIP in the background; `download_line` says whether it
  survived and its longest stall after the event.
- `await_holder` / `one_holder`: the VIP on exactly director n (polled over ssh: an upper bound
  by ~0.2 s); a failure message carries what `logs(n)` returns for each live director.
- `split(lab)`: a split brain. The directors' taps are made isolated bridge ports
  (`bridge link set dev tapN isolated on`): frames between the two directors are dropped (VRRP
  adverts, the sync daemons' multicast, ARP between them) while every other port, the clients,
  the nodes and the bridge itself (ssh), still reaches both. Healed when the block ends, also on
  an error. `arp_answerers` reads which MACs answered ARP for the VIP in a capture;
  `split_brain(lab, say, logs)` is the whole drill (printed; asserts one holder once healed).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from tests.lab import harness, nodes, vm

RATE = 20  # requests/s, the figure
SETTLE = 15.0  # s: bounded wait for a VIP to land where expected
DOWNLOAD = "/slow/{seconds}"  # tests/lab/node_server.py: 1 KiB per 0.1 s
STALL = 0.3  # s without a byte that the download client records as a stall


@dataclass(frozen=True)
class Figures:
    requests: int
    failed: int
    how: str  # "6 timeout, 1 reset" (empty when none failed)
    gap: float  # s: the longest time between two successes around the event

    def __str__(self) -> str:
        how = f" ({self.how})" if self.how else ""
        return f"{self.failed} of {self.requests} failed{how}, client gap {self.gap * 1000:.0f} ms"


def figures(results: list[dict], event: float) -> Figures:
    """The client-visible outage around `event` from the load's results (each with "outcome",
    "start" and "took"): the failed requests and how they ended, and the gap: the longest time
    between two consecutive successes' completions from 1 s before the event on (>= 1/RATE when
    nothing failed; inf when fewer than two succeeded)."""
    bad = Counter(r["outcome"] for r in results if r["outcome"] != "ok")
    how = ", ".join(f"{n} {outcome}" for outcome, n in sorted(bad.items()))
    done = sorted(r["start"] + r["took"] for r in results if r["outcome"] == "ok")
    done = [t for t in done if t >= event - 1.0]
    gap = max((b - a for a, b in zip(done, done[1:], strict=False)), default=float("inf"))
    return Figures(len(results), sum(bad.values()), how, gap)


def goal(ok: bool) -> str:
    return "MET" if ok else "MISSED"


def under_load(
    lab: harness.Lab, event: Callable[[float], object], after: float = 3.0, before: float = 2.0
) -> tuple[Figures, float, object]:
    """Run `event(at)` under the paced client (`before` s of load before it, `after` s after it
    returned); (figures, the event's time, what event returned)."""
    with nodes.load(lab, lab.vip, 80, rate=RATE, timeout=1.0, max_seconds=120) as load:
        time.sleep(before)
        at = time.time()
        value = event(at)
        time.sleep(after)
        stop = time.time()
        time.sleep(1.5)  # the last requests (1 s timeout) finish
        results = [r for r in load.results() if r["start"] <= stop]
    return figures(results, at), at, value


# -- the long download ---------------------------------------------------------------------------

_DOWNLOAD_CLIENT = """
import http.client, json, sys, time
host, path, stall = sys.argv[1], sys.argv[2], float(sys.argv[3])
got, stalls, error, length = 0, [], None, None
last = start = time.time()
try:
    conn = http.client.HTTPConnection(host, 80, timeout=10)
    conn.request("GET", path)
    reply = conn.getresponse()
    length = int(reply.getheader("Content-Length"))
    while True:
        chunk = reply.read1(65536)
        now = time.time()
        if not chunk:
            break
        if now - last > stall:
            stalls.append([last, now - last])
        last, got = now, got + len(chunk)
except Exception as exc:
    error = repr(exc)
print(json.dumps({"bytes": got, "length": length, "error": error, "stalls": stalls,
                  "took": time.time() - start}))
"""


class Download:
    """A slow download through the VIP from the client namespace, running in the background."""

    def __init__(self, lab: harness.Lab, seconds: int) -> None:
        self.lab = lab
        path = DOWNLOAD.format(seconds=seconds)
        argv = [harness.HOST_PYTHON, "-c", _DOWNLOAD_CLIENT, lab.vip, path, str(STALL)]
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", lab.client_ns, *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.tracked = lab._state.add_proc(self.proc.pid, "drill download")
        self.seconds = seconds

    def result(self) -> dict:
        """What the client printed, plus "survived": every byte arrived without an error."""
        try:
            out, err = self.proc.communicate(timeout=self.seconds + 30)
        finally:
            self.proc.kill()
            self.proc.wait()
            self.lab._state.procs.remove(self.tracked)
            self.lab._state.save()
        return downloaded(out, err)


def downloaded(out: str, err: str) -> dict:
    got = json.loads(out) if out.strip() else {"error": err.strip()[-200:], "bytes": 0}
    got.setdefault("length", None)
    got["survived"] = got["error"] is None and got["bytes"] == got["length"]
    return got


def download_line(got: dict, event: float) -> str:
    """ "download survived, 51200/51200 bytes, stall 210 ms": the stall is the longest one that
    ended after `event`."""
    stall = max((gap for at, gap in got.get("stalls", []) if at + gap >= event), default=0.0)
    state = "survived" if got["survived"] else f"CUT ({got['error']})"
    return f"download {state}, {got['bytes']}/{got['length']} bytes, stall {stall * 1000:.0f} ms"


# -- who holds the VIP ---------------------------------------------------------------------------


def await_holder(
    lab: harness.Lab,
    n: int | None,
    since: float,
    logs: Callable[[int], str] | None = None,
    vips: list[str] | None = None,
) -> float:
    """Seconds from `since` until director n alone (n None: any one director) holds every one of
    `vips` (default: the lab's exposed ones); fails after SETTLE s with what `logs(m)` says for
    each live director."""
    return await_holders(lab, lambda held: held == [n] or (n is None and len(held) == 1), since, logs, vips)  # fmt: skip


def await_holders(
    lab: harness.Lab,
    want: Callable[[list[int]], bool],
    since: float,
    logs: Callable[[int], str] | None = None,
    vips: list[str] | None = None,
) -> float:
    """Seconds from `since` until `want(holders)` is true for every VIP (polled, bounded)."""
    deadline = time.time() + SETTLE
    while time.time() < deadline:
        if all(want(held) for held in _holders(lab, vips).values()):
            return time.time() - since
        time.sleep(0.1)
    raise AssertionError(f"VIP holders not as wanted: {_holders(lab, vips)}; {_logs(lab, logs)}")


def one_holder(
    lab: harness.Lab,
    n: int | None = None,
    logs: Callable[[int], str] | None = None,
    vips: list[str] | None = None,
) -> dict[str, list[int]]:
    """Every VIP on exactly one director (director n, if given), read now; the holders."""
    holders = _holders(lab, vips)
    bad = {vip: held for vip, held in holders.items() if len(held) != 1 or n not in (None, *held)}
    assert not bad, f"VIPs not on exactly one director {n or ''}: {holders}; {_logs(lab, logs)}"
    return holders


def watch_holders(lab: harness.Lab, seconds: float) -> list[str]:
    """The VIP holders read every ~0.2 s for `seconds` (bounded), as the list of changes:
    ["+0.0s {vip: [2]}", "+2.3s {vip: [1, 2]}", ...] (one entry when nothing moved)."""
    start, seen, last = time.time(), [], None
    while time.time() - start < seconds:
        now = lab.vip_holders()
        if now != last:
            seen.append(f"+{time.time() - start:.1f}s {now}")
            last = now
        time.sleep(0.2)
    return seen


def _holders(lab: harness.Lab, vips: list[str] | None) -> dict[str, list[int]]:
    if vips is None:
        return lab.vip_holders()
    return harness.vip_holders(lab._state, lab.describe(), vips)


def _logs(lab: harness.Lab, logs: Callable[[int], str] | None) -> str:
    if logs is None:
        return "no logs"
    return "; ".join(f"director {m}: {logs(m)}" for m in lab.live_directors())


# -- split brain ---------------------------------------------------------------------------------


def _isolate(lab: harness.Lab, on: bool) -> None:
    for n in range(1, lab.director_count + 1):
        lab.in_ns(
            lab.lab_ns,
            ["bridge", "link", "set", "dev", vm.tap(n), "isolated", "on" if on else "off"],
        )


def isolated(lab: harness.Lab) -> list[int]:
    """The directors whose tap is an isolated bridge port now (read back from the kernel)."""
    out = lab.in_ns(lab.lab_ns, ["bridge", "-d", "-j", "link", "show"]).stdout
    taps = {vm.tap(n): n for n in range(1, lab.director_count + 1)}
    return sorted(taps[p["ifname"]] for p in json.loads(out) if p["ifname"] in taps and p.get("isolated"))  # fmt: skip


@contextmanager
def split(lab: harness.Lab) -> Iterator[None]:
    """The link between the directors cut (clients, nodes and ssh still reach both) for the
    duration of the block."""
    _isolate(lab, True)
    try:
        yield
    finally:
        _isolate(lab, False)


_ARP_REPLY = re.compile(r"^([0-9a-f:]{17}) > [0-9a-f:]{17}, ethertype ARP .*: Reply (\S+) is-at ([0-9a-f:]{17})")  # fmt: skip
_GARP = re.compile(r"^([0-9a-f:]{17}) > [0-9a-f:]{17}, ethertype ARP .*: Request who-has (\S+) (?:\([0-9a-fA-F:]{17}\) )?tell (\S+),")  # fmt: skip
_ANNOUNCE = re.compile(r"^([0-9a-f:]{17}) > [0-9a-f:]{17}, ethertype ARP .*: Announcement (\S+),")  # fmt: skip


def arp_answerers(lines: list[str], vip: str) -> dict[str, Counter]:
    """From `tcpdump -n -e` lines: {"reply": Counter(MAC answering ARP for vip),
    "gratuitous": Counter(MAC announcing vip: who-has vip tell vip)}."""
    out = {"reply": Counter(), "gratuitous": Counter()}
    for line in lines:
        m = _ARP_REPLY.match(line)
        if m and m[2] == vip:
            out["reply"][m[3]] += 1
        m = _GARP.match(line)
        if m and m[2] == vip and m[3] == vip:
            out["gratuitous"][m[1]] += 1
        m = _ANNOUNCE.match(line)  # how tcpdump 4.99 prints some gratuitous requests
        if m and m[2] == vip:
            out["gratuitous"][m[1]] += 1
    return out


def director_of_mac(mac: str, count: int = harness.MAX_DIRECTORS) -> int | None:
    return next((n for n in range(1, count + 1) if vm.mac(n) == mac.lower()), None)


def split_brain(lab: harness.Lab, say, logs, hold: float = 4.0) -> None:
    """Cut the link between the directors (clients and nodes still reach both) for `hold` s
    under the paced client with a download running; print what happened (holders, who answers
    ARP for the VIP, failed requests, the download) and assert that after healing every VIP is
    on exactly one director."""
    download = Download(lab, seconds=int(hold) + 12)
    time.sleep(1.0)
    seen: dict = {}

    def cut(at: float) -> None:
        # One capture from the cut to the settled heal: gratuitous ARP at the takeover during
        # the split and after the heal, and the replies to the client's own request.
        with lab.capture_on_client("arp") as cap:
            with split(lab):
                assert isolated(lab) == [1, 2]
                try:
                    seen["both"] = await_holders(lab, lambda held: held == [1, 2], at, logs)
                except AssertionError as exc:  # a fact to print, not a failure
                    seen["both"], seen["why"] = None, str(exc)[:300]
                seen["during"] = lab.vip_holders()
                lab.in_ns(lab.client_ns, ["ip", "neigh", "flush", "to", lab.vip])
                seen["asked"] = nodes.attempts(lab, lab.vip, 80, count=3)
                time.sleep(max(0.0, at + hold - time.time()))
            seen["healed"] = time.time()
            seen["settled"] = await_holder(lab, None, seen["healed"], logs)
            time.sleep(1.0)
        seen["arp"] = arp_answerers(cap.lines, lab.vip)
        seen["arp lines"] = len(cap.lines)
        neigh = lab.in_ns(lab.client_ns, ["ip", "-j", "neigh", "show", "to", lab.vip]).stdout
        seen["client"] = [director_of_mac(e.get("lladdr", "")) for e in json.loads(neigh or "[]")]

    fig, at, _ = under_load(lab, cut, after=3.0)
    assert isolated(lab) == []
    after = one_holder(lab, logs=logs)  # the robust fact: one holder per VIP once healed
    got = download.result()
    replies = {director_of_mac(m): c for m, c in seen["arp"]["reply"].items()}
    garps = {director_of_mac(m): c for m, c in seen["arp"]["gratuitous"].items()}
    both = f"both held it within {seen['both']:.2f}s" if seen["both"] else f"not both: {seen}"
    say(
        f"split brain (directors' link cut {hold:.0f}s, clients reach both): {both}; during the"
        f" split holders {seen['during']}, ARP replies for the VIP by director {replies},"
        f" gratuitous ARP (split and heal) by director {garps} (of {seen['arp lines']} ARP"
        f" packets seen by the client), client requests then"
        f" {[r['outcome'] for r in seen['asked']]}; over the whole drill {fig},"
        f" {download_line(got, at)}; healed: one holder per VIP after"
        f" {seen['settled']:.2f}s: {after}, the client's ARP entry then: director {seen['client']}"
    )
