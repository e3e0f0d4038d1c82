"""Issue 9, the runtime side: probes drain and restore real servers, the depool threshold holds
them, health.json keeps a drain across a restart, and neither the runtime's passes nor a
provider's apply (the agent in the runtime's process) undo a drain.

On the in-memory kernel of test_agent_logic (destinations keyed by (address, port)); probe
results come from a scripted prober; records are written by the real agent. Expected tables,
weights and log lines are written out literally here, never computed by providers/health.py.
"""

from __future__ import annotations

import http.server
import io
import json
import socket
import threading

import pytest

from providers import agent, probing, runtime, virtual_service
from providers.model import Director
from tests.program.conftest import TCP_HEALTH
from tests.unit.test_agent_logic import OWNER, MemoryKernel, spec
from tests.unit.test_runtime import _set, make_runtime, paths  # noqa: F401 (a fixture)

VIP = "203.0.113.201"
KEY = f"tcp/{VIP}:80"
N1, N2, N3 = "203.0.113.11", "203.0.113.12", "203.0.113.13"
CHECK = {**TCP_HEALTH, "check": "kubeProxy"}


class Scripted:
    """Answers each node's probes from its own list of results, in order; records each call."""

    def __init__(self, **script: list[bool]):
        self.script = {address.replace("_", "."): list(r) for address, r in script.items()}
        self.calls: list[str] = []

    def add(self, address: str, *results: bool) -> None:
        self.script.setdefault(address, []).extend(results)

    def probe(self, target: probing.ProbeTarget) -> tuple[bool, str]:
        self.calls.append(target.address)
        ok = self.script[target.address].pop(0)
        return ok, "" if ok else "HTTP 503"


def apply(kernel, health=CHECK, servers=((N1, 1), (N2, 1))):
    request = {"op": "apply", "spec": spec(servers=servers), "interface": "eth0"}
    if health is not None:
        request["health"] = health
    return json.loads(json.dumps(agent.Agent(kernel).handle(json.loads(json.dumps(request)))))


def read(kernel):
    doc = {"op": "read", "protocol": "tcp", "vip": VIP, "port": 80, "interface": "eth0"}
    return json.loads(json.dumps(agent.Agent(kernel).handle(doc | {"owner": OWNER})))


def health_runtime(kernel, paths, prober, restoring=False):  # noqa: F811
    rt = make_runtime(kernel, paths, restoring)
    rt.health = probing.HealthKeeper(
        str(paths / "lib" / "health.json"), {"kubeProxy": prober}, rt.log, lambda: rt.now
    )
    rt.now = 1000.0
    return rt


def step(rt, seconds: float = 1.0) -> list[str]:
    """One probe round at the fake clock, then a pass; the pass's repair lines."""
    rt.now += seconds
    rt.probe(rt.now)
    return rt.reconcile()


def weights(kernel) -> list[tuple[str, int]]:
    return [(a, w) for a, _port, w, _fwd in kernel.table()]


def states(rt) -> dict[str, str]:
    return {h["address"]: h["state"] for h in rt.status()["services"][KEY]["health"]}


def test_a_failing_node_is_drained_after_fall_and_gets_its_weight_back_after_rise(paths):  # noqa: F811
    k = MemoryKernel()
    apply(k)
    prober = Scripted(**{N1: [True, False, False, True, True], N2: [True] * 5})
    rt = health_runtime(k, paths, prober)
    rt.reconcile()
    assert step(rt) == [] and weights(k) == [(N1, 1), (N2, 1)]  # ok
    assert step(rt) == [] and weights(k) == [(N1, 1), (N2, 1)]  # one failure: fall is 2
    lines = step(rt)  # the second failure: drained, and the pass puts weight 0 in the kernel
    assert weights(k) == [(N1, 0), (N2, 1)]
    assert lines == [f"health {KEY}: set-dest {N1}:80 weight 1 -> 0"]
    assert f"drained {KEY} {N1}:80 (weight 0): HTTP 503" in rt.logged
    assert states(rt) == {N1: "drained", N2: "up"}
    assert rt.status()["inSync"] is True  # a drain is what the director should hold
    assert rt.reconcile() == [] and weights(k) == [(N1, 0), (N2, 1)]  # not "repaired" back
    assert step(rt) == [] and weights(k) == [(N1, 0), (N2, 1)]  # one success: rise is 2
    assert step(rt) == [f"health {KEY}: set-dest {N1}:80 weight 0 -> 1"]
    assert weights(k) == [(N1, 1), (N2, 1)]
    assert f"undrained {KEY} {N1}:80: weight 1 back after 2 successful probes" in rt.logged
    assert states(rt) == {N1: "up", N2: "up"}
    assert prober.calls == [N1, N2] * 5  # every target at each of its intervals


