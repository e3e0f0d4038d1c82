"""The dynamic provider through the SDK's gRPC server against the real lab director.

`ipvsadm -Ln` on the director is the independent oracle; the provider itself never parses it.
Tests run in file order and share one provider process (one pooled SSH connection), as a
`pulumi up` does; every request is answered by the director's runtime, which the first one
installs if need be. The stack's repair is off (runtime.json), so drift made here by hand stays
for read to show and update to repair.
"""

from __future__ import annotations

import re
import subprocess
import threading

import grpc
import pytest

from tests.lab import ops
from tests.provider.grpc_client import ProviderServer

pytestmark = pytest.mark.lab

VIP = "203.0.113.201"
OWNER = "ipvs-ingress/lab"
FOREIGN = "TCP  203.0.113.250:8080 rr"


def vs_props(lab, port=80, servers=None, **over) -> dict:
    servers = (
        servers if servers is not None else [{"address": ip, "weight": 1} for ip in lab.node_ips]
    )
    return {
        "director": lab.director_config(),
        "vip": VIP,
        "port": port,
        "protocol": "tcp",
        "realServers": servers,
        "owner": OWNER,
        **over,
    }


def oracle(lab, port=80) -> list[tuple[str, str, str]]:
    """(real server, forwarding, weight) rows of VIP:port in `ipvsadm -Ln`."""
    rows, inside = [], False
    for line in lab.ipvsadm_ln().splitlines():
        if line.startswith(("TCP", "UDP")):
            inside = line.split()[1] == f"{VIP}:{port}"
        elif inside and line.strip().startswith("->") and "RemoteAddress" not in line:
            parts = line.split()
            rows.append((parts[1], parts[2], parts[3]))
    return sorted(rows)


def vip_bound(lab) -> bool:
    return f"{VIP}/32" in lab.director(f"ip -o addr show dev {lab.interface}").stdout


@pytest.fixture(scope="module")
def provider(lab, tmp_path_factory):
    log = tmp_path_factory.mktemp("provider") / "transport.log"
    ops.clear(lab, [VIP])
    # A service ipvs-ingress did not create: it must survive every operation below.
    lab.director(
        "modprobe ip_vs && ipvsadm -A -t 203.0.113.250:8080 -s rr && ipvsadm -a -t 203.0.113.250:8080 -r 203.0.113.11:8080 -g"
    )  # noqa: E501
    lab.expose(VIP, 80)
    lab.expose(VIP, 443)
    srv = ProviderServer(env={"IPVS_INGRESS_LOG": str(log)})
    srv.configure({"ipvs-ingress:sshPrivateKey": lab.private_key_pem})
    srv.log = log
    with ops.repair_off(lab, OWNER):
        yield srv
        srv.close()
        ops.clear(lab, [VIP])


@pytest.fixture(scope="module")
def created(lab, provider):
    inputs, failures = provider.check(vs_props(lab))
    assert failures == []
    id_, outs = provider.create(inputs)
    return id_, inputs, outs


def test_create_realizes_dr_service_seen_by_ipvsadm(lab, created):
    id_, _, outs = created
    assert id_ == f"{lab.director_ip}:22/tcp/{VIP}:80"
    assert oracle(lab) == [(f"{ip}:80", "Route", "1") for ip in sorted(lab.node_ips)]
    assert outs["ipvsadm"] == [
        f"TCP {VIP}:80 wlc -> {ip}:80 Route 1" for ip in sorted(lab.node_ips)
    ]
    assert outs["inSync"] is True
    assert vip_bound(lab)
    assert lab.director("cat /proc/sys/net/ipv4/ip_forward").stdout.strip() == "1"


def test_requests_through_the_vip_reach_every_node(lab, created):
    answers = lab.http_from_client(f"http://{VIP}/", 20)
    assert len(answers) == 20 and set(answers) == set(lab.node_names)


