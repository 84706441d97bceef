"""Container health check for a CSX service: asks grpc.health.v1 and exits 0 only on SERVING.

    python /opt/csx/grpc_health_check.py [--service NAME] [--address HOST:PORT]
                                         [--ca FILE --cert FILE --key FILE] [--server-name NAME]

With no options it checks the service of its own container: the port comes from that service's
CSX_<SERVICE>_GRPC_ADDRESS and the mutual-TLS files from CSX_<SERVICE>_TLS_CA_FILE, _TLS_CERT_FILE
and _TLS_KEY_FILE (the service's own certificate is a valid client: every CSX service certificate
is issued for both server and client use). The TLS name checked is the first DNS name in that
certificate, so the check can dial 127.0.0.1. CSX_<SERVICE>_INSECURE_DEV=true means plaintext.

Prints the status (SERVING, NOT_SERVING, SERVICE_UNKNOWN, UNREACHABLE). Used by the docker-compose
health checks and the Helm chart's `helm test` pod, which check the mutual-TLS port itself (and so
the service's certificate too). The chart's probes are the kubelet's native gRPC probes of the
plaintext health-only port (CSX_<SERVICE>_HEALTH_ADDRESS) instead. The images have no
grpc_health_probe binary; this needs only grpcio and grpcio-health-checking, which they have.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_PORT = 50051
TIMEOUT_SECONDS = 3.0
TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class Target:
    address: str
    ca: str = ""
    cert: str = ""
    key: str = ""
    server_name: str = ""

    @property
    def secure(self) -> bool:
        return bool(self.ca and self.cert and self.key)


def service_prefix(env: Mapping[str, str]) -> str:
    """The CSX_<SERVICE>_ prefix of the one service whose settings this container has ("" if none)."""
    prefixes = {
        name.removesuffix("GRPC_ADDRESS") for name in env if name.startswith("CSX_") and name.endswith("_GRPC_ADDRESS")
    }
    return prefixes.pop() if len(prefixes) == 1 else ""


def first_dns_name(cert_pem: bytes) -> str:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ""
    names = san.get_values_for_type(x509.DNSName)
    return names[0] if names else ""


def target_from(args: argparse.Namespace, env: Mapping[str, str]) -> Target:
    prefix = service_prefix(env)
    address = args.address
    if not address:
        listen = env.get(f"{prefix}GRPC_ADDRESS", "") if prefix else ""
        port = listen.rpartition(":")[2] if listen else str(DEFAULT_PORT)
        address = f"127.0.0.1:{port}"
    insecure = prefix and env.get(f"{prefix}INSECURE_DEV", "").lower() in TRUE
    ca = args.ca or ("" if insecure or not prefix else env.get(f"{prefix}TLS_CA_FILE", ""))
    cert = args.cert or ("" if insecure or not prefix else env.get(f"{prefix}TLS_CERT_FILE", ""))
    key = args.key or ("" if insecure or not prefix else env.get(f"{prefix}TLS_KEY_FILE", ""))
    return Target(address, ca, cert, key, args.server_name)


def check(target: Target, service: str = "", timeout: float = TIMEOUT_SECONDS) -> str:
    """The serving status name, or UNREACHABLE / SERVICE_UNKNOWN when there is no status."""
    if target.secure:
        with open(target.ca, "rb") as f:
            ca = f.read()
        with open(target.cert, "rb") as f:
            cert = f.read()
        with open(target.key, "rb") as f:
            key = f.read()
        credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
        server_name = target.server_name or first_dns_name(cert)
        options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        channel = grpc.secure_channel(target.address, credentials, options=options)
    else:
        channel = grpc.insecure_channel(target.address)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            return "SERVICE_UNKNOWN" if code == grpc.StatusCode.NOT_FOUND else "UNREACHABLE"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def main(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="gRPC health check for a CSX service")
    parser.add_argument("--service", default="", help='health service name ("" = the whole server)')
    parser.add_argument("--address", default="", help="host:port (default: 127.0.0.1 and the service's port)")
    parser.add_argument("--ca", default="")
    parser.add_argument("--cert", default="")
    parser.add_argument("--key", default="")
    parser.add_argument(
        "--server-name", default="", help="TLS name to verify (default: the certificate's first DNS name)"
    )
    parser.add_argument("--timeout", type=float, default=TIMEOUT_SECONDS)
    args = parser.parse_args(argv)
    target = target_from(args, os.environ if env is None else env)
    status = check(target, args.service, args.timeout)
    print(status)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
