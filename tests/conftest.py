"""Shared pytest setup: the director lab session fixture (tests/lab) and its marker.

The lab is only built for tests that request the `lab` fixture; other suites never pay for it.
Provisioning and boot times are printed when the lab comes up and again in the summary.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

import pytest

_TIMINGS = pytest.StashKey[list[str]]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "lab: needs the qemu director lab (root, qemu)")
    config.stash[_TIMINGS] = []


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # `-m "not lab"` deselects everything that would build the lab.
    for item in items:
        if "lab" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.lab)


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    from tests import hostile

    line = hostile.summary()
    if line:
        terminalreporter.section("hostile suite")
        terminalreporter.write_line(line)
    if config.stash.get(_TIMINGS, None):
        terminalreporter.section("director lab")
        for line in config.stash[_TIMINGS]:
            terminalreporter.write_line(line)


def _skip(request: pytest.FixtureRequest, reason: str) -> None:
    # On CI the lab is the proof that the product works on a real kernel: never skip it there.
    if os.environ.get("CI"):
        pytest.fail(f"director lab cannot run on CI: {reason}")
    _say(request, f"SKIPPED: {reason}")
    pytest.skip(reason)


def _say(request: pytest.FixtureRequest, line: str) -> None:
    request.config.stash[_TIMINGS].append(line)
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled():
        print(f"\n[lab] {line}", flush=True)


@contextmanager
def own_lab(request: pytest.FixtureRequest, label: str, **options):
    """A lab of a module's own (one it reboots, or init="busybox" for a director without
    systemd), torn down when the block ends; skipped or failed like the shared one when it
    cannot start."""
    if os.geteuid() != 0:
        _skip(request, "director lab needs root (network namespaces, tap, iptables)")
    from tests.lab import harness, provision, vm

    art = provision.provision()
    reason = vm.can_start()
    if reason:
        _skip(request, reason)
    the_lab = harness.Lab(artifacts=art, **options).start()
    _say(request, f"{label}: qemu start to sshd {the_lab.director_boot_seconds:.1f}s")
    try:
        yield the_lab
    finally:
        the_lab.close()


@pytest.fixture(scope="session")
def lab(request: pytest.FixtureRequest):
    """A booted director lab shared by the session (see tests/lab/harness.py): systemd as PID 1,
    as the provider's runtime needs; tests that reboot it boot their own (`own_lab`)."""
    if os.geteuid() != 0:
        _skip(request, "director lab needs root (network namespaces, tap, iptables)")
    from tests.lab import provision, vm
    from tests.lab.harness import Lab

    art = provision.provision()  # installs apt packages on a fresh machine
    _say(
        request,
        f"provisioning: {art.elapsed:.1f}s (budget 120 s on a fresh machine; cache {art.cache})",
    )
    reason = vm.can_start()
    if reason:
        _skip(request, reason)
    started = time.monotonic()
    the_lab = Lab(artifacts=art).start()
    _say(
        request,
        f"boot (namespaces + director VM with {the_lab.init} + sshd): {the_lab.boot_seconds:.1f}s; "
        f"fixture up {art.elapsed + time.monotonic() - started:.1f}s after request "
        "(budget 45 s with a warm cache: systemd boots in ~22-25 s on a quiet machine)",
    )
    if the_lab.stale_cleaned:
        _say(request, f"cleaned stale labs of earlier runs: {the_lab.stale_cleaned}")
    try:
        yield the_lab
    finally:
        the_lab.close()
