"""The lab drill's pure figures (tests/lab/drill.py): the outage a client saw, how a download
ended, who answered ARP. Expected values are worked out by hand from the inputs."""

from __future__ import annotations

import math

from tests.lab import drill


def _ok(start: float, took: float = 0.01) -> dict:
    return {"outcome": "ok", "start": start, "took": took}


def test_no_failure_gap_is_the_pace():
    results = [_ok(100 + k * 0.05) for k in range(40)]
    got = drill.figures(results, event=101.0)
    assert (got.requests, got.failed, got.how) == (40, 0, "")
    assert math.isclose(got.gap, 0.05, abs_tol=1e-9)
    assert str(got) == "0 of 40 failed, client gap 50 ms"


def test_failures_are_counted_by_outcome_and_the_gap_spans_them():
    results = [_ok(100.3), _ok(100.5, 0.02)]
    results += [{"outcome": "timeout", "start": 100.55, "took": 1.0}] * 2
    results += [{"outcome": "reset", "start": 100.6, "took": 0.1}]
    results += [_ok(100.9, 0.03), _ok(100.95)]
    got = drill.figures(results, event=100.55)
    assert (got.requests, got.failed, got.how) == (7, 3, "1 reset, 2 timeout")
    # 100.52 -> 100.93: the successes around the failures.
    assert math.isclose(got.gap, 0.41, abs_tol=1e-9)


def test_successes_long_before_the_event_do_not_count():
    # A 5 s pause 10 s before the event is not the event's outage.
    results = [_ok(90.0), _ok(95.0), _ok(99.5), _ok(99.6), _ok(100.2)]
    assert math.isclose(drill.figures(results, event=100.0).gap, 0.6, abs_tol=1e-9)


def test_fewer_than_two_successes_is_an_infinite_gap():
    results = [_ok(100.0), {"outcome": "timeout", "start": 100.1, "took": 1.0}]
    got = drill.figures(results, event=100.0)
    assert got.gap == math.inf and got.failed == 1


def test_download_survives_only_whole_and_without_error():
    whole = drill.downloaded('{"bytes": 10, "length": 10, "error": null, "stalls": []}', "")
    short = drill.downloaded('{"bytes": 4, "length": 10, "error": null, "stalls": []}', "")
    reset = drill.downloaded('{"bytes": 4, "length": 10, "error": "reset", "stalls": []}', "")
    dead = drill.downloaded("", "Traceback ...\nKilled")
    assert [g["survived"] for g in (whole, short, reset, dead)] == [True, False, False, False]
    assert dead["bytes"] == 0 and dead["length"] is None and "Killed" in dead["error"]


def test_download_line_reports_the_longest_stall_after_the_event():
    got = {"bytes": 10, "length": 10, "error": None, "survived": True}
    got["stalls"] = [[50.0, 2.0], [100.1, 0.21], [103.0, 0.4]]  # the first ended before 100
    assert drill.download_line(got, event=100.0) == "download survived, 10/10 bytes, stall 400 ms"
    cut = {"bytes": 3, "length": 10, "error": "ConnectionResetError()", "survived": False}
    assert drill.download_line(cut, 0.0) == (
        "download CUT (ConnectionResetError()), 3/10 bytes, stall 0 ms"
    )


def test_arp_answerers_from_tcpdump_lines():
    d1, d2, cli = "52:54:00:a0:00:02", "52:54:00:a0:00:03", "4a:11:22:33:44:55"
    head = ", ethertype ARP (0x0806), length 42: "
    lines = [
        f"{cli} > ff:ff:ff:ff:ff:ff{head}Request who-has 203.0.113.201 tell 203.0.113.10, length 28",
        f"{d1} > {cli}{head}Reply 203.0.113.201 is-at {d1}, length 28",
        f"{d2} > {cli}{head}Reply 203.0.113.201 is-at {d2}, length 28",
        f"{d2} > {cli}{head}Reply 203.0.113.3 is-at {d2}, length 28",  # not the VIP
        f"{d2} > ff:ff:ff:ff:ff:ff{head}Request who-has 203.0.113.201 tell 203.0.113.201, length 28",
        f"{d1} > ff:ff:ff:ff:ff:ff{head}Request who-has 203.0.113.3 tell 203.0.113.2, length 28",
        f"{d1} > ff:ff:ff:ff:ff:ff{head}Announcement 203.0.113.201, length 28",
        # keepalived's: the target MAC set to broadcast, which tcpdump shows in brackets
        f"{d2} > ff:ff:ff:ff:ff:ff{head}Request who-has 203.0.113.201"
        " (ff:ff:ff:ff:ff:ff) tell 203.0.113.201, length 28",
        "garbage",
    ]
    got = drill.arp_answerers(lines, "203.0.113.201")
    assert dict(got["reply"]) == {d1: 1, d2: 1}
    assert dict(got["gratuitous"]) == {d2: 2, d1: 1}
    assert [drill.director_of_mac(m) for m in (d1, d2.upper(), cli)] == [1, 2, None]
