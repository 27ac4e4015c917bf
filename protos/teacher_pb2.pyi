from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class GetMetadataRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetMetadataResponse(_message.Message):
    __slots__ = ("name", "num_classes", "input_shape", "feature_dim", "normalization_mean", "normalization_std", "allowed_outputs", "max_batch", "max_message_bytes", "wire_dtypes", "mode", "remaining_budget", "has_bn_prior", "max_image_side", "privacy")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    FEATURE_DIM_FIELD_NUMBER: _ClassVar[int]
    NORMALIZATION_MEAN_FIELD_NUMBER: _ClassVar[int]
    NORMALIZATION_STD_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPES_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    REMAINING_BUDGET_FIELD_NUMBER: _ClassVar[int]
    HAS_BN_PRIOR_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_SIDE_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_FIELD_NUMBER: _ClassVar[int]
    name: str
    num_classes: int
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    feature_dim: int
    normalization_mean: _containers.RepeatedScalarFieldContainer[float]
    normalization_std: _containers.RepeatedScalarFieldContainer[float]
    allowed_outputs: _containers.RepeatedScalarFieldContainer[str]
    max_batch: int
    max_message_bytes: int
    wire_dtypes: _containers.RepeatedScalarFieldContainer[str]
    mode: str
    remaining_budget: int
    has_bn_prior: bool
    max_image_side: int
    privacy: Privacy
    def __init__(self, name: _Optional[str] = ..., num_classes: _Optional[int] = ..., input_shape: _Optional[_Iterable[int]] = ..., feature_dim: _Optional[int] = ..., normalization_mean: _Optional[_Iterable[float]] = ..., normalization_std: _Optional[_Iterable[float]] = ..., allowed_outputs: _Optional[_Iterable[str]] = ..., max_batch: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., wire_dtypes: _Optional[_Iterable[str]] = ..., mode: _Optional[str] = ..., remaining_budget: _Optional[int] = ..., has_bn_prior: _Optional[bool] = ..., max_image_side: _Optional[int] = ..., privacy: _Optional[_Union[Privacy, _Mapping]] = ...) -> None: ...

class Privacy(_message.Message):
    __slots__ = ("mechanism", "epsilon", "delta", "accountant", "max_grad_norm", "noise_multiplier", "statistics_noise_multiplier")
    MECHANISM_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    ACCOUNTANT_FIELD_NUMBER: _ClassVar[int]
    MAX_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    STATISTICS_NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    mechanism: str
    epsilon: float
    delta: float
    accountant: str
    max_grad_norm: float
    noise_multiplier: float
    statistics_noise_multiplier: float
    def __init__(self, mechanism: _Optional[str] = ..., epsilon: _Optional[float] = ..., delta: _Optional[float] = ..., accountant: _Optional[str] = ..., max_grad_norm: _Optional[float] = ..., noise_multiplier: _Optional[float] = ..., statistics_noise_multiplier: _Optional[float] = ...) -> None: ...

class QueryRequest(_message.Message):
    __slots__ = ("images", "want_features", "want_bn_loss", "response_dtype", "keep_for_grad")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    WANT_FEATURES_FIELD_NUMBER: _ClassVar[int]
    WANT_BN_LOSS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    KEEP_FOR_GRAD_FIELD_NUMBER: _ClassVar[int]
    images: Tensor
    want_features: bool
    want_bn_loss: bool
    response_dtype: str
    keep_for_grad: bool
    def __init__(self, images: _Optional[_Union[Tensor, _Mapping]] = ..., want_features: _Optional[bool] = ..., want_bn_loss: _Optional[bool] = ..., response_dtype: _Optional[str] = ..., keep_for_grad: _Optional[bool] = ...) -> None: ...

class QueryResponse(_message.Message):
    __slots__ = ("logits", "features", "bn_loss", "batch_handle")
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    BN_LOSS_FIELD_NUMBER: _ClassVar[int]
    BATCH_HANDLE_FIELD_NUMBER: _ClassVar[int]
    logits: Tensor
    features: Tensor
    bn_loss: float
    batch_handle: bytes
    def __init__(self, logits: _Optional[_Union[Tensor, _Mapping]] = ..., features: _Optional[_Union[Tensor, _Mapping]] = ..., bn_loss: _Optional[float] = ..., batch_handle: _Optional[bytes] = ...) -> None: ...

class InputGradRequest(_message.Message):
    __slots__ = ("images", "grad_logits", "bn_weight", "response_dtype", "batch_handle")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    GRAD_LOGITS_FIELD_NUMBER: _ClassVar[int]
    BN_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    BATCH_HANDLE_FIELD_NUMBER: _ClassVar[int]
    images: Tensor
    grad_logits: Tensor
    bn_weight: float
    response_dtype: str
    batch_handle: bytes
    def __init__(self, images: _Optional[_Union[Tensor, _Mapping]] = ..., grad_logits: _Optional[_Union[Tensor, _Mapping]] = ..., bn_weight: _Optional[float] = ..., response_dtype: _Optional[str] = ..., batch_handle: _Optional[bytes] = ...) -> None: ...

class InputGradResponse(_message.Message):
    __slots__ = ("grad_images",)
    GRAD_IMAGES_FIELD_NUMBER: _ClassVar[int]
    grad_images: Tensor
    def __init__(self, grad_images: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
