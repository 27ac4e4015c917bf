"""Confidence-weighted teacher ensembles: golden values, the confident teacher's weight, no
gradient through the weights, and equal weighting exactly as the paper's loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cdfkd.student_node import losses
from cdfkd.student_node.config import LossWeights, Method
from cdfkd.student_node.models.multi_header import StudentOutputs
from cdfkd.student_node.objectives import (
    ensemble_weights,
    generator_adversarial_loss,
    student_loss,
)
from cdfkd.student_node.trainer import init_state, run_iteration
from tests.student_node.test_trainer import small_config

RNG = np.random.default_rng(11)
N, B, K, D = 3, 6, 5, 4
S = RNG.normal(size=(N, B, K))
T = RNG.normal(size=(N, B, K)) * 2
F_S = RNG.normal(size=(N, B, D))
F_T = RNG.normal(size=(N, B, D))


def _t(array: np.ndarray) -> list[torch.Tensor]:
    return [torch.from_numpy(a.copy()) for a in array]


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def test_confidence_weights_golden_value() -> None:
    tau = 0.3
    confidence = _softmax(T, axis=2).max(axis=2)  # (N, B)
    expected = _softmax(confidence / tau, axis=0)
    weights = losses.confidence_weights(_t(T), tau)
    assert weights.shape == (N, B)
    np.testing.assert_allclose(weights.numpy(), expected, rtol=0, atol=1e-14)
    target = (expected[:, :, None] * T).sum(0)
    np.testing.assert_allclose(
        losses.mean_logits(_t(T), weights).numpy(), target, rtol=0, atol=1e-13
    )
    assert losses.ensemble_l1(_t(S), _t(T), weights).item() == pytest.approx(
        np.abs(S.mean(0) - target).mean(), abs=1e-13
    )


def test_equal_weighting_is_exactly_the_papers_loss() -> None:
    """``equal`` gives no weights, so every method's terms are computed as before, bit for bit."""
    for method in Method:
        config = small_config(method, generator_objective="adversarial")
        assert config.ensemble_weighting == "equal"
        assert ensemble_weights(config, _t(T)) is None
        heads = 1 if method is Method.DFAD else N
        outputs = StudentOutputs(_t(S[:heads]), _t(F_S[:heads]))
        weights = config.loss_weights()
        ours = student_loss(method, weights, outputs, _t(T), _t(F_T), None)
        stacked_t = torch.stack(_t(T)).mean(0)
        stacked_s = torch.stack(_t(S[:heads])).mean(0)
        match method:
            case Method.CDFKD_MFS | Method.KD_REAL:
                paper = weights.ensemble * torch.nn.functional.l1_loss(stacked_s, stacked_t)
                assert torch.equal(ours.ensemble, paper)
            case Method.CDFKD:
                paper = weights.ensemble * losses.kd_kl(stacked_s, stacked_t)
                assert torch.equal(ours.ensemble, paper)
            case Method.DFAD:
                paper = weights.header * torch.nn.functional.l1_loss(stacked_s, stacked_t)
                assert torch.equal(ours.header, paper)


def test_the_confident_teacher_carries_the_ensemble() -> None:
    """Per sample: teacher 0 is sure on the first half, teacher 1 on the second; the other is
    uniform (all-equal logits). The target follows whichever is confident on each sample."""
    batch = 8
    sure = torch.full((batch, K), -4.0)
    sure[torch.arange(batch), torch.arange(batch) % K] = 4.0
    uniform = torch.zeros(batch, K)
    first = torch.cat([sure[:4], uniform[4:]])
    second = torch.cat([uniform[:4], sure[4:]])
    config = small_config(ensemble_weighting="confidence")  # tau 0.1
    weights = ensemble_weights(config, [first, second])
    assert weights is not None
    assert (weights[0, :4] > 0.99).all()
    assert (weights[1, 4:] > 0.99).all()
    target = losses.mean_logits([first, second], weights)
    assert torch.allclose(target, sure, atol=0.1)
    # The student that imitates the confident teachers: near-zero ensemble loss under
    # confidence weights, the paper's equal weights pull it halfway to uniform.
    outputs = StudentOutputs([sure.clone(), sure.clone()], [])
    lw = LossWeights()
    weighted = student_loss(Method.CDFKD_MFS, lw, outputs, [first, second], None, weights)
    equal = student_loss(Method.CDFKD_MFS, lw, outputs, [first, second], None, None)
    assert weighted.ensemble.item() < 0.1 * equal.ensemble.item()
    assert torch.equal(weighted.header, equal.header)  # per-header terms stay as they are


def test_no_gradient_flows_through_the_weights() -> None:
    """d(weighted mean)/dt_i is w_i itself: the weights are constants of the answers."""
    teacher = [t.requires_grad_(True) for t in _t(T)]
    weights = losses.confidence_weights(teacher, 0.2)
    assert not weights.requires_grad
    target = losses.mean_logits(teacher, weights)
    grads = torch.autograd.grad(target.sum(), teacher)
    for i, grad in enumerate(grads):
        assert torch.equal(grad, weights[i].unsqueeze(1).expand(B, K))
    # dfad's generator objective reaches the teachers through the weighted mean only.
    loss = generator_adversarial_loss(
        Method.DFAD, LossWeights(), StudentOutputs(_t(S[:1]), []), teacher, weights
    )
    assert loss.item() == pytest.approx(
        -np.abs(S[0] - (weights.numpy()[:, :, None] * T).sum(0)).mean(), abs=1e-13
    )


def test_confidence_weighting_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="weights.ensemble is 0"):
        small_config(ensemble_weighting="confidence", weights={"ensemble": 0.0})
    with pytest.raises(ValueError, match="confidence_temperature"):
        small_config(ensemble_weighting="confidence", confidence_temperature=0.0)
    small_config(Method.DFAD, ensemble_weighting="confidence")  # dfad's one target
    small_config(Method.CDFKD, ensemble_weighting="confidence")


def test_a_confidence_weighted_run_trains_and_differs_from_equal(digits_teachers) -> None:
    teachers = digits_teachers.load()
    results = []
    for weighting in ("equal", "confidence"):
        config = small_config(ensemble_weighting=weighting, student_steps_per_generator_step=1)
        state = init_state(config, [t.info() for t in teachers], torch.device("cpu"))
        metrics = run_iteration(state, teachers, config)
        assert np.isfinite(metrics.student_loss)
        results.append((metrics.ensemble_loss, metrics.header_loss))
    (equal_ensemble, equal_header), (weighted_ensemble, weighted_header) = results
    assert equal_header == weighted_header  # the same first step's per-header term
    assert equal_ensemble != weighted_ensemble
