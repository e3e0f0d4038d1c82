"""Fuzz of ipvs-ingress:health and vips[i].health (issue 9), fixed seed: random settings at both
levels, valid and not, over random VIPs with tcp and udp ports. Every case either loads or is a
ConfigError whose problems are exactly the fields an oracle written here predicts (a problem
named where its value was set); an accepted case resolves every (VIP, port) to exactly the
settings the oracle computes. The oracle is this file's own reading of the contract
(CONTRACTS-9), not the loader's or the model's code.
"""

from __future__ import annotations

import copy
import math
import random
from collections import Counter
from typing import Any

from components.config import ConfigError, load, load_stack_file
from providers.virtual_service import VirtualServiceProvider
from tests import hostile
from tests.program.conftest import HOST_KEY

SEED = 20261209
CASES = 1500
VIPS = ["203.0.113.201", "203.0.113.202", "198.51.100.10"]
NODES = [{"address": "192.0.2.11", "weight": 1}, {"address": "192.0.2.12", "weight": 2}]
STACK, VIP_PATH = "ipvs-ingress:health", "ipvs-ingress:vips[{}].health"

VALID = {
    "check": ["vip", "kubeProxy", "none"],
    "intervalSeconds": [0.2, 0.5, 1, 2.5, 60, 3.0],
    "timeoutSeconds": [0.1, 0.25, 0.5, 1, 5, 60],
    "rise": [1, 2, 3, 10, 2.0],
    "fall": [1, 2, 5, 10, 3.0],
    "depoolThreshold": [0, 0.5, 1, 0.25, 1.0, 0.0, 0.7],
    "kubeProxyPort": [10256, 1, 65535, 10256.0],
    "http": [
        None,
        {},
        {"path": "/"},
        {"path": "/healthz", "expectStatus": 204},
        {"expectStatus": 599.0},
    ],  # fmt: skip
}
INVALID = {
    "check": ["VIP", "http", "", 1, ["vip"], "kubeproxy"],
    "intervalSeconds": [0.1, 0, -1, 61, True, "1", math.nan, math.inf, 10**400],
    "timeoutSeconds": [0.05, 0, True, "0.5", math.nan, -math.inf],
    "rise": [0, 11, 2.5, True, "2", -1, 10**400],
    "fall": [0, 11, 1.5, False, "3"],
    "depoolThreshold": [-0.1, 1.01, True, "0.5", math.nan, math.inf],
    "kubeProxyPort": [0, 65536, True, "10256", 1.5],
    "http": [
        "GET /", [], {"path": "healthz"}, {"path": "/a b"}, {"path": "/é"}, {"path": "/" + "a" * 200},
        {"path": "/x\x00"}, {"expectStatus": 99}, {"expectStatus": 600}, {"expectStatus": True},
        {"method": "GET"}, {"path": None}, {"path": "/", "expectStatus": "200"},
    ],
}  # fmt: skip
UNKNOWN_KEYS = ["intervall", "Rise", "timeout", "checks"]
NOT_OBJECTS = [[], "vip", 5, True, [{"rise": 2}]]


def settings(rng: random.Random) -> Any:
    """One level's health: usually an object of a few keys, valid or not; sometimes junk."""
    roll = rng.random()
    if roll < 0.15:
        return None
    if roll < 0.2:
        return copy.deepcopy(rng.choice(NOT_OBJECTS))
    out: dict[str, Any] = {}
    for key in rng.sample(list(VALID), rng.randint(0, 4)):
        pool = INVALID[key] if rng.random() < 0.12 else VALID[key]
        out[key] = copy.deepcopy(rng.choice(pool))
    if rng.random() < 0.08:
        out[rng.choice(UNKNOWN_KEYS)] = 1
    if rng.random() < 0.1:
        out[rng.choice(list(VALID))] = None  # null: the default (http: none)
    return out


def case(rng: random.Random) -> dict[str, Any]:
    vips = []
    for address in rng.sample(VIPS, rng.randint(1, 3)):
        pairs = rng.sample([(p, q) for p in (53, 80, 443, 8080) for q in ("tcp", "udp")], rng.randint(1, 3))  # fmt: skip
        vip = {"address": address, "ports": [{"port": p, "protocol": q} for p, q in pairs]}
        if rng.random() < 0.6:
            vip["health"] = settings(rng)
        vips.append(vip)
    values = {
        "vips": vips,
        "realServers": copy.deepcopy(NODES),
        "director": {"host": "203.0.113.2", "hostKey": HOST_KEY},
    }
    if rng.random() < 0.7:
        values["health"] = settings(rng)
    return values


