"""The only Tensor <-> proto code: encoding, decoding and validation (STYLE.md 4).

Tensors travel as ``{dtype, shape, data}`` with little-endian bytes. Decoding validates the
dtype against an allow-list, the rank, every dimension, the element count, the byte length and
the values (NaN/Inf) *before* any computation sees them. Nothing is ever unpickled.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cdfkd.protos import teacher_pb2
from cdfkd.protos.errors import CdfkdError

#: dtypes that may cross the wire, by wire name.
WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_WIRE_NAMES = {dtype: name for name, dtype in WIRE_DTYPES.items()}
#: numpy views of the wire dtypes, explicitly little-endian (bfloat16 travels as its bits).
_LITTLE_ENDIAN = {"float32": "<f4", "float16": "<f2", "bfloat16": "<u2"}


class InvalidTensor(CdfkdError):
    """A tensor message is malformed: bad dtype, shape, byte length or values."""


@dataclass(frozen=True)
class TensorLimits:
    """Bounds a decoded tensor must respect.

    Attributes:
        max_rank: Largest number of dimensions.
        max_elements: Largest number of elements.
    """

    max_rank: int = 4
    max_elements: int = 64 * 1024 * 1024


def wire_name(dtype: torch.dtype) -> str:
    """The wire name of ``dtype``; raises InvalidTensor for dtypes that may not travel."""
    try:
        return _WIRE_NAMES[dtype]
    except KeyError:
        raise InvalidTensor(
            f"dtype {dtype} cannot travel; use one of {sorted(WIRE_DTYPES)}"
        ) from None


def encode(tensor: torch.Tensor, dtype: str | None = None) -> teacher_pb2.Tensor:
    """Encode ``tensor`` (cast to wire dtype ``dtype``, default its own) as a Tensor message."""
    target = WIRE_DTYPES.get(dtype) if dtype else tensor.dtype
    if target is None:
        raise InvalidTensor(f"unknown wire dtype {dtype!r}; use one of {sorted(WIRE_DTYPES)}")
    name = wire_name(target)
    values = tensor.detach().to(device="cpu")
    if target is torch.bfloat16:
        array = values.to(target).contiguous().view(torch.uint16).numpy()
    elif values.dtype in (torch.float32, torch.float16):
        # Cast in numpy (IEEE round to nearest even, as torch), on this thread: see decode.
        array = values.contiguous().numpy()
    else:
        array = values.to(target).contiguous().numpy()
    with np.errstate(over="ignore"):  # beyond float16's range is inf, as torch casts it
        array = array.astype(_LITTLE_ENDIAN[name], copy=False)
    return teacher_pb2.Tensor(dtype=name, shape=list(values.shape), data=array.tobytes())


def decode(
    message: teacher_pb2.Tensor,
    *,
    name: str,
    expected_shape: Sequence[int | None] | None = None,
    limits: TensorLimits = TensorLimits(),
    allowed_dtypes: Sequence[str] | None = None,
) -> torch.Tensor:
    """Validate and decode a Tensor message to float32.

    Args:
        message: The received message.
        name: What the tensor is, for error messages ("images", "grad_logits").
        expected_shape: Required shape; None entries match any size.
        limits: Rank and element-count bounds.
        allowed_dtypes: Wire dtypes accepted here (default: all of WIRE_DTYPES).

    Raises:
        InvalidTensor: the message is malformed; the message says how.
    """
    allowed = WIRE_DTYPES if allowed_dtypes is None else allowed_dtypes
    if message.dtype not in WIRE_DTYPES or message.dtype not in allowed:
        raise InvalidTensor(
            f"{name}: dtype {message.dtype!r} is not accepted; use one of {sorted(allowed)}"
        )
    shape = list(message.shape)
    if not shape or len(shape) > limits.max_rank:
        raise InvalidTensor(f"{name}: rank {len(shape)} is outside 1..{limits.max_rank}")
    if any(size < 1 for size in shape):
        raise InvalidTensor(f"{name}: shape {shape} has an empty or negative dimension")
    elements = math.prod(shape)
    if elements > limits.max_elements:
        raise InvalidTensor(
            f"{name}: {elements} elements exceed the limit of {limits.max_elements}"
        )
    if expected_shape is not None and (
        len(expected_shape) != len(shape)
        or any(e is not None and e != s for e, s in zip(expected_shape, shape, strict=False))
    ):
        wanted = tuple("B" if e is None else e for e in expected_shape)
        raise InvalidTensor(f"{name}: shape {tuple(shape)} does not match {wanted}")
    dtype = WIRE_DTYPES[message.dtype]
    itemsize = torch.tensor([], dtype=dtype).element_size()
    if len(message.data) != elements * itemsize:
        raise InvalidTensor(
            f"{name}: {len(message.data)} bytes of data, but shape {tuple(shape)} of "
            f"{message.dtype} needs {elements * itemsize}"
        )
    array = np.frombuffer(message.data, dtype=_LITTLE_ENDIAN[message.dtype])
    if dtype is torch.bfloat16:
        # bfloat16 is the high half of a float32: shift it there (numpy has no bfloat16).
        array = (array.astype(np.uint32) << 16).view(np.float32)
    else:
        # In numpy, on this thread: torch's conversion would start an intra-op parallel region
        # on the caller's (often a prefetch lane's) thread, competing with the student's.
        array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise InvalidTensor(f"{name}: contains NaN or Inf")
    return torch.from_numpy(array).reshape(shape)