def test_each_target_is_probed_at_its_own_interval(paths):  # noqa: F811
    k = MemoryKernel()
    apply(k, health={**CHECK, "intervalSeconds": 2.0})
    prober = Scripted(**{N1: [True] * 3, N2: [True] * 3})
    rt = health_runtime(k, paths, prober)
    rt.reconcile()
    for _ in range(5):  # t = 1001 .. 1005 against due times 1001, 1003, 1005
        rt.now += 1.0
        rt.probe(rt.now)
    assert prober.calls == [N1, N2] * 3


def test_a_target_between_states_is_probed_again_after_half_an_interval(paths):  # noqa: F811
    k = MemoryKernel()
    apply(k, health={**CHECK, "intervalSeconds": 2.0, "fall": 3, "rise": 2})
    prober = Scripted(**{N1: [False, False, False, True, True], N2: [True] * 4})
    rt = health_runtime(k, paths, prober)
    rt.reconcile()
    times: list[tuple[float, str]] = []
    for _ in range(14):  # every half second from 1000.5 to 1007
        rt.now += 0.5
        before = len(prober.calls)
        rt.probe(rt.now)
        times += [(rt.now, a) for a in prober.calls[before:]]
    n1 = [t for t, a in times if a == N1]
    n2 = [t for t, a in times if a == N2]
    # N1: fails at its first probe, then every half interval (1 s) until drained after 3, then
    # at the interval again (2 s) until the first success, then after 1 s until back up.
    assert [b - a for a, b in zip(n1, n1[1:], strict=False)] == [1.0, 1.0, 2.0, 1.0]
    assert [b - a for a, b in zip(n2, n2[1:], strict=False)] == [2.0, 2.0, 2.0]  # steady
    assert states(rt) == {N1: "up", N2: "up"} and weights(k) == [(N1, 1), (N2, 1)]


def test_when_all_fail_none_is_drained_below_the_threshold_and_status_says_why(paths):  # noqa: F811
    k = MemoryKernel()
    apply(k, servers=((N1, 1), (N2, 1), (N3, 1)))  # threshold 0.5 of 3: 2 stay pooled
    prober = Scripted(**{N1: [False] * 4, N2: [True, False, False, False], N3: [True, True, False, False]})  # fmt: skip
    rt = health_runtime(k, paths, prober)
    rt.reconcile()
    for _ in range(4):
        step(rt)
    # N1 failed first: it is drained; N2 and N3 are failing too but kept in service.
    assert weights(k) == [(N1, 0), (N2, 1), (N3, 1)]
    assert states(rt) == {N1: "drained", N2: "held", N3: "held"}
    why = "draining it would leave fewer than 2 of 3 real servers pooled (depoolThreshold 0.5)"
    held = [f"{KEY} {n}:80 kept in service though failing (HTTP 503): {why}" for n in (N2, N3)]
    assert [n for n in rt.status()["notes"] if "kept in service" in n] == held
    assert all(rt.logged.count(line) == 1 for line in held)  # said once, not every pass
    step_lines = [line for line in rt.logged if line.startswith("drained")]
    assert step_lines == [f"drained {KEY} {N1}:80 (weight 0): HTTP 503"]


