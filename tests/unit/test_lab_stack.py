"""`./dev lab up` leaves a stack ready for `pulumi up --stack lab` (a stand-in CLI records calls)."""

from __future__ import annotations

import stat

import yaml

from components.config import load_stack_file
from providers import model
from tests.lab import __main__ as lab_cli
from tests.program.conftest import ROOT, VS_TYPE, run_program

INFO = {
    "host": "203.0.113.2",
    "port": 22,
    "user": "root",
    "hostKey": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMUmmSK6gtVhUmYnKSwP+B/ZoYbs1FkFCtqNm4AxvOq",
    "interface": "eth0",
    "proxyCommand": "ip netns exec lab-1 socat - TCP:%h:%p",
    "vip": "203.0.113.201",
    "nodes": {"node1": "203.0.113.11", "node2": "203.0.113.12"},
}


def test_lab_stack_file_is_valid_config_and_cli_gets_the_secret(tmp_path, monkeypatch):
    stack_file = tmp_path / "Pulumi.lab.yaml"
    monkeypatch.setattr(lab_cli, "STACK_FILE", stack_file)
    key = tmp_path / "id_ed25519"
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n-----END OPENSSH PRIVATE KEY-----\n")
    calls = tmp_path / "calls"
    fake = tmp_path / "pulumi"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\ncat >> {calls}\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)

    lab_cli.write_lab_stack({**INFO, "keyPath": str(key)}, pulumi=str(fake))

    cfg = load_stack_file(yaml.safe_load(stack_file.read_text())["config"])
    assert [s.key for s in cfg.virtual_services] == ["tcp/203.0.113.201:80"]
    assert cfg.director == model.Director(
        host="203.0.113.2", host_key=INFO["hostKey"], proxy_command=INFO["proxyCommand"]
    )
    assert cfg.kubernetes is False  # the lab's nodes stand in for kube-proxy
    assert "PRIVATE KEY" not in stack_file.read_text()
    recorded = calls.read_text().splitlines()
    assert recorded[0] == "stack select --create lab"
    assert recorded[1] == "config set --secret --stack lab ipvs-ingress:sshPrivateKey"
    assert recorded[2] == "-----BEGIN OPENSSH PRIVATE KEY-----"


def test_lab_up_prints_how_to_reach_the_lab(capsys):
    """`./dev lab up` and `status` end by printing this; it must not raise."""
    info = {
        **INFO,
        "id": "1-ab",
        "keyPath": "/k",
        "knownHosts": "/kh",
        "namespaces": {"lab": "lab-1", "client": "lab-1-cli", "nodes": ["lab-1-n1", "lab-1-n2"]},
        "init": "systemd",
    }
    lab_cli._print_info(info)
    out = capsys.readouterr().out
    assert "nodes        node1=203.0.113.11 node2=203.0.113.12" in out
    assert "healthz :10256" in out


def test_without_the_cli_only_the_file_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(lab_cli, "STACK_FILE", tmp_path / "Pulumi.lab.yaml")
    monkeypatch.setattr(lab_cli.shutil, "which", lambda _name: None)
    lab_cli.write_lab_stack({**INFO, "keyPath": "/nonexistent"})
    assert (tmp_path / "Pulumi.lab.yaml").exists()


def test_pulumi_up_on_the_lab_stack_needs_no_cluster(tmp_path, monkeypatch):
    """The program as `pulumi up --stack lab` runs it on a machine with no kubeconfig at all:
    the director side only, nothing for pulumi-kubernetes to do, no kubeconfig asked for."""
    stack_file = tmp_path / "Pulumi.lab.yaml"
    monkeypatch.setattr(lab_cli, "STACK_FILE", stack_file)
    monkeypatch.setattr(lab_cli.shutil, "which", lambda _name: None)
    for name in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    lab_cli.write_lab_stack({**INFO, "keyPath": "/nonexistent"})

    # What the engine hands the program: Pulumi.yaml's defaults, then the stack file's values.
    project = yaml.safe_load((ROOT / "Pulumi.yaml").read_text())["config"]
    values = {key: decl["default"] for key, decl in project.items() if "default" in decl}
    stack = yaml.safe_load(stack_file.read_text())["config"]
    values.update({key.split(":", 1)[1]: value for key, value in stack.items()})
    run = run_program(values, stack="lab", kubeconfig=None)

    assert {r.typ for r in run.resources} == {"ipvs-ingress:index:Ingress", VS_TYPE}
    (vs,) = run.of_type(VS_TYPE)
    assert vs.dependencies == []
    assert (vs.inputs["vip"], vs.inputs["port"], vs.inputs["owner"]) == (
        "203.0.113.201", 80, "ipvs-ingress/lab",
    )  # fmt: skip
    assert vs.inputs["realServers"] == [
        {"address": "203.0.113.11", "weight": 1},
        {"address": "203.0.113.12", "weight": 1},
    ]
    assert vs.inputs["director"]["proxyCommand"] == INFO["proxyCommand"]
    assert run.outputs == {
        "vips": ["203.0.113.201"],
        "urls": ["http://203.0.113.201:80"],
        "virtualServices": [
            "TCP 203.0.113.201:80 wlc -> 203.0.113.11:80 Route 1",
            "TCP 203.0.113.201:80 wlc -> 203.0.113.12:80 Route 1",
        ],
        "realServerHealth": [  # the program's default check (vip), as a fresh director reports
            "TCP 203.0.113.201:80 -> 203.0.113.11:80 up",
            "TCP 203.0.113.201:80 -> 203.0.113.12:80 up",
        ],
    }
