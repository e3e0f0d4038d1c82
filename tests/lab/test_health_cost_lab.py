"""What health checks cost the director (issue 9): 50 virtual services x 10 real servers, every
one probed through its VIP at the defaults (check vip, every 1 s, timeout 0.5 s).

The 50 services are created through the provider (gRPC, as the engine does); then, with no
provider call, the runtime probes for a measured window. Printed: probes per second (from the
runtime's own count in its status file) against the 500 per second asked, and the runtime's
CPU (utime + stime from /proc/<pid>/stat) and the whole VM's busy share over the window. The
oracle that the probes were real: the kernel's connection counters of the 10 probe services
grow, and no real server is drained (all nodes are healthy: a drain here would be a false
positive of an overloaded prober). Boots its own 10-node systemd lab (`-m slow_lab` alone).
"""

from __future__ import annotations

import json
import shlex
import time

import pytest

from tests.conftest import _say, own_lab
from tests.lab import ops
from tests.lab.test_runtime_lab import OWNER, connect

pytestmark = [pytest.mark.lab, pytest.mark.slow_lab]

SERVICES, NODES = 50, 10
VIPS = [f"203.0.113.{151 + i}" for i in range(SERVICES)]
WINDOW = 20.0  # seconds measured

# On the director: the runtime's probe count and CPU ticks, and the VM's, at one moment.
_SAMPLE = """
import json, os, time
status = json.load(open("/run/ipvs-ingress/status.json"))
pid = status["pid"]
fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
cpu = [int(x) for x in open("/proc/stat").readline().split()[1:]]
print(json.dumps({"time": time.monotonic(), "sent": status["probesSent"], "pid": pid,
                  "ticks": int(fields[11]) + int(fields[12]), "hz": os.sysconf("SC_CLK_TCK"),
                  "busy": sum(cpu) - cpu[3] - cpu[4], "all": sum(cpu),
                  "drained": [h for s in status["services"].values() for h in s["health"]
                              if h["state"] != "up"],
                  "inPlace": sum(1 for p in status["probeServices"].values() if p["inPlace"])}))
"""


@pytest.fixture(scope="module")
def cost_lab(request: pytest.FixtureRequest):
    with own_lab(request, "health cost lab", init="systemd", nodes=NODES) as lab:
        yield lab


def sample(lab) -> dict:
    return json.loads(lab.director(f"python3 -c {shlex.quote(_SAMPLE)}").stdout)


def test_probing_50_services_of_10_real_servers(cost_lab, request):
    lab = cost_lab
    for vip in VIPS:
        lab.expose(vip, 80)
    provider = connect(lab)
    try:
        started = time.monotonic()
        for vip in VIPS:
            props = {
                "director": lab.director_config(),
                "vip": vip,
                "port": 80,
                "protocol": "tcp",
                "realServers": [{"address": ip, "weight": 1} for ip in lab.node_ips],
                "owner": OWNER,
                "health": {},  # the program's defaults, as for a stack that sets none
            }
            inputs, failures = provider.check(props)
            assert failures == [] and inputs["health"]["check"] == "vip"
            provider.create(inputs)
        created = time.monotonic() - started
    finally:
        provider.close()
    deadline = time.monotonic() + 60
    while (first := sample(lab))["inPlace"] < NODES:
        assert time.monotonic() < deadline, first
        time.sleep(1)
    ops.wait_for_pass(lab)
    time.sleep(5)  # past the first probes of every target
    first = sample(lab)
    time.sleep(WINDOW)
    last = sample(lab)
    seconds = last["time"] - first["time"]
    rate = (last["sent"] - first["sent"]) / seconds
    cpu = (last["ticks"] - first["ticks"]) / last["hz"] / seconds
    vm = (last["busy"] - first["busy"]) / max(1, last["all"] - first["all"])
    conns = lab.director("ipvsadm -Ln --stats | awk '/^FWM/ {n += $3} END {print n}'").stdout
    _say(
        request,
        f"health cost lab: {SERVICES} services x {NODES} real servers, check vip every 1 s: "
        f"{rate:.0f} probes/s of {SERVICES * NODES} asked, runtime CPU {cpu:.0%} of the one "
        f"emulated CPU, VM busy {vm:.0%} (qemu TCG; the 50 creates took {created:.1f}s); "
        f"drained meanwhile: {len(last['drained'])}",
    )
    assert first["pid"] == last["pid"]
    assert int(conns.strip() or 0) > 0  # the probes went through the probe services
    assert rate > 0.2 * SERVICES * NODES, (rate, first, last)  # printed: the figure; under TCG
    assert last["drained"] == [], last["drained"][:5]
