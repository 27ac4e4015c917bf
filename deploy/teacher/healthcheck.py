"""Ask a teacher node's standard gRPC health service whether it serves, over mutual TLS.

    python healthcheck.py [--address HOST:PORT] [--ca CA.pem] [--cert CLIENT.pem]
                          [--key CLIENT.key] [--server-name NAME] [--service NAME]
                          [--timeout SECONDS]

The same check as ``grpc_health_probe -addr=HOST:PORT -tls -tls-ca-cert=CA.pem
-tls-client-cert=CLIENT.pem -tls-client-key=CLIENT.key``, with only grpcio and
grpcio-health-checking. Every option defaults to an environment variable (CDFKD_HEALTH_ADDRESS,
CDFKD_HEALTH_CA, CDFKD_HEALTH_CERT, CDFKD_HEALTH_KEY, CDFKD_HEALTH_SERVER_NAME,
CDFKD_HEALTH_SERVICE), so the container's HEALTHCHECK needs no arguments. The client
certificate must chain to the node's ``tls.client_ca``; it needs no entry in the node's policy
(the health service answers any trusted caller, and a caller not listed there gets no teacher
answers). Exit codes: 0 SERVING, 1 NOT_SERVING or unknown service, 2 unreachable or TLS
refused, 3 bad arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING, NOT_SERVING, UNREACHABLE, USAGE = 0, 1, 2, 3


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default=env("CDFKD_HEALTH_ADDRESS", "127.0.0.1:50051"))
    parser.add_argument("--ca", default=env("CDFKD_HEALTH_CA"), help="CA of the node's cert")
    parser.add_argument("--cert", default=env("CDFKD_HEALTH_CERT"), help="client certificate")
    parser.add_argument("--key", default=env("CDFKD_HEALTH_KEY"), help="client key")
    parser.add_argument(
        "--server-name",
        default=env("CDFKD_HEALTH_SERVER_NAME") or None,
        help="name to check in the node's certificate instead of the address's host",
    )
    parser.add_argument(
        "--service",
        default=env("CDFKD_HEALTH_SERVICE", ""),
        help="'' (the node) or cdfkd.teacher.v1.TeacherService",
    )
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds")
    parser.add_argument("--insecure", action="store_true", help="plaintext (insecure = true)")
    return parser.parse_args(argv)


def check(arguments: argparse.Namespace) -> int:
    """One Health/Check call; returns the exit code."""
    if arguments.insecure:
        channel = grpc.insecure_channel(arguments.address)
    else:
        missing = [name for name in ("ca", "cert", "key") if not getattr(arguments, name)]
        if missing:
            print(f"missing --{', --'.join(missing)} (or CDFKD_HEALTH_*)", file=sys.stderr)
            return USAGE
        credentials = grpc.ssl_channel_credentials(
            root_certificates=Path(arguments.ca).read_bytes(),
            private_key=Path(arguments.key).read_bytes(),
            certificate_chain=Path(arguments.cert).read_bytes(),
        )
        options = []
        if arguments.server_name:
            options.append(("grpc.ssl_target_name_override", arguments.server_name))
        channel = grpc.secure_channel(arguments.address, credentials, options=options)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(
                health_pb2.HealthCheckRequest(service=arguments.service),
                timeout=arguments.timeout,
            )
        except grpc.RpcError as error:
            if error.code() is grpc.StatusCode.NOT_FOUND:
                print(f"{arguments.address}: unknown service {arguments.service!r}")
                return NOT_SERVING
            print(f"{arguments.address}: {error.code().name}: {error.details()}", file=sys.stderr)
            return UNREACHABLE
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{arguments.address}: {status}")
    return SERVING if reply.status == health_pb2.HealthCheckResponse.SERVING else NOT_SERVING


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and check once."""
    try:
        arguments = _arguments(argv)
    except SystemExit as exit_:  # --help, or argparse's own usage error
        return USAGE if exit_.code else 0
    try:
        return check(arguments)
    except OSError as error:  # an unreadable TLS file
        print(f"cannot read a TLS file: {error}", file=sys.stderr)
        return USAGE


if __name__ == "__main__":
    sys.exit(main())
