"""RemoteTeacher: the Teacher protocol over gRPC to a teacher node.

Every call has a deadline; calls are idempotent (a request id makes a retry of an answered
call get the stored answer), so UNAVAILABLE and DEADLINE_EXCEEDED are retried with exponential
backoff; every other status maps to a typed error whose message says what to do.

The generator step sends its batch once (``send_batch_once``): its Query asks the node to keep
the images, and the InputGrad of the very same wire bytes carries the node's batch handle
instead of them. Where the node answers no handle (an older node, a logits-only caller, a node
that keeps nothing) or no longer holds the batch (NOT_FOUND: expired, evicted, a restarted or
another replica), the InputGrad is sent again with the images, so a run never fails for it;
the answer is the same either way. gRPC channels do not pickle: pass a
:class:`RemoteTeacherConfig` (addresses and file paths) and build the teacher where it is used.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import grpc
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from cdfkd.protos import teacher_pb2, teacher_pb2_grpc
from cdfkd.protos.codec import WIRE_DTYPES, InvalidTensor, TensorLimits, decode, encode
from cdfkd.protos.contract import BUDGET_EXHAUSTED_KEY, REQUEST_ID_KEY, RETRY_AFTER_KEY
from cdfkd.student_node.errors import (
    RemoteTeacherError,
    TeacherBudgetExhausted,
    TeacherFailed,
    TeacherRefused,
    TeacherRejectedRequest,
    TeacherUnavailable,
)
from cdfkd.student_node.teachers.protocol import PrivacyInfo, TeacherInfo, TeacherOutputs
from cdfkd.student_node.teachers.zeroth_order import zeroth_order_input_grad

logger = logging.getLogger(__name__)

Reply = TypeVar("Reply")

_RETRIED = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
_GRPC_PREFIX = 5  # compressed flag + 4-byte length before every gRPC message
#: Statuses of an InputGrad by batch handle after which the images are sent instead: the node
#: does not hold the batch (NOT_FOUND, FAILED_PRECONDITION), does not know the field
#: (INVALID_ARGUMENT: an older node sees no images), or the method (UNIMPLEMENTED).
_HANDLE_FALLBACK = frozenset(
    {"NOT_FOUND", "FAILED_PRECONDITION", "INVALID_ARGUMENT", "UNIMPLEMENTED"}
)
#: Handles the client remembers per teacher (the generator step needs one at a time).
_MAX_KEPT = 4
#: Consecutive handle misses after which a teacher is no longer asked to keep batches.
_MAX_HANDLE_MISSES = 3


def privacy_of(metadata: teacher_pb2.GetMetadataResponse) -> PrivacyInfo | None:
    """The guarantee GetMetadata states; None when the field is absent."""
    if not metadata.HasField("privacy"):
        return None
    privacy = metadata.privacy
    return PrivacyInfo(
        mechanism=privacy.mechanism,
        epsilon=privacy.epsilon,
        delta=privacy.delta,
        accountant=privacy.accountant,
        max_grad_norm=privacy.max_grad_norm,
        noise_multiplier=privacy.noise_multiplier,
        statistics_noise_multiplier=privacy.statistics_noise_multiplier,
    )


class RemoteTeacherConfig(BaseModel):
    """How to reach one teacher node (picklable: plain values and paths only)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    address: str = Field(min_length=3, description="host:port of the teacher node")
    ca: Path | None = Field(default=None, description="CA that signed the node's certificate")
    cert: Path | None = Field(default=None, description="this student's client certificate")
    key: Path | None = Field(default=None, description="this student's client key")
    server_name: str | None = Field(default=None, description="name to check instead of host")
    insecure: bool = False
    deadline_s: float = Field(default=60.0, gt=0.0, le=3600.0)
    retries: int | None = Field(
        default=None, ge=0, le=100_000, description="None: retry until outage_timeout_s"
    )
    outage_timeout_s: float = Field(default=300.0, gt=0.0, le=86_400.0)
    backoff_s: float = Field(default=0.2, ge=0.0, le=60.0)
    max_backoff_s: float = Field(default=5.0, ge=0.0, le=600.0)
    wire_dtype: str = "float32"
    zeroth_order_directions: int = Field(
        default=8, ge=1, le=1024, description="directions of the estimate for logits-only nodes"
    )
    zeroth_order_step: float = Field(default=0.01, gt=0.0, le=10.0)
    seed: int = Field(default=0, description="seed of the zeroth-order directions")
    max_message_bytes: int = Field(default=64 * 1024 * 1024, ge=1024, le=2**31 - 1)
    send_batch_once: bool = Field(
        default=True,
        description="the generator step's InputGrad names its Query's kept batch instead of "
        "sending the images again (falls back to the images where the node does not keep it)",
    )

    @model_validator(mode="after")
    def _check(self) -> RemoteTeacherConfig:
        if self.wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"wire_dtype must be one of {sorted(WIRE_DTYPES)}")
        missing = [k for k in ("ca", "cert", "key") if getattr(self, k) is None]
        if not self.insecure and missing:
            raise ValueError(
                f"mutual TLS needs ca, cert and key (missing {missing}); or insecure = true"
            )
        return self


