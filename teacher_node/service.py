"""TeacherServicer: authorize, decode, apply the owner's policy, call the engine, encode, audit.

All exception -> status code mapping lives in :func:`status_for` (STYLE.md 4). Unexpected
errors become INTERNAL with a generic message and a logged traceback; the server keeps serving.
Every request, answered or refused, leaves one line in the audit log (when one is configured);
a record that cannot be written refuses the request with UNAVAILABLE.

Calls that run the engine (:data:`ENGINE_RPCS`) pass through :class:`Admission` first (bounded
in flight, refused with a retry hint beyond), carry an optional request id (a retry with the
same id and bytes gets the stored reply, see :mod:`request_ids`), and wait for their fair turn
in :meth:`TeacherServicer._charge`, the one place an answer is charged: a call whose client has
gone by then is dropped, neither computed nor charged. Answer paths call ``self._charge``
where they used to call ``policy.admit``.

A Query with ``keep_for_grad`` leaves its images in :class:`KeptBatches` (only for callers that
may have input gradients) and answers a ``batch_handle``; an InputGrad with that handle is
served from the kept images after the very checks, charge and audit of one with the images.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import torch

from cdfkd.protos import teacher_pb2, teacher_pb2_grpc
from cdfkd.protos.codec import InvalidTensor, TensorLimits, decode, encode
from cdfkd.protos.contract import (
    BATCH_HANDLE_BYTES,
    BUDGET_EXHAUSTED_KEY,
    REQUEST_ID_KEY,
    RETRY_AFTER_KEY,
)
from cdfkd.teacher_node.admission import Admission, CallDropped, Clock, FairQueue, Ticket
from cdfkd.teacher_node.answers import (
    KeyedNoise,
    answer_input_grad,
    answer_query,
    check_outputs,
    refused_outputs,
)
from cdfkd.teacher_node.audit import AuditLog, AuditUnavailable
from cdfkd.teacher_node.config import TeacherNodeConfig
from cdfkd.teacher_node.engine import TeacherEngine
from cdfkd.teacher_node.errors import (
    InvalidInput,
    LimitExceeded,
    PermissionDenied,
    Unauthenticated,
)
from cdfkd.teacher_node.identity import CallerIdentities
from cdfkd.teacher_node.kept_batches import BatchHandleUnknown, KeptBatches
from cdfkd.teacher_node.package import TeacherMetadata
from cdfkd.teacher_node.policy import MODE_OUTPUTS, BudgetExhausted, CallerRule, Policy
from cdfkd.teacher_node.privacy import PrivacyGuarantee
from cdfkd.teacher_node.request_ids import (
    MAX_REQUEST_ID_LENGTH,
    Claim,
    RecentRequests,
    valid_request_id,
)
from cdfkd.teacher_node.security import caller_identity, client_ca_bundle, peer_description
from cdfkd.teacher_node.telemetry import NodeMetrics

logger = logging.getLogger(__name__)

Response = TypeVar("Response")

#: Request ids remembered per caller (the oldest forgotten first).
MAX_REQUEST_IDS_PER_CALLER = 4096


_STATUS: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (InvalidTensor, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (LimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (AuditUnavailable, grpc.StatusCode.UNAVAILABLE),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (BatchHandleUnknown, grpc.StatusCode.NOT_FOUND),
)
#: RPCs that run the engine: admitted, queued fairly, charged once per request id.
ENGINE_RPCS = frozenset({"Query", "InputGrad"})
#: What a caller is told when the audit log cannot be written (the path stays in the node's log).
AUDIT_UNAVAILABLE = "the node cannot write its audit log and refuses to answer: retry later"


def status_for(error: Exception) -> grpc.StatusCode | None:
    """The status code of an expected error, or None for an unexpected one."""
    for kind, code in _STATUS:
        if isinstance(error, kind):
            return code
    return None


def _budget_json(error: BudgetExhausted) -> str:
    """The trailing metadata value of a budget refusal (``contract.BUDGET_EXHAUSTED_KEY``)."""
    fields = {
        "budget": error.budget,
        "limit": error.limit,
        "used": error.used,
        "requested": error.requested,
    }
    return json.dumps(fields, separators=(",", ":"))


def _claimed_images(request: Any) -> int:
    """The batch size a request claims (for the audit of refusals); 0 if it claims none."""
    images = getattr(request, "images", None)
    shape = list(images.shape) if images is not None else []
    return int(shape[0]) if shape and 0 <= shape[0] < 2**62 else 0


def _request_id(context: grpc.ServicerContext) -> str | None:
    """The client's request id (reused across its retries), None if it sent none."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY:
            text = value if isinstance(value, str) else value.decode(errors="replace")
            if not valid_request_id(text):
                raise InvalidInput(
                    f"metadata {REQUEST_ID_KEY} must be 1-{MAX_REQUEST_ID_LENGTH} printable "
                    "ASCII characters"
                )
            return text
    return None


