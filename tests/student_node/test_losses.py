"""Golden values of every loss term, computed independently in float64 with numpy or by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cdfkd.student_node import losses
from cdfkd.student_node.config import LossWeights, Method
from cdfkd.student_node.models.multi_header import StudentOutputs
from cdfkd.student_node.objectives import generator_adversarial_loss, student_loss

RNG = np.random.default_rng(7)
N, B, K, D = 3, 4, 5, 6
S = RNG.normal(size=(N, B, K))
T = RNG.normal(size=(N, B, K))
F_S = RNG.normal(size=(N, B, D))
F_T = RNG.normal(size=(N, B, D))


def _t(array: np.ndarray) -> list[torch.Tensor]:
    return [torch.from_numpy(a.copy()) for a in array]


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _kl(s: np.ndarray, t: np.ndarray) -> float:
    p, q = _softmax(s), _softmax(t)
    return float((q * (np.log(q) - np.log(p))).sum(axis=1).mean())


def test_l1_by_hand() -> None:
    s = torch.tensor([[1.0, -2.0], [0.5, 0.0]], dtype=torch.float64)
    t = torch.tensor([[0.0, 0.0], [0.5, 4.0]], dtype=torch.float64)
    assert losses.l1(s, t).item() == pytest.approx((1 + 2 + 0 + 4) / 4)


def test_feature_l1_by_hand_sums_dims_and_averages_batch() -> None:
    f = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    g = torch.tensor([[0.0, 0.0, 0.0], [1.0, -1.0, 0.0]], dtype=torch.float64)
    assert losses.feature_l1(f, g).item() == pytest.approx((6 + 2) / 2)


def test_header_l1() -> None:
    expected = np.mean([np.abs(S[i] - T[i]).mean() for i in range(N)])
    assert losses.header_l1(_t(S), _t(T)).item() == pytest.approx(expected, abs=1e-14)


def test_header_feature_l1() -> None:
    expected = np.mean([np.abs(F_S[i] - F_T[i]).sum(axis=1).mean() for i in range(N)])
    assert losses.header_feature_l1(_t(F_S), _t(F_T)).item() == pytest.approx(expected, abs=1e-14)


def test_ensemble_l1() -> None:
    expected = np.abs(S.mean(axis=0) - T.mean(axis=0)).mean()
    assert losses.ensemble_l1(_t(S), _t(T)).item() == pytest.approx(expected, abs=1e-14)


def test_kl_terms() -> None:
    assert losses.kd_kl(_t(S)[0], _t(T)[0]).item() == pytest.approx(_kl(S[0], T[0]), abs=1e-12)
    header = np.mean([_kl(S[i], T[i]) for i in range(N)])
    assert losses.header_kl(_t(S), _t(T)).item() == pytest.approx(header, abs=1e-12)
    ensemble = _kl(S.mean(axis=0), T.mean(axis=0))
    assert losses.ensemble_kl(_t(S), _t(T)).item() == pytest.approx(ensemble, abs=1e-12)
    assert losses.kd_kl(_t(T)[0], _t(T)[0]).item() == pytest.approx(0.0, abs=1e-12)


def test_cdfkd_mfs_student_objective_applies_the_method_weights() -> None:
    weights = LossWeights()  # 1, 0.2, 5
    out = student_loss(Method.CDFKD_MFS, weights, StudentOutputs(_t(S), _t(F_S)), _t(T), _t(F_T))
    header = np.mean([np.abs(S[i] - T[i]).mean() for i in range(N)])
    feature = np.mean([np.abs(F_S[i] - F_T[i]).sum(axis=1).mean() for i in range(N)])
    ensemble = np.abs(S.mean(axis=0) - T.mean(axis=0)).mean()
    assert out.header.item() == pytest.approx(1.0 * header, abs=1e-13)
    assert out.feature.item() == pytest.approx(0.2 * feature, abs=1e-13)
    assert out.ensemble.item() == pytest.approx(5.0 * ensemble, abs=1e-13)
    assert out.total.item() == pytest.approx(header + 0.2 * feature + 5 * ensemble, abs=1e-12)


def test_dfad_student_objective_uses_the_mean_teacher() -> None:
    out = student_loss(
        Method.DFAD,
        LossWeights.default_for(Method.DFAD),
        StudentOutputs(_t(S[:1]), _t(F_S[:1])),
        _t(T),
        _t(F_T),
    )
    assert out.total.item() == pytest.approx(np.abs(S[0] - T.mean(axis=0)).mean(), abs=1e-13)
    assert out.feature.item() == 0.0
    assert out.ensemble.item() == 0.0


def test_cdfkd_student_objective_is_kl() -> None:
    weights = LossWeights.default_for(Method.CDFKD)
    out = student_loss(Method.CDFKD, weights, StudentOutputs(_t(S), _t(F_S)), _t(T), _t(F_T))
    header = np.mean([_kl(S[i], T[i]) for i in range(N)])
    assert out.total.item() == pytest.approx(header + _kl(S.mean(0), T.mean(0)), abs=1e-12)


def test_generator_objectives() -> None:
    outputs = StudentOutputs(_t(S), _t(F_S))
    mfs = generator_adversarial_loss(Method.CDFKD_MFS, LossWeights(), outputs, _t(T))
    # sum_i -w_g L1(s_i, t_i) / N
    expected = -sum(np.abs(S[i] - T[i]).mean() for i in range(N)) / N
    assert mfs.item() == pytest.approx(expected, abs=1e-13)
    dfad = generator_adversarial_loss(
        Method.DFAD, LossWeights(), StudentOutputs(_t(S[:1]), _t(F_S[:1])), _t(T)
    )
    assert dfad.item() == pytest.approx(-np.abs(S[0] - T.mean(0)).mean(), abs=1e-13)
    with pytest.raises(ValueError, match="kd_real"):
        generator_adversarial_loss(Method.KD_REAL, LossWeights(), outputs, _t(T))


def test_cdfkd_generator_objective_does_not_reach_the_teachers() -> None:
    teacher = [t.requires_grad_(True) for t in _t(T)]
    student = [s.requires_grad_(True) for s in _t(S)]
    loss = generator_adversarial_loss(
        Method.CDFKD,
        LossWeights.default_for(Method.CDFKD),
        StudentOutputs(student, _t(F_S)),
        teacher,
    )
    grads = torch.autograd.grad(loss, [*student, *teacher], allow_unused=True)
    assert all(g is not None for g in grads[:N])
    assert all(g is None for g in grads[N:])
