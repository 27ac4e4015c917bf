"""The fair scheduler and the request-id memory, pure, on an injected clock."""

from __future__ import annotations

import math

import pytest

from cdfkd.teacher_node.admission import (
    MAX_RETRY_AFTER_S,
    MIN_RETRY_AFTER_S,
    Admission,
    CallDropped,
    FairQueue,
    Overloaded,
    TicketState,
)
from cdfkd.teacher_node.request_ids import Claim, RecentRequests, RequestIdReused


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _run_all(queue: FairQueue) -> list[str]:
    """Serve every queued call one at a time; the callers in engine order."""
    order: list[str] = []
    while True:
        granted = [t for t in queue.grant() if t.state is TicketState.RUNNING]
        if not granted:
            return order
        for ticket in granted:
            order.append(ticket.caller)
            queue.finish(ticket)


def test_round_robin_across_callers_whatever_their_queue_length() -> None:
    queue = FairQueue(max_in_flight=20, max_in_flight_per_caller=10, slots=1, clock=FakeClock())
    for _ in range(6):
        queue.enter("flood")
    queue.enter("student")
    queue.enter("student")
    queue.enter("third")
    # FIFO would serve the six flood calls first; round-robin interleaves the callers.
    assert _run_all(queue) == [
        "flood",
        "student",
        "third",
        "flood",
        "student",
        "flood",
        "flood",
        "flood",
        "flood",
    ]
    assert queue.in_flight == 0
    assert queue.running == 0


def test_a_caller_arriving_later_is_served_before_the_flood_finishes() -> None:
    queue = FairQueue(max_in_flight=20, max_in_flight_per_caller=10, slots=1, clock=FakeClock())
    tickets = [queue.enter("flood") for _ in range(5)]
    first = queue.grant()
    assert first == [tickets[0]]
    assert tickets[0].state is TicketState.RUNNING
    late = queue.enter("student")
    queue.finish(tickets[0])
    assert queue.grant() == [late]  # next, not behind the four queued flood calls
    queue.finish(late)
    assert queue.grant() == [tickets[1]]
    queue.finish(tickets[1])
    again = queue.enter("student")  # a student calling one at a time is always next
    assert queue.grant() == [again]
    queue.finish(again)
    assert queue.grant() == [tickets[2]]


def test_calls_in_flight_are_bounded_in_total_and_per_caller() -> None:
    clock = FakeClock()
    queue = FairQueue(max_in_flight=3, max_in_flight_per_caller=2, slots=1, clock=clock)
    queue.enter("a")
    queue.enter("a")
    with pytest.raises(Overloaded, match="'a' already has 2 calls in flight") as per_caller:
        queue.enter("a")
    queue.enter("b")
    with pytest.raises(Overloaded, match="busy") as total:
        queue.enter("c")
    for refusal in (per_caller.value, total.value):
        assert MIN_RETRY_AFTER_S <= refusal.retry_after_s <= MAX_RETRY_AFTER_S
    assert queue.in_flight == 3
    assert queue.in_flight_of("a") == 2
    # Finishing frees the slot for the same caller.
    (running,) = queue.grant()
    clock.now += 0.2
    queue.finish(running)
    queue.enter(running.caller)
    assert queue.in_flight == 3


def test_the_retry_hint_follows_the_measured_service_time() -> None:
    clock = FakeClock()
    queue = FairQueue(max_in_flight=4, max_in_flight_per_caller=4, slots=1, clock=clock)
    assert queue.retry_after_s() == MIN_RETRY_AFTER_S  # nothing measured yet
    queue.enter("a")
    (ticket,) = queue.grant()
    clock.now += 0.5
    queue.finish(ticket)
    assert queue.service_time_s == pytest.approx(0.5)
    for _ in range(4):
        queue.enter("a")
    with pytest.raises(Overloaded) as refusal:
        queue.enter("a")
    assert refusal.value.retry_after_s == pytest.approx(2.0)  # 4 calls ahead x 0.5 s
    # A caller that keeps retrying into a full node is told to wait longer each time...
    with pytest.raises(Overloaded) as again:
        queue.enter("a")
    assert again.value.retry_after_s == pytest.approx(4.0)
    with pytest.raises(Overloaded) as capped:
        queue.enter("a")
    assert capped.value.retry_after_s == MAX_RETRY_AFTER_S
    # ...while another caller refused for the first time gets the plain estimate.
    queue.max_in_flight = 4
    with pytest.raises(Overloaded) as other:
        queue.enter("b")
    assert other.value.retry_after_s == pytest.approx(2.0)
    (slow,) = queue.grant()
    clock.now += 1000.0
    queue.finish(slow)
    queue.enter("a")
    assert queue.retry_after_s("a") == MAX_RETRY_AFTER_S  # a hint is never longer than this
    clock.now += 1.0
    for ticket in queue.grant():
        queue.finish(ticket)
    assert queue.service_time_s < 1000.0