def test_no_key_material_in_outputs_or_serialized_provider(lab, provider, created):
    _, _, outs = created
    body = "".join(lab.private_key_pem.splitlines()[1:-1])[:40]
    text = repr(outs) + provider.serialized
    assert body not in text and "PRIVATE KEY" not in text


def test_update_changes_weights_and_real_servers_in_place(lab, provider, created):
    id_, inputs, _ = created
    first, second = lab.node_ips[:2]
    new, _ = provider.check(vs_props(lab, servers=[{"address": first, "weight": 5}]))
    assert list(provider.diff(id_, inputs, new).replaces) == []
    outs = provider.update(id_, inputs, new)
    assert oracle(lab) == [(f"{first}:80", "Route", "5")]
    assert outs["realServers"] == [{"address": first, "weight": 5}]
    back = provider.update(id_, new, inputs)
    assert oracle(lab) == sorted((f"{ip}:80", "Route", "1") for ip in lab.node_ips)
    assert second in repr(back["ipvsadm"])


def test_read_shows_manual_drift_and_update_repairs_it(lab, provider, created):
    id_, inputs, outs = created
    first, second = lab.node_ips[:2]
    lab.director(
        f"ipvsadm -e -t {VIP}:80 -r {first}:80 -g -w 9 && ipvsadm -d -t {VIP}:80 -r {second}:80"
    )
    rid, live = provider.read(id_, outs)
    assert rid == id_
    assert live["realServers"] == [{"address": first, "weight": 9}] and live["inSync"] is False
    diff = provider.diff(id_, live, inputs)
    assert diff.changes == diff.DIFF_SOME and list(diff.replaces) == []
    repaired = provider.update(id_, live, inputs)
    assert repaired["inSync"] is True
    assert oracle(lab) == sorted((f"{ip}:80", "Route", "1") for ip in lab.node_ips)


def test_destinations_at_another_port_added_by_hand_converge(lab, provider, created):
    id_, inputs, outs = created
    first = lab.node_ips[0]
    # ipvsadm gives a DR destination the service's port, so by hand another port means -m.
    lab.director(
        f"ipvsadm -a -t {VIP}:80 -r {first}:8080 -m -w 1"
        f" && ipvsadm -a -t {VIP}:80 -r 203.0.113.99:8080 -m -w 1"
    )
    stray = {(f"{first}:8080", "Masq", "1"), ("203.0.113.99:8080", "Masq", "1")}
    assert stray <= set(oracle(lab))
    rid, live = provider.read(id_, outs)
    assert rid == id_ and live["inSync"] is False
    assert f"TCP {VIP}:80 wlc -> 203.0.113.99:8080 Masq 1" in live["ipvsadm"]
    assert f"TCP {VIP}:80 wlc -> {first}:8080 Masq 1" in live["ipvsadm"]
    repaired = provider.update(id_, live, inputs)
    assert repaired["inSync"] is True
    assert oracle(lab) == sorted((f"{ip}:80", "Route", "1") for ip in lab.node_ips)


def test_an_unbound_vip_is_shown_by_read_and_rebound_by_update(lab, provider, created):
    id_, inputs, outs = created
    lab.director(f"ip addr del {VIP}/32 dev {lab.interface}")
    assert not vip_bound(lab)
    rid, live = provider.read(id_, outs)
    assert rid == id_ and (live["vipBound"], live["ipForward"], live["inSync"]) == (
        False,
        True,
        False,
    )
    diff = provider.diff(id_, live, inputs)
    assert diff.changes == diff.DIFF_SOME and list(diff.replaces) == []
    repaired = provider.update(id_, live, inputs)
    assert (repaired["vipBound"], repaired["inSync"]) == (True, True) and vip_bound(lab)
    assert len(lab.http_from_client(f"http://{VIP}/", 4)) == 4


