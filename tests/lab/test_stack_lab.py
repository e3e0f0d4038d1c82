"""The lab stack end to end, minus the engine and the cluster: the stack file that
`./dev lab up` writes goes through the program's config layer into the provider's create,
and traffic to the VIP reaches every node with replies that bypass the director. Every request
goes to the director's runtime (installed by the first one if need be)."""

from __future__ import annotations

import pytest
import yaml

from components.config import load_stack_file
from providers import model, plan
from tests.lab import ops
from tests.lab.__main__ import lab_stack
from tests.provider.grpc_client import ProviderServer

pytestmark = pytest.mark.lab


def test_lab_stack_deploys_and_serves_through_the_director(lab):
    cfg = load_stack_file(lab_stack(lab.describe())["config"])
    assert [s.key for s in cfg.virtual_services] == [f"tcp/{lab.vip}:80"]
    ops.clear(lab, [lab.vip])
    lab.expose(lab.vip, 80)
    srv = ProviderServer()
    created = []
    try:
        srv.configure({"ipvs-ingress:sshPrivateKey": lab.private_key_pem})
        for spec in cfg.virtual_services:
            # The owner is what the Ingress component adds: '<project>/<stack>'.
            props = {**model.to_props(cfg.director, spec), "owner": "ipvs-ingress/lab"}
            inputs, failures = srv.check(props)
            assert failures == []
            created.append(srv.create(inputs))
        assert created[0][1]["ipvsadm"] == [
            f"TCP {lab.vip}:80 wlc -> {ip}:80 Route 1" for ip in sorted(lab.node_ips)
        ]
        answers = lab.http_from_client(f"http://{lab.vip}/", 10)
        assert set(answers) == set(lab.node_names)
        # Direct Routing: the director forwarded the requests but sent no packet back out.
        conns, in_pkts, out_pkts, stats = lab.service_counters(lab.vip, 80, min_conns=10)
        assert conns >= 10 and in_pkts > 0 and out_pkts == 0, stats
    finally:
        for id_, outs in created:
            srv.delete(id_, outs)
        srv.close()
    assert f"{lab.vip}:80" not in lab.ipvsadm_ln()


def test_dry_run_shows_drift_and_changes_nothing(lab, tmp_path, capsys):
    stack_file = tmp_path / "Pulumi.lab.yaml"
    stack_file.write_text(yaml.safe_dump(lab_stack(lab.describe())))
    cfg = load_stack_file(lab_stack(lab.describe())["config"])
    ops.clear(lab, [lab.vip])
    srv = ProviderServer()
    # Repair off for the stack: the drift made below stays for the dry run to show.
    with ops.repair_off(lab, "ipvs-ingress/lab"):
        try:
            srv.configure({"ipvs-ingress:sshPrivateKey": lab.private_key_pem})
            # Owned by the stack the file is named after: the dry run plans as that stack; its
            # repair and health settings as the Ingress component passes them.
            spec = cfg.virtual_services[0]
            props = {
                **model.to_props(cfg.director, spec, cfg.repair, dict(cfg.health[spec.key])),
                "owner": "ipvs-ingress/lab",
            }
            id_, outs = srv.create(srv.check(props)[0])
            first = lab.node_ips[0]
            lab.director(f"ipvsadm -e -t {lab.vip}:80 -r {first}:80 -g -w 7")
            before = lab.ipvsadm_sn()
            assert plan.main([str(stack_file), "--key", str(lab.private_key_path)]) == 0
            assert capsys.readouterr().out.splitlines() == [
                f"tcp/{lab.vip}:80: 1 change(s)",
                f"  set-dest tcp/{lab.vip}:80 -> {first}:80 weight 1 Route",
            ]
            assert lab.ipvsadm_sn() == before
            srv.delete(id_, outs)
        finally:
            srv.close()
    # The health check's probe services go with the service, within a pass.
    ops.wait_for_pass(lab)
    ops.wait_for_pass(lab)
    assert "FWM" not in lab.ipvsadm_ln()


def test_dry_run_errors_are_one_line(lab, tmp_path, capsys):
    stack_file = tmp_path / "Pulumi.lab.yaml"
    broken = lab_stack(lab.describe())
    broken["config"]["ipvs-ingress:vips"][0]["ports"][0]["port"] = 70000
    stack_file.write_text(yaml.safe_dump(broken))
    assert plan.main([str(stack_file), "--key", str(lab.private_key_path)]) == 1
    err = capsys.readouterr().err
    assert (
        err.startswith("error: ipvs-ingress:vips[0].ports[0].port: 70000") and err.count("\n") == 1
    )