# --- the oracle ------------------------------------------------------------------------------


def number(v: Any, lo: float, hi: float) -> float | None:
    if type(v) not in (int, float) or (type(v) is float and not math.isfinite(v)):
        return None
    return float(v) if lo <= v <= hi else None


def whole(v: Any, lo: int, hi: int) -> int | None:
    if type(v) is int:
        return v if lo <= v <= hi else None
    if type(v) is float and math.isfinite(v) and v == int(v):
        return int(v) if lo <= v <= hi else None
    return None


def good_path(p: Any) -> bool:
    return (
        type(p) is str
        and p[:1] == "/"
        and len(p) <= 200
        and all(33 <= ord(ch) <= 126 for ch in p)  # printable ASCII, no space
    )


def expect(values: dict) -> tuple[set[str], dict[str, dict]]:
    """(the problem fields, the resolved settings per service key)."""
    problems: set[str] = set()
    stack = values.get("health")
    if stack is not None and type(stack) is not dict:
        problems.add(STACK)
    stack = stack if type(stack) is dict else {}
    resolved = {}
    for i, vip in enumerate(values["vips"]):
        own = vip.get("health")
        if own is not None and type(own) is not dict:
            problems.add(VIP_PATH.format(i))
        own = own if type(own) is dict else {}
        for port in vip["ports"]:
            found, health = one_service(stack, own, port["protocol"], VIP_PATH.format(i))
            problems |= found
            key = f"{port['protocol']}/{vip['address']}:{port['port']}"
            resolved[key] = health
    return problems, resolved


def one_service(
    stack: dict, own: dict, protocol: str, vip_path: str, config: bool = True
) -> tuple[set[str], dict]:
    """`config`: as the stack config resolves it (where udp's default check takes no http); else
    as the provider checks a VirtualService's own `health` input (where such http is refused)."""

    def where(key: str) -> str:  # the level that set `key`
        return vip_path if key in own else STACK

    def given(key: str) -> Any:
        """The VIP's value over the stack's; null at the VIP: the default, as unset."""
        value = own[key] if key in own else stack.get(key)
        return value

    problems: set[str] = set()
    for key in {*stack, *own}:
        if key not in VALID:
            problems.add(f"{where(key)}.{key}")
    check = given("check")
    check_given = check is not None
    if check is None:
        check = "kubeProxy" if protocol == "udp" else "vip"
    if check not in ("vip", "kubeProxy", "none"):
        problems.add(f"{where('check')}.check")
    elif check == "vip" and protocol == "udp":
        problems.add(f"{where('check')}.check")
    interval = given("intervalSeconds")
    interval = 1.0 if interval is None else number(interval, 0.2, 60)
    if interval is None:
        problems.add(f"{where('intervalSeconds')}.intervalSeconds")
    top = interval if interval is not None else 60.0
    timeout = given("timeoutSeconds")
    timeout = min(0.5, top) if timeout is None else number(timeout, 0.1, top)
    if timeout is None:
        problems.add(f"{where('timeoutSeconds')}.timeoutSeconds")
    counts = {}
    for key, default, lo, hi in (("rise", 2, 1, 10), ("fall", 2, 1, 10), ("kubeProxyPort", 10256, 1, 65535)):  # fmt: skip
        raw = given(key)
        counts[key] = default if raw is None else whole(raw, lo, hi)
        if counts[key] is None:
            problems.add(f"{where(key)}.{key}")
    threshold = given("depoolThreshold")
    threshold = 0.5 if threshold is None else number(threshold, 0, 1)
    if threshold is None:
        problems.add(f"{where('depoolThreshold')}.depoolThreshold")
    # http: the stack's applies only where the check is vip; none where the check is udp's default.
    http = given("http")
    from_stack = "http" not in own
    if http is not None and from_stack and own.get("check") not in (None, "vip"):
        http = None
    if not check_given and protocol == "udp" and config:
        http = None
    get = None
    if http is not None:
        base = f"{where('http')}.http"
        if type(http) is not dict:
            problems.add(base)
        else:
            bad = {f"{base}.{k}" for k in http if k not in ("path", "expectStatus")}
            path, status = http.get("path", "/"), whole(http.get("expectStatus", 200), 100, 599)
            if not good_path(path):
                bad.add(f"{base}.path")
            if status is None:
                bad.add(f"{base}.expectStatus")
            problems |= bad
            if not bad:
                get = {"path": path, "expectStatus": status}
                if check != "vip":
                    problems.add(base)
    health = {
        "check": check,
        "intervalSeconds": interval,
        "timeoutSeconds": timeout,
        **counts,
        "depoolThreshold": threshold,
    }
    if get is not None:
        health["http"] = get
    return problems, health


