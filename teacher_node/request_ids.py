"""Recent request ids per caller, so that a retried call is answered once and charged once.

The client sends a request id in the call's metadata and reuses it for every retry of that
call. The node keeps, per caller, the digest of each recent request and its reply: a retry
with the same id and the same bytes gets the stored reply (nothing computed, nothing
charged); a retry that arrives while the first attempt still runs waits for it. The same id
with *different* bytes is refused, so an id cannot be reused to get free answers, and a
stored reply is returned unchanged, so repeating a request cannot average away output noise.

Memory is bounded: entries live ``ttl_s`` seconds, at most ``max_entries_per_caller`` per
caller, and stored replies take at most ``max_bytes`` in total (oldest evicted first). A retry
of an evicted request is a new request: computed and charged again.
"""

from __future__ import annotations

import enum
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from cdfkd.teacher_node.errors import InvalidInput

Clock = Callable[[], float]

#: Longest request id accepted (the client sends 32 hex digits).
MAX_REQUEST_ID_LENGTH = 64


class RequestIdReused(InvalidInput):
    """A request id came back with a different request (INVALID_ARGUMENT)."""


class Claim(enum.Enum):
    """What to do with a request."""

    NEW = "new"  # compute it, then complete() or forget()
    REPLAY = "replay"  # answer with the stored reply
    PENDING = "pending"  # the first attempt still runs: wait for entry.done, then claim again


@dataclass(eq=False)
class Entry:
    """One remembered request."""

    digest: bytes
    created: float
    reply: object | None = None
    size: int = 0
    done: threading.Event = field(default_factory=threading.Event, repr=False)


def valid_request_id(request_id: str) -> bool:
    """Whether ``request_id`` is a usable id: 1-64 printable ASCII characters."""
    return (
        0 < len(request_id) <= MAX_REQUEST_ID_LENGTH
        and request_id.isascii()
        and (request_id.isprintable())
    )


class RecentRequests:
    """Per-caller memory of recent request ids (thread-safe).

    Args:
        ttl_s: Seconds a request id is remembered.
        max_entries_per_caller: Ids remembered per caller (oldest forgotten first).
        max_bytes: Total size of stored replies (oldest evicted first).
        clock: Monotonic seconds (injected for tests).
    """

    def __init__(
        self, ttl_s: float, max_entries_per_caller: int, max_bytes: int, clock: Clock
    ) -> None:
        self.ttl_s = ttl_s
        self.max_entries_per_caller = max_entries_per_caller
        self.max_bytes = max_bytes
        self.clock = clock
        self.stored_bytes = 0
        self._callers: dict[str, OrderedDict[str, Entry]] = {}
        self._lock = threading.Lock()

    def claim(self, caller: str, request_id: str, digest: bytes) -> tuple[Claim, Entry]:
        """Register or look up ``request_id`` of ``caller`` for a request with ``digest``.

        Raises:
            RequestIdReused: the id is remembered with another request's digest.
        """
        with self._lock:
            self._expire()
            entries = self._callers.setdefault(caller, OrderedDict())
            entry = entries.get(request_id)
            if entry is not None:
                if entry.digest != digest:
                    raise RequestIdReused(
                        f"request id {request_id!r} was already used for a different request: "
                        "send a new id for every new request"
                    )
                return (Claim.REPLAY if entry.done.is_set() else Claim.PENDING), entry
            entry = Entry(digest, self.clock())
            entries[request_id] = entry
            while len(entries) > self.max_entries_per_caller:
                _, oldest = entries.popitem(last=False)
                self._release(oldest)
            return Claim.NEW, entry

    def complete(self, caller: str, request_id: str, reply: object, size: int) -> None:
        """Store the reply of a NEW request and wake retries waiting for it."""
        with self._lock:
            entry = self._callers.get(caller, OrderedDict()).get(request_id)
            if entry is None:
                return
            if size > self.max_bytes:
                del self._callers[caller][request_id]
            else:
                entry.reply, entry.size = reply, size
                self.stored_bytes += size
                self._evict_bytes()
            entry.done.set()

    def forget(self, caller: str, request_id: str) -> None:
        """A NEW request failed or was dropped: forget it, so a retry is a new request."""
        with self._lock:
            entry = self._callers.get(caller, OrderedDict()).pop(request_id, None)
            if entry is not None:
                self._release(entry)
                entry.done.set()

    def __len__(self) -> int:
        with self._lock:
            return sum(len(entries) for entries in self._callers.values())

    def _expire(self) -> None:
        horizon = self.clock() - self.ttl_s
        for caller in list(self._callers):
            entries = self._callers[caller]
            while entries:
                request_id, oldest = next(iter(entries.items()))
                if oldest.created > horizon or not oldest.done.is_set():
                    break
                del entries[request_id]
                self._release(oldest)
            if not entries:
                del self._callers[caller]

    def _evict_bytes(self) -> None:
        while self.stored_bytes > self.max_bytes:
            oldest: tuple[float, str, str] | None = None
            for caller, entries in self._callers.items():
                # Entries are in creation order: the caller's first stored reply is its oldest.
                stored = next(((i, e) for i, e in entries.items() if e.size), None)
                if stored is not None and (oldest is None or stored[1].created < oldest[0]):
                    oldest = (stored[1].created, caller, stored[0])
            if oldest is None:
                return
            self._release(self._callers[oldest[1]].pop(oldest[2]))

    def _release(self, entry: Entry) -> None:
        self.stored_bytes -= entry.size
        entry.size = 0
        entry.reply = None
