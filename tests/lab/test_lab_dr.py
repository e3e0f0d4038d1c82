"""The article's experiment on a real IPVS director, driven through the director's own ipvsadm.

Independent of the product: these prove the lab reproduces Direct Routing, so a failing provider
lab test points at the provider, not at the lab. Each test removes the IPVS state it created.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections import Counter

import pytest

from tests.lab import harness, state

pytestmark = pytest.mark.lab

REQUESTS = 20


@pytest.fixture
def dr_service(lab):
    """VIP:80 wlc with every node as a `route` (-g) destination, as the article sets it up."""
    dests = " && ".join(f"ipvsadm -a -t {lab.vip}:80 -r {ip}:80 -g -w 1" for ip in lab.node_ips)
    lab.director(
        "modprobe ip_vs && modprobe ip_vs_wlc && sysctl -qw net.ipv4.ip_forward=1"
        f" && ip addr add {lab.vip}/32 dev {lab.interface}"
        f" && ipvsadm -A -t {lab.vip}:80 -s wlc && {dests}"
    )
    yield
    # Back to the state the VM booted in, so later (provider) tests start clean.
    # Unloading is best effort (fails while anything else holds ip_vs); when it works the
    # product's agent gets to load ip_vs itself, as on a fresh director.
    lab.director(
        f"ipvsadm -C && ip addr del {lab.vip}/32 dev {lab.interface}"
        " && sysctl -qw net.ipv4.ip_forward=0"
        " && { modprobe -r ip_vs_wlc ip_vs 2>/dev/null || true; }"
    )
    assert lab.ipvsadm_sn().strip() == ""


def _dest_rows(ipvsadm_ln: str) -> dict[str, tuple[str, int]]:
    """`-> addr:port  Forward Weight ...` rows of `ipvsadm -Ln` as {addr:port: (fwd, weight)}."""
    rows = re.findall(r"->\s+(\S+)\s+(\w+)\s+(\d+)\s+\d+\s+\d+", ipvsadm_ln)
    return {addr: (fwd, int(weight)) for addr, fwd, weight in rows}


def test_virtual_service_routes_to_every_node(lab, dr_service):
    listing = lab.ipvsadm_ln()
    assert re.search(rf"^TCP\s+{re.escape(lab.vip)}:80 wlc\s*$", listing, re.M), listing
    assert _dest_rows(listing) == {f"{ip}:80": ("Route", 1) for ip in lab.node_ips}, listing
    saved = lab.ipvsadm_sn()
    for ip in lab.node_ips:
        assert f"-a -t {lab.vip}:80 -r {ip}:80 -g -w 1" in saved, saved


def test_requests_reach_every_node(lab, dr_service):
    bodies = lab.http_from_client(f"http://{lab.vip}/", REQUESTS)
    counts = Counter(bodies)
    assert len(bodies) == REQUESTS
    assert set(counts) == set(lab.node_names), counts


def test_replies_bypass_the_director(lab, dr_service):
    vm_mac = lab.director(f"cat /sys/class/net/{lab.interface}/address").stdout.strip()
    node_macs = {lab.mac_of(ns) for ns in lab.node_ns}
    with (
        lab.capture_on_director_tap(f"ip and host {lab.vip}") as tap,
        lab.capture_on_client(f"ip and src host {lab.vip}") as client,
    ):
        bodies = lab.http_from_client(f"http://{lab.vip}/", 10)
    assert set(bodies) <= set(lab.node_names)

    # Requests do cross the tap: in from the client, out again to a node's MAC, VIP unchanged.
    forwarded = [p for p in tap.packets if p.src_mac == vm_mac and p.dst == lab.vip]
    assert forwarded, tap
    assert {p.dst_mac for p in forwarded} <= node_macs, tap
    # ...but no reply does: nothing with the VIP as its source ever passes the director.
    assert [p for p in tap.packets if p.src == lab.vip] == [], tap

    # Replies arrive at the client straight from the nodes' MACs.
    assert len(client.packets) >= 10, client
    assert {p.src_mac for p in client.packets} <= node_macs, client
    assert vm_mac not in {p.src_mac for p in client.packets}
    # The client still resolves the VIP to the director: only the director answers ARP for it.
    neigh = lab.in_ns(lab.client_ns, ["ip", "neigh", "show", lab.vip]).stdout
    assert vm_mac in neigh, neigh

    conns, inpkts, outpkts, stats = lab.service_counters(lab.vip, 80, min_conns=10)
    assert conns >= 10 and inpkts > 0, stats
    assert outpkts == 0, stats


# -- d. teardown leaves nothing behind ------------------------------------------------------------

_CHILD = """
import json, signal
from tests.lab import provision
from tests.lab.harness import Lab
lab = Lab(artifacts=provision.provision()).start(wait_ready=False)
print(json.dumps(lab.footprint()), flush=True)
signal.pause()
"""


def _spawn_lab_process() -> subprocess.Popen:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": root}
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _footprint_of(child: subprocess.Popen) -> dict:
    line = child.stdout.readline()
    if not line:
        child.kill()
        pytest.fail(f"lab child failed: {child.communicate(timeout=30)[1]}")
    return json.loads(line)


def test_teardown_leaves_nothing_behind(lab):
    # Started first so their boots overlap with the in-process lab's.
    terminated, crashed = _spawn_lab_process(), _spawn_lab_process()
    try:
        # 1. close() of a fully booted lab (ssh master, VM, servers).
        other = harness.Lab(artifacts=lab.art).start()
        footprint = other.footprint()
        assert other.director("true").returncode == 0
        assert {p["what"] for p in footprint["procs"]} >= {
            "qemu",
            "ssh master",
            "http server node1",
        }
        other.close()
        assert harness.leftovers(footprint) == []

        # 2. SIGTERM: the lab's handler tears down before the process dies of the signal.
        term_fp = _footprint_of(terminated)
        assert harness.leftovers(term_fp), "the child's lab should be up"
        terminated.send_signal(signal.SIGTERM)
        assert terminated.wait(timeout=60) == -signal.SIGTERM
        assert harness.leftovers(term_fp) == []

        # 3. SIGKILL leaves everything behind; the next start-up's stale cleanup removes it.
        crash_fp = _footprint_of(crashed)
        crashed.kill()
        crashed.wait(timeout=30)
        assert any("qemu" in item for item in harness.leftovers(crash_fp))
        assert crash_fp["id"] in state.cleanup_stale(lab.art.cache)
        assert harness.leftovers(crash_fp) == []
    finally:
        for child in (terminated, crashed):
            if child.poll() is None:
                child.kill()
            child.communicate(timeout=30)
        state.cleanup_stale(lab.art.cache)
    # None of that touched the session's lab.
    assert lab.director("true").returncode == 0
    assert lab.http_from_client(f"http://{lab.node_ips[0]}:{harness.NODE_PORT}/", 1) == ["node1"]
