"""Teacher queries asked ahead while the student computes (``TrainConfig.prefetch``).

Within one iteration the generator does not change until its own step, so the batches of the
K student steps, and the generator step's batch (whose Query does not depend on the student;
only its InputGrad cotangent does), can be made in the serial loop's order and their Query
calls sent ahead while the student trains on an earlier batch: the round trips overlap with
compute. :class:`Lookahead` drives that for one iteration; :class:`TeacherLanes` gives every
teacher one worker thread, so each teacher still gets its calls one at a time and in the
serial loop's order (its budget is charged in the same order), while different teachers are
asked concurrently.

Errors: an answer's error is raised when the loop reaches that batch, after the student steps
on the batches before it, exactly where the serial loop raises it. Once any query has failed,
no query of a later batch starts, on any teacher; the loop's own errors (a non-finite loss)
stop them in the same way. Queries of later batches already under way when the error happened
(at most ``depth`` batches per teacher) are waited for, their answers dropped: they are
requests the serial loop would not have made, and the owners count them. Nothing is left
running when a lookahead closes.

No grpc, ray or flwr here (the teachers are the Teacher protocol).
"""

from __future__ import annotations

import collections
import functools
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from types import TracebackType
from typing import Generic, TypeVar

from cdfkd.student_node.teachers.protocol import Teacher, TeacherOutputs

T = TypeVar("T")
P = TypeVar("P")

#: What to ask a teacher about one batch.
Ask = Callable[[Teacher], TeacherOutputs]


class TeacherLanes:
    """One worker thread per teacher: a teacher's calls run one at a time, in the order given.

    Args:
        count: Number of teachers.
    """

    def __init__(self, count: int) -> None:
        if count < 1:
            raise ValueError("lanes need at least one teacher")
        self._lanes = [
            ThreadPoolExecutor(1, thread_name_prefix=f"teacher-lane-{index}")
            for index in range(count)
        ]

    def __len__(self) -> int:
        return len(self._lanes)

    def submit(self, lane: int, function: Callable[[], T]) -> Future[T]:
        """Run ``function`` on lane ``lane`` after everything submitted there before."""
        return self._lanes[lane].submit(function)

    def close(self) -> None:
        """Cancel what has not started, wait for what has, end the threads."""
        for lane in self._lanes:
            lane.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> TeacherLanes:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class _Skipped(Exception):
    """A query not started because one of an earlier (or the same) batch failed."""


@dataclass
class _Item(Generic[P]):
    payload: P | None
    answers: list[Future[TeacherOutputs]]
    error: Exception | None = None


class Lookahead(Generic[P]):
    """Items ``0 .. count - 1`` made in order, their answers asked up to ``depth`` items ahead.

    ``produce(index)`` makes an item on the calling thread, strictly in index order (the
    generator's forwards, BatchNorm statistics and the RNG advance as in the serial loop), and
    returns its payload and what to ask every teacher about it. :meth:`take` returns the items
    in order with every teacher's answers; while the caller works on item ``i``, the answers
    for items ``i + 1 .. i + depth`` are being fetched. An error of ``produce`` (a non-finite
    batch) is raised by :meth:`take` of its item, and no later item is made.

    Use it as a context manager: leaving it stops and waits for whatever is still asked.
    """

    def __init__(
        self,
        lanes: TeacherLanes,
        teachers: Sequence[Teacher],
        produce: Callable[[int], tuple[P, Ask]],
        count: int,
        depth: int,
    ) -> None:
        if len(lanes) != len(teachers):
            raise ValueError(f"{len(lanes)} lanes for {len(teachers)} teachers")
        if depth < 0:
            raise ValueError("depth must be >= 0")
        self._lanes = lanes
        self._teachers = list(teachers)
        self._produce = produce
        self._count = count
        self._depth = depth
        self._pending: collections.deque[_Item[P]] = collections.deque()
        self._made = 0  # items produced (and asked) so far
        self._taken = 0  # items handed out by take()
        self._lock = threading.Lock()
        self._stop = count  # no query of an item after this index starts (lowered on errors)

    def _ask(self, index: int, ask: Ask, teacher: Teacher) -> TeacherOutputs:
        with self._lock:
            if index > self._stop:
                raise _Skipped(index)
        try:
            return ask(teacher)
        except BaseException:
            with self._lock:
                self._stop = min(self._stop, index)
            raise

    def _fill(self, last: int) -> None:
        """Make and ask items up to index ``last`` (inclusive)."""
        while self._made <= min(last, self._count - 1):
            index = self._made
            self._made += 1
            try:
                payload, ask = self._produce(index)
            except Exception as error:  # raised by take(index), where the serial loop raises it
                self._pending.append(_Item(None, [], error))
                self._count = index + 1  # nothing after a failed item is made
                return
            futures = [
                self._lanes.submit(lane, functools.partial(self._ask, index, ask, teacher))
                for lane, teacher in enumerate(self._teachers)
            ]
            self._pending.append(_Item(payload, futures))

    def prime(self) -> None:
        """Make and ask the first ``max(depth, 1)`` items now, before the first :meth:`take`."""
        self._fill(max(self._depth, 1) - 1)

    def take(self) -> tuple[P, list[TeacherOutputs]]:
        """The next item and every teacher's answers to it (in teacher order).

        Raises:
            Exception: the item's own error, or the first error among its answers in teacher
                order (as ``Executor.map`` over the teachers raises it).
        """
        index = self._taken
        if index >= self._count:
            raise IndexError(f"all {self._count} items have been taken")
        self._fill(index + self._depth)
        item = self._pending.popleft()
        self._taken += 1
        if item.error is not None:
            raise item.error
        wait(item.answers)
        errors = [future.exception() for future in item.answers]
        for error in errors:
            if error is not None and not isinstance(error, _Skipped):
                raise error
        if any(errors):  # cannot happen: a skip follows an error of this or an earlier item
            raise RuntimeError(f"a query of item {index} was skipped without an error")
        assert item.payload is not None
        return item.payload, [future.result() for future in item.answers]

    def close(self) -> None:
        """Start no further query, cancel what has not started, wait for what has."""
        with self._lock:
            self._stop = -1
        futures = [future for item in self._pending for future in item.answers]
        for future in futures:
            future.cancel()
        wait(futures)
        self._pending.clear()

    def __enter__(self) -> Lookahead[P]:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
