"""The real-director lab: an IPVS kernel in a qemu VM reached over SSH, Kubernetes-node
stand-ins in network namespaces, and the article's experiment as tests.

provision.py  cached artifacts (kernel, vmlinux, initramfs, pyroute2, keys)
harness.py    `Lab`: topology, VM, ssh, captures, teardown; the `lab` fixture is in tests/conftest.py
drill.py      failover drills on two directors: paced load figures, long download, VIP holders,
              split brain (the directors' taps as isolated bridge ports)
__main__.py   `python -m tests.lab up [--init busybox] [--directors 2]|status|reboot|crash|start|node|down`
"""
