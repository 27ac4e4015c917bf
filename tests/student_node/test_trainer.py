"""The loop: a few iterations per method, non-finite detection, error pickling."""

from __future__ import annotations

import pickle

import pytest
import torch

from cdfkd.student_node.config import GeneratorConfig, Method, StudentConfig, TrainConfig
from cdfkd.student_node.errors import IncompatibleTeachers, NonFiniteLossError
from cdfkd.student_node.teachers.protocol import TeacherInfo, TeacherOutputs
from cdfkd.student_node.trainer import build_student, check_teachers, init_state, train


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
