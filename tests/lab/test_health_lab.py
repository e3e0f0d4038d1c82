"""Health checks through the VIP on the lab director (issue 9), with the nodes failing the way
real ones do (tests/lab/nodes.py) under a paced client at 20 requests/s.

One virtual service over the lab's two nodes is created through the provider (gRPC) with the
program's health defaults (check vip: the Seesaw probe through a fwmark service per node, every
1 s, timeout 0.5 s, rise 2, fall 2, depoolThreshold 0.5). Printed per case: the time from the
failure to the drain and from the recovery to the configured weight back, and the failed
requests. The oracle of a drain is the kernel's own table (/proc/net/ip_vs, streamed from the
director and stamped on arrival here, so both ends of each interval are on this host's clock);
the client's results say what a drain spared. Boots its own systemd lab (`-m slow_lab` alone).
"""

from __future__ import annotations

import contextlib
import json
import shlex
import subprocess
import threading
import time

import pytest

from tests.conftest import _say, own_lab
from tests.lab import nodes, ops
from tests.lab.test_runtime_lab import OWNER, connect, journal

pytestmark = [pytest.mark.lab, pytest.mark.slow_lab]

VIP = "203.0.113.201"
N1, N2 = "203.0.113.11", "203.0.113.12"
CLIENT = "203.0.113.10"
INTERVAL, TIMEOUT, RISE, FALL = 1.0, 0.5, 2, 2  # the program's defaults (asserted below)
DRAIN_GOAL = INTERVAL * FALL + 1  # the goals
BACK_GOAL = INTERVAL * RISE + 1
# The emulated director (qemu TCG, one CPU shared with the runtime's passes) and the stream's
# own delay: allowed on top of the goals, which are printed with MET or MISSED.
SLACK = 1.5
RATE = 20
# The client's timeout where a test asserts that nothing fails after a drain: a request the
# drained node got would hang for good and fail at any timeout, while a stall of the emulated
# director longer than 1 s (qemu TCG on a loaded CI host) must not read as a drain that failed.
# Results are read only after every request started before the end has finished (settled).
AFTER_DRAIN_TIMEOUT = 3.0

# On the director: print the VIP service's weight per real server (from the kernel's own text)
# each time it changes, at most every 20 ms, until stdin closes or `limit` seconds passed.
_WATCH = r"""
import json, sys, select, time
vip, port, limit = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
key = "TCP  %08X:%04X" % (int.from_bytes(bytes(int(x) for x in vip.split(".")), "big"), port)
def weights():
    found, out = False, {}
    for line in open("/proc/net/ip_vs"):
        if not line.startswith("  ->"):
            found = line.startswith(key)
        elif found:
            host, w = line.split()[1].split(":")[0], int(line.split()[3])
            out[".".join(str(b) for b in int(host, 16).to_bytes(4, "big"))] = w
    return out
last, end = None, time.monotonic() + limit
while time.monotonic() < end:
    now = weights()
    if now != last:
        print(json.dumps(now), flush=True)
        last = now
    if select.select([sys.stdin], [], [], 0.02)[0]:
        break
"""


class TableWatch:
    """The director's VIP service weights as they change, stamped with this host's time.time()
    when each line arrives (an ssh stream: milliseconds behind the kernel)."""

    def __init__(self, lab, limit: float = 300):
        argv = lab.ssh_argv(f"python3 -u -c {shlex.quote(_WATCH)} {VIP} 80 {limit}")
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True
        )
        self.tracked = lab._state.add_proc(self.proc.pid, "table watch")
        self.lab, self.seen, self.cond = lab, [], threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        self.wait(lambda w: True, 0, 60)  # streaming

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self.cond:
                self.seen.append((time.time(), json.loads(line)))
                self.cond.notify_all()

    def wait(self, pred, after: float, limit: float) -> float:
        """The first time at or after `after` that the weights satisfy `pred` (the state in
        force at `after` counts, stamped `after`)."""
        deadline = time.monotonic() + limit
        with self.cond:
            while True:
                before = [w for t, w in self.seen if t <= after][-1:]
                if before and pred(before[0]):
                    return after
                hits = [t for t, w in self.seen if t > after and pred(w)]
                if hits:
                    return hits[0]
                left = deadline - time.monotonic()
                assert left > 0, f"not within {limit} s: {self.seen[-5:]}"
                self.cond.wait(left)

    def weights_between(self, t0: float, t1: float) -> list[dict]:
        with self.cond:
            before = [w for t, w in self.seen if t <= t0][-1:]
            return before + [w for t, w in self.seen if t0 < t <= t1]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self.lab._state.procs.remove(self.tracked)
        self.lab._state.save()


