"""The engine takes run-space pixels of any size: resized and normalized inside, gradients exact."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from cdfkd.teacher_node.datasets import Normalization
from cdfkd.teacher_node.engine import TeacherEngine
from cdfkd.teacher_node.errors import InvalidInput
from cdfkd.teacher_node.owner_model import FeatureTap
from tests import owner_models
from tests.helpers import reference_logits_and_bn_prior

NORMALIZATION = Normalization(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def _engine(dtype: torch.dtype = torch.float32, **kwargs) -> tuple[TeacherEngine, FeatureTap]:
    torch.manual_seed(0)
    model = owner_models.tiny_resnet()
    model.train()
    with torch.no_grad():  # non-trivial running statistics
        model(torch.randn(16, 3, 32, 32) * 0.5 + 0.2)
    tap = FeatureTap(model.eval().to(dtype))
    return TeacherEngine(tap, (3, 32, 32), NORMALIZATION, **kwargs), tap


def test_input_gradient_is_exact_through_resize_and_normalization() -> None:
    engine, tap = _engine(torch.float64)
    generator = torch.Generator().manual_seed(1)
    pixels = torch.rand(6, 3, 20, 28, generator=generator, dtype=torch.float64)
    cotangent = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    bn_weight = 0.3

    reference_input = pixels.clone().requires_grad_(True)
    mean = torch.tensor(NORMALIZATION.mean, dtype=torch.float64).view(1, -1, 1, 1)
    std = torch.tensor(NORMALIZATION.std, dtype=torch.float64).view(1, -1, 1, 1)
    resized = F.interpolate(reference_input, size=(32, 32), mode="bilinear", align_corners=False)
    logits, prior = reference_logits_and_bn_prior(tap, (resized - mean) / std)
    answer = engine.query(pixels)
    assert answer.bn_loss is not None
    torch.testing.assert_close(answer.logits, logits.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(answer.bn_loss, prior.detach(), rtol=1e-12, atol=1e-12)
    objective = (logits * cotangent).sum() + bn_weight * prior
    (expected,) = torch.autograd.grad(objective, reference_input)
    actual = engine.input_grad(pixels, cotangent, bn_weight)
    assert actual.shape == pixels.shape
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


def test_channels_last_images_give_what_the_wire_gives() -> None:
    engine, _ = _engine()
    pixels = torch.rand(4, 3, 24, 24, generator=torch.Generator().manual_seed(2))
    strided = pixels.to(memory_format=torch.channels_last)
    cotangent = torch.randn(4, 4, generator=torch.Generator().manual_seed(3))
    a, b = engine.query(pixels), engine.query(strided)
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.features, b.features)
    assert torch.equal(
        engine.input_grad(pixels, cotangent, 0.1), engine.input_grad(strided, cotangent, 0.1)
    )


def test_channels_and_sizes_are_bounded() -> None:
    engine, _ = _engine(max_image_side=40)
    assert engine.info.max_image_side == 40
    with pytest.raises(InvalidInput, match=r"expected \(B, 3, H, W\) with H and W at most 40"):
        engine.query(torch.rand(2, 1, 32, 32))
    with pytest.raises(InvalidInput, match="at most 40"):
        engine.query(torch.rand(2, 3, 41, 8))
    assert engine.query(torch.rand(2, 3, 40, 8)).logits.shape == (2, 4)
    with pytest.raises(InvalidInput, match="larger than max_image_side"):
        _engine(max_image_side=16)
