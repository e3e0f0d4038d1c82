"""Drive the dynamic provider the way the Pulumi engine does: through the SDK's own gRPC server.

`python -m pulumi.dynamic` is what the engine runs for dynamic resources. Properties travel as
protobuf Structs, so numbers arrive as floats; config secrets arrive unwrapped.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
from google.protobuf import struct_pb2
from pulumi.dynamic.dynamic import serialize_provider
from pulumi.runtime.proto import provider_pb2, provider_pb2_grpc

from providers.virtual_service import VirtualServiceProvider

REPO = Path(__file__).resolve().parents[2]
URN = "urn:pulumi:test::ipvs-ingress::pulumi-python:dynamic/ipvs:VirtualService::vs"
PROVIDER_KEY = "__provider"


def to_struct(props: dict) -> struct_pb2.Struct:
    # Not json_format: a Struct carries inf and nan, which hostile tests send.
    struct = struct_pb2.Struct()
    struct.update(props)
    return struct


def from_struct(struct: struct_pb2.Struct) -> dict:
    return {k: _from_value(v) for k, v in struct.fields.items()}


def _from_value(value: struct_pb2.Value):
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return from_struct(value.struct_value)
    if kind == "list_value":
        return [_from_value(v) for v in value.list_value.values]
    return None if kind in (None, "null_value") else getattr(value, kind)


class ProviderServer:
    """One `python -m pulumi.dynamic` process, as the engine starts it (cwd = project root)."""

    def __init__(self, env: dict | None = None):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pulumi.dynamic"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
        )
        port = int(self.proc.stdout.readline())
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = provider_pb2_grpc.ResourceProviderStub(self.channel)
        # Serialized exactly as pulumi.dynamic.Resource does it in the program.
        self.serialized = serialize_provider(VirtualServiceProvider())

    def _with_provider(self, props: dict) -> struct_pb2.Struct:
        return to_struct({**props, PROVIDER_KEY: self.serialized})

    def configure(self, config: dict) -> provider_pb2.ConfigureResponse:
        return self.stub.Configure(
            provider_pb2.ConfigureRequest(args=to_struct(config), variables=config)
        )

    def check(self, news: dict, olds: dict | None = None) -> tuple[dict, list[tuple[str, str]]]:
        resp = self.stub.Check(
            provider_pb2.CheckRequest(
                urn=URN, olds=self._with_provider(olds or {}), news=self._with_provider(news)
            )
        )
        inputs = from_struct(resp.inputs)
        inputs.pop(PROVIDER_KEY, None)
        return inputs, [(f.property, f.reason) for f in resp.failures]

    def diff(self, id_: str, olds: dict, news: dict) -> provider_pb2.DiffResponse:
        return self.stub.Diff(
            provider_pb2.DiffRequest(
                id=id_, urn=URN, olds=self._with_provider(olds), news=self._with_provider(news)
            )
        )

    def create(self, props: dict, timeout: float = 300) -> tuple[str, dict]:
        resp = self.stub.Create(
            provider_pb2.CreateRequest(urn=URN, properties=self._with_provider(props)),
            timeout=timeout,
        )
        return resp.id, from_struct(resp.properties)

    def read(self, id_: str, props: dict, timeout: float = 300) -> tuple[str, dict]:
        resp = self.stub.Read(
            provider_pb2.ReadRequest(id=id_, urn=URN, properties=self._with_provider(props)),
            timeout=timeout,
        )
        return resp.id, from_struct(resp.properties)

    def update(self, id_: str, olds: dict, news: dict, timeout: float = 300) -> dict:
        resp = self.stub.Update(
            provider_pb2.UpdateRequest(
                id=id_, urn=URN, olds=self._with_provider(olds), news=self._with_provider(news)
            ),
            timeout=timeout,
        )
        return from_struct(resp.properties)

    def delete(self, id_: str, props: dict, timeout: float = 300) -> None:
        self.stub.Delete(
            provider_pb2.DeleteRequest(id=id_, urn=URN, properties=self._with_provider(props)),
            timeout=timeout,
        )

    def close(self) -> None:
        self.channel.close()
        self.proc.kill()
        self.proc.wait(timeout=10)
        for stream in (self.proc.stdout, self.proc.stderr):
            stream.close()