def test_a_broadcast_real_server_is_one_line_and_leaves_nothing(lab, provider):
    before = lab.ipvsadm_sn()
    first = {"address": lab.node_ips[0], "weight": 1}
    bad = [first, {"address": "203.0.113.255", "weight": 1}]
    inputs, failures = provider.check(vs_props(lab, port=7100, servers=bad))
    assert failures == []  # the director's prefix is only known on the director
    with pytest.raises(grpc.RpcError) as err:
        provider.create(inputs)
    msg = err.value.details()
    assert "\n" not in msg and msg.startswith(
        f"director {lab.director_ip}: realServers[1].address:"
    )
    assert "203.0.113.255 is the broadcast address of 203.0.113.0/24 on eth0" in msg
    assert lab.ipvsadm_sn() == before
    assert f"{VIP}:7100" not in lab.director("cat /var/lib/ipvs-ingress/state.json").stdout
    # Nothing stuck: the same service without it is created at once.
    good, _ = provider.check(vs_props(lab, port=7100, servers=[first]))
    id_, outs = provider.create(good)
    assert oracle(lab, 7100) == [(f"{first['address']}:7100", "Route", "1")]
    provider.delete(id_, outs)
    assert oracle(lab, 7100) == []


def test_read_of_a_deleted_service_reports_it_gone(lab, provider):
    inputs, _ = provider.check(vs_props(lab, port=443))
    id_, outs = provider.create(inputs)
    lab.director(f"ipvsadm -D -t {VIP}:443")
    rid, _ = provider.read(id_, outs)
    assert rid == ""
    provider.delete(id_, outs)  # deleting what is already gone is fine


def test_parallel_resources_share_one_connection_and_the_runtime(lab, provider, created):
    ports = [8001, 8002, 8003, 8004]
    results, errors = {}, []

    def create(port):
        try:
            inputs, _ = provider.check(vs_props(lab, port=port))
            results[port] = provider.create(inputs)
        except grpc.RpcError as err:  # pragma: no cover - reported below
            errors.append(err.details())

    threads = [threading.Thread(target=create, args=(p,)) for p in ports]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for port in ports:
        assert oracle(lab, port) == sorted((f"{ip}:{port}", "Route", "1") for ip in lab.node_ips)
        provider.delete(*results[port])
        assert oracle(lab, port) == []
    # One SSH connection, one channel to the runtime, whose process answered every request:
    # no interpreter started on the director for any of them.
    log = provider.log.read_text()
    assert log.count("connected to director") == 1 and log.count("attached to runtime") == 1, log
    attached = re.search(r"attached to runtime \S+ on director \S+ \(pid (\d+)\)", log)
    assert attached and attached.group(1) == ops.unit(lab)["MainPID"], log
    assert ops.interpreters(lab) == []


