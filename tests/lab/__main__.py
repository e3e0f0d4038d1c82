"""A director lab for people: ``python -m tests.lab up|status|reboot|node|down`` (as root).

``up`` boots a lab that stays up after the command returns (its state lives under the lab cache)
and prints how to reach the director and how to point a stack at it; ``status`` shows it again;
``reboot`` reboots the director (systemd as PID 1 on a disk that survives reboots, unless started
with ``up --init busybox``); ``node`` fails and heals its Kubernetes-node stand-ins and switches
their externalTrafficPolicy (tests/lab/nodes.py); ``down`` tears it down. Everything runs inside the lab's own network
namespaces, so the director is reached through the printed ProxyCommand.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.lab import harness, nodes, ops, provision, state, vm

REPO = Path(__file__).resolve().parents[2]
STACK_FILE = REPO / "stacks" / "Pulumi.lab.yaml"


def _persistent(cache) -> list[state.RunState]:
    return [r for r in state.runs(cache) if r.persistent]


def _print_info(info: dict) -> None:
    director = harness.director_config(info)
    ns = info["namespaces"]
    ssh = [
        "ssh",
        "-i",
        info["keyPath"],
        "-o",
        f"UserKnownHostsFile={info['knownHosts']}",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        f"ProxyCommand={info['proxyCommand']}",
        f"{info['user']}@{info['host']}",
        "ipvsadm -Ln",
    ]
    # Not `nodes`: that is the module, for its HEALTHZ_PORT below.
    node_list = " ".join(f"{name}={ip}" for name, ip in info["nodes"].items())
    print(f"""director lab {info["id"]} is up
  director     {info["user"]}@{info["host"]}:{info["port"]} (interface {info["interface"]})
  private key  {info["keyPath"]}
  host key     {info["hostKey"]}
  ProxyCommand {info["proxyCommand"]}
  nodes        {node_list} (kube-proxy stand-ins: {info["vip"]}:80 to each node's pod; healthz :{nodes.HEALTHZ_PORT})
  namespaces   lab {ns["lab"]}, client {ns["client"]}
  init         {info.get("init", "busybox")}

Try it (as root; the director is only reachable through the lab's namespace):
  {shlex.join(ssh)}
  ip netns exec {ns["client"]} curl -s http://{info["vip"]}/

Point a stack at it: {STACK_FILE.relative_to(REPO)} is written for this lab (stack "lab", the
director side only: no cluster needed); then
  pulumi stack select --create lab
  pulumi config set --secret ipvs-ingress:sshPrivateKey < {shlex.quote(info["keyPath"])}
  pulumi up --stack lab
Or any other stack by hand:
  pulumi config set ipvs-ingress:director {shlex.quote(json.dumps(director))}
""")


def lab_stack(info: dict) -> dict:
    """A complete stack config for this lab: its VIP on :80, its nodes, its director.

    The director side only (kubernetes: false): the lab's nodes are stand-ins that forward the
    VIP themselves, as kube-proxy would, so `pulumi up --stack lab` needs no cluster.
    """
    director = harness.director_config(info)
    return {
        "config": {
            "ipvs-ingress:kubernetes": False,
            "ipvs-ingress:vips": [
                {"address": info["vip"], "ports": [{"port": 80, "protocol": "tcp"}]}
            ],
            "ipvs-ingress:realServers": [
                {"address": ip, "weight": 1} for ip in info["nodes"].values()
            ],
            "ipvs-ingress:director": director,
        }
    }


def write_lab_stack(info: dict, pulumi: str | None = None) -> None:
    """Write stacks/Pulumi.lab.yaml; with the Pulumi CLI at hand, also select the stack and set
    its secret key, so that `pulumi up --stack lab` is all that is left to run."""
    header = (
        "# Written by `./dev lab up` for the local director lab; not committed.\n"
        "# kubernetes: false: the lab's nodes forward the VIP themselves, so the stack manages\n"
        "# only the director and `pulumi up --stack lab` needs no cluster or kubeconfig.\n"
    )
    STACK_FILE.write_text(header + yaml.safe_dump(lab_stack(info), sort_keys=False))
    pulumi = pulumi or shutil.which("pulumi")
    if pulumi is None:
        return
    steps = [
        ([pulumi, "stack", "select", "--create", "lab"], None),
        (
            [pulumi, "config", "set", "--secret", "--stack", "lab", "ipvs-ingress:sshPrivateKey"],
            info["keyPath"],
        ),
    ]
    for argv, stdin_path in steps:
        with open(stdin_path or os.devnull) as stdin:
            done = subprocess.run(argv, cwd=REPO, stdin=stdin, capture_output=True, text=True)
        if done.returncode != 0:
            why = (done.stderr or done.stdout).strip().splitlines()
            print(
                f"`{shlex.join(argv[1:])}` failed ({why[-1] if why else done.returncode}): run it by hand",
                file=sys.stderr,
            )
            return
    print("stack lab selected, its sshPrivateKey set (secret)", file=sys.stderr)


def up(nodes: int, init: str) -> int:
    art = provision.provision()
    print(f"provisioning: {art.elapsed:.1f}s", file=sys.stderr)
    for run in _persistent(art.cache):
        if run.owner.alive():
            print("a lab is already up (`down` first for a fresh one)\n", file=sys.stderr)
            write_lab_stack(run.info)
            _print_info(run.info)
            return 0
    lab = harness.Lab(nodes=nodes, artifacts=art, persistent=True, init=init).start()
    lab.adopt_by_vm()
    print(f"boot: {lab.boot_seconds:.1f}s", file=sys.stderr)
    write_lab_stack(lab.describe())
    _print_info(lab.describe())
    return 0


def status() -> int:
    labs = _persistent(provision.cache_dir())
    if not labs:
        print("no lab is up (start one with `python -m tests.lab up`)")
        return 1
    code = 0
    for run in labs:
        if not run.owner.alive():
            print(f"lab {run.id}: its VM is gone; `down` removes the rest")
            code = 1
            continue
        # ipvsadm would load ip_vs itself; leave that to the product's runtime.
        show = (
            "if [ -e /proc/net/ip_vs ]; then ipvsadm -Ln; else echo 'ip_vs not loaded'; fi; "
            f"if [ -x {ops.COMMAND} ]; then echo; {ops.COMMAND} status; "
            "else echo; echo 'no ipvs-ingress runtime yet (the first pulumi up installs it)'; fi"
        )
        probe = subprocess.run(
            harness.ssh_argv(run.info, show), capture_output=True, text=True, timeout=30
        )
        _print_info(run.info)
        if probe.returncode in (0, 1):  # 1: `ipvs-ingress status` saw drift or no runtime
            print(f"IPVS on the director:\n{probe.stdout}")
        else:
            print(f"ssh to the director failed: {probe.stderr.strip()}")
            code = 1
    return code


def reboot(power_cut: bool) -> int:
    labs = [r for r in _persistent(provision.cache_dir()) if r.owner.alive()]
    if not labs:
        print("no lab is up (start one with `python -m tests.lab up`)")
        return 1
    code = 0
    for run in labs:
        try:
            took = harness.restart_director(run, run.info, clean=not power_cut)
        except (ValueError, RuntimeError) as exc:
            print(f"lab {run.id}: {exc}", file=sys.stderr)
            code = 1
            continue
        how = "power cut" if power_cut else "reboot"
        print(
            f"lab {run.id}: {how}: VM down after {took.down:.1f}s, "
            f"sshd answers {took.up:.1f}s after qemu started ({took.total:.1f}s in all)"
        )
    return code


def node(action: str, args: list[str]) -> int:
    """`node status`, `node fail <i> <mode>`, `node heal <i> [<mode>]`, `node policy <name> [<i>]`."""
    labs = [r for r in _persistent(provision.cache_dir()) if r.owner.alive()]
    if not labs:
        print("no lab is up (start one with `python -m tests.lab up`)")
        return 1
    run = labs[-1]
    if "pods" not in run.info.get("namespaces", {}):
        print("this lab's nodes have no pods yet (an older lab): `./dev lab down && ./dev lab up`")
        return 1
    the_nodes = nodes.Nodes.of_run(run)
    try:
        if action == "fail" and len(args) == 2:
            the_nodes.fail(_node_number(args[0]), args[1])
        elif action == "heal" and len(args) in (1, 2):
            the_nodes.heal(_node_number(args[0]), args[1] if len(args) == 2 else None)
        elif action == "policy" and len(args) in (1, 2):
            the_nodes.policy(args[0], _node_number(args[1]) if len(args) == 2 else None)
        elif action != "status" or args:
            print(f"usage: node {NODE_USAGE}", file=sys.stderr)
            return 2
    except ValueError as exc:
        print(f"node {action}: {exc}", file=sys.stderr)
        return 2
    for i, n in enumerate(the_nodes.nodes, 1):
        failing = ", ".join(sorted(the_nodes.failures(i))) or "healthy"
        print(
            f"{n.name} {n.address} (pod {n.pod_address}): {the_nodes.policy_of(i)}, {failing}; "
            f"healthz {the_nodes.healthz_url(i)}"
        )
    print(f"failures: {', '.join(nodes.MODES)}")
    return 0


def _node_number(text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"node {text[:20]!r} is not a node number (1 for node1)")
    return int(text)


NODE_USAGE = "status | fail <i> <failure> | heal <i> [<failure>] | policy Cluster|Local [<i>]"


def down() -> int:
    cache = provision.cache_dir()
    labs = _persistent(cache)
    for run in labs:
        state.teardown(run)
        print(f"lab {run.id} is down")
    stale = state.cleanup_stale(cache)  # test runs that died without cleaning up
    if stale:
        print(f"also removed stale labs: {', '.join(stale)}")
    if not labs and not stale:
        print("no lab was up")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.lab",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up_args = sub.add_parser("up", help="boot a lab that stays up")
    up_args.add_argument("--nodes", type=int, default=2, help="node namespaces (default 2)")
    up_args.add_argument(
        "--init",
        choices=vm.INITS,
        default="systemd",
        help="the director's PID 1: systemd (default: what the provider's runtime needs, on a "
        "disk that survives `reboot`) or busybox (faster boot, no systemd: the provider refuses it)",
    )
    sub.add_parser("status", help="show the running lab and its IPVS table")
    sub.add_parser(
        "reboot", help="reboot the director (not a lab up with --init busybox)"
    ).add_argument(
        "--power-cut", action="store_true", help="kill qemu instead of `systemctl reboot`"
    )
    node_args = sub.add_parser("node", help=f"the nodes: {NODE_USAGE}")
    node_args.add_argument("action", choices=["status", "fail", "heal", "policy"])
    node_args.add_argument("args", nargs="*")
    sub.add_parser("down", help="tear the lab down")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("the lab needs root (network namespaces, tap, iptables)")
    if args.command == "up":
        return up(args.nodes, args.init)
    if args.command == "reboot":
        return reboot(args.power_cut)
    if args.command == "node":
        return node(args.action, args.args)
    return status() if args.command == "status" else down()


if __name__ == "__main__":
    sys.exit(main())
