"""The zeroth-order estimate of a black-box teacher's input gradient points the right way."""

from __future__ import annotations

import torch

from cdfkd.student_node.teachers.zeroth_order import zeroth_order_input_grad

DIRECTIONS = 256  # at 1x16x16 inputs (256 dimensions per image)


def test_estimate_correlates_with_the_true_gradient(digits_teachers) -> None:
    teacher = digits_teachers.load()[0]
    images = torch.randn(16, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    cotangent = torch.randn(16, 10, generator=torch.Generator().manual_seed(1))
    exact = teacher.input_grad(images, cotangent, 0.0)
    calls = []

    def logits_of(batch: torch.Tensor) -> torch.Tensor:
        calls.append(batch.shape[0])
        return teacher.query(batch, features=False, bn_loss=False).logits

    estimate = zeroth_order_input_grad(
        logits_of, images, cotangent, DIRECTIONS, 0.01, torch.Generator().manual_seed(2), 512
    )
    assert estimate.shape == exact.shape
    assert sum(calls) == 16 * (DIRECTIONS + 1)  # every probe is a query, counted by the node
    assert max(calls) <= 512
    cosine = torch.nn.functional.cosine_similarity(estimate.flatten(), exact.flatten(), dim=0)
    assert cosine.item() > 0.5, cosine.item()
    per_image = torch.nn.functional.cosine_similarity(estimate.flatten(1), exact.flatten(1), dim=1)
    assert (per_image > 0).all()
