"""providers/health.py (issue 9 groundwork): rise/fall per target, drain weights under the depool
threshold, and health.json across a restart. Expected states and weights are written out here,
or computed by an oracle of this file's own (a window over the last results), never by the
module under test.
"""

from __future__ import annotations

import json
import random

import pytest

from providers import health
from providers.health import Target, Tracker, effective_weights
from providers.model import RealServer, VirtualServiceSpec
from tests import hostile

KEY = "tcp/203.0.113.201:80"
RS = "203.0.113.11:80"
CHECKED = {"check": "vip", "rise": 2, "fall": 2, "depoolThreshold": 0.5}


def spec(*weights: int, port: int = 80) -> VirtualServiceSpec:
    servers = tuple(RealServer(f"203.0.113.{11 + i}", w) for i, w in enumerate(weights))
    return VirtualServiceSpec("203.0.113.201", port, "tcp", real_servers=servers)


def names(n: int) -> list[str]:
    return [f"203.0.113.{11 + i}:80" for i in range(n)]


def down(since: float = 100.0, reason: str = "connect refused") -> Target:
    return Target(up=False, failures=2, since=since, reason=reason)


# --- rise and fall -----------------------------------------------------------------------------


def run(results: list[bool], rise: int, fall: int) -> list[bool]:
    tracker = Tracker()
    tracker.configure(KEY, {"rise": rise, "fall": fall})
    out = []
    for t, ok in enumerate(results):
        tracker.observe(KEY, RS, ok, "" if ok else "timed out", float(t))
        out.append(tracker.target(KEY, RS).up)
    return out


def window_oracle(results: list[bool], rise: int, fall: int) -> list[bool]:
    """Up/down after each result, from the last results alone: down once the last `fall` were
    failures (while up), up once the last `rise` were successes (while down)."""
    up, out = True, []
    for i in range(len(results)):
        if up and i + 1 >= fall and not any(results[i + 1 - fall : i + 1]):
            up = False
        elif not up and i + 1 >= rise and all(results[i + 1 - rise : i + 1]):
            up = True
        out.append(up)
    return out


def test_a_new_target_is_up_before_any_probe():
    tracker = Tracker()
    assert tracker.target(KEY, RS) == Target(up=True, successes=0, failures=0, since=None)
    assert tracker.states("tcp/203.0.113.201:443") == {}


@pytest.mark.parametrize(
    ("results", "rise", "fall", "expected"),
    [
        # fall 2: one failure is not enough, two in a row drain
        ([False, True, False, False], 2, 2, [True, True, True, False]),
        # rise 2: one success while down is not enough, a failure resets the count
        ([False, False, True, False, True, True], 2, 2, [True, False, False, False, False, True]),
        # rise 1, fall 1: every result decides
        ([False, True, False, True], 1, 1, [False, True, False, True]),
        # fall 3 with successes in between never drains
        ([False, False, True, False, False, True], 2, 3, [True] * 6),
        # rise 3
        ([False] * 3 + [True] * 3, 3, 3, [True, True, False, False, False, True]),
    ],
)
def test_rise_and_fall_sequences(results, rise, fall, expected):
    assert run(results, rise, fall) == expected


def test_observe_says_when_the_state_changed_and_keeps_since_and_reason():
    tracker = Tracker()
    tracker.configure(KEY, CHECKED)
    assert tracker.observe(KEY, RS, False, "connect: refused", 10.0) is False
    assert tracker.observe(KEY, RS, False, "connect:\n timed out" + " x" * 300, 11.0) is True
    t = tracker.target(KEY, RS)
    assert (t.up, t.since, t.failures) == (False, 11.0, 2)
    assert "\n" not in t.reason and len(t.reason) == 200 and t.reason.startswith("connect: timed")
    assert tracker.observe(KEY, RS, True, "", 12.0) is False
    assert tracker.observe(KEY, RS, True, "", 13.0) is True
    assert (tracker.target(KEY, RS).up, tracker.target(KEY, RS).since) == (True, 13.0)


def test_unconfigured_services_use_rise_2_fall_2():
    tracker = Tracker()
    tracker.observe(KEY, RS, False, "refused", 1.0)
    assert tracker.target(KEY, RS).up
    tracker.observe(KEY, RS, False, "refused", 2.0)
    assert not tracker.target(KEY, RS).up


def test_rise_fall_fuzz_against_a_window_oracle():
    rng = random.Random(9)
    cases = 1000
    for _ in range(cases):
        rise, fall = rng.randint(1, 10), rng.randint(1, 10)
        p = rng.random()
        results = [rng.random() < p for _ in range(rng.randint(1, 40))]
        assert run(results, rise, fall) == window_oracle(results, rise, fall), (rise, fall)
    hostile.record(fuzz_cases=cases)


def test_forget_drops_removed_real_servers_or_a_whole_service():
    tracker = Tracker()
    for rs in names(3):
        tracker.observe(KEY, rs, False, "x", 1.0)
    tracker.forget(KEY, keep=names(3)[:2])
    assert sorted(tracker.states(KEY)) == names(3)[:2]
    tracker.forget(KEY)
    assert tracker.states(KEY) == {}


