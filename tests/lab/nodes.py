"""The lab's Kubernetes nodes: kube-proxy (iptables mode) for a Service with spec.externalIPs,
a pod per node, kube-proxy's healthz, and the ways real nodes fail (issue 9).

Per node i (1-based, node<i>), every packet inside the lab's own namespaces:

    lab-<id>-n<i>   eth0 203.0.113.(10+i)/24 on the lab bridge; vpod 203.0.113.(10+i)/32 to the
                    pod; kube-proxy's rules; its healthz on :10256 (kube_proxy_healthz.py)
    lab-<id>-p<i>   the pod: eth0 198.51.100.(10+i)/32, default via the node; node_server.py on
                    :8080 answering "node<i>" and recording each request's peer address

Why a pod namespace and not a server in the node's: kube-proxy masquerades in nat POSTROUTING
(KUBE-MARK-MASQ, then MASQUERADE), which locally delivered packets never cross, so only a pod
behind the node is masqueraded the way kube-proxy does it. The node's end of the pod link carries
the node's own address (as Calico's unnumbered veths do): MASQUERADE takes the outgoing device's
address, so under Cluster the pod sees the node's address, as in the article's capture.

The rules (rewritten whole per node on every change, iptables-restore, so any sequence of calls
lands on the one state it describes):
    nat PREROUTING  -> LAB-SERVICES: -d VIP -p P --dport N -j LAB-EXT  (one per exposed VIP:port)
                       node:8080 -> pod:8080 (a hostPort: the pod reached directly)
    nat LAB-EXT     Cluster: mark for masquerade, DNAT to the local pod; without a ready local
                    pod, to the pod of the first other node that has one (kube-proxy spreads over
                    all endpoints at random; the lab picks one, so tests know which), none: no
                    DNAT (filter rejects)
                    Local: DNAT to the local pod only, no masquerade; none: no DNAT (filter drops)
    nat POSTROUTING mark -> MASQUERADE
    filter FORWARD  new flows -> LAB-EXTERNAL: "has no local endpoints" DROP (Local),
                    "has no endpoints" REJECT (Cluster), as kube-proxy's KUBE-EXTERNAL-SERVICES;
                    eth0 -> eth0 without DNAT: DROP (a node is no router for the segment, so a VIP
                    packet no rule took dies here instead of going back to the director).

The API (`lab.nodes`, a `Nodes`; `Nodes.of_run(run)` in another process, as `./dev lab node`
uses it; each call reads back the last one's record, so both may take turns); i is a node's
number, 1..len(lab.node_ips):
    policy(name, node=None)      "Cluster" (the default) or "Local", for every node or one
    policy_of(i) -> str
    fail(i, mode)                switch a failure on; idempotent. Modes (MODES):
        "server-stop"       the pod's server process stops: connects are refused (RST). The
                            pod stays an endpoint (before Kubernetes notices: readiness
                            probes take seconds), so under Cluster no other node avoids it
        "vip-rule-missing"  kube-proxy's rules for the VIPs are gone; healthz still 200; VIP
                            connects time out (the node drops what it cannot deliver)
        "unreachable"       the node's link to the bridge is down: connects time out, ARP fails
        "no-local-pod"      the node has no ready local pod: under Local VIP packets are dropped
                            (time out) while healthz answers 200; under Cluster the node forwards
                            to another node's pod (masqueraded), or rejects when none has one
        "proxy-stale"       healthz answers 503; the rules keep working
    heal(i, mode=None)           switch one failure (or every one) off; idempotent
    failures(i) -> frozenset     the failures switched on
    reset()                      every node healthy, policy Cluster, no peers recorded
    peers(i) -> list[str]        peer addresses node i's pod saw, in order, since clear_peers
    clear_peers(i=None)
    address(i), pod_address(i), healthz_url(i)
    expose(vip, port, protocol)  what Lab.expose does: kube-proxy's rules for one more VIP:port

From the client: `attempts(lab, host, port, count, timeout, path)` makes `count` sequential GETs
from the client namespace and says how each ended: {"outcome": "ok", "status", "body"} or
{"outcome": "refused" | "timeout" | "unreachable" | "reset" | "error", "error"}.
`load(lab, host, port, rate, timeout, max_seconds)` is a context manager: a client process in the
client namespace starting one GET every 1/rate s (each in its own thread, so a request that hangs
does not slow the rate) until the block ends (at most max_seconds); `.results()` are the finished
ones so far, oldest first, each with "start" (epoch seconds, comparable to time.time() here) and
"took" besides the keys above.
"""