def test_a_restart_keeps_a_drained_server_drained_until_rise_successes(paths):  # noqa: F811
    k = MemoryKernel()
    apply(k)
    rt = health_runtime(k, paths, Scripted(**{N1: [False, False], N2: [True, True]}))
    rt.reconcile()
    step(rt), step(rt)
    assert weights(k) == [(N1, 0), (N2, 1)]
    saved = json.loads((paths / "lib" / "health.json").read_text())
    assert saved["services"][KEY][f"{N1}:80"]["up"] is False
    # A reboot: the kernel is empty, the record and health.json survive; a new runtime.
    k2 = MemoryKernel()
    k2.forwarding = False
    prober = Scripted(**{N1: [True, True], N2: [True, True]})
    rt2 = health_runtime(k2, paths, prober, restoring=True)
    rt2.now = 5000.0
    rt2.reconcile()
    assert weights(k2) == [(N1, 0), (N2, 1)]  # restored drained, never at weight 1 first
    assert not any(f"{N1}:80 weight 1" in change for change in k2.changes)
    assert states(rt2) == {N1: "drained", N2: "up"}
    assert step(rt2) == [] and weights(k2) == [(N1, 0), (N2, 1)]  # one success: not yet
    assert step(rt2) == [f"health {KEY}: set-dest {N1}:80 weight 0 -> 1"]


def drained(paths, monkeypatch):  # noqa: F811
    """A runtime that drained N1, its keeper set as the agent's (as the runtime process does)."""
    k = MemoryKernel()
    apply(k)
    rt = health_runtime(k, paths, Scripted(**{N1: [False, False], N2: [True, True]}))
    rt.reconcile()
    step(rt), step(rt)
    monkeypatch.setattr(agent, "HEALTH", rt.health)
    return k, rt


def test_an_apply_in_the_runtime_does_not_undo_a_drain(paths, monkeypatch):  # noqa: F811
    k, rt = drained(paths, monkeypatch)
    reply = apply(k)  # `pulumi up` with the same inputs
    assert weights(k) == [(N1, 0), (N2, 1)] and reply["changes"] == []
    reply = apply(k, servers=((N1, 1), (N2, 3)))  # a real change still happens, drain kept
    assert weights(k) == [(N1, 0), (N2, 3)]
    assert reply["changes"] == [f"set-dest {KEY} -> {N2}:80 weight 3 Route"]
    assert [(h["address"], h["state"], h["weight"]) for h in reply["realServerHealth"]] == [
        (N1, "drained", 0),
        (N2, "up", 3),
    ]
    assert rt.reconcile() == []  # and the runtime agrees: nothing to repair
    apply(k, health=None, servers=((N1, 1), (N2, 3)))  # check removed: the configured weights
    assert weights(k) == [(N1, 1), (N2, 3)]


def test_without_the_runtime_an_apply_uses_the_configured_weights(paths, monkeypatch):  # noqa: F811
    k, _rt = drained(paths, monkeypatch)
    monkeypatch.setattr(agent, "HEALTH", None)
    apply(k)
    assert weights(k) == [(N1, 1), (N2, 1)]


def test_a_refresh_during_a_drain_shows_no_diff(paths, monkeypatch):  # noqa: F811
    k, _rt = drained(paths, monkeypatch)
    director = Director("203.0.113.1", "ssh-ed25519 unused")
    model_spec = virtual_service.model.spec_from_dict(spec())
    result = read(k)
    outs = virtual_service._outputs(director, model_spec, result)
    assert outs["inSync"] is True
    assert outs["realServers"] == [{"address": N1, "weight": 1}, {"address": N2, "weight": 1}]
    assert outs["ipvsadm"] == [f"TCP {VIP}:80 wlc -> {N}:80 Route {w}" for N, w in ((N1, 0), (N2, 1))]  # fmt: skip
    assert [
        (h["address"], h["state"], h["weight"], h["reason"]) for h in outs["realServerHealth"]
    ] == [  # fmt: skip
        (N1, "drained", 0, "HTTP 503"),
        (N2, "up", 1, ""),
    ]
    assert outs["realServerHealth"][0]["since"] == "1970-01-01T00:16:42Z"  # drained at 1002
    # The next `up` compares the refreshed state with the same inputs: no change.
    news = virtual_service._props(director, model_spec, {"health": CHECK})
    diff = virtual_service.VirtualServiceProvider().diff("id", {**news, **outs}, news)
    assert diff.changes is False
    # Real drift still shows: the kernel's weight of N2 changed by hand.
    _set(k, N2, weight=5)
    outs = virtual_service._outputs(director, model_spec, read(k))
    assert outs["inSync"] is False
    assert outs["realServers"] == [{"address": N1, "weight": 1}, {"address": N2, "weight": 5}]
    assert virtual_service.VirtualServiceProvider().diff("id", {**news, **outs}, news).changes
    # And a drained server put back to its weight by hand is drift too (the runtime repairs it).
    _set(k, N2, weight=1), _set(k, N1, weight=1)
    outs = virtual_service._outputs(director, model_spec, read(k))
    assert outs["inSync"] is False


