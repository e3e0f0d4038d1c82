"""The lab's node stand-ins behave like kube-proxy nodes and fail the way real nodes do.

Independent of the product: the director's IPVS is set up with its own ipvsadm (Direct Routing,
as test_lab_dr.py), so these prove the lab's nodes, which the health-check lab tests rely on.
Seen from the client through the VIP (one node in service at a time: the others at weight 0) and
directly (node:8080, the pod's hostPort; node:10256, kube-proxy's healthz). The oracles are the
client's sockets (refused, timed out, answered by whom), the pods' peer records, and, for
healing, the nodes' own iptables-save, routes and links compared before and after.
"""

from __future__ import annotations

import json
import re
import time

import pytest

from tests.lab import nodes as nodes_mod

pytestmark = pytest.mark.lab

PORT = 80
TIMEOUT = 1.0  # a lab reply takes milliseconds; a second without one is a timeout
NO_ANSWER = {"timeout", "unreachable"}  # a node cut off: silence, or ARP for it failed


@pytest.fixture(scope="module")
def rr_service(lab):
    """VIP:80 rr, every node a `route` (-g) destination; removed at the end as test_lab_dr does."""
    dests = " && ".join(
        f"ipvsadm -a -t {lab.vip}:{PORT} -r {ip}:{PORT} -g -w 1" for ip in lab.node_ips
    )
    lab.director(
        "modprobe ip_vs && modprobe ip_vs_rr && sysctl -qw net.ipv4.ip_forward=1"
        f" && ip addr add {lab.vip}/32 dev {lab.interface}"
        f" && ipvsadm -A -t {lab.vip}:{PORT} -s rr && {dests}"
    )
    yield
    lab.nodes.reset()
    lab.director(
        f"ipvsadm -C && ip addr del {lab.vip}/32 dev {lab.interface}"
        " && sysctl -qw net.ipv4.ip_forward=0"
        " && { modprobe -r ip_vs_rr ip_vs 2>/dev/null || true; }"
    )


@pytest.fixture
def nodes(lab, rr_service):
    lab.nodes.reset()
    yield lab.nodes
    lab.nodes.reset()


def only(lab, i: int) -> None:
    """New VIP connections go to node i alone (the others at weight 0)."""
    edits = " && ".join(
        f"ipvsadm -e -t {lab.vip}:{PORT} -r {ip}:{PORT} -g -w {1 if n == i else 0}"
        for n, ip in enumerate(lab.node_ips, 1)
    )
    lab.director(edits)


def via_vip(lab, count: int = 3, timeout: float = TIMEOUT) -> list[dict]:
    return nodes_mod.attempts(lab, lab.vip, PORT, count, timeout)


def outcomes(results: list[dict]) -> list[str]:
    """ "node1" for an answer from node1's pod, else how the attempt failed."""
    return [r["body"].strip() if r["outcome"] == "ok" else r["outcome"] for r in results]


def healthz(lab, i: int) -> dict:
    [got] = nodes_mod.attempts(lab, lab.node_ips[i - 1], nodes_mod.HEALTHZ_PORT, path="/healthz")
    return got


def pod_direct(lab, i: int) -> list[str]:
    return outcomes(nodes_mod.attempts(lab, lab.node_ips[i - 1], nodes_mod.POD_PORT))


def server_procs(lab, i: int) -> list:
    return [p for p in lab._state.procs if p.what == f"http server node{i}" and p.alive()]


def assert_fresh(reply: dict) -> None:
    assert reply["outcome"] == "ok" and reply["status"] == 200, reply
    body = json.loads(reply["body"])
    assert body["nodeHealthy"] is True and set(body) == {
        "lastUpdated",
        "currentTime",
        "nodeHealthy",
    }, body


# -- externalTrafficPolicy ----------------------------------------------------------------------