def test_two_stacks_at_once_do_not_interleave(lab):
    # Two provider processes = two `pulumi up` runs; the director's lock keeps state.json whole.
    servers = [ProviderServer() for _ in range(2)]
    try:
        ids = []
        for srv in servers:
            srv.configure({"ipvs-ingress:sshPrivateKey": lab.private_key_pem})
        done = []

        def run(srv, port):
            inputs, _ = srv.check(vs_props(lab, port=port))
            done.append((srv, *srv.create(inputs)))

        threads = [
            threading.Thread(target=run, args=(s, p))
            for s, p in zip(servers, (9001, 9002), strict=True)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(done) == 2
        state = lab.director("cat /var/lib/ipvs-ingress/state.json").stdout
        assert f"tcp/{VIP}:9001" in state and f"tcp/{VIP}:9002" in state
        for srv, id_, outs in done:
            srv.delete(id_, outs)
            ids.append(id_)
        assert oracle(lab, 9001) == [] and oracle(lab, 9002) == []
    finally:
        for srv in servers:
            srv.close()


def test_foreign_service_is_refused_and_left_alone(lab, provider):
    inputs, _ = provider.check({**vs_props(lab, port=8080), "vip": "203.0.113.250"})
    with pytest.raises(grpc.RpcError) as err:
        provider.create(inputs)
    msg = err.value.details()
    assert "\n" not in msg and "was not created by ipvs-ingress" in msg and "ipvsadm -D" in msg
    assert re.search(r"TCP\s+203\.0\.113\.250:8080 rr", lab.ipvsadm_ln())


def test_off_link_real_server_is_refused_before_any_change(lab, provider):
    before = lab.ipvsadm_sn()
    inputs, _ = provider.check(
        vs_props(lab, port=7000, servers=[{"address": "198.51.100.7", "weight": 1}])
    )
    with pytest.raises(grpc.RpcError) as err:
        provider.create(inputs)
    assert "not on-link on eth0" in err.value.details() and "\n" not in err.value.details()
    assert lab.ipvsadm_sn() == before


def test_delete_leaves_no_trace_but_the_foreign_service(lab, provider, created):
    id_, _, outs = created
    provider.delete(id_, outs)
    table = lab.ipvsadm_ln()
    assert f"{VIP}:80" not in table
    assert re.search(r"TCP\s+203\.0\.113\.250:8080 rr", table)
    assert not vip_bound(lab)
    assert "tcp/" not in lab.director("cat /var/lib/ipvs-ingress/state.json").stdout
    assert ops.held_for(lab, OWNER) == ([], [])  # the runtime holds nothing of the stack


@pytest.mark.parametrize("case", ["host-key", "auth", "unreachable"])
def test_connection_failures_are_one_line_with_the_fix(lab, case, tmp_path):
    config_key = lab.private_key_pem
    director = lab.director_config()
    if case == "host-key":
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "hk")], check=True
        )
        director["hostKey"] = (tmp_path / "hk.pub").read_text().split(" director")[0].strip()
        expect = "presented host key SHA256:"
    elif case == "auth":
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")], check=True
        )
        config_key = (tmp_path / "k").read_text()
        expect = "refused the SSH key"
    else:
        director["host"] = "203.0.113.99"  # nobody there, inside the lab's own namespace
        expect = "is unreachable"
    srv = ProviderServer()
    try:
        srv.configure({"ipvs-ingress:sshPrivateKey": config_key})
        inputs, _ = srv.check({**vs_props(lab, port=6000), "director": director})
        with pytest.raises(grpc.RpcError) as err:
            srv.create(inputs, timeout=120)
        msg = err.value.details()
        assert expect in msg and "\n" not in msg and "Traceback" not in msg
        assert msg.startswith(f"director {director['host']}") or msg.startswith(
            f"director root@{director['host']}"
        )
    finally:
        srv.close()
    assert f"{VIP}:6000" not in lab.ipvsadm_ln()


def test_ipv6_virtual_service_round_trip(lab, tmp_path):
    # IPv6 on the lab segment just for this test (nodad: usable at once); removed at the end.
    lab.director(f"ip -6 addr add 2001:db8::2/64 dev {lab.interface} nodad")
    for i, ns in enumerate(lab.node_ns):
        lab.in_ns(ns, ["sysctl", "-q", "-w", "net.ipv6.conf.eth0.disable_ipv6=0"])
        lab.in_ns(ns, ["ip", "-6", "addr", "add", f"2001:db8::{11 + i}/64", "dev", "eth0", "nodad"])
    servers = [{"address": f"2001:db8::{11 + i}", "weight": 2} for i in range(len(lab.node_ns))]
    srv = ProviderServer()
    try:
        srv.configure({"ipvs-ingress:sshPrivateKey": lab.private_key_pem})
        inputs, failures = srv.check({**vs_props(lab, servers=servers), "vip": "2001:db8::201"})
        assert failures == []
        id_, outs = srv.create(inputs)
        assert id_.endswith("/tcp/[2001:db8::201]:80")
        table = lab.ipvsadm_ln()
        assert "TCP  [2001:db8::201]:80 wlc" in table
        for rs in servers:
            assert re.search(rf"-> \[{rs['address']}\]:80\s+Route\s+2", table), table
        assert "2001:db8::201/128" in lab.director(f"ip -6 -o addr show dev {lab.interface}").stdout
        srv.delete(id_, outs)
        assert "2001:db8::201" not in lab.ipvsadm_ln()
        assert "2001:db8::201" not in lab.director(f"ip -6 -o addr show dev {lab.interface}").stdout
    finally:
        srv.close()
        lab.director(f"ip -6 addr del 2001:db8::2/64 dev {lab.interface}", check=False)
        for i, ns in enumerate(lab.node_ns):
            lab.in_ns(
                ns,
                ["ip", "-6", "addr", "del", f"2001:db8::{11 + i}/64", "dev", "eth0"],
                check=False,
            )
            lab.in_ns(ns, ["sysctl", "-q", "-w", "net.ipv6.conf.eth0.disable_ipv6=1"], check=False)