from __future__ import annotations

import json
import select
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.lab import state

POD_PORT = 8080  # the pod's server; also the node's hostPort to it
HEALTHZ_PORT = 10256  # kube-proxy's healthzBindAddress default
POLICIES = ("Cluster", "Local")
MODES = ("server-stop", "vip-rule-missing", "unreachable", "no-local-pod", "proxy-stale")
MASQ_MARK = "0x4000/0x4000"  # kube-proxy's KUBE-MARK-MASQ bit
HERE = Path(__file__).parent
NODE_SERVER = HERE / "node_server.py"
HEALTHZ_SERVER = HERE / "kube_proxy_healthz.py"
HOST_PYTHON = "/usr/bin/python3"
READY_TIMEOUT = 15.0


@dataclass
class Node:
    index: int
    name: str
    ns: str
    pod_ns: str
    address: str
    pod_address: str
    link: str  # its veth's end in the lab namespace, on the bridge
    policy: str = "Cluster"
    failures: set[str] = field(default_factory=set)
    remote_route: str | None = None  # another node's pod, routed to under Cluster
    applied: str = ""  # the service rules last written


def pod_address(i: int) -> str:
    return f"198.51.100.{10 + i}"


class Nodes:
    def __init__(self, lab) -> None:
        self.lab = lab
        self.nodes = [
            Node(i, name, ns, f"{lab.lab_ns}-p{i}", addr, pod_address(i), f"v-n{i}")
            for i, (name, ns, addr) in enumerate(
                zip(lab.node_names, lab.node_ns, lab.node_ips, strict=True), 1
            )
        ]
        self.exposed: list[tuple[str, int, str]] = []
        self.dir = Path(lab.run_dir) / "nodes"
        self._load()

    @classmethod
    def of_run(cls, run: state.RunState) -> Nodes:
        """The nodes of a lab another process started (`./dev lab up`), as it left them."""
        return cls(_RunView(run))

    # -- the API ------------------------------------------------------------------------------

    def policy(self, name: str, node: int | None = None) -> None:
        self._load()
        if name not in POLICIES:
            raise ValueError(f"policy {name!r} is not one of {', '.join(POLICIES)}")
        for n in self._select(node):
            n.policy = name
        self._apply_rules()

    def policy_of(self, i: int) -> str:
        self._load()
        return self._node(i).policy

    def fail(self, i: int, mode: str) -> None:
        self._load()
        node = self._node(i)
        if mode not in MODES:
            raise ValueError(f"failure {mode!r} is not one of {', '.join(MODES)}")
        node.failures.add(mode)
        self._converge(node)

    def heal(self, i: int, mode: str | None = None) -> None:
        self._load()
        node = self._node(i)
        if mode is not None and mode not in MODES:
            raise ValueError(f"failure {mode!r} is not one of {', '.join(MODES)}")
        node.failures -= {mode} if mode else set(MODES)
        self._converge(node)

    def failures(self, i: int) -> frozenset[str]:
        self._load()
        return frozenset(self._node(i).failures)

    def reset(self) -> None:
        self._load()  # the routes another process added are removed too
        for n in self.nodes:
            n.policy = "Cluster"
            n.failures.clear()
            n.applied = ""  # rewritten even if someone changed the rules behind our back
            self._converge(n, rules=False)
        self._apply_rules()
        self.clear_peers()

    def peers(self, i: int) -> list[str]:
        path = self._peers_file(self._node(i))
        return path.read_text().split() if path.exists() else []

    def clear_peers(self, i: int | None = None) -> None:
        for n in self._select(i):
            # The server appends (O_APPEND): after truncation it writes at the new end.
            self._peers_file(n).write_text("")

    def address(self, i: int) -> str:
        return self._node(i).address

    def pod_address(self, i: int) -> str:
        return self._node(i).pod_address

    def healthz_url(self, i: int) -> str:
        return f"http://{self._node(i).address}:{HEALTHZ_PORT}/healthz"

    def expose(self, vip: str, port: int, protocol: str = "tcp") -> None:
        self._load()
        if (vip, port, protocol) not in self.exposed:
            self.exposed.append((vip, port, protocol))
        self._apply_rules()

    # -- building (Lab.start) -----------------------------------------------------------------

    def build(self) -> None:
        """The pod link, routes, sysctls and kube-proxy's fixed rules of every node."""
        self.dir.mkdir(exist_ok=True)
        for n in self.nodes:
            self._ip_batch(
                n.ns,
                [
                    f"link add vpod type veth peer name eth0 netns {n.pod_ns}",
                    f"addr add {n.address}/32 dev vpod",
                    "link set vpod up",
                    f"route add {n.pod_address}/32 dev vpod",
                ],
            )
            self._ip_batch(
                n.pod_ns,
                [
                    f"addr add {n.pod_address}/32 dev eth0",
                    "link set eth0 up",
                    f"route add {n.address}/32 dev eth0",
                    f"route add default via {n.address} dev eth0",
                ],
            )
            # A Kubernetes node forwards (to its pods); no redirects or reverse-path checks to
            # second-guess the lab's routes.
            sysctls = ["net.ipv4.ip_forward=1"]
            for dev in ("all", "default", "eth0", "vpod"):
                sysctls += [
                    f"net.ipv4.conf.{dev}.send_redirects=0",
                    f"net.ipv4.conf.{dev}.rp_filter=0",
                ]
            self.lab.in_ns(n.ns, ["sysctl", "-qw", *sysctls])
            self._restore(n.ns, self._fixed_rules(n))
            self._peers_file(n).write_text("")

    def start(self) -> None:
        """Every node's pod server and kube-proxy healthz, waited for together."""
        started = [self._spawn_server(n) for n in self.nodes]
        started += [self._spawn_healthz(n) for n in self.nodes]
        self._await_ready(started)

    # -- converging a node on its state -------------------------------------------------------

    def _converge(self, node: Node, rules: bool = True) -> None:
        link = "down" if "unreachable" in node.failures else "up"
        _run(["ip", "-n", self.lab.lab_ns, "link", "set", node.link, link])
        flag = self._stale_flag(node)
        if "proxy-stale" in node.failures:
            if not flag.exists():
                flag.touch()
        else:
            flag.unlink(missing_ok=True)
        running = self._server_procs(node)
        if "server-stop" in node.failures:
            for proc in running:
                state.kill(proc)
                self.lab._state.procs.remove(proc)
            self.lab._state.save()
        elif not running:
            self._await_ready([self._spawn_server(node)])
        if rules:
            # Every node: under Cluster another node may forward to this one's pod.
            self._apply_rules()

    def _apply_rules(self) -> None:
        for n in self.nodes:
            self._route_to_remote_pod(n)
            rules = self._service_rules(n)
            if rules != n.applied:  # a failure's time is not spent rewriting unchanged nodes
                self._restore(n.ns, rules)
                n.applied = rules
        self._save()

    def _save(self) -> None:
        """What was asked, for `./dev lab node` in a later process (Nodes.of_run)."""
        saved = {
            "exposed": self.exposed,
            "nodes": {
                n.name: {
                    "policy": n.policy,
                    "failures": sorted(n.failures),
                    "remoteRoute": n.remote_route,
                    "applied": n.applied,
                }
                for n in self.nodes
            },
        }
        tmp = self.dir / "state.json.tmp"
        tmp.write_text(json.dumps(saved))
        tmp.rename(self.dir / "state.json")

    def _load(self) -> None:
        """Read back what was asked last, here or by `./dev lab node` (one at a time)."""
        path = self.dir / "state.json"
        if not path.exists():
            return
        saved = json.loads(path.read_text())
        self.exposed = [tuple(e) for e in saved["exposed"]]
        for n in self.nodes:
            mine = saved["nodes"].get(n.name, {})
            n.policy = mine.get("policy", n.policy)
            n.failures = set(mine.get("failures", ()))
            n.remote_route = mine.get("remoteRoute")
            n.applied = mine.get("applied", "")

    def _route_to_remote_pod(self, n: Node) -> None:
        """Under Cluster without a local pod, the pod kube-proxy picked is reached through its
        node; the route goes again once it is not needed, so healing leaves no trace."""
        target, _ = self._endpoint(n)
        want = target.pod_address if target not in (None, n) else None
        if want == n.remote_route:
            return
        if n.remote_route:
            self._ip_batch(n.ns, [f"route del {n.remote_route}/32"])
        if want:
            self._ip_batch(n.ns, [f"route add {want}/32 via {target.address} dev eth0"])
        n.remote_route = want

    def _fixed_rules(self, n: Node) -> str:
        return "\n".join(
            [
                "*nat",
                ":LAB-SERVICES - [0:0]",
                ":LAB-EXT - [0:0]",
                "-A PREROUTING -j LAB-SERVICES",
                f"-A PREROUTING -d {n.address}/32 -p tcp -m tcp --dport {POD_PORT}"
                f" -j DNAT --to-destination {n.pod_address}:{POD_PORT}",
                f"-A POSTROUTING -m mark --mark {MASQ_MARK} -j MASQUERADE",
                "COMMIT",
                "*filter",
                ":LAB-EXTERNAL - [0:0]",
                "-A FORWARD -m conntrack --ctstate NEW -j LAB-EXTERNAL",
                "-A FORWARD -i eth0 -o eth0 -m conntrack ! --ctstate DNAT -j DROP",
                "COMMIT",
                "",
            ]
        )

    def _endpoint(self, n: Node) -> tuple[Node | None, str]:
        """(the pod node n's VIP traffic goes to, or None; what to do without one)."""
        if "no-local-pod" not in n.failures:
            return n, ""
        if n.policy == "Local":
            return None, "DROP"  # kube-proxy: "has no local endpoints"
        others = [o for o in self.nodes if "no-local-pod" not in o.failures]
        return (others[0], "") if others else (None, "REJECT")  # "has no endpoints"

    def _service_rules(self, n: Node) -> str:
        nat = ["*nat", ":LAB-SERVICES - [0:0]", ":LAB-EXT - [0:0]"]
        filt = ["*filter", ":LAB-EXTERNAL - [0:0]"]
        if "vip-rule-missing" not in n.failures:
            target, otherwise = self._endpoint(n)
            for vip, port, proto in self.exposed:
                match = f"-d {vip}/32 -p {proto} -m {proto} --dport {port}"
                nat.append(f"-A LAB-SERVICES {match} -j LAB-EXT")
                if target is None:
                    filt.append(f"-A LAB-EXTERNAL {match} -j {otherwise}")
            if target is not None:
                if n.policy == "Cluster":
                    nat.append(f"-A LAB-EXT -j MARK --set-xmark {MASQ_MARK}")
                for proto in sorted({proto for _, _, proto in self.exposed}):
                    nat.append(
                        f"-A LAB-EXT -p {proto} -j DNAT"
                        f" --to-destination {target.pod_address}:{POD_PORT}"
                    )
        return "\n".join([*nat, "COMMIT", *filt, "COMMIT", ""])

    # -- processes ----------------------------------------------------------------------------

    def _server_procs(self, n: Node) -> list[state.Proc]:
        return [p for p in self.lab._state.procs if p.what == f"http server {n.name}" and p.alive()]

    def _spawn_server(self, n: Node) -> tuple[subprocess.Popen, str]:
        argv = [str(NODE_SERVER), n.name, str(POD_PORT), self.lab.id, str(self._peers_file(n))]
        return self._spawn(n.pod_ns, argv, f"http server {n.name}")

    def _spawn_healthz(self, n: Node) -> tuple[subprocess.Popen, str]:
        argv = [str(HEALTHZ_SERVER), str(HEALTHZ_PORT), self.lab.id, str(self._stale_flag(n))]
        return self._spawn(n.ns, argv, f"kube-proxy healthz {n.name}")

    def _spawn(self, ns: str, argv: list[str], what: str) -> tuple[subprocess.Popen, str]:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, HOST_PYTHON, *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lab._state.add_proc(proc.pid, what)
        return proc, f"{what} in {ns}"

    def _await_ready(self, started: list[tuple[subprocess.Popen, str]]) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        for proc, what in started:
            ready, _, _ = select.select([proc.stdout], [], [], max(0, deadline - time.monotonic()))
            line = proc.stdout.readline() if ready else ""
            proc.stdout.close()
            if line.strip() != "ready":
                raise RuntimeError(f"{what} did not start: {line!r}")

    # -- helpers ------------------------------------------------------------------------------

    def _node(self, i: int) -> Node:
        if not isinstance(i, int) or not 1 <= i <= len(self.nodes):
            raise ValueError(f"node {i!r} is not one of 1..{len(self.nodes)}")
        return self.nodes[i - 1]

    def _select(self, i: int | None) -> list[Node]:
        return self.nodes if i is None else [self._node(i)]

    def _peers_file(self, n: Node) -> Path:
        return self.dir / f"{n.name}.peers"

    def _stale_flag(self, n: Node) -> Path:
        return self.dir / f"{n.name}.proxy-stale"

    def _ip_batch(self, ns: str, commands: list[str]) -> None:
        _run(["ip", "-n", ns, "-batch", "-"], stdin="\n".join(commands) + "\n")

    def _restore(self, ns: str, rules: str) -> None:
        _run(["ip", "netns", "exec", ns, "iptables-restore", "-w", "--noflush"], stdin=rules)