def test_cluster_pod_sees_the_node_address_and_replies_bypass_the_director(lab, nodes):
    vm_mac = lab.director(f"cat /sys/class/net/{lab.interface}/address").stdout.strip()
    for i, name in enumerate(lab.node_names, 1):
        only(lab, i)
        nodes.clear_peers()
        with lab.capture_on_director_tap(f"ip and host {lab.vip}") as tap:
            got = outcomes(via_vip(lab, 4))
        assert got == [name] * 4
        # kube-proxy masquerades: the pod saw the node, never the client; the other pod nothing.
        assert nodes.peers(i) == [lab.node_ips[i - 1]] * 4
        assert all(nodes.peers(o) == [] for o in range(1, len(lab.node_ips) + 1) if o != i)
        # Direct Routing kept: requests cross the director, no reply (source VIP) does.
        assert [p for p in tap.packets if p.src_mac == vm_mac and p.dst == lab.vip], tap
        assert [p for p in tap.packets if p.src == lab.vip] == [], tap
        # The pod reached directly (hostPort) is not masqueraded.
        nodes.clear_peers()
        assert pod_direct(lab, i) == [name]
        assert nodes.peers(i) == [lab.client_ip]
        assert_fresh(healthz(lab, i))
    # The pod's listen backlog holds probes plus a 20 req/s client (socketserver's default: 5).
    listen = lab.in_ns(lab.pod_ns[0], ["ss", "-Hltn", f"sport = :{nodes_mod.POD_PORT}"]).stdout
    assert listen.split()[:3] == ["LISTEN", "0", "128"], listen


def test_local_pod_sees_the_client_address(lab, nodes):
    nodes.policy("Local")
    for i, name in enumerate(lab.node_names, 1):
        only(lab, i)
        nodes.clear_peers()
        assert outcomes(via_vip(lab, 4)) == [name] * 4
        assert nodes.peers(i) == [lab.client_ip] * 4
    # Back to Cluster: masqueraded again.
    nodes.policy("Cluster")
    only(lab, 1)
    nodes.clear_peers()
    assert outcomes(via_vip(lab, 2)) == ["node1"] * 2
    assert nodes.peers(1) == [lab.node_ips[0]] * 2


def test_local_without_a_local_pod_drops_vip_traffic_while_healthz_says_200(lab, nodes):
    nodes.policy("Local")
    nodes.fail(2, "no-local-pod")
    nodes.clear_peers()
    only(lab, 2)
    started = time.monotonic()
    assert outcomes(via_vip(lab)) == ["timeout"] * 3  # dropped: no RST, no ICMP
    assert time.monotonic() - started >= 3 * TIMEOUT
    assert nodes.peers(2) == []  # nothing reached the pod
    assert_fresh(healthz(lab, 2))  # kube-proxy itself is fine
    assert pod_direct(lab, 2) == ["node2"]  # the pod is there, just no endpoint of the VIP
    only(lab, 1)
    assert outcomes(via_vip(lab, 2)) == ["node1"] * 2  # other nodes unaffected
    nodes.heal(2, "no-local-pod")
    only(lab, 2)
    nodes.clear_peers()
    assert outcomes(via_vip(lab, 2)) == ["node2"] * 2
    assert nodes.peers(2) == [lab.client_ip] * 2


def test_cluster_without_a_local_pod_forwards_to_another_nodes_pod(lab, nodes):
    nodes.fail(2, "no-local-pod")
    only(lab, 2)
    nodes.clear_peers()
    assert outcomes(via_vip(lab, 3)) == ["node1"] * 3  # node2 -> node1's pod, masqueraded
    assert nodes.peers(1) == [lab.node_ips[1]] * 3 and nodes.peers(2) == []
    nodes.fail(1, "no-local-pod")  # no endpoint anywhere: kube-proxy rejects
    assert outcomes(via_vip(lab, 2)) == ["refused"] * 2
    nodes.heal(1)
    nodes.heal(2)
    assert outcomes(via_vip(lab, 2)) == ["node2"] * 2


# -- failures -----------------------------------------------------------------------------------


def test_server_stop_refuses_and_heals(lab, nodes):
    only(lab, 1)
    nodes.fail(1, "server-stop")
    nodes.fail(1, "server-stop")  # idempotent
    assert server_procs(lab, 1) == []
    assert outcomes(via_vip(lab)) == ["refused"] * 3
    assert pod_direct(lab, 1) == ["refused"]
    assert_fresh(healthz(lab, 1))
    nodes.heal(1, "server-stop")
    nodes.heal(1, "server-stop")
    assert len(server_procs(lab, 1)) == 1
    assert outcomes(via_vip(lab, 2)) == ["node1"] * 2