def _privacy_message(guarantee: PrivacyGuarantee | None) -> teacher_pb2.Privacy | None:
    """GetMetadata's ``privacy``: the package's guarantee; None (absent) without one."""
    if guarantee is None:
        return None
    return teacher_pb2.Privacy(
        mechanism=guarantee.mechanism,
        epsilon=guarantee.epsilon,
        delta=guarantee.delta,
        accountant=guarantee.accountant,
        max_grad_norm=guarantee.max_grad_norm,
        noise_multiplier=guarantee.noise_multiplier,
        statistics_noise_multiplier=guarantee.statistics_noise_multiplier,
    )


@dataclass
class _Call:
    """What the servicer knows about the call a handler thread is serving."""

    rpc: str
    caller: str
    peer: str
    started: float
    context: grpc.ServicerContext
    request_id: str | None = None
    ticket: Ticket | None = None
    decision: str = ""
    images: int = 0
    #: The batch size of the kept images an InputGrad's handle names (for its refusal's audit).
    kept_images: int | None = None

    def still_wanted(self) -> bool:
        """Whether the client still waits for the answer."""
        remaining = self.context.time_remaining()
        return self.context.is_active() and (remaining is None or remaining > 0)


def _rpc(method: Callable[..., Response]) -> Callable[..., Response]:
    """Admit, deduplicate, map exceptions to status codes, audit and count, in one place."""

    @functools.wraps(method)
    def wrapper(self: TeacherServicer, request: Any, context: grpc.ServicerContext) -> Response:
        # What the certificate claims, for refusals, until it is bound to an identity.
        call = _Call(
            method.__name__, peer_description(context), context.peer(), self._monotonic(), context
        )
        self._local.call = call
        try:
            call.caller = caller_identity(context, self._identities)
            return self._serve(method, request, call)
        except Exception as error:  # noqa: BLE001 - every error must become a status
            self._refuse(call, request, error)
            raise RuntimeError("unreachable: context.abort raises") from error
        finally:
            self._local.call = None
            if call.ticket is not None:
                self._admission.finish(call.ticket)

    return wrapper