def _run(argv: list[str], stdin: str | None = None) -> None:
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` exited {proc.returncode}: {proc.stderr.strip()}")


_GET = """
import errno, http.client, json, sys, threading, time


def get(host, port, path, timeout):
    conn = http.client.HTTPConnection(host, int(port), timeout=float(timeout))
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        reply = conn.getresponse()
        return {"outcome": "ok", "status": reply.status, "body": reply.read().decode()}
    except TimeoutError as exc:
        return {"outcome": "timeout", "error": repr(exc)}
    except ConnectionRefusedError as exc:
        return {"outcome": "refused", "error": repr(exc)}
    except ConnectionResetError as exc:
        return {"outcome": "reset", "error": repr(exc)}
    except OSError as exc:
        gone = exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH)
        return {"outcome": "unreachable" if gone else "error", "error": repr(exc)}
    except Exception as exc:
        return {"outcome": "error", "error": repr(exc)}
    finally:
        conn.close()
"""

_ATTEMPTS = (
    _GET
    + """
host, port, path, count, timeout = sys.argv[1:6]
print(json.dumps([get(host, port, path, timeout) for _ in range(int(count))]))
"""
)

_LOAD = (
    _GET
    + """
host, port, path, rate, timeout, max_seconds, out_path = sys.argv[1:8]
out, lock = open(out_path, "a", buffering=1), threading.Lock()


def one(start):
    got = get(host, port, path, timeout)
    got.update(start=start, took=time.time() - start)
    with lock:
        out.write(json.dumps(got) + "\\n")


first = time.time()
print("ready", flush=True)
for k in range(int(float(rate) * float(max_seconds))):
    time.sleep(max(0.0, first + k / float(rate) - time.time()))
    threading.Thread(target=one, args=(time.time(),), daemon=True).start()
time.sleep(float(timeout) + 1)
"""
)


def attempts(
    lab, host: str, port: int, count: int = 1, timeout: float = 1.0, path: str = "/"
) -> list[dict]:
    """`count` sequential GETs of http://host:port/path from the client namespace, each ending
    in a dict whose "outcome" says how (see the module docstring); never raises for a failure."""
    argv = [HOST_PYTHON, "-c", _ATTEMPTS, host, str(port), path, str(count), str(timeout)]
    proc = lab.in_ns(lab.client_ns, argv, timeout=count * (timeout + 1) + 15)
    return json.loads(proc.stdout)


class Load:
    """A running `load`: its results so far."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def results(self) -> list[dict]:
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        # The last line may be half-written while the client runs.
        done = []
        for line in lines:
            try:
                done.append(json.loads(line))
            except ValueError:
                continue
        return sorted(done, key=lambda r: r["start"])


@contextmanager
def load(
    lab,
    host: str,
    port: int,
    rate: float = 20,
    timeout: float = 1.0,
    max_seconds: float = 120,
    path: str = "/",
) -> Iterator[Load]:
    """GETs at `rate` per second from the client namespace for the duration of the block."""
    lab.nodes.dir.mkdir(exist_ok=True)
    out = lab.nodes.dir / f"load-{time.time_ns()}.jsonl"
    argv = [HOST_PYTHON, "-c", _LOAD, host, str(port), path, str(rate), str(timeout)]
    proc = subprocess.Popen(
        ["ip", "netns", "exec", lab.client_ns, *argv, str(max_seconds), str(out)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    tracked = lab._state.add_proc(proc.pid, "client load")
    try:
        lab.nodes._await_ready([(proc, "client load")])
        yield Load(out)
    finally:
        state.kill(tracked)
        lab._state.procs.remove(tracked)
        lab._state.save()


class _RunView:
    """What Nodes needs of a Lab, read from a run's recorded state."""

    def __init__(self, run: state.RunState) -> None:
        info = run.info
        self._state = run
        self.id = info["id"]
        self.run_dir = info["runDir"]
        self.lab_ns = info["namespaces"]["lab"]
        self.client_ns = info["namespaces"]["client"]
        self.node_ns = info["namespaces"]["nodes"]
        self.node_names = list(info["nodes"])
        self.node_ips = list(info["nodes"].values())

    def in_ns(self, ns: str, argv: list[str], check: bool = True, timeout: float = 60):
        proc = subprocess.run(
            ["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"`{' '.join(argv)}` in {ns} exited {proc.returncode}: {proc.stderr}"
            )
        return proc
