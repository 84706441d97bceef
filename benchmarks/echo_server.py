"""The baseline: a bare grpc.aio server echoing bytes (no validation, storage or encryption), on
the same transport as CSX: mutual TLS with the stack's development certificates."""

from __future__ import annotations

import asyncio
import sys

import grpc

from csx_common.pki import DevPki, PeerIdentity

METHOD = "/csx.bench.v1.EchoService/Echo"


async def serve(port: int, pki_dir: str) -> None:
    async def echo(request: bytes, _context: grpc.aio.ServicerContext) -> bytes:
        return request

    handler = grpc.method_handlers_generic_handler(
        "csx.bench.v1.EchoService",
        {"Echo": grpc.unary_unary_rpc_method_handler(echo)},  # identity (de)serializers: raw bytes
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    pki = DevPki(pki_dir)
    creds = pki.credentials(PeerIdentity("service", "referrals"))
    server.add_secure_port(
        f"127.0.0.1:{port}",
        grpc.ssl_server_credentials([(creds.key, creds.cert)], root_certificates=creds.ca, require_client_auth=True),
    )
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), sys.argv[2]))
