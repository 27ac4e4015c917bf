"""Student shapes and the MFS wiring; the generator's shapes."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from cdfkd.student_node.config import StudentConfig, StudentKind, TrainConfig
from cdfkd.student_node.generator import Generator
from cdfkd.student_node.models.aggregator import AttentionAggregator
from cdfkd.student_node.models.multi_header import (
    MFSStudent,
    SeparableConv,
    inference_parameters,
)
from cdfkd.student_node.teachers.protocol import TeacherInfo
from cdfkd.student_node.trainer import build_student


def _infos(dims: list[int], shape: tuple[int, int, int] = (1, 32, 32)) -> list[TeacherInfo]:
    return [TeacherInfo(f"t{i}", shape, 10, d, (0.0,), (1.0,)) for i, d in enumerate(dims)]


def _student(kind: StudentKind, dims: list[int], **kwargs) -> Any:
    """The student of ``kind``; typed Any so that tests may reach into its kind's parts."""
    config = TrainConfig(student=StudentConfig(kind=kind, **kwargs))
    return build_student(config, _infos(dims))


@pytest.mark.parametrize("kind", list(StudentKind))
def test_output_shapes(kind: StudentKind) -> None:
    student = _student(kind, [84, 84, 84])
    out = student(torch.randn(4, 1, 32, 32))
    headers = 1 if kind is StudentKind.SINGLE_HEAD else 3
    assert len(out.logits) == headers
    assert len(out.features) == headers
    assert all(t.shape == (4, 10) for t in out.logits)
    if kind is not StudentKind.SINGLE_HEAD:
        assert all(f.shape == (4, 84) for f in out.features)
    assert out.mean_logits().shape == (4, 10)


def test_heterogeneous_feature_widths_get_projections() -> None:
    student = _student(StudentKind.MFS, [84, 64, 32], widths=(16, 32, 64))
    out = student(torch.randn(2, 1, 32, 32))
    assert [f.shape[1] for f in out.features] == [84, 64, 32]
    assert isinstance(student.projections[1], torch.nn.Identity)
    assert isinstance(student.projections[0], torch.nn.Linear)


def test_mfs_encoders_read_concat_of_level_and_previous_encoder() -> None:
    student = _student(StudentKind.MFS, [64, 64], widths=(8, 16, 32), strides=(2, 2, 2))
    assert isinstance(student, MFSStudent)
    header = student.encoders[0]
    assert all(isinstance(e, SeparableConv) for e in header)
    in_channels = [e.layers[0].in_channels for e in header]
    out_channels = [e.layers[5].out_channels for e in header]
    assert in_channels == [8, 16 + 16, 32 + 32]
    assert out_channels == [16, 32, 32]
    strides = [e.layers[0].stride[0] for e in header]
    assert strides == [2, 2, 1]  # the last level keeps its spatial size


def test_every_header_reaches_every_trunk_level_and_only_its_own_encoders() -> None:
    student = _student(StudentKind.MFS, [64, 64, 64], widths=(8, 16, 32))
    images = torch.randn(4, 1, 32, 32)
    for header in range(3):
        student.zero_grad(set_to_none=True)
        student(images).logits[header].square().sum().backward()
        for level, stage in enumerate(student.trunk.stages):
            grad = stage[0].weight.grad
            assert grad is not None
            assert grad.abs().sum() > 0, (header, level)
        for level in range(3):
            conv = student.encoders[header][level].layers[0].weight
            assert conv.grad is not None
            assert conv.grad.abs().sum() > 0
        for other in set(range(3)) - {header}:
            assert all(p.grad is None for p in student.encoders[other].parameters())


def test_mfs_level_outputs_feed_the_next_encoder() -> None:
    """Encoder 2 reads concat(u_2, a^1) at u_2's spatial size."""
    student = _student(StudentKind.MFS, [64], widths=(8, 16, 32)).eval()
    captured = {}

    def capture(module, inputs, output) -> None:
        captured["in"] = inputs[0]

    student.encoders[0][1].register_forward_hook(capture)
    student(torch.randn(2, 1, 32, 32))
    assert captured["in"].shape == (2, 32, 8, 8)  # concat(u_2: 16 ch, a^1: 16 ch) at 8x8


