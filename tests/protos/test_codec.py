"""The codec: exact round trips and every rejection path."""

from __future__ import annotations

import pytest
import torch

from cdfkd.protos import teacher_pb2
from cdfkd.protos.codec import InvalidTensor, TensorLimits, decode, encode


@pytest.mark.parametrize("dtype", [None, "float32", "float16", "bfloat16"])
def test_round_trip(dtype: str | None) -> None:
    values = torch.randn(3, 4, 5)
    message = encode(values, dtype)
    decoded = decode(message, name="x")
    assert decoded.dtype == torch.float32
    expected = values if dtype in (None, "float32") else values.to(getattr(torch, dtype)).float()
    assert torch.equal(decoded, expected)


def test_float32_bytes_are_little_endian() -> None:
    assert encode(torch.tensor([1.0])).data == bytes.fromhex("0000803f")
    assert encode(torch.tensor([1.0]), "bfloat16").data == bytes.fromhex("803f")


def test_non_contiguous_and_other_devices_encode() -> None:
    values = torch.randn(4, 6).t()
    assert torch.equal(decode(encode(values), name="x"), values)


def _message(dtype: str = "float32", shape: list[int] | None = None, data: bytes | None = None):
    shape = [2, 3] if shape is None else shape
    count = 1
    for size in shape:
        count *= max(size, 0)
    if data is None:
        data = b"\x00" * (4 * count)
    return teacher_pb2.Tensor(dtype=dtype, shape=shape, data=data)


@pytest.mark.parametrize(
    ("message", "kwargs", "match"),
    [
        (_message(dtype="float64", data=b"\x00" * 48), {}, "dtype 'float64'"),
        (_message(dtype="int8", data=b"\x00" * 6), {}, "dtype 'int8'"),
        (_message(dtype="", data=b""), {}, "dtype ''"),
        (_message(dtype="pickle"), {}, "dtype 'pickle'"),
        (_message(shape=[], data=b""), {}, "rank 0"),
        (_message(shape=[1, 1, 1, 1, 1], data=b"\x00" * 4), {}, "rank 5"),
        (_message(shape=[2, 0], data=b""), {}, "empty or negative"),
        (_message(shape=[2, -3], data=b""), {}, "empty or negative"),
        (_message(data=b"\x00" * 23), {}, "23 bytes"),
        (_message(data=b"\x00" * 25), {}, "25 bytes"),
        (_message(data=b""), {}, "0 bytes"),
        (_message(shape=[2, 3]), {"expected_shape": (2, 4)}, "does not match"),
        (_message(shape=[2, 3]), {"expected_shape": (None, 3, 1)}, "does not match"),
        (_message(shape=[10, 10]), {"limits": TensorLimits(max_elements=50)}, "exceed"),
        (_message(shape=[2**31, 2**31], data=b""), {}, "exceed"),
        (_message(dtype="float16", data=b"\x00" * 12), {"allowed_dtypes": ["float32"]}, "float16"),
        (encode(torch.tensor([1.0, float("nan")])), {}, "NaN"),
        (encode(torch.tensor([float("inf"), 1.0])), {}, "NaN or Inf"),
        (encode(torch.tensor([float("-inf"), 1.0]), "float16"), {}, "NaN or Inf"),
        (encode(torch.tensor([70000.0, 1.0]), "float16"), {}, "NaN or Inf"),
    ],
)
def test_rejections(message, kwargs, match: str) -> None:
    with pytest.raises(InvalidTensor, match=match):
        decode(message, name="x", **kwargs)


def test_encode_refuses_dtypes_that_may_not_travel() -> None:
    with pytest.raises(InvalidTensor, match="cannot travel"):
        encode(torch.zeros(2, dtype=torch.int64))
    with pytest.raises(InvalidTensor, match="unknown wire dtype"):
        encode(torch.zeros(2), "float8")


@pytest.mark.parametrize("wire", ["float32", "float16", "bfloat16"])
def test_the_casts_are_torchs_bit_for_bit_from_subnormals_to_overflow(wire: str) -> None:
    # The codec casts in numpy (off torch's thread pool); the bytes must be torch's own cast's.
    values = torch.randn(200, 64, generator=torch.Generator().manual_seed(0))
    values = values * torch.logspace(-9, 6, 64)  # float16 subnormals up to past its range
    target = getattr(torch, wire)
    cast = values.to(target)
    raw = cast.view(torch.uint16) if target is torch.bfloat16 else cast
    message = encode(values, wire)
    assert message.data == raw.numpy().tobytes()  # a little-endian host, as CI's
    finite = torch.isfinite(cast).all(dim=0)
    assert bool(finite.all()) == (wire != "float16")  # float16 overflows to inf, refused below
    kept = values[:, finite]
    assert torch.equal(decode(encode(kept, wire), name="x"), kept.to(target).float())