@contextlib.contextmanager
def table_watch(lab):
    watch = TableWatch(lab)
    try:
        yield watch
    finally:
        watch.close()


def props(lab, health: dict) -> dict:
    return {
        "director": lab.director_config(),
        "vip": VIP,
        "port": 80,
        "protocol": "tcp",
        # rr: every other new connection goes to the failing node, whatever connections the
        # earlier cases left in the table (wlc would count those and spare it, flattering).
        "scheduler": "rr",
        "realServers": [{"address": ip, "weight": 1} for ip in lab.node_ips],
        "owner": OWNER,
        "health": health,
    }


@pytest.fixture(scope="module")
def hlab(request):
    with own_lab(request, "health lab", init="systemd") as lab:
        assert lab.node_ips == [N1, N2] and lab.client_ip == CLIENT
        yield lab


@pytest.fixture(scope="module")
def service(hlab):
    provider = connect(hlab)
    try:
        inputs, failures = provider.check(props(hlab, {}))  # {}: the program's defaults
        assert failures == []
        h = inputs["health"]
        assert (h["check"], h["intervalSeconds"], h["timeoutSeconds"]) == ("vip", INTERVAL, TIMEOUT)
        assert (h["rise"], h["fall"], h["depoolThreshold"]) == (RISE, FALL, 0.5)
        id_, outs = provider.create(inputs)
    finally:
        provider.close()
    assert outs["inSync"] is True
    status = json.loads(hlab.director("cat /run/ipvs-ingress/status.json").stdout)
    deadline = time.monotonic() + 30
    while sorted(p for p, e in status["probeServices"].items() if e["inPlace"]) != [N1, N2]:
        assert time.monotonic() < deadline, status["probeServices"]
        time.sleep(1)
        status = json.loads(hlab.director("cat /run/ipvs-ingress/status.json").stdout)
    assert sorted(status["probeServices"]) == [N1, N2]
    return id_, inputs


@pytest.fixture
def healthy(hlab, service):
    """Every node healthy and both real servers at their configured weight, before and after."""
    hlab.nodes.reset()
    with table_watch(hlab) as watch:
        watch.wait(lambda w: w == {N1: 1, N2: 1}, time.time(), 30)
    yield hlab
    hlab.nodes.reset()
    with table_watch(hlab) as watch:
        watch.wait(lambda w: w == {N1: 1, N2: 1}, time.time(), 30)


def settled(run, t_end: float) -> list[dict]:
    """The requests started before t_end, once each has finished or timed out."""
    time.sleep(AFTER_DRAIN_TIMEOUT + 0.5)
    return [r for r in run.results() if r["start"] < t_end]


def failed(results: list[dict], t0: float, t1: float) -> list[dict]:
    return [r for r in results if t0 <= r["start"] < t1 and r["outcome"] != "ok"]


def count(results: list[dict], t0: float, t1: float) -> int:
    return sum(1 for r in results if t0 <= r["start"] < t1)


def goal(value: float, limit: float) -> str:
    return f"goal <= {limit:g} s: {'MET' if value <= limit else 'MISSED'}"


# Healing `unreachable` brings the link back; the director resolves the node's address again
# (ARP) before the first probe can pass.
ARP_AGAIN = {"unreachable": 3.0}


