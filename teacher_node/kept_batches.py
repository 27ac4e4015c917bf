"""Generator batches kept between a Query and its InputGrad, so the images cross the wire once.

A Query with ``keep_for_grad`` leaves its images here (the Tensor message as received, so the
InputGrad decodes exactly what it would have decoded from the images sent again) under a
random handle of :data:`~cdfkd.protos.contract.BATCH_HANDLE_BYTES` bytes from ``secrets``. A
handle is bound to the caller that kept it: a lookup by another caller finds nothing, exactly
as for a handle never issued, so a handle reveals nothing and is worth nothing to anyone else.

Memory is bounded whatever the callers do: a batch lives ``ttl_s`` seconds, a caller keeps at
most ``max_entries_per_caller`` batches and ``max_bytes_per_caller`` bytes (its oldest evicted
first, so one caller cannot evict another's), and all callers together at most ``max_bytes``
(the oldest batch of any caller evicted first). A batch larger than a bound is not kept. A
batch is released once its InputGrad is answered. An evicted or expired handle only costs its
caller the images sent again.
"""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from cdfkd.protos import teacher_pb2
from cdfkd.protos.contract import BATCH_HANDLE_BYTES
from cdfkd.teacher_node.errors import TeacherError

Clock = Callable[[], float]

#: Bytes a kept batch is charged beyond its pixel data (the message and the bookkeeping).
ENTRY_OVERHEAD_BYTES = 256


class BatchHandleUnknown(TeacherError):
    """An InputGrad names a batch this node does not hold for this caller (NOT_FOUND)."""


@dataclass(frozen=True)
class KeptBatch:
    """One kept batch: the images as received, when it was kept, what it costs in memory."""

    images: teacher_pb2.Tensor
    created: float
    size: int


class KeptBatches:
    """Per-caller kept batches (thread-safe).

    Args:
        ttl_s: Seconds a batch is kept.
        max_entries_per_caller: Batches kept per caller; 0 keeps none.
        max_bytes_per_caller: Bytes of batches kept per caller.
        max_bytes: Bytes of batches kept for all callers together.
        clock: Monotonic seconds (injected for tests).
    """

    def __init__(
        self,
        ttl_s: float,
        max_entries_per_caller: int,
        max_bytes_per_caller: int,
        max_bytes: int,
        clock: Clock,
    ) -> None:
        self.ttl_s = ttl_s
        self.max_entries_per_caller = max_entries_per_caller
        self.max_bytes_per_caller = max_bytes_per_caller
        self.max_bytes = max_bytes
        self.clock = clock
        self.stored_bytes = 0
        #: Batches evicted (for entries or bytes) or expired before their InputGrad.
        self.evicted = 0
        self._callers: dict[str, OrderedDict[bytes, KeptBatch]] = {}
        self._caller_bytes: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        """Whether any batch can be kept at all."""
        return self.max_entries_per_caller > 0 and self.ttl_s > 0

    def keep(self, caller: str, images: teacher_pb2.Tensor) -> bytes | None:
        """Keep a copy of ``images`` for ``caller``; its handle, or None if it is not kept."""
        size = len(images.data) + ENTRY_OVERHEAD_BYTES
        if not self.enabled or size > min(self.max_bytes_per_caller, self.max_bytes):
            return None
        kept = teacher_pb2.Tensor()
        kept.CopyFrom(images)
        handle = secrets.token_bytes(BATCH_HANDLE_BYTES)
        with self._lock:
            self._expire()
            entries = self._callers.setdefault(caller, OrderedDict())
            entries[handle] = KeptBatch(kept, self.clock(), size)
            self._caller_bytes[caller] = self._caller_bytes.get(caller, 0) + size
            self.stored_bytes += size
            while (
                len(entries) > self.max_entries_per_caller
                or self._caller_bytes[caller] > self.max_bytes_per_caller
            ):
                self._drop(caller, next(iter(entries)))
                self.evicted += 1
            while self.stored_bytes > self.max_bytes:
                self._evict_oldest()
        return handle

    def get(self, caller: str, handle: bytes) -> teacher_pb2.Tensor:
        """The images ``caller`` kept under ``handle``.

        Raises:
            BatchHandleUnknown: no such batch for this caller (never issued, another caller's,
                expired, evicted or already used).
        """
        with self._lock:
            self._expire()
            entry = self._callers.get(caller, OrderedDict()).get(handle)
        if entry is None:
            raise BatchHandleUnknown(
                "this node does not hold the batch of that batch_handle for this caller (it "
                "expired, was evicted or was already used): send the images instead"
            )
        return entry.images

    def release(self, caller: str, handle: bytes) -> None:
        """Forget a batch whose InputGrad was answered (no-op if it is gone already)."""
        with self._lock:
            if handle in self._callers.get(caller, OrderedDict()):
                self._drop(caller, handle)

    def __len__(self) -> int:
        with self._lock:
            return sum(len(entries) for entries in self._callers.values())

    def _drop(self, caller: str, handle: bytes) -> None:
        entries = self._callers[caller]
        entry = entries.pop(handle)
        self.stored_bytes -= entry.size
        self._caller_bytes[caller] -= entry.size
        if not entries:
            del self._callers[caller]
            del self._caller_bytes[caller]

    def _evict_oldest(self) -> None:
        oldest: tuple[float, str, bytes] | None = None
        for caller, entries in self._callers.items():
            handle, entry = next(iter(entries.items()))  # each caller's entries are in order
            if oldest is None or entry.created < oldest[0]:
                oldest = (entry.created, caller, handle)
        assert oldest is not None, "stored bytes without entries"
        self._drop(oldest[1], oldest[2])
        self.evicted += 1

    def _expire(self) -> None:
        horizon = self.clock() - self.ttl_s
        for caller in list(self._callers):
            entries = self._callers[caller]
            while entries:
                handle, oldest = next(iter(entries.items()))
                if oldest.created > horizon:
                    break
                self._drop(caller, handle)
                self.evicted += 1
                if caller not in self._callers:
                    break
