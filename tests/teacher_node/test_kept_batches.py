"""The kept-batch cache alone: bound to its caller, bounded in entries and bytes, expiring."""

from __future__ import annotations

import pytest
import torch

from cdfkd.protos.codec import encode
from cdfkd.protos.contract import BATCH_HANDLE_BYTES
from cdfkd.teacher_node.kept_batches import ENTRY_OVERHEAD_BYTES, BatchHandleUnknown, KeptBatches
from tests.teacher_node.test_policy import FakeClock

#: One kept batch of 8 float32 16x16 images: 8 KiB of data.
BATCH_BYTES = 8 * 16 * 16 * 4 + ENTRY_OVERHEAD_BYTES


def _images(seed: int = 0):
    return encode(torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(seed)))


def _cache(clock: FakeClock, **bounds: int) -> KeptBatches:
    settings = {
        "ttl_s": 60.0,
        "max_entries_per_caller": 4,
        "max_bytes_per_caller": 100 * BATCH_BYTES,
        "max_bytes": 1000 * BATCH_BYTES,
        **bounds,
    }
    return KeptBatches(clock=clock, **settings)  # type: ignore[arg-type]


def test_a_kept_batch_is_its_callers_alone_and_used_once() -> None:
    cache = _cache(FakeClock())
    images = _images()
    handle = cache.keep("student", images)
    assert handle is not None
    assert len(handle) == BATCH_HANDLE_BYTES
    assert cache.get("student", handle) == images  # the message as received
    with pytest.raises(BatchHandleUnknown, match="send the images instead"):
        cache.get("other-student", handle)  # another caller: as if never issued
    assert cache.get("student", handle) == images  # the attempt took nothing from its owner
    cache.release("student", handle)
    with pytest.raises(BatchHandleUnknown):
        cache.get("student", handle)
    assert (len(cache), cache.stored_bytes) == (0, 0)
    handles = {cache.keep("student", images) for _ in range(4)}
    assert len(handles) == 4  # fresh random handles, even for the same images


def test_entries_per_caller_are_bounded_oldest_evicted_first() -> None:
    cache = _cache(FakeClock())
    handles = [cache.keep("student", _images(i)) for i in range(6)]
    other = cache.keep("other-student", _images(9))
    assert len(cache) == 4 + 1
    for evicted in handles[:2]:
        with pytest.raises(BatchHandleUnknown):
            cache.get("student", evicted)  # type: ignore[arg-type]
    for kept, seed in zip(handles[2:], range(2, 6), strict=True):
        assert cache.get("student", kept) == _images(seed)  # type: ignore[arg-type]
    assert cache.get("other-student", other) == _images(9)  # type: ignore[arg-type]
    assert cache.evicted == 2


def test_many_callers_flooding_keeps_cannot_grow_memory_without_bound() -> None:
    """The memory-exhaustion attack: 50 identities each keep 40 batches as fast as they can."""
    clock = FakeClock()
    cache = _cache(clock, max_bytes_per_caller=3 * BATCH_BYTES, max_bytes=20 * BATCH_BYTES)
    most = 0
    for round_ in range(40):
        for caller in range(50):
            cache.keep(f"caller-{caller}", _images(round_))
            most = max(most, cache.stored_bytes)
            clock.now += 0.001
    assert most <= 20 * BATCH_BYTES
    assert len(cache) == 20
    assert cache.evicted == 40 * 50 - 20
    # What is left is the newest of all: the flood evicted the oldest first.
    newest = cache.keep("student", _images(99))
    assert newest is not None
    assert cache.get("student", newest) == _images(99)


def test_one_callers_bytes_are_bounded_and_a_batch_over_a_bound_is_not_kept() -> None:
    cache = _cache(FakeClock(), max_entries_per_caller=100, max_bytes_per_caller=2 * BATCH_BYTES)
    handles = [cache.keep("student", _images(i)) for i in range(5)]
    assert len(cache) == 2
    assert cache.stored_bytes == 2 * BATCH_BYTES
    with pytest.raises(BatchHandleUnknown):
        cache.get("student", handles[0])  # type: ignore[arg-type]
    small = _cache(FakeClock(), max_bytes_per_caller=BATCH_BYTES - 1)
    assert small.keep("student", _images()) is None
    assert (len(small), small.stored_bytes) == (0, 0)
    assert _cache(FakeClock(), max_entries_per_caller=0).keep("student", _images()) is None


def test_kept_batches_expire_on_the_injected_clock() -> None:
    clock = FakeClock()
    cache = _cache(clock)
    handle = cache.keep("student", _images())
    assert handle is not None
    clock.now += 59.0
    assert cache.get("student", handle) == _images()
    clock.now += 1.0
    with pytest.raises(BatchHandleUnknown):
        cache.get("student", handle)
    assert (len(cache), cache.stored_bytes, cache.evicted) == (0, 0, 1)