def test_vip_rule_missing_times_out_while_healthz_says_200(lab, nodes):
    only(lab, 1)
    nodes.fail(1, "vip-rule-missing")
    nodes.clear_peers()
    assert outcomes(via_vip(lab)) == ["timeout"] * 3
    assert_fresh(healthz(lab, 1))
    assert pod_direct(lab, 1) == ["node1"]  # the pod is fine; only the VIP path is broken
    assert nodes.peers(1) == [lab.client_ip]
    nodes.heal(1)
    assert outcomes(via_vip(lab, 2)) == ["node1"] * 2


def test_unreachable_node_times_out_and_comes_back(lab, nodes):
    only(lab, 1)
    nodes.fail(1, "unreachable")
    assert outcomes(via_vip(lab)) == ["timeout"] * 3
    for direct in (healthz(lab, 1)["outcome"], *pod_direct(lab, 1)):
        assert direct in NO_ANSWER
    nodes.heal(1)
    assert outcomes(via_vip(lab, 2, timeout=3)) == ["node1"] * 2  # ARP may resolve afresh
    assert_fresh(healthz(lab, 1))


def test_proxy_stale_answers_503_and_its_rules_keep_working(lab, nodes):
    only(lab, 2)
    nodes.fail(2, "proxy-stale")
    time.sleep(0.05)  # lastUpdated is the flag's time: let currentTime move past it
    stale = healthz(lab, 2)
    assert stale["outcome"] == "ok" and stale["status"] == 503, stale
    body = json.loads(stale["body"])
    assert body["nodeHealthy"] is False and body["lastUpdated"] < body["currentTime"], body
    assert_fresh(healthz(lab, 1))  # per node
    assert outcomes(via_vip(lab, 2)) == ["node2"] * 2  # stale rules still forward
    nodes.heal(2)
    assert_fresh(healthz(lab, 2))
    # Anything but /healthz is a 404, as kube-proxy's mux answers it.
    [other] = nodes_mod.attempts(lab, lab.node_ips[1], nodes_mod.HEALTHZ_PORT, path="/metrics")
    assert other["status"] == 404, other


# -- healing is exact ---------------------------------------------------------------------------

_COUNTERS = re.compile(r"\[\d+:\d+\]")


def snapshot(lab) -> dict:
    """Everything a failure may touch: each node's and pod's rules and routes, the nodes' links
    on the bridge, the lab's processes."""
    seen = {}
    for ns in [*lab.node_ns, *lab.pod_ns]:
        rules = lab.in_ns(ns, ["iptables-save"]).stdout
        rules = [_COUNTERS.sub("", line) for line in rules.splitlines() if not line.startswith("#")]
        seen[ns] = {
            "rules": rules,
            "routes": lab.in_ns(ns, ["ip", "route", "show"]).stdout,
            "addrs": lab.in_ns(ns, ["ip", "-br", "addr"]).stdout,
        }
    links = lab.in_ns(lab.lab_ns, ["ip", "-br", "link"]).stdout
    seen["links"] = sorted(line.split()[:2] for line in links.splitlines())
    seen["procs"] = sorted(p.what for p in lab._state.procs if p.alive())
    seen["stale flags"] = sorted(p.name for p in lab.nodes.dir.glob("*.proxy-stale"))
    return seen


def test_every_failure_heals_to_exactly_the_healthy_state(lab, nodes):
    healthy = snapshot(lab)
    for mode in nodes_mod.MODES:
        for policy in nodes_mod.POLICIES:
            nodes.policy(policy)
            nodes.fail(1, mode)
            nodes.fail(1, mode)
            assert nodes.failures(1) == {mode}
            assert snapshot(lab) != healthy, (mode, policy)
            nodes.heal(1, mode)
            nodes.heal(1, mode)
            nodes.policy("Cluster")
            assert snapshot(lab) == healthy, (mode, policy)
    # All at once on every node, healed in one call per node.
    nodes.policy("Local")
    for i in range(1, len(lab.node_ips) + 1):
        for mode in nodes_mod.MODES:
            nodes.fail(i, mode)
    for i in range(1, len(lab.node_ips) + 1):
        nodes.heal(i)
    nodes.policy("Cluster")
    assert snapshot(lab) == healthy
    only(lab, 1)
    assert outcomes(via_vip(lab, 2, timeout=3)) == ["node1"] * 2
    with pytest.raises(ValueError, match="not one of"):
        nodes.fail(1, "on-fire")
    with pytest.raises(ValueError, match="not one of"):
        nodes.policy("Nearby")
    with pytest.raises(ValueError, match="not one of"):
        nodes.fail(len(lab.node_ips) + 1, "unreachable")


