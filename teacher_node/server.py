"""The teacher node's gRPC server: build it, serve it, drain it on SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import os
import secrets
import signal
import sys
import threading
import time
from concurrent import futures
from pathlib import Path
from types import FrameType

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cdfkd.protos import teacher_pb2_grpc
from cdfkd.teacher_node.audit import AuditLog
from cdfkd.teacher_node.config import TeacherNodeConfig
from cdfkd.teacher_node.engine import TeacherEngine
from cdfkd.teacher_node.errors import TeacherConfigError
from cdfkd.teacher_node.package import TeacherMetadata, load_package
from cdfkd.teacher_node.policy import Clock, Policy
from cdfkd.teacher_node.security import server_credentials
from cdfkd.teacher_node.service import TeacherServicer

logger = logging.getLogger(__name__)

SERVICE_NAME = "cdfkd.teacher.v1.TeacherService"


def grpc_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Message size limits, set alike on servers and channels."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


def build_policy(
    config: TeacherNodeConfig, clock: Clock = time.time, monotonic: Clock = time.monotonic
) -> Policy:
    """The node's policy; output noise is unpredictable unless ``policy.noise_seed`` is set."""
    seed = config.policy.noise_seed
    generator = torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed)
    return Policy(config.policy, clock, generator, monotonic)


def build_server(
    config: TeacherNodeConfig,
    engine: TeacherEngine | None = None,
    metadata: TeacherMetadata | None = None,
    clock: Clock = time.time,
    monotonic: Clock = time.monotonic,
) -> tuple[grpc.Server, int, health.HealthServicer]:
    """A ready (not started) server for ``config``; the package is loaded unless given.

    ``clock`` (wall time) dates the daily budgets and the audit, ``monotonic`` drives the rates.

    Returns:
        The server, the bound port (the real one when the config says port 0) and its health
        servicer.

    Raises:
        TeacherConfigError: the address cannot be bound or TLS files cannot be read.
    """
    if engine is None or metadata is None:
        metadata, model = load_package(config.node.package)
        engine = TeacherEngine(model, metadata.spec.input_shape)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.node.workers, thread_name_prefix="teacher"),
        options=grpc_options(config.limits.max_message_bytes),
    )
    audit = None
    if config.audit.path is not None:
        audit = AuditLog(config.audit.path, config.audit.max_bytes, config.audit.backups, clock)
    policy = build_policy(config, clock, monotonic)
    servicer = TeacherServicer(engine, metadata, config, policy, audit)
    teacher_pb2_grpc.add_TeacherServiceServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    credentials = server_credentials(config.tls)
    try:
        if credentials is None:
            port = server.add_insecure_port(config.node.address)
        else:
            port = server.add_secure_port(config.node.address, credentials)
    except RuntimeError as error:
        raise TeacherConfigError(f"cannot listen on {config.node.address}: {error}") from error
    if port == 0:
        raise TeacherConfigError(f"cannot listen on {config.node.address}: address in use?")
    for service in ("", SERVICE_NAME):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    return server, port, health_servicer


def serve(config: TeacherNodeConfig, ready: threading.Event | None = None) -> int:
    """Serve until SIGTERM/SIGINT, then drain in-flight calls; returns the exit code (0).

    Prints one line ``listening on HOST:PORT`` to stdout once the port is bound, and writes the
    same address to ``node.address_file`` if configured.
    """
    if config.node.threads is not None:
        torch.set_num_threads(config.node.threads)
    server, port, health_servicer = build_server(config)
    host = config.node.address.rpartition(":")[0]
    address = f"{host}:{port}"
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        logger.info("signal %d: draining for up to %.0f s", signum, config.node.drain_seconds)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    server.start()
    if config.node.address_file is not None:
        _write_atomic(config.node.address_file, address + "\n")
    print(f"listening on {address}", flush=True)
    sys.stdout.flush()
    logger.info("teacher node serving %s on %s", config.node.package, address)
    if ready is not None:
        ready.set()
    try:
        stop.wait()
    finally:
        health_servicer.enter_graceful_shutdown()
        server.stop(grace=config.node.drain_seconds).wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    logger.info("teacher node stopped")
    return 0


def _write_atomic(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