class TeacherServicer(teacher_pb2_grpc.TeacherServiceServicer):
    """Serves one teacher's answers on synthetic images; never parameters or BN statistics."""

    def __init__(
        self,
        engine: TeacherEngine,
        metadata: TeacherMetadata,
        config: TeacherNodeConfig,
        policy: Policy,
        audit: AuditLog | None = None,
        *,
        admission: Admission | None = None,
        recent: RecentRequests | None = None,
        metrics: NodeMetrics | None = None,
        monotonic: Clock = time.monotonic,
        max_message_bytes: int | None = None,
        kept: KeptBatches | None = None,
    ) -> None:
        self._engine = engine
        self._metadata = metadata
        self._config = config
        self._policy = policy
        self._audit_log = audit
        self._monotonic = monotonic
        self._admission = admission or Admission(
            FairQueue(config.node.workers, config.limits.max_in_flight_per_caller, 1, monotonic)
        )
        self._recent = recent or RecentRequests(
            config.limits.request_id_ttl_s,
            MAX_REQUEST_IDS_PER_CALLER,
            config.limits.request_id_memory_bytes,
            monotonic,
        )
        limits = config.limits
        self._kept = kept or KeptBatches(
            limits.kept_batch_ttl_s,
            limits.kept_batches_per_caller,
            limits.kept_batch_bytes_per_caller,
            limits.kept_batch_memory_bytes,
            monotonic,
        )
        self._metrics = metrics
        self._max_message_bytes = max_message_bytes or config.limits.max_message_bytes or 0
        self._local = threading.local()
        self._identities = CallerIdentities(
            config.policy.callers,
            client_ca_bundle(config.tls),
            config.policy.allow_any_trusted_caller,
        )
        self._noise = KeyedNoise.from_generator(policy.generator)
        info = engine.info
        side = info.max_image_side
        self._limits = TensorLimits(
            max_rank=4,
            max_elements=config.limits.max_batch
            * max(info.num_classes, info.input_shape[0] * side * side),
        )
        self._node_outputs = {o.value for o in config.choices.allowed_outputs}
        self._dtypes = config.choices.wire_dtypes

    def _allowed(self, rule: CallerRule) -> set[str]:
        mode_outputs = set(MODE_OUTPUTS[rule.mode]) - refused_outputs(rule.perturbation)
        allowed = mode_outputs & self._node_outputs
        return allowed if self._engine.info.has_bn_prior else allowed - {"bn_loss"}

    def _check_bn_prior(self, wanted: bool) -> None:
        """Refuse R(x) of a teacher without BatchNorm before any budget is spent."""
        if wanted and not self._engine.info.has_bn_prior:
            raise InvalidInput(
                "this teacher has no BatchNorm layers, so it has no BN-prior term R(x): ask "
                "without want_bn_loss and with bn_weight 0 (GetMetadata.has_bn_prior is false)"
            )

    def _require(self, caller: str, rule: CallerRule, wanted: set[str]) -> None:
        self._policy.check_outputs(caller, rule, wanted)
        refused = sorted(wanted - self._node_outputs)
        if refused:
            raise PermissionDenied(
                f"the owner does not allow {refused} on this node; allowed: "
                f"{sorted(self._allowed(rule))} (see GetMetadata)"
            )
        check_outputs(rule.perturbation, wanted)

    def _audit(
        self,
        caller: str,
        rpc: str,
        images: int,
        decision: str,
        *,
        reason: str = "",
        bytes_returned: int = 0,
    ) -> None:
        call: _Call | None = getattr(self._local, "call", None)
        latency_s = self._monotonic() - call.started if call is not None else 0.0
        if call is not None:
            call.decision, call.images = decision, images
        if self._metrics is not None:
            self._metrics.observe(
                caller, rpc, decision, latency_s, images if decision == "allowed" else 0
            )
        if self._audit_log is None:
            return
        try:
            mode = self._policy.rule(caller).mode.value
        except PermissionDenied:
            mode = "-"
        self._audit_log.record(
            caller=caller,
            rpc=rpc,
            images=images,
            mode=mode,
            decision=decision,
            reason=reason,
            bytes_returned=bytes_returned,
            request_id=(call.request_id or "") if call is not None else "",
            peer=call.peer if call is not None else "",
            latency_ms=latency_s * 1000,
        )

    def _serve(self, method: Callable[..., Response], request: Any, call: _Call) -> Response:
        """Admission and request-id bookkeeping around one RPC method."""
        if call.rpc not in ENGINE_RPCS:
            return method(self, request, call.context, call.caller)
        call.request_id = _request_id(call.context)
        self._policy.rule(call.caller)  # an unknown caller takes no place in the queue
        call.ticket = self._admission.enter(call.caller, call.context.time_remaining())
        ticket = call.ticket
        if not call.context.add_callback(
            lambda: self._admission.cancel(ticket, "cancelled or past its deadline while queued")
        ):
            self._admission.cancel(ticket, "cancelled before it was queued")
        if call.request_id is None:
            return method(self, request, call.context, call.caller)
        digest = hashlib.sha256(
            call.rpc.encode() + b"\0" + request.SerializeToString(deterministic=True)
        ).digest()
        while True:
            claim, entry = self._recent.claim(call.caller, call.request_id, digest)
            if claim is Claim.NEW:
                break
            if claim is Claim.REPLAY:
                self._audit(
                    call.caller,
                    call.rpc,
                    _claimed_images(request),
                    "replayed",
                    reason="a retry of an answered request: stored reply, not charged",
                    bytes_returned=entry.size,
                )
                return entry.reply  # type: ignore[return-value]
            while not entry.done.wait(1.0):
                if not call.still_wanted():
                    raise CallDropped("cancelled while its first attempt was running")
        try:
            reply = method(self, request, call.context, call.caller)
        except BaseException:
            self._recent.forget(call.caller, call.request_id)
            raise
        self._recent.complete(call.caller, call.request_id, reply, reply.ByteSize())  # type: ignore[attr-defined]
        return reply

    def _charge(self, caller: str, rule: CallerRule, images: int) -> None:
        """Wait for the call's fair turn at the engine, then charge it (if still wanted).

        Raises:
            CallDropped: the client went away or the deadline passed first (nothing charged).
        """
        call: _Call | None = getattr(self._local, "call", None)
        if call is not None and call.ticket is not None:
            self._admission.wait(call.ticket, call.still_wanted)
        self._policy.admit(caller, rule, images)

    def _refuse(self, call: _Call, request: Any, error: Exception) -> None:
        """Audit, log and abort a call that ends in ``error`` (always raises)."""
        context = call.context
        if isinstance(error, CallDropped):
            expired = (context.time_remaining() or 1.0) <= 0
            self._audit_quietly(call, request, "dropped", f"not computed, not charged: {error}")
            logger.info("%s from %s dropped: %s", call.rpc, call.caller, error)
            code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            context.abort(code, f"dropped before compute: {error}")
        code = status_for(error)
        if isinstance(error, AuditUnavailable):
            logger.error("%s from %s refused: %s", call.rpc, call.caller, error)
            if self._metrics is not None:
                self._metrics.audit_failures.inc()
            context.abort(grpc.StatusCode.UNAVAILABLE, AUDIT_UNAVAILABLE)
        reason = f"{type(error).__name__}: {error}" if code else "internal error"
        if not self._audit_quietly(call, request, "denied", reason):
            context.abort(grpc.StatusCode.UNAVAILABLE, AUDIT_UNAVAILABLE)
        if code is not None:
            logger.info("%s from %s refused: %s", call.rpc, call.caller, error)
            retry_after_s = getattr(error, "retry_after_s", None)
            if retry_after_s is not None and math.isfinite(retry_after_s):
                milliseconds = str(max(1, math.ceil(retry_after_s * 1000)))
                context.set_trailing_metadata(((RETRY_AFTER_KEY, milliseconds),))
            if isinstance(error, BudgetExhausted):
                context.set_trailing_metadata(((BUDGET_EXHAUSTED_KEY, _budget_json(error)),))
            context.abort(code, str(error))
        incident = uuid.uuid4().hex[:12]
        logger.error("%s failed (incident %s)", call.rpc, incident, exc_info=error)
        context.abort(grpc.StatusCode.INTERNAL, f"internal error (incident {incident})")

    def _audit_quietly(self, call: _Call, request: Any, decision: str, reason: str) -> bool:
        """Audit a refusal; False (logged) if the audit log cannot be written."""
        try:
            claimed = _claimed_images(request) if call.kept_images is None else call.kept_images
            self._audit(call.caller, call.rpc, claimed, decision, reason=reason)
        except AuditUnavailable as failure:
            logger.error("%s from %s: %s", call.rpc, call.caller, failure)
            if self._metrics is not None:
                self._metrics.audit_failures.inc()
            return False
        return True

    @_rpc
    def GetMetadata(  # noqa: N802 - gRPC method name
        self,
        request: teacher_pb2.GetMetadataRequest,
        context: grpc.ServicerContext,
        caller: str = "",
    ) -> teacher_pb2.GetMetadataResponse:
        """What the teacher is and what this caller may ask of it."""
        rule = self._policy.rule(caller)
        info = self._engine.info
        remaining = self._policy.remaining(caller, rule)
        reply = teacher_pb2.GetMetadataResponse(
            name=self._metadata.name,
            num_classes=info.num_classes,
            input_shape=list(info.input_shape),
            feature_dim=info.feature_dim,
            normalization_mean=list(self._metadata.normalization.mean),
            normalization_std=list(self._metadata.normalization.std),
            allowed_outputs=sorted(self._allowed(rule)),
            max_batch=self._config.limits.max_batch,
            max_message_bytes=self._max_message_bytes,
            wire_dtypes=list(self._dtypes),
            mode=rule.mode.value,
            remaining_budget=-1 if remaining is None else remaining,
            has_bn_prior=info.has_bn_prior,
            max_image_side=info.max_image_side,
            privacy=_privacy_message(self._metadata.privacy),
        )
        self._audit(caller, "GetMetadata", 0, "allowed", bytes_returned=reply.ByteSize())
        return reply

    @_rpc
    def Query(  # noqa: N802 - gRPC method name
        self, request: teacher_pb2.QueryRequest, context: grpc.ServicerContext, caller: str = ""
    ) -> teacher_pb2.QueryResponse:
        """Logits, and features and R(x) when asked for, of a batch of synthetic images."""
        rule = self._policy.rule(caller)
        wanted = {"logits"}
        if request.want_features:
            wanted.add("features")
        if request.want_bn_loss:
            wanted.add("bn_loss")
        self._check_bn_prior(request.want_bn_loss)
        self._require(caller, rule, wanted)
        images = self._images(request.images)
        dtype = self._response_dtype(request.response_dtype, request.images.dtype)
        self._charge(caller, rule, images.shape[0])
        answer = answer_query(
            self._engine,
            images,
            rule.perturbation,
            self._noise,
            features=request.want_features,
            bn_loss=request.want_bn_loss,
        )
        handle = None
        if request.keep_for_grad and "input_grad" in self._allowed(rule):
            handle = self._kept.keep(caller, request.images)
        reply = teacher_pb2.QueryResponse(
            logits=encode(answer.logits, dtype),
            features=None if answer.features is None else encode(answer.features, dtype),
            bn_loss=0.0 if answer.bn_loss is None else answer.bn_loss,
            batch_handle=handle or b"",
        )
        self._audit(caller, "Query", images.shape[0], "allowed", bytes_returned=reply.ByteSize())
        return reply

    @_rpc
    def InputGrad(  # noqa: N802 - gRPC method name
        self,
        request: teacher_pb2.InputGradRequest,
        context: grpc.ServicerContext,
        caller: str = "",
    ) -> teacher_pb2.InputGradResponse:
        """The input VJP d/dx [<v, t(x)> + bn_weight R(x)]."""
        rule = self._policy.rule(caller)
        if not math.isfinite(request.bn_weight):
            raise InvalidInput("bn_weight must be finite")
        wanted = {"input_grad", "bn_loss"} if request.bn_weight != 0.0 else {"input_grad"}
        self._check_bn_prior(request.bn_weight != 0.0)
        self._require(caller, rule, wanted)
        sent = self._kept_images(request, caller)
        images = self._images(sent)
        grad_logits = decode(
            request.grad_logits,
            name="grad_logits",
            expected_shape=(images.shape[0], self._engine.info.num_classes),
            limits=self._limits,
            allowed_dtypes=self._dtypes,
        )
        dtype = self._response_dtype(request.response_dtype, sent.dtype)
        self._charge(caller, rule, images.shape[0])
        gradient = answer_input_grad(
            self._engine, images, grad_logits, request.bn_weight, rule.perturbation, self._noise
        )
        reply = teacher_pb2.InputGradResponse(grad_images=encode(gradient, dtype))
        self._audit(
            caller, "InputGrad", images.shape[0], "allowed", bytes_returned=reply.ByteSize()
        )
        if request.batch_handle:
            self._kept.release(caller, request.batch_handle)
        return reply

    def _kept_images(
        self, request: teacher_pb2.InputGradRequest, caller: str
    ) -> teacher_pb2.Tensor:
        """The InputGrad's images: those sent, or those its ``batch_handle`` names.

        Raises:
            InvalidInput: both or a malformed handle.
            BatchHandleUnknown: this caller holds no batch under the handle.
        """
        if not request.batch_handle:
            return request.images
        if request.HasField("images"):
            raise InvalidInput("send the images or a batch_handle, not both")
        if len(request.batch_handle) != BATCH_HANDLE_BYTES:
            raise InvalidInput(
                f"a batch_handle has {BATCH_HANDLE_BYTES} bytes, not {len(request.batch_handle)}"
            )
        kept = self._kept.get(caller, request.batch_handle)
        call: _Call | None = getattr(self._local, "call", None)
        if call is not None:
            call.kept_images = int(kept.shape[0]) if kept.shape else 0
        return kept

    def _images(self, message: teacher_pb2.Tensor) -> torch.Tensor:
        shape = list(message.shape)
        if shape and shape[0] > self._config.limits.max_batch:
            raise LimitExceeded(
                f"batch of {shape[0]} images exceeds this node's max_batch "
                f"{self._config.limits.max_batch}: split the batch"
            )
        images = decode(
            message,
            name="images",
            expected_shape=(None, self._engine.info.input_shape[0], None, None),
            limits=self._limits,
            allowed_dtypes=self._dtypes,
        )
        side = self._engine.info.max_image_side
        if images.shape[2] > side or images.shape[3] > side:
            raise LimitExceeded(
                f"images of {images.shape[2]}x{images.shape[3]} exceed this node's "
                f"max_image_side {side}: use a smaller run image_shape"
            )
        if images.shape[0] < 2:
            raise InvalidInput("a batch needs at least 2 images (BatchNorm batch statistics)")
        return images.to(self._engine.dtype)

    def _response_dtype(self, requested: str, images_dtype: str) -> str:
        dtype = requested or images_dtype
        if dtype not in self._dtypes:
            raise InvalidInput(f"response_dtype {dtype!r} is not one of {list(self._dtypes)}")
        return dtype