def test_a_vip_check_gets_probe_services_and_accept_local_while_the_service_lives(paths):  # noqa: F811
    M1, M2 = 0x49490001, 0x49490002
    local = paths / "sys" / "net/ipv4/conf/eth0/accept_local"
    quiescent = paths / "sys" / "net/ipv4/vs/expire_quiescent_template"
    for f in (local, quiescent):
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("0\n")
    k = MemoryKernel()
    apply(k, health={**CHECK, "check": "vip"})
    rt = make_runtime(k, paths)
    rt.reconcile()
    assert {m: sorted(d) for m, (_s, d) in k.fwmarks.items()} == {M1: [(N1, 0)], M2: [(N2, 0)]}
    assert local.read_text() == "1\n" and quiescent.read_text() == "0\n"  # not persistent
    # The runtime's own vip prober goes through those services, and only while they exist.
    assert isinstance(rt.health.probers["vip"], probing.VipProber)
    assert rt.health.probers["vip"].route(N2) == (M2, "203.0.113.2")
    assert rt.status()["probeServices"][N1] == {"mark": f"{M1:#x}", "inPlace": True, "source": "203.0.113.2"}  # fmt: skip
    assert not any("not implemented" in line for line in rt.logged + rt.status()["notes"])
    rt.health.sent = 7
    rt.write_status()
    out = io.StringIO()
    runtime.print_status(k, status_path=rt.status_path, config_path=rt.config_path, out=out, health_path=rt.health.path)  # fmt: skip
    lines = out.getvalue().splitlines()
    assert [line for line in lines if "probe" in line] == [
        "probes: 7 sent since the runtime started (7.0 per second)",
        f"  probe service fwmark {M1:#x} -> {N1} (route): in place, probes from 203.0.113.2",
        f"  probe service fwmark {M2:#x} -> {N2} (route): in place, probes from 203.0.113.2",
    ]
    # Persistent: drained servers must shed their persistent clients too.
    request = {"op": "apply", "spec": {**spec(), "persistenceSeconds": 300}, "interface": "eth0", "health": {**CHECK, "check": "vip"}}  # fmt: skip
    agent.Agent(k).handle(json.loads(json.dumps(request)))
    rt.reconcile()
    assert quiescent.read_text() == "1\n"
    # The stack destroyed: its probe services go, the settings are put back.
    doc = {"op": "delete", "protocol": "tcp", "vip": VIP, "port": 80, "interface": "eth0", "owner": OWNER}  # fmt: skip
    agent.Agent(k).handle(doc)
    rt.reconcile()
    assert k.fwmarks == {} and local.read_text() == "0\n" and quiescent.read_text() == "0\n"
    assert rt.health.probers["vip"].route(N1) is None


def test_a_removed_real_server_is_forgotten_and_a_prober_error_is_a_failed_probe(paths):  # noqa: F811
    class Broken:
        def probe(self, target):
            raise RuntimeError("boom")

    k = MemoryKernel()
    apply(k)
    rt = health_runtime(k, paths, Broken())
    rt.reconcile(), step(rt), step(rt)
    assert weights(k) == [(N1, 0), (N2, 1)]  # N1 failed first (probe order): drained
    assert f"drained {KEY} {N1}:80 (weight 0): probe error RuntimeError: boom" in rt.logged
    apply(k, servers=((N2, 1),))
    rt.reconcile()
    saved = json.loads((paths / "lib" / "health.json").read_text())
    assert list(saved["services"][KEY]) == [f"{N2}:80"]


