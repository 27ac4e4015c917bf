"""The loop: a few iterations per method, non-finite detection, error pickling."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from cdfkd.student_node.checkpoint import config_fingerprint, load_checkpoint, save_checkpoint
from cdfkd.student_node.config import GeneratorConfig, Method, StudentConfig, TrainConfig
from cdfkd.student_node.errors import IncompatibleTeachers, NonFiniteLossError
from cdfkd.student_node.teachers.protocol import TeacherInfo, TeacherOutputs
from cdfkd.student_node.trainer import (
    build_student,
    check_teachers,
    init_state,
    run_iteration,
    train,
)


def small_config(method: Method = Method.CDFKD_MFS, **kwargs) -> TrainConfig:
    settings = {
        "method": method,
        "batch_size": 16,
        "epochs": 2,
        "iterations_per_epoch": 2,
        "student_steps_per_generator_step": 2,
        "student": StudentConfig(widths=(8, 16, 16)),
        "generator": GeneratorConfig(latent_dim=32, width=8),
    }
    return TrainConfig.model_validate({**settings, **kwargs})


@pytest.mark.parametrize("method", list(Method))
def test_each_method_runs_and_changes_the_student(digits_teachers, method: Method) -> None:
    teachers = digits_teachers.load()
    config = small_config(method)
    state = init_state(config, [t.info() for t in teachers], torch.device("cpu"))
    before = [p.clone() for p in state.student.parameters()]
    generator_before = [p.clone() for p in state.generator.parameters()]
    seen = []
    real = torch.randn(64, 1, 16, 16) if method is Method.KD_REAL else None
    train(state, teachers, config, real_images=real, callbacks=[lambda s, m: seen.append(m)])
    assert [m.iteration for m in seen] == [1, 2, 3, 4]
    assert [m.epoch for m in seen] == [0, 1, 1, 2]
    assert all(torch.isfinite(torch.tensor(m.student_loss)) for m in seen)
    assert any(
        not torch.equal(a, b) for a, b in zip(before, state.student.parameters(), strict=True)
    )
    generator_moved = any(
        not torch.equal(a, b)
        for a, b in zip(generator_before, state.generator.parameters(), strict=True)
    )
    assert generator_moved is (method is not Method.KD_REAL)
    if method is Method.CDFKD_MFS:
        assert seen[-1].feature_loss > 0
        assert seen[-1].bn_loss > 0


def test_learning_rate_follows_the_milestones(digits_teachers) -> None:
    teachers = digits_teachers.load()
    config = small_config(optimizer={"milestones": (1,), "student_lr": 0.1, "generator_lr": 0.01})
    state = init_state(config, [t.info() for t in teachers], torch.device("cpu"))
    lrs = []
    train(state, teachers, config, callbacks=[lambda s, m: lrs.append(m.student_lr)])
    assert lrs == pytest.approx([0.1, 0.01, 0.01, 0.01])


def test_should_stop_ends_training_early(digits_teachers) -> None:
    teachers = digits_teachers.load()
    config = small_config()
    state = init_state(config, [t.info() for t in teachers], torch.device("cpu"))
    train(state, teachers, config, should_stop=lambda: True)
    assert state.iteration == 1


class PoisonedTeacher:
    """A real teacher whose answers are made NaN from a given call on (a fault injector)."""

    def __init__(self, inner, poison_after: int) -> None:
        self.inner = inner
        self.calls = 0
        self.poison_after = poison_after

    def info(self) -> TeacherInfo:
        return self.inner.info()

    def query(self, images: torch.Tensor, **wanted: bool) -> TeacherOutputs:
        self.calls += 1
        out = self.inner.query(images, **wanted)
        if self.calls > self.poison_after:
            return TeacherOutputs(out.logits * float("nan"), out.features, out.bn_loss)
        return out

    def input_grad(self, images, grad_logits, bn_weight):
        return self.inner.input_grad(images, grad_logits, bn_weight)


def test_non_finite_loss_stops_without_applying_the_step(digits_teachers) -> None:
    teachers = digits_teachers.load()
    teachers[1] = PoisonedTeacher(teachers[1], poison_after=3)
    config = small_config()
    state = init_state(config, [t.info() for t in teachers], torch.device("cpu"))
    snapshot = {}

    def remember(s, m) -> None:
        snapshot.update({k: v.clone() for k, v in s.student.state_dict().items()})

    with pytest.raises(NonFiniteLossError, match="student loss is not finite at iteration 1"):
        train(state, teachers, config, callbacks=[remember])
    assert all(torch.isfinite(p).all() for p in state.student.parameters())
    assert state.iteration == 1


def test_errors_survive_pickling() -> None:
    error = NonFiniteLossError("generator loss", 12)
    again = pickle.loads(pickle.dumps(error))
    assert isinstance(again, NonFiniteLossError)
    assert (again.term, again.iteration, str(again)) == ("generator loss", 12, str(error))


def test_incompatible_teachers_are_refused() -> None:
    a = TeacherInfo("a", (1, 16, 16), 10, 84, (0.1,), (0.3,))
    b = TeacherInfo("b", (1, 16, 16), 9, 84, (0.1,), (0.3,))
    c = TeacherInfo("c", (3, 16, 16), 10, 84, (0.2,) * 3, (0.3,) * 3)
    with pytest.raises(IncompatibleTeachers, match="num_classes"):
        check_teachers([a, b])
    with pytest.raises(IncompatibleTeachers, match="'a' has 1, 'c' has 3"):
        build_student(TrainConfig(), [a, c])
    # Other input sizes and normalizations are bridged by the run image space.
    d = TeacherInfo("d", (1, 32, 32), 10, 84, (0.5,), (0.2,))
    assert check_teachers([a, d]) is a


@pytest.mark.slow  # its fixture trains two ResNet teachers (minutes on 2 busy cores)
def test_heterogeneous_teachers_train_together(mixed_teachers) -> None:
    teachers = mixed_teachers.load()
    assert len({t.info().feature_dim for t in teachers}) == 3
    config = small_config()
    state = init_state(config, [t.info() for t in teachers], torch.device("cpu"))
    train(state, teachers, config)
    assert state.iteration == config.total_iterations


def _record_learning_rates(optimizer: torch.optim.Optimizer) -> list[float]:
    """The learning rate of every ``step()`` of ``optimizer``, read as the step begins."""
    used: list[float] = []
    optimizer.register_step_pre_hook(lambda o, args, kwargs: used.append(o.param_groups[0]["lr"]))
    return used


def test_generator_learning_rate_follows_the_milestones_at_the_right_iteration(
    digits_teachers, tmp_path
) -> None:
    """METHOD.md 2: MultiStepLR x gamma at the milestones for the generator as for the student.

    Three epochs of two iterations, milestones after epochs 1 and 2, gamma 0.5: the rate each
    optimizer step actually used is recorded. A resumed run continues the generator's schedule.
    """
    teachers = digits_teachers.load()
    infos = [t.info() for t in teachers]
    optimizer = {"milestones": (1, 2), "gamma": 0.5, "student_lr": 0.1, "generator_lr": 0.01}
    config = small_config(epochs=3, optimizer=optimizer)
    state = init_state(config, infos, torch.device("cpu"))
    generator_lrs = _record_learning_rates(state.generator_optimizer)
    student_lrs = _record_learning_rates(state.student_optimizer)
    train(state, teachers, config)
    # One generator step per iteration: 2 iterations at each rate.
    assert generator_lrs == pytest.approx([0.01, 0.01, 0.005, 0.005, 0.0025, 0.0025], rel=1e-12)
    # Two student steps per iteration, on the same schedule.
    assert student_lrs == pytest.approx([0.1] * 4 + [0.05] * 4 + [0.025] * 4, rel=1e-12)

    # Stop after iteration 3 (mid epoch 2), checkpoint, resume in a fresh state.
    state = init_state(config, infos, torch.device("cpu"))
    train(state, teachers, config, should_stop=lambda: state.iteration == 3)
    fingerprint = config_fingerprint(config)
    saved = save_checkpoint(tmp_path, state, fingerprint)
    resumed = init_state(config, infos, torch.device("cpu"))
    load_checkpoint(saved, resumed, fingerprint)
    generator_lrs = _record_learning_rates(resumed.generator_optimizer)
    train(resumed, teachers, config)
    assert resumed.iteration == 6
    assert generator_lrs == pytest.approx([0.005, 0.0025, 0.0025], rel=1e-12)


class RecordingTeacher:
    """A real teacher that keeps a copy of every batch it is asked about (test instrumentation)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.queries: list[torch.Tensor] = []
        self.input_grads: list[torch.Tensor] = []

    def info(self) -> TeacherInfo:
        return self.inner.info()

    def query(self, images: torch.Tensor, **wanted: bool) -> TeacherOutputs:
        self.queries.append(images.detach().clone())
        return self.inner.query(images, **wanted)

    def input_grad(self, images, grad_logits, bn_weight):
        self.input_grads.append(images.detach().clone())
        return self.inner.input_grad(images, grad_logits, bn_weight)


