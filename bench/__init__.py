"""The director benchmark of issue 4: ipvs-ingress against per-rule ipvsadm and one batch.

`python -m bench` (see bench/README.md); `bench.run.run(lab, S, R)` runs it on a started Lab.
"""