# --- the depool threshold --------------------------------------------------------------------


# (n real servers, all down, threshold) -> how many are drained: n - ceil(threshold * n).
@pytest.mark.parametrize(
    ("n", "threshold", "drained"),
    [
        (1, 0, 1), (1, 0.5, 0), (1, 1, 0),
        (2, 0, 2), (2, 0.5, 1), (2, 1, 0),
        (3, 0, 3), (3, 0.5, 1), (3, 1, 0),
        (10, 0, 10), (10, 0.5, 5), (10, 1, 0),
    ],
)  # fmt: skip
def test_all_down_drains_only_down_to_the_threshold(n, threshold, drained):
    states = {rs: down(since=float(100 + i)) for i, rs in enumerate(names(n))}
    weights, held = effective_weights(spec(*[3] * n), {**CHECKED, "depoolThreshold": threshold}, states)  # fmt: skip
    # The longest down (earliest since) go first; the rest keep their configured weight.
    assert weights == {rs: 0 if i < drained else 3 for i, rs in enumerate(names(n))}
    assert len(held) == n - drained
    for rs in names(n)[drained:]:
        (line,) = [h for h in held if f" {rs} " in h]
        assert line.startswith(f"{KEY} {rs} kept in service though failing (connect refused)")
        assert f"of {n} real servers pooled (depoolThreshold {threshold:g})" in line


@pytest.mark.parametrize(
    ("n", "failing", "threshold", "drained"),
    [
        (2, 1, 0.5, 1), (3, 1, 0.5, 1), (3, 2, 0.5, 1), (10, 3, 0.5, 3), (10, 6, 0.5, 5),
        (10, 4, 0.7, 3), (3, 1, 1, 0), (3, 2, 0, 2), (10, 9, 0.25, 7),
    ],
)  # fmt: skip
def test_some_down(n, failing, threshold, drained):
    # Down in reverse order of name, so "longest down first" is not "first by name".
    states = {rs: down(since=float(200 - i)) for i, rs in enumerate(names(n)[:failing])}
    weights, held = effective_weights(spec(*[1] * n), {**CHECKED, "depoolThreshold": threshold}, states)  # fmt: skip
    drained_rs = sorted(names(n)[:failing], key=lambda rs: -names(n).index(rs))[:drained]
    assert {rs for rs, w in weights.items() if w == 0} == set(drained_rs)
    assert len(held) == failing - drained


def test_up_targets_and_unobserved_ones_keep_their_weight():
    states = {names(3)[0]: Target(up=True, failures=1, reason="one failure")}
    weights, held = effective_weights(spec(1, 2, 3), CHECKED, states)
    assert weights == dict(zip(names(3), [1, 2, 3], strict=True)) and held == []


def test_equal_since_drains_by_name():
    states = {rs: down(since=5.0) for rs in names(4)}
    weights, _ = effective_weights(spec(1, 1, 1, 1), CHECKED, states)
    assert weights == dict(zip(names(4), [0, 0, 1, 1], strict=True))


def test_configured_weight_zero_is_not_pooled():
    # Two real servers, one at weight 0: the other is the only one pooled, and ceil(0.5 * 2) = 1
    # must stay, so it is held though it fails.
    weights, held = effective_weights(spec(1, 0), CHECKED, {names(2)[0]: down()})
    assert weights == {names(2)[0]: 1, names(2)[1]: 0} and len(held) == 1
    # A failing weight-0 server is neither drained (it is at 0 already) nor held.
    weights, held = effective_weights(spec(1, 1, 0), CHECKED, {names(3)[2]: down()})
    assert weights == dict(zip(names(3), [1, 1, 0], strict=True)) and held == []
    # Three at weight 1 and one at 0, threshold 0.5: 2 must stay pooled of the 3 that can be.
    states = {rs: down(since=float(i)) for i, rs in enumerate(names(4)[:3])}
    weights, held = effective_weights(spec(1, 1, 1, 0), CHECKED, states)
    assert weights == dict(zip(names(4), [0, 1, 1, 0], strict=True)) and len(held) == 2


@pytest.mark.parametrize("cfg", [None, {"check": "none", "depoolThreshold": 0}])
def test_no_check_means_the_configured_weights(cfg):
    states = {rs: down() for rs in names(3)}
    assert effective_weights(spec(1, 2, 3), cfg, states) == (
        dict(zip(names(3), [1, 2, 3], strict=True)),
        [],
    )


def test_ipv6_real_servers_are_named_in_brackets():
    v6 = VirtualServiceSpec("2001:db8::201", 443, "tcp", real_servers=(RealServer("2001:db8::11"),))  # fmt: skip
    weights, _ = effective_weights(v6, {**CHECKED, "depoolThreshold": 0}, {"[2001:db8::11]:443": down()})  # fmt: skip
    assert weights == {"[2001:db8::11]:443": 0}


def test_pooled_minimum_is_not_fooled_by_binary_fractions():
    assert [health.pooled_minimum(t, 10) for t in (0.1, 0.3, 0.7, 0.9)] == [1, 3, 7, 9]
    assert health.pooled_minimum(0.5, 3) == 2 and health.pooled_minimum(0.34, 3) == 2