@pytest.mark.parametrize("mode", ["server-stop", "unreachable"])
def test_a_failing_node_is_drained_then_back_after_it_recovers(healthy, request, mode):
    lab = healthy
    load = nodes.load(lab, VIP, 80, RATE, timeout=AFTER_DRAIN_TIMEOUT)
    with table_watch(lab) as watch, load as run:
        time.sleep(2.0)
        lab.nodes.fail(2, mode)
        t_fail = time.time()
        t_drained = watch.wait(lambda w: w.get(N2) == 0, t_fail, 20)
        time.sleep(3.0)  # requests after the drain: none may fail
        lab.nodes.heal(2, mode)
        t_heal = time.time()
        t_back = watch.wait(lambda w: w.get(N2) == 1, t_heal, 30)
        time.sleep(2.0)
        t_end = time.time()
        results = settled(run, t_end)
    drain, back = t_drained - t_fail, t_back - t_heal
    lost = failed(results, t_fail - 1.0, t_drained + 1.0)  # 1 s: a request's own timeout
    _say(
        request,
        f"health lab: node {mode} at {RATE} req/s: drained {drain:.2f}s after the failure "
        f"({goal(drain, DRAIN_GOAL)}), {len(lost)}/{count(results, t_fail, t_drained)} requests "
        f"failed meanwhile (goal <= 3: {'MET' if len(lost) <= 3 else 'MISSED'}), "
        f"{len(failed(results, t_drained + 1.0, t_heal))} after the drain; back "
        f"{back:.2f}s after recovery ({goal(back, BACK_GOAL)}), "
        f"{len(failed(results, t_heal, t_end))} failed after the recovery",
    )
    assert drain <= DRAIN_GOAL + SLACK
    assert back <= BACK_GOAL + SLACK + ARP_AGAIN.get(mode, 0.0)
    late = failed(results, t_drained + 1.0, t_end)  # drained: nothing else fails
    assert late == [], (late, t_drained, watch.weights_between(t_fail, t_end))
    assert all(r["outcome"] in ("refused", "reset", "timeout") for r in lost), lost[:3]
    assert count(results, t_fail - 2, t_end) >= RATE * (t_end - t_fail) * 0.8  # the load ran
    lines = journal(lab)
    assert any(line.startswith(f"drained tcp/{VIP}:80 {N2}:80 (weight 0): vip probe") for line in lines)  # fmt: skip
    assert f"health tcp/{VIP}:80: set-dest {N2}:80 weight 1 -> 0" in lines


def update_health(lab, service, health: dict) -> None:
    id_, inputs = service
    provider = connect(lab)
    try:
        new, failures = provider.check(props(lab, health))
        assert failures == []
        provider.update(id_, inputs, new)
    finally:
        provider.close()
    ops.wait_for_pass(lab)


def test_a_missing_vip_rule_is_drained_by_the_vip_probe_not_by_kube_proxy_healthz(
    healthy, service, request
):
    lab = healthy
    assert nodes.attempts(lab, N2, nodes.HEALTHZ_PORT, path="/healthz")[0]["status"] == 200
    load = nodes.load(lab, VIP, 80, RATE, timeout=AFTER_DRAIN_TIMEOUT)
    with table_watch(lab) as watch, load as run:
        time.sleep(1.0)
        lab.nodes.fail(2, "vip-rule-missing")
        t_fail = time.time()
        healthz = nodes.attempts(lab, N2, nodes.HEALTHZ_PORT, path="/healthz")[0]
        t_drained = watch.wait(lambda w: w.get(N2) == 0, t_fail, 20)
        time.sleep(3.0)
        t_end = time.time()
        results = settled(run, t_end)
    assert healthz["status"] == 200  # kube-proxy says the node is fine
    vip_lost = failed(results, t_fail - 1.0, t_drained + 1.0)
    late = failed(results, t_drained + 1.0, t_end)
    assert late == [], (late, t_drained, watch.weights_between(t_fail, t_end))
    # The same failure with check kubeProxy: healthz answers 200, nothing is drained.
    lab.nodes.heal(2)
    with table_watch(lab) as watch:
        watch.wait(lambda w: w.get(N2) == 1, time.time(), 30)
    update_health(lab, service, {"check": "kubeProxy"})
    try:
        with table_watch(lab) as watch, nodes.load(lab, VIP, 80, RATE, timeout=1.0) as run:
            time.sleep(1.0)
            lab.nodes.fail(2, "vip-rule-missing")
            k_fail = time.time()
            time.sleep(DRAIN_GOAL + SLACK + 2.0)  # longer than a vip probe needed to drain it
            k_end = time.time()
            results = run.results()
            seen = watch.weights_between(k_fail, k_end)
    finally:
        lab.nodes.heal(2)
        update_health(lab, service, {})
    kube_lost = failed(results, k_fail + 1.0, k_end - 1.0)
    _say(
        request,
        f"health lab: VIP rule missing on node2, its kube-proxy healthz 200: check vip drained "
        f"it in {t_drained - t_fail:.2f}s ({len(vip_lost)} requests failed, then 0); check "
        f"kubeProxy never drained it: {len(kube_lost)}/{count(results, k_fail + 1.0, k_end - 1.0)} "
        f"requests failed in {k_end - k_fail - 2.0:.1f}s",
    )
    assert t_drained - t_fail <= DRAIN_GOAL + SLACK
    assert all(w.get(N2) == 1 for w in seen), seen  # kubeProxy: never drained
    assert len(kube_lost) >= 5  # and the clients pay for it


