"""The run image space: its defaults, and teachers seen through it by the trainer."""

from __future__ import annotations

import pytest
import torch

from cdfkd.student_node.config import TrainConfig
from cdfkd.student_node.errors import IncompatibleTeachers
from cdfkd.student_node.teachers.local import InProcessTeacher
from cdfkd.student_node.teachers.protocol import TeacherInfo
from cdfkd.student_node.teachers.run_space import RunSpaceTeacher, resolve_image_space
from cdfkd.teacher_node.datasets import Normalization
from cdfkd.teacher_node.engine import TeacherEngine
from cdfkd.teacher_node.zoo import ArchitectureSpec, build_classifier


def _info(name: str, shape: tuple[int, int, int], mean: float, std: float) -> TeacherInfo:
    channels = shape[0]
    return TeacherInfo(name, shape, 10, 84, (mean,) * channels, (std,) * channels)


def test_defaults_are_the_largest_input_and_the_shared_or_averaged_normalization() -> None:
    same = [_info("a", (3, 20, 20), 0.5, 0.25), _info("b", (3, 32, 24), 0.5, 0.25)]
    space = resolve_image_space(same)
    assert space.image_shape == (3, 32, 24)
    assert space.normalization == Normalization(mean=(0.5,) * 3, std=(0.25,) * 3)
    mixed = [*same, _info("c", (3, 28, 28), 0.2, 0.4)]
    space = resolve_image_space(mixed)
    assert space.image_shape == (3, 28, 28)  # 784 pixels > 768
    assert space.normalization.mean == pytest.approx((0.4,) * 3)
    assert space.normalization.std == pytest.approx((0.3,) * 3)


def test_configured_values_win_and_channels_must_agree() -> None:
    infos = [_info("a", (3, 20, 20), 0.5, 0.25), _info("b", (3, 32, 32), 0.4, 0.2)]
    chosen = Normalization(mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.5))
    config = TrainConfig.model_validate(
        {"image_shape": [3, 24, 24], "normalization": chosen.model_dump()}
    )
    space = resolve_image_space(infos, config.image_shape, config.normalization)
    assert (space.image_shape, space.normalization) == ((3, 24, 24), chosen)
    with pytest.raises(IncompatibleTeachers, match=r"'a' has 3, 'gray' has 1"):
        resolve_image_space([infos[0], _info("gray", (1, 20, 20), 0.5, 0.25)])
    with pytest.raises(IncompatibleTeachers, match="must match the teachers' 3 channels"):
        resolve_image_space(infos, (1, 24, 24))


def test_bad_run_image_space_config_names_the_key() -> None:
    with pytest.raises(ValueError, match="image_shape"):
        TrainConfig.model_validate({"image_shape": [3, 4, 4]})
    with pytest.raises(ValueError, match="positive std"):
        TrainConfig.model_validate({"normalization": {"mean": [0.5], "std": [0.0]}})


def _teacher(dtype: torch.dtype = torch.float32) -> InProcessTeacher:
    spec = ArchitectureSpec(architecture="lenet5_bn", input_shape=(1, 16, 16), num_classes=10)
    torch.manual_seed(0)
    model = build_classifier(spec).to(dtype)
    model.train()
    with torch.no_grad():
        model(torch.randn(32, 1, 16, 16, dtype=dtype))
    normalization = Normalization(mean=(0.3,), std=(0.4,))
    return InProcessTeacher(
        TeacherEngine(model.eval(), (1, 16, 16), normalization), "t", normalization
    )


def test_a_homogeneous_federation_sees_what_it_saw_before_up_to_rounding() -> None:
    teacher = _teacher()
    space = resolve_image_space([teacher.info()])
    seen = RunSpaceTeacher(teacher, space)
    standardized = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = teacher._engine._model(standardized)  # noqa: SLF001 - what the model saw before
    now = seen.query(standardized)
    torch.testing.assert_close(now.logits, before.logits, rtol=1e-5, atol=1e-5)
    assert now.features is not None
    torch.testing.assert_close(now.features, before.features, rtol=1e-5, atol=1e-5)


def test_the_gradient_through_the_run_normalization_is_exact() -> None:
    teacher = _teacher(torch.float64)
    space = resolve_image_space(
        [teacher.info()], (1, 24, 20), Normalization(mean=(0.6,), std=(0.2,))
    )
    seen = RunSpaceTeacher(teacher, space)
    generator = torch.Generator().manual_seed(2)
    standardized = torch.randn(5, 1, 24, 20, generator=generator, dtype=torch.float64)
    cotangent = torch.randn(5, 10, generator=generator, dtype=torch.float64)
    leaf = standardized.clone().requires_grad_(True)
    engine = teacher._engine  # noqa: SLF001
    outputs = engine._forward(leaf * 0.2 + 0.6, with_bn_loss=True)  # noqa: SLF001
    assert outputs.bn_loss is not None
    (expected,) = torch.autograd.grad(
        (outputs.logits * cotangent).sum() + 0.1 * outputs.bn_loss, leaf
    )
    torch.testing.assert_close(
        seen.input_grad(standardized, cotangent, 0.1), expected, rtol=1e-10, atol=1e-12
    )