# --- health.json ---------------------------------------------------------------------------------


def drained_tracker(rise: int = 2) -> Tracker:
    tracker = Tracker()
    tracker.configure(KEY, {**CHECKED, "rise": rise})
    for t in (1.0, 2.0):
        tracker.observe(KEY, RS, False, "connect refused", t)
    if rise > 1:
        tracker.observe(KEY, RS, True, "", 3.0)  # one success: not enough to rise
    return tracker


def test_to_json_is_what_is_written_out_here():
    data = json.loads(drained_tracker().to_json())
    assert data == {
        "version": 1,
        "services": {
            KEY: {
                RS: {
                    "up": False,
                    "successes": 1,
                    "failures": 0,
                    "since": 2.0,
                    "reason": "connect refused",
                }
            }
        },
    }


@pytest.mark.parametrize("rise", [1, 2, 3, 10])
def test_a_drained_target_stays_drained_across_a_restart_until_rise_successes(rise):
    text = drained_tracker(rise).to_json()
    restarted, why = Tracker.from_json(text)
    assert why is None
    restarted.configure(KEY, {**CHECKED, "rise": rise})
    target = restarted.target(KEY, RS)
    # The success counted before the restart is not carried over.
    assert (target.up, target.successes, target.since) == (False, 0, 2.0)
    for i in range(rise):
        weights, _ = effective_weights(spec(1, 1, 1), {**CHECKED, "depoolThreshold": 0}, restarted.states(KEY))  # fmt: skip
        assert weights[RS] == 0, f"back after {i} of {rise} successes"
        restarted.observe(KEY, RS, True, "", 10.0 + i)
    weights, _ = effective_weights(spec(1, 1, 1), CHECKED, restarted.states(KEY))
    assert weights[RS] == 1 and restarted.target(KEY, RS).since == 10.0 + rise - 1


def test_up_targets_and_failure_counts_survive_a_restart():
    tracker = Tracker()
    tracker.observe(KEY, RS, False, "timed out", 1.0)  # 1 of fall 2
    restarted, why = Tracker.from_json(tracker.to_json())
    assert why is None and restarted.target(KEY, RS).up
    assert restarted.observe(KEY, RS, False, "timed out", 2.0) is True  # the second drains


@pytest.mark.parametrize(
    "text",
    ["", "{", "null", "[]", '"x"', "[" * 100_000, '{"version": 2, "services": {}}',
     '{"services": {}}', '{"version": 1, "services": []}', '{"version": 1}', None, b"\xff\xfe"],
)  # fmt: skip
def test_unreadable_json_is_an_empty_tracker_and_a_reason(text):
    tracker, why = Tracker.from_json(text)
    assert tracker.services == {}
    assert isinstance(why, str) and why.endswith("every real server starts up") and len(why) < 200
    assert "\n" not in why


GOOD = {"up": False, "successes": 0, "failures": 2, "since": 5.0, "reason": "refused"}


@pytest.mark.parametrize(
    "bad",
    [
        {**GOOD, "up": "no"}, {**GOOD, "up": None}, {k: v for k, v in GOOD.items() if k != "up"},
        {**GOOD, "failures": -1}, {**GOOD, "failures": True}, {**GOOD, "failures": 2.5},
        {**GOOD, "failures": 10**9}, {**GOOD, "successes": "1"}, {**GOOD, "since": "yesterday"},
        {**GOOD, "since": float("nan")}, {**GOOD, "since": float("inf")}, {**GOOD, "since": -1},
        {**GOOD, "reason": 5}, "down", None, [],
    ],
)  # fmt: skip
def test_a_malformed_target_is_dropped_and_counted(bad):
    text = json.dumps({"version": 1, "services": {KEY: {RS: bad, "203.0.113.12:80": GOOD}}})
    tracker, why = Tracker.from_json(text)
    assert why == "1 malformed entry dropped (those real servers start up)"
    assert tracker.target(KEY, RS).up  # dropped: starts up
    assert tracker.target(KEY, "203.0.113.12:80") == Target(False, 0, 2, 5.0, "refused")


def test_malformed_names_are_dropped():
    text = json.dumps(
        {"version": 1, "services": {"": {RS: GOOD}, KEY: {"x\ny": GOOD, "y" * 400: GOOD}, "k": 1}}
    )
    tracker, why = Tracker.from_json(text)
    assert tracker.services == {} and why == "4 malformed entries dropped (those real servers start up)"  # fmt: skip


def test_health_is_stdlib_only_and_does_no_io():
    """The director imports it with the runtime (stdlib + providers.model): no Pulumi, no
    paramiko, no files, sockets or clock."""
    source = (health.__file__ and open(health.__file__).read()) or ""
    imports = [line.split()[1] for line in source.splitlines() if line.startswith(("import ", "from "))]  # fmt: skip
    assert set(imports) <= {"__future__", "json", "math", "collections.abc", "dataclasses", "providers"}  # fmt: skip
    for word in ("open(", "socket", "time.", "subprocess", "os."):
        assert word not in source, word
