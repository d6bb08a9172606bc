"""The Open Inference Protocol over gRPC (handlers/grpc.py) on the running event loop: the port, TLS and
the bounds grpc enforces itself. The servicer's module is imported at start() only (see handlers/grpc.py:
its messages claim protobuf names that tritonclient.grpc also claims), so a process that never turns
gRPC on never imports it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc import aio

from server.config import Config
from service.use_cases import UseCases

if TYPE_CHECKING:
    from server.server import Server


class GrpcTransport:
    def __init__(self, config: Config, use_cases: UseCases, *, host: str, port: int):
        self.config, self.use_cases, self.host, self.port = config, use_cases, host, port
        self.server: aio.Server | None = None

    async def start(self) -> str:
        """Serve the protocol on host:port (over TLS when grpc.tls_cert_file and grpc.tls_key_file are set)
        with the use cases every transport shares (a session's pinned version is loaded on first use here
        too); `port` becomes the bound one. Raises OSError, in one sentence, for a port that cannot be
        bound or a certificate that cannot be read or used."""
        from handlers.grpc import InferenceService
        from handlers.oip_grpc import grpc_predict_v2_pb2_grpc as pb_grpc

        settings = self.config.grpc
        credentials = _tls_credentials(settings.tls_cert_file, settings.tls_key_file) if settings.tls_cert_file \
            else None
        # grpc enforces both bounds itself, before the handler (and so the token check) runs: past either
        # the client gets RESOURCE_EXHAUSTED. The send limit only has to fit our own responses.
        server = aio.server(
            options=[("grpc.max_receive_message_length", settings.max_message_bytes),
                     ("grpc.max_send_message_length", max(settings.max_message_bytes, 4 * 1024 * 1024))],
            maximum_concurrent_rpcs=settings.max_concurrent_calls,
        )
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(self.use_cases), server)
        host = self.host
        address = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
        try:
            bound = (server.add_secure_port(address, credentials) if credentials is not None
                     else server.add_insecure_port(address))
        except RuntimeError as exc:
            bound, failure = 0, f" ({exc})"
        else:
            failure = ""
        if not bound and credentials is not None:  # grpc does not say which: a rejected key pair, or the port
            raise OSError(f"Could not serve gRPC over TLS on {address}; grpc.tls_cert_file and grpc.tls_key_file "
                          "must be a PEM certificate chain and its unencrypted private key, and grpc.port a free "
                          "port.")
        if not bound:
            raise OSError(f"Could not bind gRPC to {address}{failure}; set grpc.port to a free port.")
        await server.start()
        self.server, self.port = server, bound
        return f"grpc={host}:{bound}"

    async def stop(self, grace: float) -> None:
        """No new calls; those in flight get `grace` seconds, as HTTP requests do."""
        if self.server is not None:
            await self.server.stop(grace)


def for_server(server: Server) -> GrpcTransport | None:
    """gRPC where grpc.port is set, created after any fork (a gRPC server does not survive fork; each
    process binds the port, SO_REUSEPORT)."""
    config = server.config
    if not config.grpc.port:
        return None
    return GrpcTransport(config, server.use_cases, host=config.server.host, port=config.grpc.port)


def _tls_credentials(cert_file: str, key_file: str) -> grpc.ServerCredentials:
    """Server credentials from PEM files, read now so that a missing or wrong file stops startup with its name."""
    pems = []
    for setting, name, kind, marker in (
        ("grpc.tls_cert_file", cert_file, "certificate", b"-----BEGIN CERTIFICATE-----"),
        ("grpc.tls_key_file", key_file, "private key", b"PRIVATE KEY-----"),
    ):
        try:
            pem = Path(name).expanduser().read_bytes()
        except OSError as exc:
            raise OSError(f"Could not read {setting} {name!r} ({exc.strerror or exc}).") from None
        if marker not in pem:
            raise OSError(f"{setting} {name!r} holds no PEM {kind}; give the PEM file of the {kind}.")
        pems.append(pem)
    certificate, key = pems
    return grpc.ssl_server_credentials([(key, certificate)])
