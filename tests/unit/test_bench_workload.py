"""The benchmark's provider inputs pass the provider's own check (the lab smoke run relies on it)."""

from __future__ import annotations

from bench.workload import Workload
from providers import model

DIRECTOR = {
    "host": "203.0.113.2",
    "hostKey": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMUmmSK6gtVhUmYnKSwP+B/ZoYbs1FkFCtqNm4AxvOq",
}


def test_benchmark_inputs_pass_the_providers_check_with_an_owner():
    props = Workload.build(3, ["203.0.113.11", "203.0.113.12"]).props(DIRECTOR)
    assert len(props) == 3
    for p in props:
        assert model.check_virtual_service(p, need_owner=True) == []
        assert p["owner"] == "ipvs-ingress/bench"
