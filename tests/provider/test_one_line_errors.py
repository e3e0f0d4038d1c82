"""Item 14: expected errors reach the engine as one line, scoped to the provider server process.

The SDK's provider server reports every exception as `traceback.format_exc()`. Only there, and
only for DirectorError and InvalidSpec, the message is the error's own line; any other error
keeps its traceback, and no other process (the Pulumi program) sees a changed `traceback`.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import grpc
import pytest
from pulumi.runtime.proto import provider_pb2

from tests.provider.grpc_client import REPO, URN, ProviderServer, to_struct
from tests.provider.test_grpc_pure import props

NO_KEY = (
    "ipvs-ingress:sshPrivateKey is not set, so director 203.0.113.2 cannot be reached: "
    "run 'pulumi config set --secret sshPrivateKey < ~/.ssh/id_ed25519'"
)


@pytest.fixture(scope="module")
def server():
    srv = ProviderServer()
    srv.configure({})
    srv.check(props())  # the provider is unpickled, so providers.virtual_service is imported
    yield srv
    srv.close()


def _details(call) -> str:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == grpc.StatusCode.UNKNOWN
    return err.value.details()


def test_director_errors_are_one_line_from_create_read_update_and_delete(server):
    inputs, _ = server.check(props())
    for call in (
        lambda: server.create(inputs, timeout=30),
        lambda: server.read("203.0.113.2:22/tcp/203.0.113.201:80", inputs, timeout=30),
        lambda: server.update("id", inputs, inputs, timeout=30),
        lambda: server.delete("203.0.113.2:22/tcp/203.0.113.201:80", inputs, timeout=30),
    ):
        assert _details(call) == NO_KEY


def test_invalid_specs_are_one_line_from_create_read_and_delete(server):
    # Stored state the current model refuses (e.g. hand-edited): the operation names the field.
    bad = {**props(), "vip": "203.0.113.300"}
    for call in (
        lambda: server.create(bad, timeout=30),
        lambda: server.read("id", bad, timeout=30),
        lambda: server.delete("id", bad, timeout=30),
    ):
        details = _details(call)
        assert details.startswith("vip: '203.0.113.300' is not an IP address")
        assert "\n" not in details and "Traceback" not in details


def test_an_unsplittable_100_kb_proxy_command_is_one_short_line_at_check_and_create(tmp_path):
    # Before: check passed it, and create echoed all 100,082 characters from the transport.
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")], check=True
    )
    proxy = "ssh '" + "x" * 100_000
    bad = props(director={**props()["director"], "proxyCommand": proxy})
    srv = ProviderServer()
    try:
        srv.configure({"ipvs-ingress:sshPrivateKey": (tmp_path / "k").read_text()})
        _, failures = srv.check(bad)
        assert [f for f, _ in failures] == ["director.proxyCommand"]
        assert len(failures[0][1]) <= 300
        details = _details(lambda: srv.create(bad, timeout=30))
        assert details.startswith("director.proxyCommand: \"ssh 'xxx") and "at most 1024" in details
        assert "\n" not in details and len(details) <= 300, len(details)
    finally:
        srv.close()


def test_unexpected_errors_keep_their_traceback(server):
    # No serialized provider in the request: a bug, not an operational failure.
    request = provider_pb2.CreateRequest(urn=URN, properties=to_struct(props()))
    details = _details(lambda: server.stub.Create(request, timeout=30))
    assert details.startswith("Traceback (most recent call last):")
    assert "KeyError: '__provider'" in details and details.count("\n") > 3


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_pulumi_program_process_keeps_the_real_traceback_module():
    proc = _python(
        """
        import importlib, traceback
        real = traceback.format_exc
        import providers.virtual_service as vs
        importlib.reload(vs)
        assert traceback.format_exc is real, traceback.format_exc
        try:
            raise vs.DirectorError("director 203.0.113.2:22 is unreachable")
        except vs.DirectorError:
            text = traceback.format_exc()
        assert text.startswith("Traceback (most recent call last):"), text
        print("ok")
        """
    )
    assert proc.stdout == "ok\n", proc.stderr


def test_in_the_provider_server_the_shim_is_idempotent_and_never_recurses():
    # This process poses as `python -m pulumi.dynamic`: its __main__ is that module by name.
    proc = _python(
        """
        import importlib, importlib.machinery, sys, traceback
        sys.modules["__main__"].__spec__ = importlib.machinery.ModuleSpec(
            "pulumi.dynamic.__main__", None
        )
        import providers.virtual_service as vs
        for _ in range(3):
            importlib.reload(vs)
        real = sys.modules["traceback"]
        assert real.format_exc.__module__ == "traceback"
        assert traceback is not real and traceback._real is real  # one shim, never stacked
        try:
            raise vs.DirectorError("director 203.0.113.2:22 is unreachable")
        except vs.DirectorError:
            assert traceback.format_exc() == "director 203.0.113.2:22 is unreachable"
        try:
            vs.model.parse_virtual_service({"vip": "x"})
        except vs.model.InvalidSpec:
            text = traceback.format_exc()
            assert text.startswith("director: None is not an object") and "\\n" not in text
        try:
            raise vs.DirectorError("director.proxyCommand " + "x" * 100_000 + " cannot start")
        except vs.DirectorError:
            text = traceback.format_exc()  # a long message is cut in the middle, to one line
            assert len(text) <= 300 and text.endswith(" cannot start"), len(text)
        try:
            {}["missing"]
        except KeyError:
            text = traceback.format_exc()
        assert text.startswith("Traceback (most recent call last):") and "KeyError" in text
        print("ok")
        """
    )
    assert proc.stdout == "ok\n", proc.stderr