def test_when_every_node_fails_the_threshold_keeps_half_in_service_and_says_why(healthy, request):
    lab = healthy
    with table_watch(lab) as watch:
        lab.nodes.fail(1, "server-stop")
        lab.nodes.fail(2, "server-stop")
        t_fail = time.time()
        t_one = watch.wait(lambda w: sorted(w.values()) == [0, 1], t_fail, 20)
        time.sleep(INTERVAL * FALL + 2.0)  # the other's failures counted too: still held
        seen = watch.weights_between(t_one, time.time())
    assert all(sorted(w.values()) == [0, 1] for w in seen), seen  # never both drained
    status = lab.director("ipvs-ingress status", check=False).stdout
    held = [line for line in status.splitlines() if " held since " in line]
    drained = [line for line in status.splitlines() if " drained since " in line]
    assert len(held) == 1 and len(drained) == 1, status
    notes = [line for line in status.splitlines() if "kept in service" in line]
    assert notes, status
    lines = journal(lab)
    assert any("kept in service" in line for line in lines)
    _say(
        request,
        f"health lab: both nodes failing: one drained {t_one - t_fail:.2f}s after, the other "
        f"held in service by depoolThreshold 0.5; status: {notes[0].strip()[:150]}",
    )


def test_local_policy_the_pod_sees_the_client_and_a_node_without_a_pod_is_drained(healthy, request):
    lab = healthy
    # The runtime set conn_reuse_mode bit 2: a client reusing a port is scheduled anew, never
    # sent after an old FIN_WAIT entry to the node drained below (providers/agent.py).
    assert int(lab.director("cat /proc/sys/net/ipv4/vs/conn_reuse_mode").stdout) & 2
    lab.nodes.clear_peers()
    assert all(a["outcome"] == "ok" for a in nodes.attempts(lab, VIP, 80, count=6))
    cluster = set(lab.nodes.peers(1) + lab.nodes.peers(2))
    assert cluster <= {N1, N2} and cluster, cluster  # Cluster: kube-proxy masquerades
    lab.nodes.policy("Local")
    with table_watch(lab) as watch:
        lab.nodes.fail(2, "no-local-pod")
        t_fail = time.time()
        t_drained = watch.wait(lambda w: w.get(N2) == 0, t_fail, 20)
        time.sleep(1.0)
        lab.nodes.clear_peers()
        t_load = time.time()
        # 1 s here: with 3 s, 9-15 of 100 requests timed out in 2 of 3 runs after the tests
        # before it (0 when run alone; with 1 s, 0 in 5 of 6 runs): cause not found yet.
        with nodes.load(lab, VIP, 80, RATE, timeout=1.0) as run:
            time.sleep(5.0)
            results = run.results()
        weights = watch.weights_between(t_load, time.time())
    peers = lab.nodes.peers(1)
    lost = [r for r in results if r["outcome"] != "ok"]
    _say(
        request,
        f"health lab: externalTrafficPolicy Local: node2 without a local pod drained "
        f"{t_drained - t_fail:.2f}s after; then {len(lost)}/{len(results)} requests failed and "
        f"node1's pod saw the peers {sorted(set(peers))} (the client is {CLIENT}); under Cluster "
        f"the pods saw {sorted(cluster)}",
    )
    # On a failure, the director's connection entries to the drained node say whether the
    # failed requests followed an old entry (same client port) instead of being scheduled.
    entries = lab.director(f"ipvsadm -Lcn | grep -F ' {N2}:80' || true", check=False).stdout
    assert lost == [] and len(results) >= RATE * 4, (len(lost), lost[:2], entries, weights)
    assert peers and set(peers) == {CLIENT}
    assert lab.nodes.peers(2) == []