def test_simple_multi_header_shares_all_but_the_last_stage() -> None:
    student = _student(StudentKind.SIMPLE_MULTI_HEADER, [64, 64], widths=(8, 16, 32))
    assert len(student.shared) == 2
    assert len(student.last_stages) == 2
    first, second = student.last_stages
    assert not torch.equal(first[0].weight, second[0].weight)


@pytest.mark.parametrize("shape", [(1, 32, 32), (3, 28, 28), (1, 16, 16), (3, 30, 22)])
def test_generator_makes_images_of_the_input_shape(shape: tuple[int, int, int]) -> None:
    generator = Generator(64, shape, width=8)
    images = generator(torch.randn(5, 64))
    assert images.shape == (5, *shape)
    # The final affine-free BN standardizes each channel over the batch.
    assert images.mean(dim=(0, 2, 3)).abs().max() < 1e-4


def test_a_pixel_range_generator_makes_only_pixels_in_the_unit_range() -> None:
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    generator = Generator(64, (3, 20, 20), 8, "pixel_range", (mean, std))
    with torch.no_grad():
        for parameter in generator.parameters():
            parameter.mul_(50)  # saturate: what an adversary can push the weights to
    images = generator(100 * torch.randn(64, 64))
    pixels = images * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    assert pixels.min() >= -1e-6
    assert pixels.max() <= 1 + 1e-6
    assert pixels.min() < 0.01
    assert pixels.max() > 0.99
    # The normalization is the run's, not a trained value: not in the state dict.
    keys = set(generator.state_dict())
    assert keys == set(Generator(64, (3, 20, 20), 8).state_dict()) - {
        "out.2.running_mean",
        "out.2.running_var",
        "out.2.num_batches_tracked",
    }


def test_the_authors_generator_output_bounds_no_pixel() -> None:
    """The affine-free BN standardizes the batch: a sparse minority lands far from the rest."""
    generator = Generator(64, (1, 16, 16), 8)
    last = generator.out[2]
    tanh_output = torch.full((8, 1, 16, 16), -1.0)
    tanh_output[0, 0, 0, :3] = 1.0  # 3 of 2,048 pixels bright
    images = last(tanh_output)
    assert images.max() > 20  # standard deviations: no image of [0, 1] pixels is there


def test_a_pixel_range_generator_needs_the_normalization() -> None:
    with pytest.raises(ValueError, match="normalization"):
        Generator(64, (1, 16, 16), 8, "pixel_range")
    with pytest.raises(ValueError, match="batchnorm"):
        TrainConfig.model_validate({"generator": {"output": "clamp"}})


def test_attention_weights_are_a_softmax_over_headers() -> None:
    aggregator = AttentionAggregator(10)
    logits = torch.randn(3, 4, 10)
    alpha = aggregator.weights(logits)
    assert alpha.shape == (4, 3)
    assert torch.allclose(alpha.sum(dim=1), torch.ones(4))
    expected = (alpha.T.unsqueeze(-1) * logits).sum(0)
    assert torch.allclose(aggregator(logits), expected, atol=1e-6)


@pytest.mark.parametrize("kind", list(StudentKind))
@pytest.mark.parametrize("dims", [[84, 84, 84], [64, 64, 64]])
def test_inference_parameters_are_the_ones_the_logits_use(kind: StudentKind, dims) -> None:
    student = _student(kind, dims)
    torch.stack(student(torch.randn(4, 1, 32, 32)).logits).sum().backward()
    used = sum(p.numel() for p in student.parameters() if p.grad is not None)
    total = sum(p.numel() for p in student.parameters())
    assert inference_parameters(student) == used
    # Teachers of feature width 84 (LeNet-5-BN) need projections from the 64-wide header.
    projected = dims[0] != 64 and kind is not StudentKind.SINGLE_HEAD
    assert (used < total) is projected