def test_health_config_fuzz():
    rng = random.Random(SEED)
    tally: Counter[str] = Counter()
    failures: list[str] = []
    for i in range(CASES):
        values = case(rng)
        problems, resolved = expect(values)
        try:
            if i % 2:
                cfg = load_stack_file({f"ipvs-ingress:{k}": v for k, v in values.items()})
            else:
                cfg = load(values)
        except ConfigError as err:
            tally["refused"] += 1
            got = {p.field for p in err.problems}
            if got != problems:
                failures.append(f"case {i}: refused with {sorted(got)}, expected {sorted(problems)}")  # fmt: skip
            text = str(err)
            if "\n" in text or len(text) > 300:
                failures.append(f"case {i}: error of {len(text)} chars: {text[:120]!r}")
            continue
        except Exception as err:  # a traceback: never
            tally["tracebacks"] += 1
            failures.append(f"case {i}: {type(err).__name__}: {str(err)[:200]}")
            continue
        tally["accepted"] += 1
        if problems:
            failures.append(f"case {i}: accepted, expected {sorted(problems)}")
            continue
        got = {k: dict(v) for k, v in cfg.health.items()}
        if got != resolved:
            failures.append(f"case {i}: resolved {got}, expected {resolved}")
        floats = ("intervalSeconds", "timeoutSeconds", "depoolThreshold")
        if any(type(h[k]) is not float for h in got.values() for k in floats):
            failures.append(f"case {i}: a number of seconds or a fraction is not a float")
    assert failures == [], "\n".join(failures[:10])
    assert tally["accepted"] >= CASES // 4 and tally["refused"] >= CASES // 4, tally
    hostile.record(fuzz_cases=CASES, tracebacks=tally["tracebacks"])


def as_grpc(value: Any) -> Any:
    """Numbers as the engine delivers them to the provider: every one a float."""
    if type(value) is int and abs(value) < 2**53:
        return float(value)
    if isinstance(value, dict):
        return {k: as_grpc(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_grpc(v) for v in value]
    return value


PROVIDER_CASES = 1000


def test_provider_check_of_the_health_input_fuzz():
    """The same settings as one VirtualService's `health` input (another program, or state,
    may send anything): the provider's check refuses exactly the fields the oracle predicts,
    each in one line, and hands back exactly the settings it computes."""
    rng = random.Random(SEED + 1)
    provider, failures, refused = VirtualServiceProvider(), [], 0
    base = {
        "director": {"host": "203.0.113.2", "hostKey": HOST_KEY},
        "vip": "203.0.113.201",
        "realServers": NODES,
        "owner": "ipvs-ingress/fuzz",
    }
    for i in range(PROVIDER_CASES):
        health, protocol = settings(rng), rng.choice(["tcp", "udp"])
        news = {**base, "port": 80, "protocol": protocol, "health": health}
        if health is not None and type(health) is not dict:
            problems, resolved = {"health"}, None
        else:
            problems, resolved = one_service({}, health or {}, protocol, "health", config=False)
        try:
            result = provider.check({}, as_grpc(news) if i % 2 else news)
        except Exception as err:  # a traceback: never
            failures.append(f"case {i}: {type(err).__name__}: {str(err)[:200]}")
            continue
        got = {f.property for f in result.failures}
        if got != problems:
            failures.append(f"case {i}: {health!r:.100} -> {sorted(got)}, expected {sorted(problems)}")  # fmt: skip
        elif problems:
            refused += 1
            if any("\n" in f.reason or len(f.reason) > 300 for f in result.failures):
                failures.append(f"case {i}: a failure is not one bounded line")
        elif health is None:
            if "health" in result.inputs:
                failures.append(f"case {i}: no health became {result.inputs['health']}")
        elif result.inputs["health"] != resolved:
            failures.append(f"case {i}: {result.inputs['health']}, expected {resolved}")
    assert failures == [], "\n".join(failures[:10])
    assert PROVIDER_CASES // 4 <= refused <= PROVIDER_CASES * 3 // 4, refused
    hostile.record(fuzz_cases=PROVIDER_CASES)