def test_udp_scheduler_and_persistence_reach_the_kernel(lab, provider):
    props = {
        **vs_props(lab, port=53),
        "protocol": "udp",
        "scheduler": "rr",
        "persistenceSeconds": 300,
    }
    inputs, _ = provider.check(props)
    id_, outs = provider.create(inputs)
    try:
        assert re.search(rf"UDP\s+{VIP}:53 rr persistent 300", lab.ipvsadm_ln())
        assert outs["ipvsadm"][0].startswith(f"UDP {VIP}:53 rr persistent 300 -> ")
        # Persistence off and another scheduler: an in-place update, read back from the kernel.
        news, _ = provider.check({**props, "scheduler": "wlc", "persistenceSeconds": 0})
        assert list(provider.diff(id_, inputs, news).replaces) == []
        updated = provider.update(id_, inputs, news)
        assert re.search(rf"UDP\s+{VIP}:53 wlc\s*$", lab.ipvsadm_ln(), re.M)
        assert (
            updated["scheduler"] == "wlc"
            and updated["persistenceSeconds"] == 0
            and updated["inSync"]
        )
    finally:
        provider.delete(id_, outs)
    assert f"{VIP}:53" not in lab.ipvsadm_ln()


def test_a_kernel_refusal_is_one_line_and_the_half_made_service_is_rolled_back(lab):
    # Sent straight to the runtime (no validation on the way) with a route that makes it on-link:
    # 255.255.255.255 passes the agent's own checks, so the real kernel's EINVAL for it, after
    # the service was added, is what answers.
    from providers import model, transport

    director, _ = model.parse_virtual_service(vs_props(lab))
    session = transport.RuntimeSession(director, lab.private_key_pem)
    servers = [
        {"address": lab.node_ips[0], "weight": 1},
        {"address": "255.255.255.255", "weight": 1},
    ]
    spec = {
        "vip": VIP,
        "port": 7200,
        "protocol": "tcp",
        "scheduler": "wlc",
        "persistenceSeconds": 0,
        "realServers": servers,
        "owner": OWNER,
    }
    before = lab.ipvsadm_sn()
    lab.director(f"ip route add 255.255.255.255/32 dev {lab.interface}")
    try:
        with pytest.raises(transport.DirectorError) as err:
            session.request("apply", spec=spec, interface=lab.interface, adopt=False)
        assert str(err.value) == (
            f"director {lab.director_ip}: realServers: 255.255.255.255: the kernel refused"
            f" add-dest tcp/{VIP}:7200 -> 255.255.255.255:7200 (Invalid argument):"
            " list the nodes' own unicast addresses"
        )
        assert lab.ipvsadm_sn() == before
        assert f"{VIP}:7200" not in lab.director("cat /var/lib/ipvs-ingress/state.json").stdout
    finally:
        session.close()
        lab.director(f"ip route del 255.255.255.255/32 dev {lab.interface}", check=False)