def test_status_prints_each_drained_and_held_real_server(paths):  # noqa: F811
    k = MemoryKernel()
    apply(k, servers=((N1, 1), (N2, 1), (N3, 1)))
    prober = Scripted(**{N1: [False] * 2, N2: [False] * 2, N3: [True] * 2})
    rt = health_runtime(k, paths, prober)
    rt.reconcile(), step(rt), step(rt)
    out = io.StringIO()
    code = runtime.print_status(
        k,
        status_path=rt.status_path,
        config_path=rt.config_path,
        out=out,
        health_path=rt.health.path,
    )
    lines = out.getvalue().splitlines()
    assert f"{KEY} [{OWNER}] applied: in sync" in lines  # the drain is not drift
    health_lines = [line for line in lines if line.startswith("  health")]
    assert health_lines == [
        f"  health  {N1}:80 drained since 1970-01-01T00:16:42Z: HTTP 503",
        f"  health  {N2}:80 held since 1970-01-01T00:16:42Z: HTTP 503",
    ]
    assert code == 0  # running (this process wrote the status) and in sync despite the drain


def test_the_running_runtime_applies_a_drain_at_once_not_at_its_next_interval(paths):  # noqa: F811
    k = MemoryKernel()
    apply(k, health={**CHECK, "intervalSeconds": 0.2, "timeoutSeconds": 0.1})
    rt = make_runtime(k, paths, config={"intervalSeconds": 3600})

    class Failing:
        def probe(self, target):
            return target.address != N1, "HTTP 503"

    rt.health = probing.HealthKeeper(str(paths / "h.json"), {"kubeProxy": Failing()}, rt.log)
    stop = threading.Event()
    thread = threading.Thread(target=runtime.run, args=(rt, stop))
    thread.start()
    try:
        for _ in range(100):  # at most 10 s; fall 2 x 0.2 s and a wake: well under 1 s
            if k.services and weights(k) == [(N1, 0), (N2, 1)]:
                break
            threading.Event().wait(0.1)
    finally:
        stop.set()
        rt.wake.set()
        thread.join(10)
    assert not thread.is_alive()
    assert weights(k) == [(N1, 0), (N2, 1)]
    assert f"health {KEY}: set-dest {N1}:80 weight 1 -> 0" in rt.logged


# --- the kubeProxy prober against a server on loopback ------------------------------------------


