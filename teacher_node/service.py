"""TeacherServicer: authorize, decode, apply the owner's policy, call the engine, encode, audit.

All exception -> status code mapping lives in :func:`status_for` (STYLE.md 4). Unexpected
errors become INTERNAL with a generic message and a logged traceback; the server keeps serving.
Every request, answered or refused, leaves one line in the audit log (when one is configured).
"""

from __future__ import annotations

import functools
import logging
import math
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
import torch

from cdfkd.protos import teacher_pb2, teacher_pb2_grpc
from cdfkd.protos.codec import InvalidTensor, TensorLimits, decode, encode
from cdfkd.protos.contract import RETRY_AFTER_KEY
from cdfkd.teacher_node.answers import (
    KeyedNoise,
    answer_input_grad,
    answer_query,
    check_outputs,
    refused_outputs,
)
from cdfkd.teacher_node.audit import AuditLog
from cdfkd.teacher_node.config import TeacherNodeConfig
from cdfkd.teacher_node.engine import TeacherEngine
from cdfkd.teacher_node.errors import (
    InvalidInput,
    LimitExceeded,
    PermissionDenied,
    Unauthenticated,
)
from cdfkd.teacher_node.identity import CallerIdentities
from cdfkd.teacher_node.package import TeacherMetadata
from cdfkd.teacher_node.policy import MODE_OUTPUTS, CallerRule, Policy, RateLimited
from cdfkd.teacher_node.security import caller_identity, client_ca_bundle, peer_description

logger = logging.getLogger(__name__)

Response = TypeVar("Response")


_STATUS: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (InvalidTensor, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (LimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
)


def status_for(error: Exception) -> grpc.StatusCode | None:
    """The status code of an expected error, or None for an unexpected one."""
    for kind, code in _STATUS:
        if isinstance(error, kind):
            return code
    return None


def _claimed_images(request: Any) -> int:
    """The batch size a request claims (for the audit of refusals); 0 if it claims none."""
    images = getattr(request, "images", None)
    shape = list(images.shape) if images is not None else []
    return int(shape[0]) if shape and 0 <= shape[0] < 2**62 else 0


def _rpc(method: Callable[..., Response]) -> Callable[..., Response]:
    """Map exceptions to status codes and audit refusals, in one place."""

    @functools.wraps(method)
    def wrapper(self: TeacherServicer, request: Any, context: grpc.ServicerContext) -> Response:
        caller = peer_description(context)  # what the certificate claims, for refusals
        try:
            caller = caller_identity(context, self._identities)
            return method(self, request, context, caller)
        except Exception as error:  # noqa: BLE001 - every error must become a status
            code = status_for(error)
            self._audit(
                caller,
                method.__name__,
                _claimed_images(request),
                "denied",
                reason=f"{type(error).__name__}: {error}" if code else "internal error",
            )
            if code is not None:
                logger.info("%s from %s refused: %s", method.__name__, caller, error)
                if isinstance(error, RateLimited) and math.isfinite(error.retry_after_s):
                    milliseconds = str(max(1, math.ceil(error.retry_after_s * 1000)))
                    context.set_trailing_metadata(((RETRY_AFTER_KEY, milliseconds),))
                context.abort(code, str(error))
            incident = uuid.uuid4().hex[:12]
            logger.exception("%s failed (incident %s)", method.__name__, incident)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error (incident {incident})")
            raise RuntimeError("unreachable: context.abort raises") from error

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
    ) -> None:
        self._engine = engine
        self._metadata = metadata
        self._config = config
        self._policy = policy
        self._audit_log = audit
        self._identities = CallerIdentities(
            config.policy.callers,
            client_ca_bundle(config.tls),
            config.policy.allow_any_trusted_caller,
        )
        self._noise = KeyedNoise.from_generator(policy.generator)
        info = engine.info
        self._limits = TensorLimits(
            max_rank=4,
            max_elements=config.limits.max_batch
            * max(info.num_classes, math.prod(info.input_shape)),
        )
        self._node_outputs = {o.value for o in config.choices.allowed_outputs}
        self._dtypes = config.choices.wire_dtypes

    def _allowed(self, rule: CallerRule) -> set[str]:
        mode_outputs = set(MODE_OUTPUTS[rule.mode]) - refused_outputs(rule.perturbation)
        return mode_outputs & self._node_outputs

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
        )

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
            max_message_bytes=self._config.limits.max_message_bytes,
            wire_dtypes=list(self._dtypes),
            mode=rule.mode.value,
            remaining_budget=-1 if remaining is None else remaining,
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
        self._require(caller, rule, wanted)
        images = self._images(request.images)
        dtype = self._response_dtype(request.response_dtype, request.images.dtype)
        self._policy.admit(caller, rule, images.shape[0])
        answer = answer_query(
            self._engine,
            images,
            rule.perturbation,
            self._noise,
            features=request.want_features,
            bn_loss=request.want_bn_loss,
        )
        reply = teacher_pb2.QueryResponse(
            logits=encode(answer.logits, dtype),
            features=None if answer.features is None else encode(answer.features, dtype),
            bn_loss=0.0 if answer.bn_loss is None else answer.bn_loss,
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
        self._require(caller, rule, wanted)
        images = self._images(request.images)
        grad_logits = decode(
            request.grad_logits,
            name="grad_logits",
            expected_shape=(images.shape[0], self._engine.info.num_classes),
            limits=self._limits,
            allowed_dtypes=self._dtypes,
        )
        dtype = self._response_dtype(request.response_dtype, request.images.dtype)
        self._policy.admit(caller, rule, images.shape[0])
        gradient = answer_input_grad(
            self._engine, images, grad_logits, request.bn_weight, rule.perturbation, self._noise
        )
        reply = teacher_pb2.InputGradResponse(grad_images=encode(gradient, dtype))
        self._audit(
            caller, "InputGrad", images.shape[0], "allowed", bytes_returned=reply.ByteSize()
        )
        return reply

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
            expected_shape=(None, *self._engine.info.input_shape),
            limits=self._limits,
            allowed_dtypes=self._dtypes,
        )
        if images.shape[0] < 2:
            raise InvalidInput("a batch needs at least 2 images (BatchNorm batch statistics)")
        return images.to(self._engine.dtype)

    def _response_dtype(self, requested: str, images_dtype: str) -> str:
        dtype = requested or images_dtype
        if dtype not in self._dtypes:
            raise InvalidInput(f"response_dtype {dtype!r} is not one of {list(self._dtypes)}")
        return dtype