def open_channel(config: RemoteTeacherConfig) -> grpc.Channel:
    """A channel with the configured TLS and message-size limits."""
    options: list[tuple[str, object]] = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        # Reconnect soon after a node comes back (gRPC's default backoff grows to 120 s).
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", int(max(1.0, config.max_backoff_s) * 1000)),
    ]
    if config.insecure:
        return grpc.insecure_channel(config.address, options=options)
    if config.server_name:
        options.append(("grpc.ssl_target_name_override", config.server_name))
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(config.ca).read_bytes(),  # type: ignore[arg-type]
        private_key=Path(config.key).read_bytes(),  # type: ignore[arg-type]
        certificate_chain=Path(config.cert).read_bytes(),  # type: ignore[arg-type]
    )
    return grpc.secure_channel(config.address, credentials, options=options)


def _error_for(error: grpc.RpcError, address: str, method: str) -> RemoteTeacherError:
    code = error.code()
    details = error.details() or ""
    where = f"teacher node {address} ({method})"
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return TeacherRefused(
            f"{where} refused this caller: {details}. Check the client certificate and ask the "
            "node's owner to allow this identity",
            address,
            code.name,
        )
    budget = _budget_refusal(error) if code is grpc.StatusCode.RESOURCE_EXHAUSTED else None
    if budget is not None:
        return TeacherBudgetExhausted(
            f"{where} refused the request: {details}",
            address,
            code.name,
            str(budget.get("budget", "")),
            int(budget.get("limit", 0)),
            int(budget.get("used", 0)),
            int(budget.get("requested", 0)),
        )
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return TeacherRefused(
            f"{where} refused the request as too large or over budget: {details}",
            address,
            code.name,
        )
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        return TeacherRejectedRequest(
            f"{where} rejected the request: {details}. The student and the node may disagree "
            "on shapes or versions",
            address,
            code.name,
        )
    if code in _RETRIED:
        return TeacherUnavailable(
            f"{where} did not answer ({code.name}: {details}). Check that the node runs, that "
            "the address is reachable, and that its certificate is trusted (a TLS failure looks "
            "like this too)",
            address,
            code.name,
        )
    return TeacherFailed(
        f"{where} failed ({code.name}: {details}); the node's operator has the details",
        address,
        code.name,
    )


