"""The baseline: a bare grpc.aio server echoing bytes (no validation, storage or encryption)."""

from __future__ import annotations

import asyncio
import sys

import grpc

METHOD = "/csx.bench.v1.EchoService/Echo"


async def serve(port: int) -> None:
    async def echo(request: bytes, _context: grpc.aio.ServicerContext) -> bytes:
        return request

    handler = grpc.method_handlers_generic_handler(
        "csx.bench.v1.EchoService",
        {"Echo": grpc.unary_unary_rpc_method_handler(echo)},  # identity (de)serializers: raw bytes
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
