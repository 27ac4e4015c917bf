"""Each method's student and generator objectives: the one place loss weights are applied."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import assert_never

from torch import Tensor

from cdfkd.student_node import losses
from cdfkd.student_node.config import IdealConfig, LossWeights, Method, TrainConfig
from cdfkd.student_node.models.multi_header import StudentOutputs


@dataclass(frozen=True)
class StudentLoss:
    """L_S and its weighted parts (0-dim tensors; absent terms are zero)."""

    total: Tensor
    header: Tensor
    feature: Tensor
    ensemble: Tensor


@dataclass(frozen=True)
class IdealGeneratorLoss:
    """IDEAL's L_G and its weighted parts (0-dim tensors)."""

    total: Tensor
    confidence: Tensor
    balance: Tensor
    disagreement: Tensor
    moments: Tensor


def ensemble_weights(config: TrainConfig, teacher_logits: Sequence[Tensor]) -> Tensor | None:
    """The per-sample teacher weights of ``config.ensemble_weighting``, (N, B), detached.

    None for ``equal``: the paper's plain mean, computed exactly as before.
    """
    match config.ensemble_weighting:
        case "equal":
            return None
        case "confidence":
            return losses.confidence_weights(teacher_logits, config.confidence_temperature)
        case unknown:
            assert_never(unknown)


def uses_teacher_features(method: Method, weights: LossWeights) -> bool:
    """Whether the student loss of ``method`` needs the teachers' features g_i."""
    return method in (Method.CDFKD_MFS, Method.KD_REAL) and weights.feature > 0


def student_loss(
    method: Method,
    weights: LossWeights,
    student: StudentOutputs,
    teacher_logits: Sequence[Tensor],
    teacher_features: Sequence[Tensor | None] | None,
    teacher_weights: Tensor | None = None,
) -> StudentLoss:
    """L_S of METHOD.md 2 for ``method``.

    cdfkd_mfs and kd_real: w_s (1/N) sum L1(s_i, t_i) + w_f (1/N) sum ||f_i - g_i||_1
    + w_e L1(mean s, mean t); the feature term averages over the teachers that give features.
    cdfkd: w_s (1/N) sum KL + w_e KL(ensemble). dfad: w_s L1(s, mean t). ``teacher_weights``
    (N, B) makes "mean t" a per-sample weighted mean (:func:`ensemble_weights`); the
    per-header terms stay as they are.
    """
    zero = student.logits[0].new_zeros(())
    match method:
        case Method.CDFKD_MFS | Method.KD_REAL:
            header = weights.header * losses.header_l1(student.logits, teacher_logits)
            feature = zero
            pairs = [
                (f, g)
                for f, g in zip(student.features, teacher_features or (), strict=False)
                if g is not None
            ]
            if uses_teacher_features(method, weights) and pairs:
                # Over the headers whose teacher shares features (an owner may withhold them).
                feature = weights.feature * losses.header_feature_l1(
                    [f for f, _ in pairs], [g for _, g in pairs]
                )
            ensemble = weights.ensemble * losses.ensemble_l1(
                student.logits, teacher_logits, teacher_weights
            )
        case Method.CDFKD:
            header = weights.header * losses.header_kl(student.logits, teacher_logits)
            feature = zero
            ensemble = weights.ensemble * losses.ensemble_kl(
                student.logits, teacher_logits, teacher_weights
            )
        case Method.DFAD:
            header = weights.header * losses.l1(
                student.logits[0], losses.mean_logits(teacher_logits, teacher_weights)
            )
            feature = zero
            ensemble = zero
    return StudentLoss(header + feature + ensemble, header, feature, ensemble)


def generator_adversarial_loss(
    method: Method,
    weights: LossWeights,
    student: StudentOutputs,
    teacher_logits: Sequence[Tensor],
    teacher_weights: Tensor | None = None,
) -> Tensor:
    """The adversarial part of L_G (the BN-prior part is added by the teachers' VJP).

    cdfkd_mfs: -w_g (1/N) sum_i L1(s_i, t_i), through student and teachers ("asymmetric":
    only the header discrepancy). cdfkd: -(w_s header KL + w_e ensemble KL) with the teachers'
    logits detached, as in the authors' code. dfad: -w_g L1(s, mean t). ``teacher_weights``
    as in :func:`student_loss` (cdfkd_mfs has no ensemble here).
    """
    match method:
        case Method.CDFKD_MFS:
            return -weights.generator * losses.header_l1(student.logits, teacher_logits)
        case Method.CDFKD:
            detached = [t.detach() for t in teacher_logits]
            return -(
                weights.header * losses.header_kl(student.logits, detached)
                + weights.ensemble * losses.ensemble_kl(student.logits, detached, teacher_weights)
            )
        case Method.DFAD:
            return -weights.generator * losses.l1(
                student.logits[0], losses.mean_logits(teacher_logits, teacher_weights)
            )
        case Method.KD_REAL:
            raise ValueError("kd_real trains on real data and has no generator step")
        case unknown:
            assert_never(unknown)


def generator_ideal_loss(
    ideal: IdealConfig, student: StudentOutputs, images: Tensor | None = None
) -> IdealGeneratorLoss:
    """IDEAL's student-only L_G: w_c CE(S, argmax S) - w_b H(mean_batch softmax S) - w_d D + w_m M.

    S is the student's prediction, the mean of its header logits (METHOD.md 1: its output
    without real data; a single head is its own mean); D the headers' disagreement
    (:func:`~cdfkd.student_node.losses.header_disagreement`, only computed when w_d > 0); M the
    standardized ``images``' distance from the run normalization's moments
    (:func:`~cdfkd.student_node.losses.image_moments`, only when w_m > 0, which needs
    ``images``). No teacher takes part.
    """
    prediction = losses.mean_logits(student.logits)
    confidence = ideal.confidence * losses.student_confidence_ce(prediction)
    balance = -ideal.balance * losses.batch_mean_entropy(prediction)
    disagreement = (
        -ideal.disagreement * losses.header_disagreement(student.logits)
        if ideal.disagreement > 0
        else prediction.new_zeros(())
    )
    if ideal.moments > 0:
        if images is None:
            raise ValueError("ideal.moments > 0 needs the generated images")
        moments = ideal.moments * losses.image_moments(images)
    else:
        moments = prediction.new_zeros(())
    total = confidence + balance + disagreement + moments
    return IdealGeneratorLoss(total, confidence, balance, disagreement, moments)
