"""TeacherServicer: authorize, decode, check the owner's choices, call the engine, encode.

All exception -> status code mapping lives in :func:`status_for` (STYLE.md 4). Unexpected
errors become INTERNAL with a generic message and a logged traceback; the server keeps serving.
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
from cdfkd.teacher_node.config import Output, TeacherNodeConfig
from cdfkd.teacher_node.engine import TeacherEngine
from cdfkd.teacher_node.errors import InvalidInput, LimitExceeded, PermissionDenied
from cdfkd.teacher_node.package import TeacherMetadata
from cdfkd.teacher_node.security import caller_identity

logger = logging.getLogger(__name__)

Response = TypeVar("Response")

_STATUS: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (InvalidTensor, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (LimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
)


def status_for(error: Exception) -> grpc.StatusCode | None:
    """The status code of an expected error, or None for an unexpected one."""
    for kind, code in _STATUS:
        if isinstance(error, kind):
            return code
    return None


def _rpc(method: Callable[..., Response]) -> Callable[..., Response]:
    """Map exceptions of a servicer method to status codes in one place."""

    @functools.wraps(method)
    def wrapper(self: TeacherServicer, request: Any, context: grpc.ServicerContext) -> Response:
        try:
            return method(self, request, context)
        except Exception as error:  # noqa: BLE001 - every error must become a status
            code = status_for(error)
            if code is not None:
                logger.info(
                    "%s from %s refused: %s", method.__name__, caller_identity(context), error
                )
                context.abort(code, str(error))
            incident = uuid.uuid4().hex[:12]
            logger.exception("%s failed (incident %s)", method.__name__, incident)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error (incident {incident})")
            raise RuntimeError("unreachable: context.abort raises") from error

    return wrapper


class TeacherServicer(teacher_pb2_grpc.TeacherServiceServicer):
    """Serves one teacher's answers on synthetic images; never parameters or BN statistics."""

    def __init__(
        self, engine: TeacherEngine, metadata: TeacherMetadata, config: TeacherNodeConfig
    ) -> None:
        self._engine = engine
        self._metadata = metadata
        self._config = config
        info = engine.info
        self._limits = TensorLimits(
            max_rank=4,
            max_elements=config.limits.max_batch
            * max(info.num_classes, math.prod(info.input_shape)),
        )
        self._allowed = set(config.choices.allowed_outputs)
        self._dtypes = config.choices.wire_dtypes

    @_rpc
    def GetMetadata(  # noqa: N802 - gRPC method name
        self, request: teacher_pb2.GetMetadataRequest, context: grpc.ServicerContext
    ) -> teacher_pb2.GetMetadataResponse:
        """What the teacher is and what the caller may ask of it."""
        info = self._engine.info
        return teacher_pb2.GetMetadataResponse(
            name=self._metadata.name,
            num_classes=info.num_classes,
            input_shape=list(info.input_shape),
            feature_dim=info.feature_dim,
            normalization_mean=list(self._metadata.normalization.mean),
            normalization_std=list(self._metadata.normalization.std),
            allowed_outputs=[o.value for o in self._config.choices.allowed_outputs],
            max_batch=self._config.limits.max_batch,
            max_message_bytes=self._config.limits.max_message_bytes,
            wire_dtypes=list(self._dtypes),
        )

    @_rpc
    def Query(  # noqa: N802 - gRPC method name
        self, request: teacher_pb2.QueryRequest, context: grpc.ServicerContext
    ) -> teacher_pb2.QueryResponse:
        """Logits, and features and R(x) when asked for, of a batch of synthetic images."""
        self._require(Output.FEATURES, request.want_features)
        self._require(Output.BN_LOSS, request.want_bn_loss)
        images = self._images(request.images)
        dtype = self._response_dtype(request.response_dtype, request.images.dtype)
        out = self._engine.query(images, with_bn_loss=request.want_bn_loss)
        return teacher_pb2.QueryResponse(
            logits=encode(out.logits, dtype),
            features=encode(out.features, dtype) if request.want_features else None,
            bn_loss=float(out.bn_loss) if out.bn_loss is not None else 0.0,
        )

    @_rpc
    def InputGrad(  # noqa: N802 - gRPC method name
        self, request: teacher_pb2.InputGradRequest, context: grpc.ServicerContext
    ) -> teacher_pb2.InputGradResponse:
        """The input VJP d/dx [<v, t(x)> + bn_weight R(x)]."""
        self._require(Output.INPUT_GRAD, True)
        if request.bn_weight != 0.0:
            self._require(Output.BN_LOSS, True)
        if not torch.isfinite(torch.tensor(request.bn_weight)):
            raise InvalidInput("bn_weight must be finite")
        images = self._images(request.images)
        grad_logits = decode(
            request.grad_logits,
            name="grad_logits",
            expected_shape=(images.shape[0], self._engine.info.num_classes),
            limits=self._limits,
            allowed_dtypes=self._dtypes,
        )
        dtype = self._response_dtype(request.response_dtype, request.images.dtype)
        gradient = self._engine.input_grad(images, grad_logits, request.bn_weight)
        return teacher_pb2.InputGradResponse(grad_images=encode(gradient, dtype))

    def _require(self, output: Output, wanted: bool) -> None:
        if wanted and output not in self._allowed:
            raise PermissionDenied(
                f"the owner does not allow '{output.value}'; allowed: "
                f"{sorted(o.value for o in self._allowed)} (see GetMetadata)"
            )

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
