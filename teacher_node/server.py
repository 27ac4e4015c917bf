"""The teacher node's gRPC server: build it, serve it, drain it on SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import math
import os
import secrets
import signal
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cdfkd.protos import teacher_pb2_grpc
from cdfkd.protos.codec import WIRE_DTYPES
from cdfkd.teacher_node.admission import Admission, FairQueue
from cdfkd.teacher_node.audit import AuditLog
from cdfkd.teacher_node.config import MetricsSettings, TeacherNodeConfig
from cdfkd.teacher_node.engine import MAX_IMAGE_SIDE, EngineInfo, TeacherEngine
from cdfkd.teacher_node.errors import TeacherConfigError
from cdfkd.teacher_node.package import TeacherMetadata, load_package
from cdfkd.teacher_node.policy import Clock, Policy
from cdfkd.teacher_node.security import server_credentials
from cdfkd.teacher_node.service import TeacherServicer
from cdfkd.teacher_node.telemetry import HttpEndpoint, NodeMetrics, health_route, metrics_route

logger = logging.getLogger(__name__)

SERVICE_NAME = "cdfkd.teacher.v1.TeacherService"
#: Threads beyond ``node.workers`` so that refusals, metadata and health checks never wait
#: behind calls queued for the engine.
SPARE_THREADS = 4
#: gRPC's own bound on RPCs in its queue (refused without a retry hint: a last line of defence
#: against connection floods, far above what admission lets in).
MAX_CONCURRENT_RPCS = 256
#: Room for message framing, the other fields of a request and metadata.
MESSAGE_OVERHEAD_BYTES = 64 * 1024


def grpc_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Message size limits, set alike on servers and channels."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


def largest_accepted_image_shape(config: TeacherNodeConfig, info: EngineInfo) -> tuple[int, ...]:
    """The largest ``(C, H, W)`` a request may carry: ``max_image_side`` square, C as the teacher's.

    Query images of the run's size are resized on the node; the engine refuses larger ones.
    """
    channels, height, width = info.input_shape
    side = max(info.max_image_side, height, width)
    return (channels, side, side)


def message_bytes_for(config: TeacherNodeConfig, info: EngineInfo) -> int:
    """The message size limit: ``limits.max_message_bytes``, or what the largest batch needs.

    The largest messages are an InputGrad request (``max_batch`` images and their logit
    cotangents) and its reply (their gradients), and a Query reply (logits and features), all
    in the widest wire dtype the node accepts.
    """
    if config.limits.max_message_bytes is not None:
        return config.limits.max_message_bytes
    itemsize = max(WIRE_DTYPES[name].itemsize for name in config.choices.wire_dtypes)
    batch = config.limits.max_batch
    image = math.prod(largest_accepted_image_shape(config, info))
    elements = batch * max(image + info.num_classes, info.num_classes + info.feature_dim)
    return min(2**31 - 1, elements * itemsize + MESSAGE_OVERHEAD_BYTES)


def build_policy(
    config: TeacherNodeConfig, clock: Clock = time.time, monotonic: Clock = time.monotonic
) -> Policy:
    """The node's policy; output noise is unpredictable unless ``policy.noise_seed`` is set."""
    seed = config.policy.noise_seed
    generator = torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed)
    return Policy(config.policy, clock, generator, monotonic)


def engine_for_package(
    metadata: TeacherMetadata, model: torch.nn.Module, max_image_side: int | None
) -> TeacherEngine:
    """The engine over a loaded package (its own input shape and normalization).

    Args:
        metadata: The package's metadata.
        model: Its model.
        max_image_side: ``limits.max_image_side``; None: twice the teacher's larger side, which
            admits the run image shape of federations whose inputs differ by up to 2x and
            keeps the largest message (see :func:`message_bytes_for`) near what the teacher's
            own batches need.

    Raises:
        TeacherConfigError: the package's input is larger than ``max_image_side``.
    """
    if max_image_side is None:
        max_image_side = min(MAX_IMAGE_SIDE, 2 * max(metadata.input_shape[1:]))
    if max(metadata.input_shape[1:]) > max_image_side:
        raise TeacherConfigError(
            f"limits.max_image_side {max_image_side} is smaller than the teacher's input "
            f"{metadata.input_shape}: raise it"
        )
    return TeacherEngine(
        model,
        metadata.input_shape,
        metadata.normalization,
        max_image_side=max_image_side,
        statistics=metadata.released_statistics,
    )


@dataclass
class Node:
    """A built teacher node: its gRPC server and, when configured, metrics and health endpoints.

    Attributes:
        server: The gRPC server (not started by :func:`build_node`).
        port: The bound gRPC port.
        health: The gRPC health servicer.
        servicer: The teacher servicer.
        metrics: The node's Prometheus metrics (kept even with no endpoint).
        endpoints: ``{"metrics": ..., "health": ...}``, those configured.
    """

    server: grpc.Server
    port: int
    health: health.HealthServicer
    servicer: TeacherServicer
    metrics: NodeMetrics
    endpoints: dict[str, HttpEndpoint]
    audit: AuditLog | None = None
    serving: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        """Start serving gRPC and the HTTP endpoints."""
        self.server.start()
        for endpoint in self.endpoints.values():
            endpoint.start()
        self.serving.set()

    def stop(self, grace: float | None) -> None:
        """Report NOT_SERVING, drain calls for up to ``grace`` seconds, close the endpoints."""
        self.serving.clear()
        self.health.enter_graceful_shutdown()
        self.server.stop(grace=grace).wait()
        for endpoint in self.endpoints.values():
            endpoint.stop()

    def healthy(self) -> bool:
        """Serving, and the audit log (if any) accepts records."""
        return self.serving.is_set() and (self.audit is None or self.audit.healthy)