# -- the load the health tests measure with ------------------------------------------------------


def test_load_keeps_its_rate_and_shows_when_a_node_failed(lab, nodes):
    """20 GETs/s through the VIP (rr over both nodes) while node1's server is stopped for about
    a second: the rate holds, only requests sent to node1 meanwhile fail, and they are refused."""
    lab.director(
        " && ".join(f"ipvsadm -e -t {lab.vip}:{PORT} -r {ip}:{PORT} -g -w 1" for ip in lab.node_ips)
    )
    with nodes_mod.load(lab, lab.vip, PORT, rate=20, timeout=TIMEOUT, max_seconds=30) as run:
        time.sleep(1.0)
        failed_at = time.time()
        nodes.fail(1, "server-stop")
        time.sleep(1.0)
        nodes.heal(1)
        healed_at = time.time()
        time.sleep(1.0)
        ended = time.time()
    results = [r for r in run.results() if r["start"] + r["took"] < ended]
    starts = [r["start"] for r in results]
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    print(
        f"\nload: {len(results)} GETs in {starts[-1] - starts[0]:.2f}s, "
        f"gaps {min(gaps) * 1000:.0f}..{max(gaps) * 1000:.0f} ms"
    )
    expected = 20 * (ended - starts[0])
    assert abs(len(results) - expected) <= 3, (len(results), expected)
    assert max(gaps) < 0.2, gaps
    failed = [r for r in results if r["outcome"] != "ok"]
    assert failed and {r["outcome"] for r in failed} == {"refused"}, failed
    # Only while the server was down (healing starts a new one: allow its start-up).
    assert all(failed_at <= r["start"] <= healed_at for r in failed), (failed_at, healed_at, failed)
    answered = [r["body"].strip() for r in results if r["outcome"] == "ok"]
    assert set(answered) == {"node1", "node2"}, answered
    assert not [p for p in lab._state.procs if p.what == "client load"]


# -- another process: `./dev lab node` ---------------------------------------------------------


def test_a_later_process_sees_and_drives_the_same_nodes(lab, nodes, monkeypatch, capsys):
    """`./dev lab node` runs in a process of its own: Nodes.of_run rebuilds the nodes from the
    run's record, with the policy and failures the lab's owner left."""
    from tests.lab import __main__ as lab_cli

    nodes.policy("Local")
    nodes.fail(2, "proxy-stale")
    later = nodes_mod.Nodes.of_run(lab._state)
    assert later.policy_of(1) == "Local" and later.failures(2) == {"proxy-stale"}
    assert later.exposed == nodes.exposed

    monkeypatch.setattr(lab_cli, "_persistent", lambda cache: [lab._state])
    only(lab, 1)
    assert lab_cli.node("fail", ["1", "vip-rule-missing"]) == 0
    assert outcomes(via_vip(lab, 2)) == ["timeout"] * 2
    assert_fresh(healthz(lab, 1))
    assert lab_cli.node("heal", ["1"]) == 0
    nodes.clear_peers()
    assert outcomes(via_vip(lab, 2)) == ["node1"] * 2
    assert nodes.peers(1) == [lab.client_ip] * 2  # still Local
    assert lab_cli.node("policy", ["Cluster"]) == 0
    assert lab_cli.node("heal", ["2", "proxy-stale"]) == 0
    assert lab_cli.node("status", []) == 0
    shown = capsys.readouterr().out
    assert f"node1 {lab.node_ips[0]} (pod 198.51.100.11): Cluster, healthy" in shown, shown
    assert lab_cli.node("fail", ["x", "unreachable"]) == 2
    assert lab_cli.node("fail", ["1", "on-fire"]) == 2
    assert "not one of" in capsys.readouterr().err
    assert nodes.policy_of(1) == "Cluster" and nodes.failures(2) == set()  # the owner reads back
    nodes.clear_peers()
    assert outcomes(via_vip(lab, 2)) == ["node1"] * 2
    assert nodes.peers(1) == [lab.node_ips[0]] * 2  # Cluster again: masqueraded
