"""The operator's view of a node: Prometheus metrics and a plaintext health endpoint.

Metrics live in a registry per node (not prometheus-client's global one), so several nodes in
one process (tests) do not collide. ``/metrics`` is served on ``[metrics] address``;
``/healthz`` on ``[metrics] health_address`` (loopback only) answers ``SERVING`` (200) or
``NOT_SERVING`` (503) in plain text, for probes that speak neither gRPC nor TLS.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

#: Latency buckets in seconds: a small Query takes milliseconds, a large InputGrad seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _Budgets(Collector):
    """``cdfkd_budget_remaining_images{caller}``, read from the policy at scrape time."""

    def __init__(self, remaining: Callable[[], Iterable[tuple[str, int]]]) -> None:
        self._remaining = remaining

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "cdfkd_budget_remaining_images",
            "Images each listed caller may still have answered (callers with a budget only)",
            labels=["caller"],
        )
        for caller, remaining in self._remaining():
            family.add_metric([caller], remaining)
        yield family


class NodeMetrics:
    """The node's Prometheus metrics.

    Args:
        in_flight: Calls queued or running, read at scrape time.
        budgets: (caller, remaining images) for callers with a budget, read at scrape time.
    """

    def __init__(
        self,
        in_flight: Callable[[], float],
        budgets: Callable[[], Iterable[tuple[str, int]]],
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "cdfkd_requests",
            "Requests by caller, RPC and decision (allowed, denied, dropped, replayed)",
            ["caller", "rpc", "decision"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "cdfkd_request_latency_seconds",
            "Time from a call's arrival to its answer or refusal",
            ["rpc", "decision"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.images = Counter(
            "cdfkd_images_answered",
            "Images answered (computed and charged) by caller and RPC",
            ["caller", "rpc"],
            registry=self.registry,
        )
        self.audit_suppressed_total = Gauge(
            "cdfkd_audit_refusals_suppressed_total",
            "Refusals not written to the audit log because their peer was over its line rate",
            registry=self.registry,
        )
        self.audit_failures = Counter(
            "cdfkd_audit_write_failures",
            "Audit records that could not be written (the request was refused UNAVAILABLE)",
            registry=self.registry,
        )
        in_flight_gauge = Gauge(
            "cdfkd_calls_in_flight",
            "Calls queued for the engine or running",
            registry=self.registry,
        )
        in_flight_gauge.set_function(in_flight)
        self.registry.register(_Budgets(budgets))

    def observe(
        self, caller: str, rpc: str, decision: str, seconds: float, images: int = 0
    ) -> None:
        """Count one finished request."""
        self.requests.labels(caller, rpc, decision).inc()
        self.latency.labels(rpc, decision).observe(seconds)
        if images:
            self.images.labels(caller, rpc).inc(images)

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)


class HttpEndpoint:
    """A tiny HTTP server on its own thread with fixed plain routes.

    Args:
        address: ``HOST:PORT`` (port 0 picks one; :attr:`port` tells which).
        routes: path -> function returning (status, content type, body).
    """

    def __init__(
        self, address: str, routes: dict[str, Callable[[], tuple[int, str, bytes]]]
    ) -> None:
        host, _, port = address.rpartition(":")

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's method name
                route = routes.get(self.path.split("?", 1)[0])
                status, content_type, body = (
                    route() if route else (404, "text/plain", b"not found\n")
                )
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                logger.debug("%s %s", self.address_string(), format % args)

        bare = host.strip("[]")
        server_class = type(
            "EndpointServer",
            (ThreadingHTTPServer,),
            {"address_family": socket.AF_INET6 if ":" in bare else socket.AF_INET},
        )
        self._server = server_class((bare, int(port)), Handler)
        self._server.daemon_threads = True
        self.host = host
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, name=f"http-{self.port}", daemon=True
        )

    def start(self) -> None:
        """Serve in the background."""
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()


def metrics_route(metrics: NodeMetrics) -> Callable[[], tuple[int, str, bytes]]:
    """``/metrics``: the Prometheus exposition."""
    return lambda: (200, CONTENT_TYPE_LATEST, metrics.exposition())


def health_route(serving: Callable[[], bool]) -> Callable[[], tuple[int, str, bytes]]:
    """``/healthz``: ``SERVING`` (200) or ``NOT_SERVING`` (503), plain text."""

    def route() -> tuple[int, str, bytes]:
        if serving():
            return 200, "text/plain; charset=utf-8", b"SERVING\n"
        return 503, "text/plain; charset=utf-8", b"NOT_SERVING\n"

    return route