def build_node(
    config: TeacherNodeConfig,
    engine: TeacherEngine | None = None,
    metadata: TeacherMetadata | None = None,
    clock: Clock = time.time,
    monotonic: Clock = time.monotonic,
) -> Node:
    """A ready (not started) node for ``config``; the package is loaded unless given.

    Raises:
        TeacherConfigError: an address cannot be bound or TLS files cannot be read.
    """
    if engine is None or metadata is None:
        metadata, model = load_package(config.node.package)
        engine = engine_for_package(metadata, model, config.limits.max_image_side)
    max_message_bytes = message_bytes_for(config, engine.info)
    server = grpc.server(
        futures.ThreadPoolExecutor(
            max_workers=config.node.workers + SPARE_THREADS, thread_name_prefix="teacher"
        ),
        options=grpc_options(max_message_bytes),
        maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,
    )
    audit = None
    if config.audit.path is not None:
        audit = AuditLog(
            config.audit.path,
            config.audit.max_bytes,
            config.audit.backups,
            clock,
            refusals_per_minute=config.audit.refusals_per_minute,
        )
    policy = build_policy(config, clock, monotonic)
    admission = Admission(
        FairQueue(config.node.workers, config.limits.max_in_flight_per_caller, 1, monotonic)
    )

    def budgets() -> list[tuple[str, int]]:
        remaining = ((n, policy.remaining(n, r)) for n, r in config.policy.callers.items())
        return [(name, left) for name, left in remaining if left is not None]

    metrics = NodeMetrics(lambda: admission.in_flight, budgets)
    servicer = TeacherServicer(
        engine,
        metadata,
        config,
        policy,
        audit,
        admission=admission,
        metrics=metrics,
        monotonic=monotonic,
        max_message_bytes=max_message_bytes,
    )
    if audit is not None:
        audit_suppressed = audit

        def count_suppressed() -> float:
            return float(audit_suppressed.suppressed)

        metrics.audit_suppressed_total.set_function(count_suppressed)
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
    node = Node(server, port, health_servicer, servicer, metrics, {}, audit)
    try:
        if config.metrics.address is not None:
            node.endpoints["metrics"] = HttpEndpoint(
                config.metrics.address, {"/metrics": metrics_route(metrics)}
            )
        if config.metrics.health_address is not None:
            node.endpoints["health"] = HttpEndpoint(
                config.metrics.health_address, {"/healthz": health_route(node.healthy)}
            )
    except OSError as error:
        for endpoint in node.endpoints.values():
            endpoint.stop()
        raise TeacherConfigError(f"cannot listen for metrics or health: {error}") from error
    return node


def build_server(
    config: TeacherNodeConfig,
    engine: TeacherEngine | None = None,
    metadata: TeacherMetadata | None = None,
    clock: Clock = time.time,
    monotonic: Clock = time.monotonic,
) -> tuple[grpc.Server, int, health.HealthServicer]:
    """A ready (not started) gRPC server for ``config``, without the HTTP endpoints.

    ``clock`` (wall time) dates the daily budgets and the audit, ``monotonic`` drives the rates
    and the admission queue.

    Returns:
        The server, the bound port (the real one when the config says port 0) and its health
        servicer.

    Raises:
        TeacherConfigError: the address cannot be bound or TLS files cannot be read.
    """
    node = build_node(_without_endpoints(config), engine, metadata, clock, monotonic)
    return node.server, node.port, node.health


def _without_endpoints(config: TeacherNodeConfig) -> TeacherNodeConfig:
    """``config`` without metrics or health endpoints (for :func:`build_server`)."""
    return config.model_copy(update={"metrics": MetricsSettings()})


def serve(config: TeacherNodeConfig, ready: threading.Event | None = None) -> int:
    """Serve until SIGTERM/SIGINT, then drain in-flight calls; returns the exit code (0).

    Prints one line ``listening on HOST:PORT`` to stdout once the port is bound, and writes the
    same address to ``node.address_file`` if configured.
    """
    if config.node.threads is not None:
        torch.set_num_threads(config.node.threads)
    node = build_node(config)
    host = config.node.address.rpartition(":")[0]
    address = f"{host}:{node.port}"
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        logger.info("signal %d: draining for up to %.0f s", signum, config.node.drain_seconds)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    node.start()
    if config.node.address_file is not None:
        _write_atomic(config.node.address_file, address + "\n")
    print(f"listening on {address}", flush=True)
    sys.stdout.flush()
    logger.info("teacher node serving %s on %s", config.node.package, address)
    for name, endpoint in node.endpoints.items():
        logger.info("%s endpoint on %s:%d", name, endpoint.host, endpoint.port)
    if ready is not None:
        ready.set()
    try:
        stop.wait()
    finally:
        node.stop(grace=config.node.drain_seconds)
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