def test_every_student_step_gets_a_fresh_generated_batch(digits_teachers) -> None:
    """METHOD.md 2: K student steps, then one generator step, *each on a fresh batch*.

    The batches are recorded where they are used (every teacher's queries, the student's
    forward) and replayed from the generator and the RNG as they were before the iteration.
    """
    steps = 3
    teachers = [RecordingTeacher(t) for t in digits_teachers.load()]
    config = small_config(student_steps_per_generator_step=steps)
    state = init_state(config, [t.info() for t in teachers], torch.device("cpu"))
    seen_by_student: list[torch.Tensor] = []
    state.student.register_forward_pre_hook(
        lambda module, args: seen_by_student.append(args[0].detach().clone())
    )
    generator_before = copy.deepcopy(state.generator)
    rng_before = torch.Generator().set_state(state.rng.get_state())

    run_iteration(state, teachers, config)

    # Every teacher is asked about the same K + 1 batches: K student steps, one generator step.
    for teacher in teachers:
        assert len(teacher.queries) == steps + 1
        first = teachers[0].queries
        assert all(torch.equal(a, b) for a, b in zip(teacher.queries, first, strict=True))
        assert [torch.equal(g, teacher.queries[-1]) for g in teacher.input_grads] == [True]
    batches = teachers[0].queries
    # The student trains on the very batch its teachers answered, step by step.
    assert len(seen_by_student) == steps + 1
    assert all(torch.equal(s, b) for s, b in zip(seen_by_student, batches, strict=True))
    # All K + 1 batches differ from each other: none is reused.
    for i in range(len(batches)):
        for j in range(i):
            assert (batches[i] - batches[j]).abs().mean() > 0.1, (i, j)
    # Each is G(z) for a fresh z ~ N(0, I) drawn from the run's RNG, in order.
    with torch.no_grad():
        for batch in batches[:steps]:
            latent = torch.randn(
                config.batch_size, config.generator.latent_dim, generator=rng_before
            )
            assert torch.equal(generator_before(latent), batch)

    # The next iteration draws new batches again.
    run_iteration(state, teachers, config)
    assert len(batches) == 2 * (steps + 1)
    for later in batches[steps + 1 :]:
        assert all((later - earlier).abs().mean() > 0.1 for earlier in batches[: steps + 1])
