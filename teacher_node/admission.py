"""Admission and fair scheduling of engine work: bounded, per-caller capped, round-robin.

Two parts, both without grpc imports:

- :class:`FairQueue`, pure: per-caller FIFO queues served round-robin across callers, with
  bounds on calls in flight (queued or running) in total and per caller. Time comes from an
  injected clock; a call whose deadline has passed when its turn comes is dropped, never run.
- :class:`Admission`, the thread-safe wrapper the servicer uses: a handler thread enters
  (or is refused with a retry hint), waits for its turn (woken early if its call is
  cancelled), runs, and finishes.

The next engine turn goes to the waiting caller served least recently (a caller with nothing
in flight counts as never served): round-robin among callers that keep calls queued, and a
caller that arrives while another floods is next, not behind the flood's queued calls. Turns
are per call rather than per image: a flooding caller gets at most one turn in every ``n``
(``n`` callers waiting), whatever its batch size, and its excess calls are refused at the door
before they cost the node a decode.
"""

from __future__ import annotations

import enum
import math
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from cdfkd.teacher_node.errors import LimitExceeded

Clock = Callable[[], float]

#: Bounds of the retry hint sent with an overload refusal, in seconds.
MIN_RETRY_AFTER_S = 0.01
MAX_RETRY_AFTER_S = 5.0
#: A caller refused again and again gets a hint doubled each time (up to the maximum), so a
#: flood of retries thins out instead of costing the node a received message per refusal.
MAX_HINT_DOUBLINGS = 8
#: Weight of the newest service time in the running estimate (exponential moving average).
SERVICE_TIME_SMOOTHING = 0.2


class Overloaded(LimitExceeded):
    """Too many calls in flight, in total or for this caller (RESOURCE_EXHAUSTED, retry later).

    Attributes:
        retry_after_s: Seconds after which a slot is expected to be free.
    """

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple[type, tuple[str, float]]:
        return (type(self), (str(self), self.retry_after_s))


class CallDropped(Exception):  # noqa: N818 - an outcome, not a failure of the node
    """The call was cancelled or its deadline passed before it reached the engine.

    Nothing was computed and nothing was charged.
    """


class TicketState(enum.Enum):
    """Where a call is."""

    QUEUED = "queued"
    RUNNING = "running"
    DROPPED = "dropped"
    DONE = "done"


@dataclass(eq=False)
class Ticket:
    """One call's place in the queue.

    Attributes:
        caller: The caller identity.
        deadline: Clock time after which nobody waits for the answer (``math.inf``: none).
        state: Where the call is.
        reason: Why it was dropped.
        started: Clock time its turn came.
    """

    caller: str
    deadline: float = math.inf
    state: TicketState = TicketState.QUEUED
    reason: str = ""
    started: float = 0.0
    sequence: int = 0
    granted: threading.Event = field(default_factory=threading.Event, repr=False)


