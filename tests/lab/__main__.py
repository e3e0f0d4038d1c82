"""A director lab for people: ``python -m tests.lab up|status|reboot|crash|start|node|down``
(as root).

``up`` boots a lab that stays up after the command returns (its state lives under the lab cache)
and prints how to reach the director and how to point a stack at it; ``up --directors 2`` boots
two directors (203.0.113.2 and .3) and writes the stack with both (ipvs-ingress:directors);
``status`` shows it again, each director's IPVS and runtime status and which director holds each
VIP; ``reboot [N]`` reboots director N (systemd as PID 1 on a disk that survives reboots, unless
started with ``up --init busybox``); ``crash N`` kills director N's VM the hard way (kill -9 of
its qemu, for failover drills) and ``start N`` boots it again on its disk; ``node`` fails and
heals its Kubernetes-node stand-ins and switches their externalTrafficPolicy
(tests/lab/nodes.py); ``down`` tears it down. Everything runs inside the lab's own network
namespaces, so the directors are reached through the printed ProxyCommand.
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
    count = harness.director_count(info)
    ns = info["namespaces"]
    # One line per director: each has its own known_hosts, pinning the key to its address.
    ssh = "\n  ".join(
        shlex.join(_ssh_example(harness.director_info(info, n))) for n in range(1, count + 1)
    )
    # Not `nodes`: that is the module, for its HEALTHZ_PORT below.
    node_list = " ".join(f"{name}={ip}" for name, ip in info["nodes"].items())
    first = "director    " if count == 1 else "director 1  "
    directors = "".join(
        f"\n  director {n}   {info['user']}@{harness.director_info(info, n)['host']}:{info['port']}"
        f" (interface {info['interface']}, VRRP priority {harness.PRIORITIES[n - 1]})"
        for n in range(2, count + 1)
    )
    key, value = "director", director
    if count > 1:
        key, value = "directors", harness.directors_config(info)
    print(f"""director lab {info["id"]} is up
  {first} {info["user"]}@{info["host"]}:{info["port"]} (interface {info["interface"]}){directors}
  private key  {info["keyPath"]}
  host key     {info["hostKey"]}
  ProxyCommand {info["proxyCommand"]}
  nodes        {node_list} (kube-proxy stand-ins: {info["vip"]}:80 to each node's pod; healthz :{nodes.HEALTHZ_PORT})
  namespaces   lab {ns["lab"]}, client {ns["client"]}
  init         {info.get("init", "busybox")}

Try it (as root; the director is only reachable through the lab's namespace):
  {ssh}
  ip netns exec {ns["client"]} curl -s http://{info["vip"]}/

Point a stack at it: {STACK_FILE.relative_to(REPO)} is written for this lab (stack "lab", the
director side only: no cluster needed); then
  pulumi stack select --create lab
  pulumi config set --secret ipvs-ingress:sshPrivateKey < {shlex.quote(info["keyPath"])}
  pulumi up --stack lab
Or any other stack by hand:
  pulumi config set ipvs-ingress:{key} {shlex.quote(json.dumps(value))}
""")


def _ssh_example(info: dict) -> list[str]:
    return [
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


def lab_stack(info: dict) -> dict:
    """A complete stack config for this lab: its VIP on :80, its nodes, its director.

    The director side only (kubernetes: false): the lab's nodes are stand-ins that forward the
    VIP themselves, as kube-proxy would, so `pulumi up --stack lab` needs no cluster. A lab with
    several directors gets them all as ipvs-ingress:directors (issue 10: VIPs held by VRRP)
    instead of ipvs-ingress:director.
    """
    if harness.director_count(info) > 1:
        directors = {"ipvs-ingress:directors": harness.directors_config(info)}
    else:
        directors = {"ipvs-ingress:director": harness.director_config(info)}
    return {
        "config": {
            "ipvs-ingress:kubernetes": False,
            "ipvs-ingress:vips": [
                {"address": info["vip"], "ports": [{"port": 80, "protocol": "tcp"}]}
            ],
            "ipvs-ingress:realServers": [
                {"address": ip, "weight": 1} for ip in info["nodes"].values()
            ],
            **directors,
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


def up(nodes: int, init: str, directors: int = 1) -> int:
    art = provision.provision()
    print(f"provisioning: {art.elapsed:.1f}s", file=sys.stderr)
    for run in _persistent(art.cache):
        if run.owner.alive():
            has = harness.director_count(run.info)
            if has != directors:
                print(
                    f"a lab with {has} director{'s' * (has > 1)} is already up: "
                    f"`./dev lab down` first for one with {directors}",
                    file=sys.stderr,
                )
                return 1
            print("a lab is already up (`down` first for a fresh one)\n", file=sys.stderr)
            write_lab_stack(run.info)
            _print_info(run.info)
            return 0
    lab = harness.Lab(
        nodes=nodes, artifacts=art, persistent=True, init=init, directors=directors
    ).start()
    lab.adopt_by_vm()
    print(f"boot: {lab.boot_seconds:.1f}s", file=sys.stderr)
    if directors > 1:
        each = ", ".join(f"{n}: {t:.1f}s" for n, t in sorted(lab.director_boot_times.items()))
        print(f"qemu start to sshd, per director: {each}", file=sys.stderr)
    write_lab_stack(lab.describe())
    _print_info(lab.describe())
    return 0


def status() -> int:
    labs = _persistent(provision.cache_dir())
    if not labs:
        print("no lab is up (start one with `python -m tests.lab up`)")
        return 1
    return max(show(run) for run in labs)


def show(run: state.RunState) -> int:
    """Print a lab's info, each director's IPVS table and runtime status, and which director
    holds each VIP; 1 when a director did not answer (or none runs)."""
    count = harness.director_count(run.info)
    live = harness.live_directors(run, count)
    if not live:
        print(f"lab {run.id}: its VMs are gone; `start 1` boots one again, `down` removes it")
        return 1
    _print_info(run.info)
    code = 0
    bound: dict[int, set[str]] = {}
    for n in range(1, count + 1):
        code |= _director_status(run, n, n in live, count, bound)
    print("VIPs (bound on a director now):")
    for vip, holders in harness.holders_of(_exposed(run), bound).items():
        names = ", ".join(f"director {n}" for n in holders) or "no director"
        split = " (more than one: each answers ARP for it)" if len(holders) > 1 else ""
        print(f"  {vip}: {names}{split}")
    unknown = [n for n in live if n not in bound]
    if unknown:
        print(f"  (not known for director {', '.join(map(str, unknown))}: no answer)")
    return code


def _director_status(
    run: state.RunState, n: int, alive: bool, count: int, bound: dict[int, set[str]]
) -> int:
    """Print director n's IPVS table and runtime status; note its bound addresses in `bound`."""
    info = harness.director_info(run.info, n)
    which = "the director" if count == 1 else f"director {n} ({info['host']})"
    if not alive:
        print(f"{which}: its VM is down (`start {n}` boots it again)\n")
        return 0
    # ipvsadm would load ip_vs itself; leave that to the product's runtime.
    script = (
        "if [ -e /proc/net/ip_vs ]; then ipvsadm -Ln; else echo 'ip_vs not loaded'; fi; "
        f"if [ -x {ops.COMMAND} ]; then echo; {ops.COMMAND} status; "
        "else echo; echo 'no ipvs-ingress runtime yet (the first pulumi up installs it)'; fi"
    )
    try:
        probe = subprocess.run(
            harness.ssh_argv(info, script), capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired:
        print(f"ssh to {which} timed out (still booting?)\n")
        return 1
    if probe.returncode not in (0, 1):  # 1: `ipvs-ingress status` saw drift or no runtime
        print(f"ssh to {which} failed: {probe.stderr.strip()}\n")
        return 1
    print(f"IPVS on {which}:\n{probe.stdout}")
    try:
        bound[n] = harness.bound_addresses(run.info, n)
    except (harness.LabError, subprocess.TimeoutExpired, ValueError):
        pass  # said as unknown under VIPs
    return 0


def _exposed(run: state.RunState) -> list[str]:
    """The VIPs the lab's nodes forward (`lab.expose`), the lab's own VIP first."""
    vips = [run.info["vip"]]
    if "pods" in run.info.get("namespaces", {}):  # an older lab's nodes keep no record
        vips += [vip for vip, _port, _proto in nodes.Nodes.of_run(run).exposed]
    return list(dict.fromkeys(vips))


def reboot(power_cut: bool, n: int = 1) -> int:
    labs = [r for r in _persistent(provision.cache_dir()) if r.owner.alive()]
    if not labs:
        print("no lab is up (start one with `python -m tests.lab up`)")
        return 1
    code = 0
    for run in labs:
        try:
            took = harness.restart_director(run, run.info, clean=not power_cut, n=n)
        except (ValueError, RuntimeError) as exc:
            print(f"lab {run.id}: {exc}", file=sys.stderr)
            code = 1
            continue
        how = "power cut" if power_cut else "reboot"
        which = "" if n == 1 else f" of director {n}"
        print(
            f"lab {run.id}: {how}{which}: VM down after {took.down:.1f}s, "
            f"sshd answers {took.up:.1f}s after qemu started ({took.total:.1f}s in all)"
        )
    return code


def crash(n: int) -> int:
    """kill -9 of director n's qemu, left dead: a failover drill."""
    labs = [r for r in _persistent(provision.cache_dir()) if r.owner.alive()]
    if not labs:
        print("no lab is up (start one with `python -m tests.lab up`)")
        return 1
    run = labs[-1]
    try:
        took = harness.stop_director(run, run.info, n, clean=False)
    except (ValueError, RuntimeError) as exc:
        print(f"crash {n}: {exc}", file=sys.stderr)
        return 1
    print(f"lab {run.id}: director {n}'s VM killed (SIGKILL), gone after {took:.2f}s")
    live = harness.live_directors(run, harness.director_count(run.info))
    if not live:
        print(
            "no director runs now: `start N` soon (meanwhile a new lab's start, or `down`, "
            "removes this one as stale)"
        )
    return 0


def start(n: int) -> int:
    """Boot director n again on its disk (after `crash`, or a VM that died)."""
    # Also a lab whose every VM is gone: its namespaces and disks are there until cleaned.
    labs = _persistent(provision.cache_dir())
    if not labs:
        print("no lab is up (start one with `python -m tests.lab up`)")
        return 1
    run = labs[-1]
    try:
        took = harness.start_director(run, run.info, n)
    except (ValueError, RuntimeError) as exc:
        print(f"start {n}: {exc}", file=sys.stderr)
        return 1
    print(f"lab {run.id}: director {n} is back, sshd answers {took:.1f}s after qemu started")
    return 0


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
        "--directors",
        type=int,
        choices=range(1, harness.MAX_DIRECTORS + 1),
        default=1,
        help="director VMs (default 1); 2: 203.0.113.2 and .3, the stack gets "
        "ipvs-ingress:directors (VRRP priorities 150 and 100)",
    )
    up_args.add_argument(
        "--init",
        choices=vm.INITS,
        default="systemd",
        help="the director's PID 1: systemd (default: what the provider's runtime needs, on a "
        "disk that survives `reboot`) or busybox (faster boot, no systemd: the provider refuses it)",
    )
    sub.add_parser(
        "status", help="show the running lab, each director's IPVS table, who holds each VIP"
    )
    reboot_args = sub.add_parser(
        "reboot", help="reboot director N (default 1; not a lab up with --init busybox)"
    )
    reboot_args.add_argument(
        "--power-cut", action="store_true", help="kill qemu instead of `systemctl reboot`"
    )
    reboot_args.add_argument("n", type=int, nargs="?", default=1, metavar="N")
    sub.add_parser(
        "crash", help="kill director N's VM the hard way (kill -9 of its qemu), for drills"
    ).add_argument("n", type=int, metavar="N")
    sub.add_parser("start", help="boot director N again on its disk (after crash)").add_argument(
        "n", type=int, metavar="N"
    )
    node_args = sub.add_parser("node", help=f"the nodes: {NODE_USAGE}")
    node_args.add_argument("action", choices=["status", "fail", "heal", "policy"])
    node_args.add_argument("args", nargs="*")
    sub.add_parser("down", help="tear the lab down")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("the lab needs root (network namespaces, tap, iptables)")
    if args.command == "up":
        return up(args.nodes, args.init, args.directors)
    if args.command == "reboot":
        return reboot(args.power_cut, args.n)
    if args.command == "crash":
        return crash(args.n)
    if args.command == "start":
        return start(args.n)
    if args.command == "node":
        return node(args.action, args.args)
    return status() if args.command == "status" else down()


if __name__ == "__main__":
    sys.exit(main())
