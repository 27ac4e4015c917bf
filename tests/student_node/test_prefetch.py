"""Pipelining (``TrainConfig.prefetch``): the serial result, its errors, nothing left running.

Real in-process teachers; the wrappers below only record calls or inject a refusal (the
refusal is the real error class a node's RESOURCE_EXHAUSTED becomes, raised here because an
in-process teacher has no budget).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from cdfkd.student_node.checkpoint import (
    config_fingerprint,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from cdfkd.student_node.config import Method
from cdfkd.student_node.errors import NonFiniteLossError, TeacherBudgetExhausted
from cdfkd.student_node.teachers.protocol import TeacherInfo, TeacherOutputs
from cdfkd.student_node.trainer import TrainState, init_state, train
from tests.student_node.test_checkpoint import _all_tensors
from tests.student_node.test_replay import _memory_tensors
from tests.student_node.test_trainer import PoisonedTeacher, small_config

K = 2  # small_config's student steps per generator step


def _lane_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("teacher-lane")]


class CallLog:
    """Every query of a set of teachers, in the order they began (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started: list[tuple[int, int]] = []  # (teacher, its call number), in start order
        self.running = 0


class LoggedTeacher:
    """A real teacher whose queries are logged; its ``fail_at``-th query raises a refusal.

    ``hold_at``: that query waits (at most 30 s) until ``release`` is set before answering.
    """

    def __init__(
        self,
        inner: Any,
        index: int,
        log: CallLog,
        fail_at: int | None = None,
        hold_at: int | None = None,
        release: threading.Event | None = None,
    ) -> None:
        self.inner, self.index, self.log = inner, index, log
        self.fail_at, self.hold_at = fail_at, hold_at
        self.release = release or threading.Event()
        self.queries: list[torch.Tensor] = []

    def info(self) -> TeacherInfo:
        return self.inner.info()

    def query(self, images: torch.Tensor, **wanted: bool) -> TeacherOutputs:
        with self.log.lock:
            self.queries.append(images.detach().clone())
            number = len(self.queries)
            self.log.started.append((self.index, number))
            self.log.running += 1
        try:
            if number == self.hold_at:
                assert self.release.wait(30), "the teacher that fails was never asked"
            if number == self.fail_at:
                self.release.set()
                raise TeacherBudgetExhausted(
                    "budget exhausted", "in-process", "RESOURCE_EXHAUSTED", "budget_images"
                )
            return self.inner.query(images, **wanted)
        finally:
            with self.log.lock:
                self.log.running -= 1

    def input_grad(self, images, grad_logits, bn_weight):
        return self.inner.input_grad(images, grad_logits, bn_weight)


def _run(digits_teachers, config, real=None, **teacher_options: dict) -> tuple[TrainState, list]:
    log = CallLog()
    teachers = [
        LoggedTeacher(t, i, log, **teacher_options.get(str(i), {}))
        for i, t in enumerate(digits_teachers.load())
    ]
    state = init_state(config, [t.info() for t in teachers], torch.device("cpu"))
    train(state, teachers, config, real_images=real)
    return state, teachers


def _assert_same(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> None:
    assert expected.keys() == found.keys()
    different = [k for k in expected if not torch.equal(expected[k], found[k])]
    assert not different


@pytest.mark.parametrize(
    ("method", "extra", "depth"),
    [
        (Method.CDFKD_MFS, {}, 2),
        (Method.CDFKD_MFS, {}, 16),  # deeper than an iteration: all K + 1 batches at once
        (Method.DFAD, {}, 1),
        (Method.KD_REAL, {}, 2),
        (Method.CDFKD_MFS, {"replay": {"size": 64, "new_batches": 2}}, 2),
        (Method.CDFKD, {"replay": {"size": 64, "new_batches": 2, "sampling": "newest"}}, 1),
        (
            Method.CDFKD_MFS,
            {"replay": {"size": 64, "new_batches": 0, "keep_generator_batch": True}},
            2,
        ),
        # IDEAL's generator step asks no teacher: nothing of it may be asked ahead either.
        (Method.CDFKD_MFS, {"generator_objective": "ideal"}, 2),
        (Method.CDFKD_MFS, {"generator_objective": "ideal", "replay": {"size": 64}}, 2),
    ],
    ids=[
        "paper-2",
        "paper-16",
        "dfad-1",
        "kd_real-2",
        "replay-2",
        "replay-newest-1",
        "replay-generator-batch-2",
        "ideal-2",
        "ideal-replay-2",
    ],
)
def test_prefetch_gives_the_serial_loop_bit_for_bit(
    digits_teachers, method: Method, extra: dict, depth: int
) -> None:
    """Same state (student, generator with its BN statistics, optimizers, RNG, memory), same
    batches asked of each teacher in the same order."""
    drawn = torch.randn(64, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    real = drawn if method is Method.KD_REAL else None
    serial, serial_teachers = _run(digits_teachers, small_config(method, **extra), real)
    piped, piped_teachers = _run(
        digits_teachers, small_config(method, prefetch=depth, **extra), real
    )
    _assert_same(_all_tensors(serial), _all_tensors(piped))
    if serial.replay is not None:
        _assert_same(_memory_tensors(serial), _memory_tensors(piped))
    for near, far in zip(serial_teachers, piped_teachers, strict=True):
        assert len(near.queries) == len(far.queries) > 0
        assert all(torch.equal(a, b) for a, b in zip(near.queries, far.queries, strict=True))
    assert not _lane_threads()  # train() ended its lanes


def test_resume_with_prefetch_is_exact(digits_teachers, tmp_path: Path) -> None:
    """A serial run's checkpoint resumed with prefetch (the fingerprint leaves it out) ends
    where an uninterrupted serial run does."""
    teachers = digits_teachers.load()
    infos = [t.info() for t in teachers]
    config = small_config(epochs=3, replay={"size": 48, "new_batches": 1})
    piped_config = config.model_copy(update={"prefetch": 2})
    assert config_fingerprint(config) == config_fingerprint(piped_config)
    fingerprint = config_fingerprint(config)

    straight = init_state(config, infos, torch.device("cpu"))
    train(straight, teachers, config)

    first = init_state(piped_config, infos, torch.device("cpu"))
    train(first, teachers, piped_config, should_stop=lambda: first.iteration >= 3)
    save_checkpoint(tmp_path, first, fingerprint)
    resumed = init_state(piped_config.model_copy(update={"seed": 99}), infos, torch.device("cpu"))
    load_checkpoint(latest_checkpoint(tmp_path), resumed, fingerprint)
    train(resumed, teachers, piped_config)
    _assert_same(_all_tensors(straight), _all_tensors(resumed))
    _assert_same(_memory_tensors(straight), _memory_tensors(resumed))


def test_a_refused_prefetched_query_surfaces_where_the_serial_loop_raises_it(
    digits_teachers,
) -> None:
    """Teacher 1 refuses its 5th query (iteration 2, student batch 2): the serial loop's error,
    after the same student steps; no query of a later batch starts after the refusal, and
    none is left running.

    Teacher 2 holds its answer to that batch until teacher 1 refuses, so its next query (the
    generator step's, already submitted with depth 2) would start after the refusal, and must
    not. (The refusing thread holds the GIL from setting the event to recording the refusal,
    microseconds against the held teacher's forward pass.)
    """
    student_at_error = {}
    for depth in (0, 2):
        log = CallLog()
        release = threading.Event()
        options: dict[str, dict] = {"1": {"fail_at": 5, "release": release}}
        if depth:
            options["2"] = {"hold_at": 5, "release": release}
        teachers = [
            LoggedTeacher(t, i, log, **options.get(str(i), {}))
            for i, t in enumerate(digits_teachers.load())
        ]
        config = small_config(prefetch=depth)
        state = init_state(config, [t.info() for t in teachers], torch.device("cpu"))
        with pytest.raises(TeacherBudgetExhausted, match="budget exhausted") as refused:
            train(state, teachers, config)
        assert refused.value.budget == "budget_images"
        assert state.iteration == 1  # the first iteration completed, the second did not
        student_at_error[depth] = {k: v.clone() for k, v in state.student.state_dict().items()}
        assert log.running == 0  # nothing still asked once the error is raised
        assert not _lane_threads()
        calls = [len(t.queries) for t in teachers]
        if depth == 0:
            # In order, one teacher after the other: teacher 2 is never asked about batch 2.
            assert calls == [5, 5, 4]
            continue
        # All three batches of the iteration were submitted when it began (depth 2); teacher
        # 2 answered the refused batch (the serial loop's fan-out asks every teacher about
        # it), and its generator query, next in its lane, never began.
        assert release.is_set()
        assert (2, 5) in log.started
        assert calls[1:] == [5, 5]
        # Teacher 0 ran free: its generator query may have begun before the refusal.
        assert calls[0] in (5, 6)
    # The student steps applied before the error are the serial loop's.
    _assert_same(student_at_error[0], student_at_error[2])


def test_a_non_finite_answer_stops_a_prefetching_run_as_a_serial_one(digits_teachers) -> None:
    states = {}
    for depth in (0, 3):
        teachers = digits_teachers.load()
        teachers[1] = PoisonedTeacher(teachers[1], poison_after=3)
        config = small_config(prefetch=depth)
        state = init_state(config, [t.info() for t in teachers], torch.device("cpu"))
        with pytest.raises(NonFiniteLossError, match="student loss is not finite at iteration 1"):
            train(state, teachers, config)
        assert state.iteration == 1
        states[depth] = {k: v.clone() for k, v in state.student.state_dict().items()}
        assert not _lane_threads()
    _assert_same(states[0], states[3])


def test_prefetch_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="less than or equal to 16"):
        small_config(prefetch=17)
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        small_config(prefetch=-1)
    assert small_config().prefetch == 0  # the serial loop unless asked


def test_a_run_config_sets_prefetch(digits_teachers, tmp_path: Path) -> None:
    from cdfkd.coordinator.config import load_run_config
    from tests.helpers import packages, small_run, write_toml

    path = write_toml(
        tmp_path / "run.toml", small_run(packages(digits_teachers.packages), {"prefetch": 4})
    )
    assert load_run_config(path).train.prefetch == 4