class RemoteTeacher:
    """A teacher on a teacher node, reached over gRPC.

    Args:
        config: Address, TLS files, deadline, retries and wire dtype.
        channel: An existing channel (tests); by default one is opened from ``config``.
        sleep: Injected for tests of the backoff.
        clock: Monotonic seconds, injected with ``sleep`` so tests of the outage timeout run
            on a fake clock.
    """

    def __init__(
        self,
        config: RemoteTeacherConfig,
        channel: grpc.Channel | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._channel = channel or open_channel(config)
        self._stub = teacher_pb2_grpc.TeacherServiceStub(self._channel)
        self._sleep = sleep
        self._clock = clock
        self.calls = 0
        #: Failed calls that were retried: the outages (and rate limits) this run lived through.
        self.retries = 0
        #: Serialized protobuf bytes sent and received, each message with gRPC's 5-byte prefix
        #: (HTTP/2 framing and TLS records come on top; bench/remote.py measures them).
        self.bytes_sent = 0
        self.bytes_received = 0
        #: Images in the answers received (Query and InputGrad; a zeroth-order estimate's
        #: probes are queries): what the node charged this caller for them.
        self.images_answered = 0
        #: InputGrads that named a kept batch, and those the node no longer held (sent again).
        self.handle_hits = 0
        self.handle_misses = 0
        self._kept: list[tuple[teacher_pb2.Tensor, bytes]] = []
        self._kept_lock = threading.Lock()
        self._consecutive_misses = 0
        metadata = self._call(
            "GetMetadata", self._stub.GetMetadata, teacher_pb2.GetMetadataRequest()
        )
        self.metadata = metadata
        self._info = TeacherInfo(
            name=metadata.name,
            input_shape=tuple(metadata.input_shape),  # type: ignore[arg-type]
            num_classes=metadata.num_classes,
            feature_dim=metadata.feature_dim,
            normalization_mean=tuple(metadata.normalization_mean),
            normalization_std=tuple(metadata.normalization_std),
            # A teacher without BatchNorm has no R(x) to give, whatever the caller may ask.
            allowed_outputs=frozenset(metadata.allowed_outputs)
            - (frozenset() if metadata.has_bn_prior else frozenset({"bn_loss"})),
            privacy=privacy_of(metadata),
        )
        self._directions = torch.Generator().manual_seed(config.seed)
        batch = max(1, metadata.max_batch)
        side = max(metadata.max_image_side, *self._info.input_shape[1:])
        self._limits = TensorLimits(
            max_rank=4,
            max_elements=batch
            * max(metadata.num_classes, metadata.feature_dim, self._info.input_shape[0] * side**2),
        )

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> RemoteTeacher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def info(self) -> TeacherInfo:
        """Shapes and normalization, from the node's metadata."""
        return self._info

    def query(
        self,
        images: Tensor,
        *,
        features: bool = True,
        bn_loss: bool = True,
        keep_for_grad: bool = False,
    ) -> TeacherOutputs:
        """Logits (and features, R(x) when asked), computed on the node.

        With ``keep_for_grad`` (and ``send_batch_once``) the node is asked to keep the images
        for the ``input_grad`` that follows.
        """
        keep = keep_for_grad and self._keeps_batches()
        request = teacher_pb2.QueryRequest(
            images=encode(images, self.config.wire_dtype),
            want_features=features,
            want_bn_loss=bn_loss,
            response_dtype=self.config.wire_dtype,
            keep_for_grad=keep,
        )
        reply = self._call("Query", self._stub.Query, request)
        if keep and reply.batch_handle:
            with self._kept_lock:
                self._kept = [*self._kept[1 - _MAX_KEPT :], (request.images, reply.batch_handle)]
        batch = images.shape[0]
        self.images_answered += batch
        device = images.device
        logits = self._decode(reply.logits, "logits", (batch, self._info.num_classes))
        returned = None
        if features:
            shape = (batch, self._info.feature_dim)
            returned = self._decode(reply.features, "features", shape).to(device)
        prior = torch.tensor(reply.bn_loss, dtype=torch.float32, device=device) if bn_loss else None
        return TeacherOutputs(logits.to(device), returned, prior)

    def input_grad(self, images: Tensor, grad_logits: Tensor, bn_weight: float) -> Tensor:
        """d/dx [<grad_logits, t(x)> + bn_weight * R(x)], computed on the node.

        A node that gives this caller no input gradients (mode ``logits_only``) gets a
        zeroth-order estimate of d/dx <grad_logits, t(x)> from logits queries instead; its
        BatchNorm-prior term is then not available.
        """
        if "input_grad" not in self._info.allowed_outputs:
            return zeroth_order_input_grad(
                lambda x: self.query(x, features=False, bn_loss=False).logits,
                images,
                grad_logits,
                self.config.zeroth_order_directions,
                self.config.zeroth_order_step,
                self._directions,
                self.metadata.max_batch,
            )
        sent = encode(images, self.config.wire_dtype)
        request = teacher_pb2.InputGradRequest(
            grad_logits=encode(grad_logits, self.config.wire_dtype),
            bn_weight=float(bn_weight),
            response_dtype=self.config.wire_dtype,
        )
        handle = self._take_handle(sent)
        reply = None
        if handle is not None:
            request.batch_handle = handle
            try:
                reply = self._call("InputGrad", self._stub.InputGrad, request)
                self.handle_hits += 1
                self._consecutive_misses = 0
            except RemoteTeacherError as error:
                if error.code not in _HANDLE_FALLBACK:
                    raise
                self._missed(error)
                request.ClearField("batch_handle")
        if reply is None:
            request.images.CopyFrom(sent)
            reply = self._call("InputGrad", self._stub.InputGrad, request)
        self.images_answered += images.shape[0]
        gradient = self._decode(reply.grad_images, "grad_images", tuple(images.shape))
        return gradient.to(images.device)

    def _keeps_batches(self) -> bool:
        """Whether to ask the node to keep a generator batch."""
        return (
            self.config.send_batch_once
            and "input_grad" in self._info.allowed_outputs
            and self._consecutive_misses < _MAX_HANDLE_MISSES
        )

    def _take_handle(self, sent: teacher_pb2.Tensor) -> bytes | None:
        """The handle of a kept batch of exactly these wire bytes (forgotten here once taken)."""
        with self._kept_lock:
            for index, (kept, handle) in enumerate(self._kept):
                if kept.dtype == sent.dtype and kept.shape == sent.shape and kept.data == sent.data:
                    del self._kept[index]
                    return handle
        return None

    def _missed(self, error: RemoteTeacherError) -> None:
        self.handle_misses += 1
        self._consecutive_misses += 1
        logger.info(
            "teacher node %s does not hold the kept batch (%s): sending the images",
            self.config.address,
            error.code,
        )
        if self._consecutive_misses == _MAX_HANDLE_MISSES:
            logger.warning(
                "teacher node %s missed %d kept batches in a row: sending generator batches "
                "twice from now on",
                self.config.address,
                _MAX_HANDLE_MISSES,
            )

    def _decode(self, message: teacher_pb2.Tensor, name: str, shape: tuple[int, ...]) -> Tensor:
        try:
            return decode(message, name=name, expected_shape=shape, limits=self._limits)
        except InvalidTensor as error:
            raise TeacherFailed(
                f"teacher node {self.config.address} sent a malformed {name}: {error}",
                self.config.address,
                "MALFORMED_RESPONSE",
            ) from error

    def _call(self, method: str, function: Callable[..., Reply], request: object) -> Reply:
        """One RPC with a deadline; idempotent failures are retried.

        An unavailable node is retried with exponential backoff; a rate-limited request waits
        for the node's retry hint. Retries stop after ``retries`` attempts (if set) or once the
        node has been failing for ``outage_timeout_s``; then the error names the node. Every
        attempt carries the same request id, so the node answers a retry of a request it has
        already answered from its stored reply and charges the budget once.
        """
        metadata = ((REQUEST_ID_KEY, uuid.uuid4().hex),)
        delay = self.config.backoff_s
        first_failure: float | None = None
        attempt = 0
        while True:
            self.calls += 1
            self.bytes_sent += request.ByteSize() + _GRPC_PREFIX  # type: ignore[attr-defined]
            try:
                reply = function(request, timeout=self.config.deadline_s, metadata=metadata)
            except grpc.RpcError as error:
                now = self._clock()
                first_failure = now if first_failure is None else first_failure
                attempt += 1
                hint = _retry_hint(error)
                wait = hint if hint is not None else delay
                exhausted = (
                    self.config.retries is not None and attempt > self.config.retries
                ) or now - first_failure + wait > self.config.outage_timeout_s
                if (error.code() not in _RETRIED and hint is None) or exhausted:
                    raise _error_for(error, self.config.address, method) from error
                logger.warning(
                    "teacher node %s: %s %s (attempt %d, failing for %.0f s): retrying in %.2f s",
                    self.config.address,
                    method,
                    "rate-limited" if hint is not None else error.code().name,
                    attempt,
                    now - first_failure,
                    wait,
                )
                self.retries += 1
                self._sleep(wait)
                if hint is None:
                    delay = min(self.config.max_backoff_s, delay * 2)
                continue
            if first_failure is not None:
                logger.warning(
                    "teacher node %s answers again after %.1f s",
                    self.config.address,
                    self._clock() - first_failure,
                )
            self.bytes_received += reply.ByteSize() + _GRPC_PREFIX  # type: ignore[attr-defined]
            return reply


def _budget_refusal(error: grpc.RpcError) -> dict[str, int | str] | None:
    """The node's account of a budget refusal (``contract.BUDGET_EXHAUSTED_KEY``), if any.

    Only plain JSON of known keys with int or str values is read; anything else is ignored.
    """
    for key, value in error.trailing_metadata() or ():
        if key != BUDGET_EXHAUSTED_KEY:
            continue
        try:
            loaded = json.loads(value)
        except (TypeError, ValueError):
            return {}
        if not isinstance(loaded, dict):
            return {}
        found: dict[str, int | str] = {}
        for name, kind in (("budget", str), ("limit", int), ("used", int), ("requested", int)):
            item = loaded.get(name)
            if isinstance(item, kind) and not isinstance(item, bool):
                found[name] = item
        return found
    return None


def _retry_hint(error: grpc.RpcError) -> float | None:
    """Seconds to wait before a rate-limited request fits, if the node said so."""
    if error.code() is not grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    for key, value in error.trailing_metadata() or ():
        if key == RETRY_AFTER_KEY:
            try:
                return max(0.0, int(value) / 1000)
            except ValueError:
                return None
    return None
