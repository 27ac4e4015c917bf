"""``cdfkd federation check``: can this run reach, trust and use every teacher?

For each teacher node: TCP reachability, the mutual-TLS handshake and the standard health
service, its metadata, and compatibility with the others (same label space and number of input
channels; architectures, input sizes and normalizations may differ, the run image space
bridges them), and that the node accepts images of the run's size. Local packages are checked
by loading their metadata.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cdfkd.coordinator.config import PackageTeacher, RunConfig
from cdfkd.protos import teacher_pb2, teacher_pb2_grpc
from cdfkd.student_node.teachers.local import privacy_info
from cdfkd.student_node.teachers.protocol import PrivacyInfo, describe_privacy
from cdfkd.student_node.teachers.remote import RemoteTeacherConfig, open_channel, privacy_of
from cdfkd.teacher_node.errors import PackageError
from cdfkd.teacher_node.package import read_metadata

logger = logging.getLogger(__name__)


@dataclass
class NodeReport:
    """What the check found about one teacher."""

    target: str
    name: str = "-"
    classes: int | None = None
    input_shape: tuple[int, ...] | None = None
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    feature_dim: int | None = None
    has_bn_prior: bool | None = None
    max_image_side: int | None = None
    allowed_outputs: tuple[str, ...] = ()
    mode: str = "-"
    remaining_budget: int | None = None
    health: str = "-"
    privacy: PrivacyInfo | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No problem found."""
        return not self.problems


def _tcp_reachable(address: str, timeout_s: float) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def _check_node(entry: RemoteTeacherConfig, timeout_s: float) -> NodeReport:
    report = NodeReport(target=entry.address)
    if not _tcp_reachable(entry.address, timeout_s):
        report.problems.append("unreachable: nothing accepts TCP connections at this address")
        return report
    try:
        channel = open_channel(entry)
    except OSError as error:
        report.problems.append(f"TLS files cannot be read: {error}")
        return report
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
            )
            report.health = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            metadata = teacher_pb2_grpc.TeacherServiceStub(channel).GetMetadata(
                teacher_pb2.GetMetadataRequest(), timeout=timeout_s
            )
        except grpc.RpcError as error:
            if error.code() is grpc.StatusCode.UNAVAILABLE:
                report.problems.append(
                    "TLS: the port answers but the handshake failed (is the node's certificate "
                    "signed by the configured ca, and does it trust this client's certificate?)"
                )
            else:
                report.problems.append(f"{error.code().name}: {error.details()}")
            return report
    if report.health != "SERVING":
        report.problems.append(f"health status {report.health}")
    report.name = metadata.name
    report.classes = metadata.num_classes
    report.input_shape = tuple(metadata.input_shape)
    report.normalization = (tuple(metadata.normalization_mean), tuple(metadata.normalization_std))
    report.feature_dim = metadata.feature_dim
    report.has_bn_prior = metadata.has_bn_prior
    report.max_image_side = metadata.max_image_side
    report.allowed_outputs = tuple(metadata.allowed_outputs)
    report.mode = metadata.mode or "-"
    report.remaining_budget = None if metadata.remaining_budget < 0 else metadata.remaining_budget
    report.privacy = privacy_of(metadata)
    if report.remaining_budget == 0:
        report.problems.append("this caller's budget on the node is used up")
    if "logits" not in report.allowed_outputs:
        report.problems.append("the node allows no logits")
    return report


def _check_package(entry: PackageTeacher) -> NodeReport:
    report = NodeReport(target=str(entry.package))
    try:
        metadata = read_metadata(entry.package)
    except PackageError as error:
        report.problems.append(str(error))
        return report
    report.name = metadata.name
    report.classes = metadata.num_classes
    report.input_shape = metadata.input_shape
    report.normalization = (metadata.normalization.mean, metadata.normalization.std)
    report.feature_dim = metadata.feature_dim
    report.has_bn_prior = metadata.has_statistics_prior
    report.allowed_outputs = ("logits", "features", "bn_loss", "input_grad")
    report.privacy = privacy_info(metadata.privacy)
    report.health = "LOCAL"
    report.mode = "full"
    return report


def check_federation(config: RunConfig, timeout_s: float = 5.0) -> list[NodeReport]:
    """Check every teacher of ``config``; compatibility is judged against the first good one."""
    reports = [
        _check_package(entry)
        if isinstance(entry, PackageTeacher)
        else _check_node(entry, timeout_s)
        for entry in config.teachers
    ]
    reference = next((r for r in reports if r.ok), None)
    if reference is None:
        return reports
    for report in reports:
        if not report.ok or report is reference:
            continue
        if report.classes != reference.classes:
            report.problems.append(
                f"incompatible label space: {report.classes} classes here, {reference.classes} "
                f"at {reference.target} ({reference.name})"
            )
        mine, theirs = _channels(report), _channels(reference)
        if mine != theirs:
            report.problems.append(
                f"incompatible input channels: {report.name} takes {mine}, {reference.name} "
                f"at {reference.target} takes {theirs}"
            )
    _check_run_image_size(config, [r for r in reports if r.ok])
    return reports


def _channels(report: NodeReport) -> int | None:
    return None if report.input_shape is None else int(report.input_shape[0])


def _check_run_image_size(config: RunConfig, reports: list[NodeReport]) -> None:
    """Every node must accept images of the run's size (configured, else the largest input)."""
    shapes = [r.input_shape for r in reports if r.input_shape is not None]
    if not shapes:
        return
    run_shape = config.train.image_shape or max(shapes, key=lambda s: int(s[1]) * int(s[2]))
    for report in reports:
        side = report.max_image_side
        if side is not None and side > 0 and max(int(run_shape[1]), int(run_shape[2])) > side:
            report.problems.append(
                f"the run's images are {run_shape[1]}x{run_shape[2]} but this node accepts at "
                f"most {side}x{side} (limits.max_image_side)"
            )


def format_table(reports: list[NodeReport]) -> str:
    """A plain-text table, one row per teacher."""
    header = (
        "teacher",
        "name",
        "health",
        "classes",
        "input",
        "features",
        "mode",
        "budget",
        "privacy",
        "status",
    )
    rows = [
        (
            r.target,
            r.name,
            r.health,
            "-" if r.classes is None else str(r.classes),
            "-" if r.input_shape is None else "x".join(map(str, r.input_shape)),
            "-" if r.feature_dim is None else str(r.feature_dim),
            r.mode,
            "unlimited" if r.remaining_budget is None else str(r.remaining_budget),
            describe_privacy(r.privacy),
            "ok" if r.ok else "FAIL: " + "; ".join(r.problems),
        )
        for r in reports
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    lines = []
    for row in [header, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)]
        lines.append("  ".join([*cells, row[-1]]))
    return "\n".join(lines)
