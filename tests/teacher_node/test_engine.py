"""TeacherEngine: the BN-prior term, the input VJP, input validation, no state between calls."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cdfkd.teacher_node.engine import TeacherEngine, bn_prior
from cdfkd.teacher_node.errors import InvalidInput
from cdfkd.teacher_node.zoo import ArchitectureSpec, build_classifier
from tests.helpers import (
    randomize_running_stats,
    reference_logits_and_bn_prior,
    running_stats,
)


def _lenet(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_classifier(
        ArchitectureSpec(architecture="lenet5_bn", input_shape=(1, 16, 16), num_classes=10)
    ).to(dtype)
    randomize_running_stats(model, 0.5, (0.5, 2.0))
    return model


def test_bn_prior_matches_hand_computation() -> None:
    means = [torch.tensor([1.0, 2.0]), torch.tensor([0.0])]
    variances = [torch.tensor([1.0, 1.0]), torch.tensor([4.0])]
    running_means = [torch.tensor([1.0, 0.0]), torch.tensor([3.0])]
    running_vars = [torch.tensor([1.0, 4.0]), torch.tensor([1.0])]
    # layer 1: ||(0, 2)|| + ||(0, -3)|| = 5, times c_1 = 5 -> 25; layer 2: 3 + 3 = 6.
    value = bn_prior(means, variances, running_means, running_vars, [5.0, 1.0])
    assert value.item() == pytest.approx(31.0)


def _reference_bn_prior(model: nn.Module, images: torch.Tensor) -> float:
    """R(x) computed independently with numpy from captured BN inputs."""
    captured: list[np.ndarray] = []
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    handles = [
        layer.register_forward_hook(lambda m, i, o: captured.append(i[0].detach().numpy()))
        for layer in layers
    ]
    model(images)
    for handle in handles:
        handle.remove()
    total = 0.0
    for index, (layer, inputs) in enumerate(zip(layers, captured, strict=True)):
        axes = (0,) + tuple(range(2, inputs.ndim))
        mean = inputs.mean(axis=axes)
        var = inputs.var(axis=axes)
        scale = 5.0 if index == 0 else 1.0
        running_mean, running_var = running_stats(layer)
        total += scale * float(
            np.linalg.norm(mean - running_mean.numpy()) + np.linalg.norm(var - running_var.numpy())
        )
    return total


def test_query_returns_logits_features_and_bn_prior() -> None:
    model = _lenet(torch.float64)
    engine = TeacherEngine(model, (1, 16, 16))
    images = torch.randn(8, 1, 16, 16, dtype=torch.float64)
    out = engine.query(images)
    assert out.logits.shape == (8, 10)
    assert out.features.shape == (8, 84)
    assert out.bn_loss.dim() == 0
    assert out.bn_loss.item() == pytest.approx(_reference_bn_prior(model, images), rel=1e-12)
    assert engine.info.num_bn_layers == 4
    assert engine.info.feature_dim == 84


def test_input_grad_is_the_vjp_of_logits_plus_weighted_bn_prior() -> None:
    model = _lenet(torch.float64)
    engine = TeacherEngine(model, (1, 16, 16))
    images = torch.randn(6, 1, 16, 16, dtype=torch.float64)
    cotangent = torch.randn(6, 10, dtype=torch.float64)
    gradient = engine.input_grad(images, cotangent, bn_weight=0.3)

    leaf = images.clone().requires_grad_(True)
    check_model = _lenet(torch.float64)
    check_model.load_state_dict(model.state_dict())
    check_model.eval()
    logits, prior = reference_logits_and_bn_prior(check_model, leaf)
    ((logits * cotangent).sum() + 0.3 * prior).backward()
    assert leaf.grad is not None
    assert torch.allclose(gradient, leaf.grad, atol=1e-12, rtol=0)


def test_engine_leaves_no_hooks_and_never_changes_the_teacher() -> None:
    model = _lenet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine = TeacherEngine(model, (1, 16, 16))
    images = torch.randn(4, 1, 16, 16)
    engine.query(images)
    engine.input_grad(images, torch.ones(4, 10), 1.0)
    assert all(not m._forward_hooks for m in model.modules())
    assert not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (torch.randn(4, 3, 16, 16), "shape"),
        (torch.randn(4, 1, 16), "shape"),
        (torch.randn(1, 1, 16, 16), "at least 2"),
        (torch.randint(0, 3, (4, 1, 16, 16)), "floating"),
        (torch.full((4, 1, 16, 16), float("nan")), "NaN"),
        (torch.full((4, 1, 16, 16), float("inf")), "NaN or Inf"),
    ],
)
def test_bad_images_are_rejected(images: torch.Tensor, message: str) -> None:
    engine = TeacherEngine(_lenet(), (1, 16, 16))
    with pytest.raises(InvalidInput, match=message):
        engine.query(images)


def test_bad_cotangent_is_rejected() -> None:
    engine = TeacherEngine(_lenet(), (1, 16, 16))
    images = torch.randn(4, 1, 16, 16)
    with pytest.raises(InvalidInput, match="grad_logits"):
        engine.input_grad(images, torch.ones(4, 9), 1.0)
    with pytest.raises(InvalidInput, match="NaN"):
        engine.input_grad(images, torch.full((4, 10), float("nan")), 1.0)
