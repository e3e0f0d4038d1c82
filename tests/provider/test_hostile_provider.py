"""The standing hostile suite, provider layer: Check and Diff fuzzed through the SDK's gRPC server.

Valid properties are mutated (wrong types, huge and non-finite numbers, huge and strange
strings, unknowns at every depth, nested junk, missing and extra keys) with a fixed seed. The
provider must never answer with a traceback, and every check failure is one line of at most
300 characters. One server process serves every case.
"""

from __future__ import annotations

import copy
import math
import random

import grpc

from tests import hostile
from tests.provider.grpc_client import ProviderServer
from tests.provider.test_unknowns import UNKNOWN, full_props, paths

SEED = 20261201
CASES = 1200  # per operation
REPLACE_KEYS = {"director.host", "director.port", "vip", "port", "protocol"}

NUMBERS = [
    0, -1, 1, 80.5, 65535, 65536, 2**31, 2**53 + 1, 1e300, -1e300, 1e-300, -0.0,
    math.inf, -math.inf, math.nan, True, False,
]  # fmt: skip
STRINGS = [
    "", " ", "\n", "\t\r\n", "\x00", "203.0.113.11\n", " 203.0.113.11", "203.0.113.300",
    "010.0.0.2", "255.255.255.255", "0.0.0.0", "::", "fe80::1", "2001:db8::201%eth0",
    "fe80::1%x;touch${IFS}marker;true", "$(reboot)", "`id`", "'; rm -rf / #", "%h %p %%",
    "２０３.０.１１３.１", "203\u2024\u0030.113.1", "\u202eevil", "😀" * 10, "é" * 50,
    "TCP", "Udp", "WLC", "ssh-ed25519", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5", "root\nroot",
    "eth0\n", "a" * 16, "director.example.net.", "-leading.dash", "x" * 300, "y" * 5000,
    UNKNOWN, UNKNOWN + " ", "04DA6B54-80E4-46F7-96EC-B56FF0331BA9", "None", "null", "[]",
]  # fmt: skip


def junk(rng: random.Random, depth: int = 0):
    """Any JSON value a Struct can carry, nested up to a few levels."""
    kind = rng.randrange(9 if depth < 4 else 5)
    if kind == 0:
        return rng.choice(NUMBERS)
    if kind == 1:
        return rng.choice(STRINGS)
    if kind == 2:
        return None
    if kind == 3:
        return UNKNOWN
    if kind == 4:
        return "z" * 1_000_000 if rng.random() < 0.05 else rng.choice(STRINGS) * rng.randrange(1, 4)
    if kind in (5, 6):
        return [junk(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = ["address", "weight", "host", "port", "hostKey", UNKNOWN, "", "😀", "x" * 200]
    return {rng.choice(keys): junk(rng, depth + 1) for _ in range(rng.randrange(4))}


def mutate(rng: random.Random, props: dict) -> dict:
    props = copy.deepcopy(props)
    for _ in range(rng.randrange(1, 4)):
        targets = paths(props)
        path = rng.choice(targets) if targets else ("vip",)
        parent = props
        for key in path[:-1]:
            parent = parent[key]
        if not isinstance(parent, dict | list):
            continue
        action = rng.random()
        if action < 0.1 and isinstance(parent, dict):
            parent.pop(path[-1], None)
        elif action < 0.2 and isinstance(parent, dict):
            parent[rng.choice(["extra", "Vip", "realservers", "__x"])] = junk(rng)
        elif action < 0.3 and isinstance(parent, list):
            parent.append(copy.deepcopy(rng.choice(parent)) if parent else junk(rng))
        elif action < 0.45:
            parent[path[-1]] = UNKNOWN
        else:
            parent[path[-1]] = junk(rng)
    return props


def test_check_and_diff_survive_hostile_input():
    rng = random.Random(SEED)
    server = ProviderServer()
    tracebacks: list[str] = []
    bad_reasons: list[tuple[str, str]] = []
    accepted = 0
    try:
        server.configure({})
        base = full_props()
        old, failures = server.check(base)
        assert failures == []
        old = {**old, "ipvsadm": ["TCP 203.0.113.201:80 wlc"], "inSync": True}
        for _ in range(CASES):
            news = mutate(rng, base)
            try:
                inputs, failures = server.check(news)
            except grpc.RpcError as err:
                tracebacks.append(f"check {news!r:.300}: {err.details()[-500:]}")
                continue
            for field, reason in failures:
                if "\n" in reason or len(reason) > 300 or not field or "Traceback" in reason:
                    bad_reasons.append((field, reason[:400]))
            if not failures and UNKNOWN not in repr(inputs):
                accepted += 1
                again, refailures = server.check(inputs)  # what check hands back checks again
                assert (again, refailures) == (inputs, []), news
        for _ in range(CASES):
            news = mutate(rng, base)
            olds = old if rng.random() < 0.85 else mutate(rng, old)
            try:
                resp = server.diff("203.0.113.2:22/tcp/203.0.113.201:80", olds, news)
            except grpc.RpcError as err:
                tracebacks.append(f"diff {news!r:.300}: {err.details()[-500:]}")
                continue
            assert resp.changes in (resp.DIFF_SOME, resp.DIFF_NONE)
            assert set(resp.replaces) <= REPLACE_KEYS
    finally:
        server.close()
    assert tracebacks == []
    assert bad_reasons == []
    assert accepted > 20  # the mutations leave some inputs valid: the happy path is fuzzed too
    hostile.record(fuzz_cases=2 * CASES, tracebacks=len(tracebacks))