class Healthz(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802
        code = Healthz.status if self.path == "/healthz" else 404
        self.send_response(code)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


@pytest.fixture
def healthz():
    server = http.server.HTTPServer(("127.0.0.1", 0), Healthz)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


def target(port: int, timeout: float = 0.5) -> probing.ProbeTarget:
    return probing.ProbeTarget(KEY, f"127.0.0.1:{port}", "127.0.0.1", 80, VIP, "kubeProxy", timeout, 1.0, port)  # fmt: skip


def test_kube_proxy_prober_200_is_up_anything_else_is_down(healthz):
    port = healthz.server_address[1]
    prober = probing.KubeProxyProber()
    Healthz.status = 200
    assert prober.probe(target(port)) == (True, "")
    Healthz.status = 503
    assert prober.probe(target(port)) == (
        False,
        f"kubeProxy healthz 127.0.0.1:{port}: HTTP 503, expected 200",
    )
    Healthz.status = 200


def test_kube_proxy_prober_refused_and_timed_out():
    prober = probing.KubeProxyProber()
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, not listening: refused
        ok, why = prober.probe(target(port))
        assert not ok and why == f"kubeProxy healthz 127.0.0.1:{port}: Connection refused"
    with socket.socket() as silent:  # accepts (backlog) but never answers: the timeout
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        port = silent.getsockname()[1]
        ok, why = prober.probe(target(port, 0.2))
        assert not ok and why == f"kubeProxy healthz 127.0.0.1:{port}: timed out after 0.2 s"


def test_a_service_recorded_pending_for_an_apply_keeps_its_drain(paths):  # noqa: F811
    k = MemoryKernel()
    apply(k)
    rt = health_runtime(k, paths, Scripted(**{N1: [False, False], N2: [True, True]}))
    rt.reconcile(), step(rt), step(rt)
    state = json.loads((paths / "state.json").read_text())
    state["services"][KEY]["state"] = "pending"  # a provider's apply, cut or under way
    (paths / "state.json").write_text(json.dumps(state))
    rt.reconcile()
    saved = json.loads((paths / "lib" / "health.json").read_text())
    assert saved["services"][KEY][f"{N1}:80"]["up"] is False
    assert states(rt) == {N1: "drained", N2: "up"}


def test_an_unwritable_health_file_is_said_once_and_probing_goes_on(paths):  # noqa: F811
    k = MemoryKernel()
    apply(k)
    (paths / "lib").mkdir()
    (paths / "lib" / "health.json").mkdir()  # os.replace onto a directory: refused
    rt = health_runtime(k, paths, Scripted(**{N1: [False, False, True, True], N2: [True] * 4}))
    rt.reconcile(), step(rt), step(rt)
    assert weights(k) == [(N1, 0), (N2, 1)]
    step(rt), step(rt)
    assert weights(k) == [(N1, 1), (N2, 1)]
    problems = [line for line in rt.logged if "cannot be written" in line]
    assert len(problems) == 1 and problems[0].startswith(f"{paths}/lib/health.json: cannot")


def test_a_result_for_a_real_server_removed_meanwhile_is_dropped(paths):  # noqa: F811
    k = MemoryKernel()
    apply(k)
    rt = health_runtime(k, paths, Scripted())
    rt.reconcile()
    apply(k, servers=((N2, 1),))
    rt.reconcile()
    # A probe of N1 started before the removal answers after it: it must not come back.
    assert rt.health.record(KEY, f"{N1}:80", False, "late", 2000.0) is False
    assert rt.health.record(KEY, f"{N1}:80", False, "late", 2001.0) is False
    assert list(rt.health.tracker.states(KEY)) == []


# --- the vip prober's socket side, on loopback (the fwmark services are the next step) --------


def vip_target(port: int, http=None, timeout: float = 0.5) -> probing.ProbeTarget:
    return probing.ProbeTarget(KEY, f"{N1}:{port}", N1, port, "127.0.0.1", "vip", timeout, 1.0, 10256, http)  # fmt: skip


def test_vip_prober_connects_with_its_mark_from_the_source_and_checks_the_status(healthz):
    port = healthz.server_address[1]
    routes: list[str] = []

    def route(address):
        routes.append(address)
        return 1001, "127.0.0.1"

    prober = probing.VipProber(route)
    assert prober.probe(vip_target(port)) == (True, "")  # a TCP connect only
    assert prober.probe(vip_target(port, {"path": "/healthz", "expectStatus": 200})) == (True, "")
    where = f"vip probe 127.0.0.1:{port} via {N1}"
    got = prober.probe(vip_target(port, {"path": "/other", "expectStatus": 200}))
    assert got == (False, f"{where}: HTTP 404, expected 200")
    assert routes == [N1] * 3
    unrouted = probing.VipProber(lambda _address: None)
    got = unrouted.probe(vip_target(port))  # not probed: never a guess through another node
    assert got == (None, f"{where}: not sent: no probe service (fwmark) in place")


def test_vip_prober_refused_and_timed_out():
    prober = probing.VipProber(lambda _address: (1001, "127.0.0.1"))
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        got = prober.probe(vip_target(port))
        assert got == (False, f"vip probe 127.0.0.1:{port} via {N1}: Connection refused")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        port = silent.getsockname()[1]
        got = prober.probe(vip_target(port, {"path": "/", "expectStatus": 200}, 0.2))
        assert got == (False, f"vip probe 127.0.0.1:{port} via {N1}: timed out after 0.2 s")


class Trickle:
    """A peer that accepts and answers one byte every `gap` seconds, forever (bounded by the
    test): a probe must give up at its timeout however the bytes trickle."""

    def __init__(self, gap: float = 0.1, reply: bytes = b"HTTP/1.0 200 OK\r\n"):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        self.gap, self.reply, self.stop = gap, reply, threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        conn, _ = self.sock.accept()
        with conn:
            for byte in self.reply * 50:
                if self.stop.wait(self.gap):
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return

    def close(self):
        self.stop.set()
        self.sock.close()


@pytest.mark.parametrize("check", ["vip", "kubeProxy"])
def test_a_trickling_peer_cannot_hold_a_probe_past_its_timeout(check):
    import time

    peer = Trickle()
    try:
        http = {"path": "/", "expectStatus": 200}
        if check == "vip":
            t = vip_target(peer.port, http, timeout=0.4)
            prober = probing.VipProber(lambda _a: (1001, "127.0.0.1"))
            where = f"vip probe 127.0.0.1:{peer.port} via {N1}"
        else:
            t = target(peer.port, timeout=0.4)
            prober = probing.KubeProxyProber()
            where = f"kubeProxy healthz 127.0.0.1:{peer.port}"
        began = time.monotonic()
        got = prober.probe(t)
        took = time.monotonic() - began
    finally:
        peer.close()
    assert got == (False, f"{where}: timed out after 0.4 s")
    assert took < 0.6, took  # one deadline for the whole exchange, not one per byte


def test_a_reply_without_a_full_status_line_is_a_failure():
    peer = Trickle(gap=0.0, reply=b"HTTP/1.1 200")  # cut before its line end, then silence
    try:
        peer.reply = b"HTTP/1.1 200"
        got = probing.KubeProxyProber().probe(target(peer.port, timeout=0.3))
    finally:
        peer.close()
    assert got[0] is False


def test_every_probe_closes_with_a_reset_so_no_entry_lingers(healthz):
    """IPVS keeps a FIN_WAIT entry (DR sees the director's packets only) that a later probe from
    the same source port would follow to the old node; an RST leaves none."""
    seen: list[str] = []
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    port = server.getsockname()[1]

    def serve():
        conn, _ = server.accept()
        with conn:
            conn.recv(1024)
            conn.sendall(b"HTTP/1.0 200 OK\r\n\r\n")
            try:
                conn.settimeout(2)
                seen.append("fin" if conn.recv(1024) == b"" else "data")
            except ConnectionResetError:
                seen.append("rst")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    got = probing.VipProber(lambda _a: (1001, "127.0.0.1")).probe(
        vip_target(port, {"path": "/", "expectStatus": 200})
    )
    thread.join(5)
    server.close()
    assert got == (True, "") and seen == ["rst"]


def test_the_directors_own_errors_are_not_sent_never_a_node_failure():
    # 203.0.113.250 is not an address of this host: bind() fails with EADDRNOTAVAIL, as after a
    # renumbering; the node is not to blame.
    got = probing.VipProber(lambda _a: (1001, "203.0.113.250")).probe(vip_target(9))
    assert got[0] is None and "the director's own error" in got[1]


def test_a_probe_not_sent_is_said_in_status_and_changes_nothing(paths):  # noqa: F811
    local = paths / "sys" / "net/ipv4/conf/eth0/accept_local"
    local.parent.mkdir(parents=True)
    local.write_text("0\n")
    k = MemoryKernel()
    apply(k, health={**CHECK, "check": "vip"})
    rt = make_runtime(k, paths)
    rt.reconcile()
    assert rt.probes.route(N1) is not None
    k.fwmarks.clear()  # flushed: until the next pass puts them back, no probe may be sent
    rt.probes.read_at = 0.0
    rt.now = rt.clock()
    for _ in range(4):
        rt.probe(rt.clock() + 10)
    rt.reconcile()
    assert states(rt) == {N1: "up", N2: "up"} and weights(k) == [(N1, 1), (N2, 1)]
    notes = [n for n in rt.status()["notes"] if "not sent" in n]
    assert notes and all("probe service fwmark" in n and "not in place" in n for n in notes)


def test_with_repair_off_a_failing_server_is_reported_not_drained(paths):  # noqa: F811
    k = MemoryKernel()
    apply(k)
    (paths / "runtime.json").write_text(json.dumps({"repair": {OWNER: False}}))
    prober = Scripted(**{N1: [False] * 3, N2: [True] * 3})
    rt = health_runtime(k, paths, prober)
    rt.reconcile(), step(rt), step(rt), step(rt)
    assert weights(k) == [(N1, 1), (N2, 1)]  # the runtime changes nothing of this stack
    assert states(rt) == {N1: "failing", N2: "up"}
    assert any(line.startswith(f"failing {KEY} {N1}:80, not drained (its stack's repair is off)") for line in rt.logged)  # fmt: skip
    # And the provider's own apply (`pulumi up`) keeps the configured weights too.
    apply(k)
    assert weights(k) == [(N1, 1), (N2, 1)]