def test_a_call_past_its_deadline_is_dropped_when_its_turn_comes() -> None:
    clock = FakeClock()
    queue = FairQueue(max_in_flight=4, max_in_flight_per_caller=4, slots=1, clock=clock)
    running = queue.enter("a")
    queue.grant()
    expiring = queue.enter("b", deadline=clock.now + 1.0)
    waiting = queue.enter("c", deadline=clock.now + 10.0)
    clock.now += 2.0
    queue.finish(running)
    changed = queue.grant()
    assert changed == [expiring, waiting]
    assert expiring.state is TicketState.DROPPED
    assert "deadline" in expiring.reason
    assert waiting.state is TicketState.RUNNING
    assert queue.in_flight == 1  # the dropped call no longer counts


def test_a_cancelled_call_leaves_the_queue_and_a_running_one_cannot_be_cancelled() -> None:
    queue = FairQueue(max_in_flight=4, max_in_flight_per_caller=4, slots=1, clock=FakeClock())
    running = queue.enter("a")
    queue.grant()
    queued = queue.enter("b")
    assert queue.cancel(queued, "client went away")
    assert queued.state is TicketState.DROPPED
    assert not queue.cancel(running, "too late")
    assert running.state is TicketState.RUNNING
    assert queue.in_flight == 1
    queue.finish(running)
    assert queue.grant() == []


def test_admission_drops_a_call_nobody_waits_for_before_it_runs() -> None:
    clock = FakeClock()
    admission = Admission(FairQueue(4, 4, 1, clock))
    first = admission.enter("a", timeout_s=None)
    admission.wait(first, lambda: True)  # granted at once
    second = admission.enter("b", timeout_s=5.0)
    assert second.deadline == clock.now + 5.0
    assert second.state is TicketState.QUEUED
    admission.finish(first)  # hands the engine to the second call...
    with pytest.raises(CallDropped, match="cancelled or past its deadline"):
        admission.wait(second, lambda: False)  # ...whose client has gone: not run
    assert admission.in_flight == 0
    cancelled = admission.enter("c", timeout_s=None)
    blocker = admission.enter("d", timeout_s=None)
    admission.cancel(blocker, "went away")  # queued behind c: dropped at once
    with pytest.raises(CallDropped, match="went away"):
        admission.wait(blocker, lambda: True)
    admission.finish(cancelled)
    assert admission.in_flight == 0
    assert math.isinf(cancelled.deadline)


def test_overloaded_round_trips_through_pickle() -> None:
    import pickle

    error = Overloaded("busy", 0.25)
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.retry_after_s) == ("busy", 0.25)


# --- request ids ---------------------------------------------------------------------------


def test_a_request_id_is_answered_once_and_replayed_after() -> None:
    recent = RecentRequests(ttl_s=60, max_entries_per_caller=8, max_bytes=1000, clock=FakeClock())
    claim, entry = recent.claim("student", "r1", b"digest")
    assert claim is Claim.NEW
    again, pending = recent.claim("student", "r1", b"digest")
    assert again is Claim.PENDING
    assert pending is entry
    assert not entry.done.is_set()
    recent.complete("student", "r1", "reply", 100)
    assert entry.done.is_set()
    claim, entry = recent.claim("student", "r1", b"digest")
    assert claim is Claim.REPLAY
    assert entry.reply == "reply"
    # Ids are per caller: another caller's r1 is a different request.
    assert recent.claim("other", "r1", b"digest")[0] is Claim.NEW


def test_reusing_an_id_for_different_bytes_is_refused() -> None:
    recent = RecentRequests(60, 8, 1000, FakeClock())
    recent.claim("student", "r1", b"first")
    recent.complete("student", "r1", "reply", 10)
    with pytest.raises(RequestIdReused, match="different request"):
        recent.claim("student", "r1", b"second")


def test_a_failed_request_is_forgotten_so_its_retry_is_new() -> None:
    recent = RecentRequests(60, 8, 1000, FakeClock())
    _, entry = recent.claim("student", "r1", b"d")
    recent.forget("student", "r1")
    assert entry.done.is_set()  # a waiting retry wakes up and claims again
    assert recent.claim("student", "r1", b"d")[0] is Claim.NEW


def test_memory_is_bounded_by_time_count_and_bytes() -> None:
    clock = FakeClock()
    recent = RecentRequests(ttl_s=60, max_entries_per_caller=3, max_bytes=250, clock=clock)
    for index in range(5):
        recent.claim("student", f"r{index}", b"d")
        recent.complete("student", f"r{index}", index, 50)
        clock.now += 1
    assert len(recent) == 3  # r0 and r1 forgotten by count
    assert recent.claim("student", "r0", b"d")[0] is Claim.NEW
    recent.complete("student", "r0", "x", 200)  # 150 + 200 > 250: oldest replies evicted
    assert recent.stored_bytes <= 250
    assert recent.claim("student", "r0", b"d")[0] is Claim.REPLAY
    assert recent.claim("student", "r2", b"d")[0] is Claim.NEW  # evicted by bytes
    recent.complete("student", "r2", "big", 10_000)  # larger than the memory: not kept
    assert recent.claim("student", "r2", b"d")[0] is Claim.NEW
    recent.forget("student", "r2")
    clock.now += 61
    assert recent.claim("student", "r4", b"d")[0] is Claim.NEW  # expired
    assert len(recent) == 1