class FairQueue:
    """Fair turns across callers into ``slots`` engine slots; pure apart from the clock.

    Args:
        max_in_flight: Calls queued or running, all callers together; beyond it, refused.
        max_in_flight_per_caller: The same for one caller.
        slots: Calls that may run at once (the engine runs one batch at a time: 1).
        clock: Monotonic seconds (injected for tests).
    """

    def __init__(
        self, max_in_flight: int, max_in_flight_per_caller: int, slots: int, clock: Clock
    ) -> None:
        if not 1 <= max_in_flight_per_caller <= max_in_flight or slots < 1:
            raise ValueError("need 1 <= max_in_flight_per_caller <= max_in_flight, slots >= 1")
        self.max_in_flight = max_in_flight
        self.max_in_flight_per_caller = max_in_flight_per_caller
        self.slots = slots
        self.clock = clock
        self.service_time_s = 0.0
        self._queues: dict[str, deque[Ticket]] = {}  # callers with waiting calls
        self._served: dict[str, int] = {}  # the turn each caller with calls in flight last got
        self._turns = 0
        self._sequence = 0
        self._in_flight: dict[str, int] = {}
        self._refusals: dict[str, int] = {}  # consecutive refusals of each caller
        self._running = 0

    @property
    def in_flight(self) -> int:
        """Calls queued or running."""
        return sum(self._in_flight.values())

    @property
    def running(self) -> int:
        """Calls holding an engine slot."""
        return self._running

    def in_flight_of(self, caller: str) -> int:
        """Calls of ``caller`` queued or running."""
        return self._in_flight.get(caller, 0)

    def retry_after_s(self, caller: str = "") -> float:
        """A hint for a refused caller.

        The time to serve what is in flight, one slot each, doubled for every refusal of
        ``caller`` since it was last admitted; within [MIN_RETRY_AFTER_S, MAX_RETRY_AFTER_S].
        """
        estimate = self.service_time_s * max(1, self.in_flight) / self.slots
        estimate *= 2 ** min(self._refusals.get(caller, 0), MAX_HINT_DOUBLINGS)
        return min(MAX_RETRY_AFTER_S, max(MIN_RETRY_AFTER_S, estimate))

    def enter(self, caller: str, deadline: float = math.inf) -> Ticket:
        """Queue a call of ``caller``, or raise :class:`Overloaded` (nothing queued then)."""
        mine = self.in_flight_of(caller)
        if mine >= self.max_in_flight_per_caller:
            raise self._refuse(
                caller,
                f"caller {caller!r} already has {mine} calls in flight (the node allows "
                f"{self.max_in_flight_per_caller}): retry after the hint",
            )
        if self.in_flight >= self.max_in_flight:
            raise self._refuse(
                caller,
                f"the node is busy ({self.in_flight} calls in flight): retry after the hint",
            )
        self._refusals.pop(caller, None)
        self._sequence += 1
        ticket = Ticket(caller, deadline, sequence=self._sequence)
        self._in_flight[caller] = mine + 1
        self._queues.setdefault(caller, deque()).append(ticket)
        return ticket

    def _refuse(self, caller: str, message: str) -> Overloaded:
        error = Overloaded(message, self.retry_after_s(caller))
        self._refusals[caller] = min(self._refusals.get(caller, 0) + 1, MAX_HINT_DOUBLINGS)
        return error

    def grant(self) -> list[Ticket]:
        """Give free slots to the next calls, round-robin; drops calls past their deadline.

        Returns:
            Every ticket whose state changed (granted ``RUNNING`` or ``DROPPED``): the caller
            wakes their threads.
        """
        changed = []
        now = self.clock()
        while self._running < self.slots and self._queues:
            caller = min(
                self._queues,
                key=lambda c: (self._served.get(c, -1), self._queues[c][0].sequence),
            )
            queue = self._queues[caller]
            ticket = queue.popleft()
            if not queue:
                del self._queues[caller]
            self._turns += 1
            self._served[caller] = self._turns
            if ticket.deadline <= now:
                self._drop(ticket, "the deadline passed while queued")
            else:
                ticket.state = TicketState.RUNNING
                ticket.started = now
                self._running += 1
            changed.append(ticket)
        return changed

    def cancel(self, ticket: Ticket, reason: str) -> bool:
        """Drop a queued call (its client went away); False if it is no longer queued."""
        if ticket.state is not TicketState.QUEUED:
            return False
        queue = self._queues[ticket.caller]
        queue.remove(ticket)
        if not queue:
            del self._queues[ticket.caller]
        self._drop(ticket, reason)
        return True

    def finish(self, ticket: Ticket) -> None:
        """A running call is done: free its slot and update the service-time estimate."""
        if ticket.state is not TicketState.RUNNING:
            raise ValueError(f"finish of a {ticket.state.value} ticket")
        ticket.state = TicketState.DONE
        self._running -= 1
        self._leave(ticket.caller)
        elapsed = max(0.0, self.clock() - ticket.started)
        if self.service_time_s == 0.0:
            self.service_time_s = elapsed
        else:
            self.service_time_s += SERVICE_TIME_SMOOTHING * (elapsed - self.service_time_s)

    def _drop(self, ticket: Ticket, reason: str) -> None:
        ticket.state = TicketState.DROPPED
        ticket.reason = reason
        self._leave(ticket.caller)

    def _leave(self, caller: str) -> None:
        self._in_flight[caller] -= 1
        if not self._in_flight[caller]:
            del self._in_flight[caller]
            self._served.pop(caller, None)  # nothing in flight: first in line next time


class Admission:
    """:class:`FairQueue` for handler threads: enter, wait for the turn, run, finish.

    Args:
        queue: The scheduling state; only used under this object's lock.
    """

    def __init__(self, queue: FairQueue) -> None:
        self.queue = queue
        self._lock = threading.Lock()

    @property
    def in_flight(self) -> int:
        """Calls queued or running."""
        with self._lock:
            return self.queue.in_flight

    def enter(self, caller: str, timeout_s: float | None) -> Ticket:
        """Queue a call with ``timeout_s`` left (None: no deadline); :class:`Overloaded` if full."""
        with self._lock:
            deadline = math.inf if timeout_s is None else self.queue.clock() + timeout_s
            ticket = self.queue.enter(caller, deadline)
            self._wake(self.queue.grant())
        return ticket

    def cancel(self, ticket: Ticket, reason: str) -> None:
        """The call's client went away: drop it if it is still queued, and wake its thread."""
        with self._lock:
            if self.queue.cancel(ticket, reason):
                ticket.granted.set()

    def wait(self, ticket: Ticket, still_wanted: Callable[[], bool], poll_s: float = 1.0) -> None:
        """Block until the call's turn; :class:`CallDropped` if it was dropped meanwhile.

        Args:
            ticket: From :meth:`enter`.
            still_wanted: Whether the client still waits (checked at every wake-up and once
                the turn has come, so an answer nobody waits for is never computed).
            poll_s: Wall-clock seconds between checks when no event wakes the thread.
        """
        while not ticket.granted.wait(poll_s):
            if not still_wanted():
                self.cancel(ticket, "cancelled while queued")
        if ticket.state is TicketState.DROPPED:
            raise CallDropped(ticket.reason)
        if not still_wanted():
            self.finish(ticket)
            raise CallDropped("cancelled or past its deadline when its turn came")

    def finish(self, ticket: Ticket) -> None:
        """Free the call's slot, or its place in the queue, and give it to the next call."""
        with self._lock:
            if ticket.state is TicketState.RUNNING:
                self.queue.finish(ticket)
            elif ticket.state is TicketState.QUEUED:
                self.queue.cancel(ticket, "abandoned before its turn")
            self._wake(self.queue.grant())

    @staticmethod
    def _wake(tickets: list[Ticket]) -> None:
        for ticket in tickets:
            ticket.granted.set()