def test_a_restart_and_a_reboot_keep_a_drained_server_drained_until_a_probe_passes(
    healthy, service, request
):
    lab = healthy
    lab.nodes.fail(2, "server-stop")
    with table_watch(lab) as watch:
        watch.wait(lambda w: w.get(N2) == 0, time.time(), 20)
    # A drain is not drift: a refresh shows no diff, and an `up` with nothing changed keeps it.
    id_, inputs = service
    provider = connect(lab)
    try:
        _, live = provider.read(id_, inputs)
        diff = provider.diff(id_, live, inputs)
        provider.update(id_, inputs, inputs)
    finally:
        provider.close()
    assert live["inSync"] is True and diff.changes == diff.DIFF_NONE
    assert {h["address"]: h["state"] for h in live["realServerHealth"]} == {N1: "up", N2: "drained"}
    assert f"-a -t {VIP}:80 -r {N2}:80 -g -w 0" in lab.ipvsadm_sn()
    with table_watch(lab) as watch:
        lab.director("systemctl restart ipvs-ingress.service")
        t0 = time.time()
        ops.wait_for_pass(lab)
        time.sleep(INTERVAL * RISE + 1.0)
        seen = watch.weights_between(t0, time.time())
    assert seen and all(w.get(N2) == 0 for w in seen), seen  # never flapped back
    took = lab.reboot()
    ops.wait_for_pass(lab, timeout=60)
    time.sleep(INTERVAL * RISE + 1.0)
    booted = journal(lab)  # this boot's lines
    restored = [line for line in booted if line.startswith(f"restored tcp/{VIP}:80: add-dest")]
    assert f"restored tcp/{VIP}:80: add-dest {N2}:80 weight 0" in restored, booted
    assert not any(f"{N2}:80 weight 1" in line for line in booted), booted
    assert f"-a -t {VIP}:80 -r {N2}:80 -g -w 0" in lab.ipvsadm_sn()
    with table_watch(lab) as watch:  # streaming before the recovery: its time is measured
        lab.nodes.heal(2)
        t_heal = time.time()
        t_back = watch.wait(lambda w: w.get(N2) == 1, t_heal, 30)
    _say(
        request,
        f"health lab: a drained server across a runtime restart and a reboot (VM start to sshd "
        f"{took.up:.1f}s): weight 0 throughout, restored at 0 after the boot; back "
        f"{t_back - t_heal:.2f}s after it recovered",
    )


def test_a_destroy_leaves_no_probe_service_and_puts_accept_local_back(hlab, service):
    id_, inputs = service
    recorded = json.loads(hlab.director("cat /var/lib/ipvs-ingress/probes.json").stdout)
    previous = recorded["sysctls"]["net/ipv4/conf/eth0/accept_local"]["previous"]
    assert hlab.director("sysctl -n net.ipv4.conf.eth0.accept_local").stdout.strip() == "1"
    provider = connect(hlab)
    try:
        provider.delete(id_, inputs)
    finally:
        provider.close()
    ops.wait_for_pass(hlab)
    ops.wait_for_pass(hlab)
    assert "FWM" not in hlab.ipvsadm_ln()
    assert hlab.director("sysctl -n net.ipv4.conf.eth0.accept_local").stdout.strip() == previous
    recorded = json.loads(hlab.director("cat /var/lib/ipvs-ingress/probes.json").stdout)
    assert recorded["marks"] == {} and recorded["sysctls"] == {}
