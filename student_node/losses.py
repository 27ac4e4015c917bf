"""Loss terms of METHOD.md section 2, one pure function per term (unweighted).

Weights are applied in :mod:`cdfkd.student_node.objectives`, the one place that combines terms.
Shapes: N headers/teachers, B batch, K classes, D feature width.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F


def l1(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """L1(s, t): mean absolute error over all (B, K) entries."""
    return F.l1_loss(student_logits, teacher_logits)


def header_l1(student_logits: Sequence[Tensor], teacher_logits: Sequence[Tensor]) -> Tensor:
    """(1/N) sum_i L1(s_i, t_i): the per-header imitation term (w_s)."""
    return torch.stack(
        [l1(s, t) for s, t in zip(student_logits, teacher_logits, strict=True)]
    ).mean()


def feature_l1(student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
    """mean_batch ||f - g||_1: sum over the D dims, mean over B (authors' ``criterion_feat``)."""
    return (student_feature - teacher_feature).abs().sum(dim=1).mean()


def header_feature_l1(
    student_features: Sequence[Tensor], teacher_features: Sequence[Tensor]
) -> Tensor:
    """(1/N) sum_i mean_batch ||f_i - g_i||_1: the feature term (w_f)."""
    return torch.stack(
        [feature_l1(f, g) for f, g in zip(student_features, teacher_features, strict=True)]
    ).mean()


def ensemble_l1(
    student_logits: Sequence[Tensor],
    teacher_logits: Sequence[Tensor],
    teacher_weights: Tensor | None = None,
) -> Tensor:
    """L1((1/N) sum_i s_i, (1/N) sum_i t_i): the ensemble term (w_e).

    With ``teacher_weights`` (N, B) the teachers' side is the weighted mean of
    :func:`mean_logits`.
    """
    return l1(
        torch.stack(list(student_logits)).mean(0), mean_logits(teacher_logits, teacher_weights)
    )


def kd_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(softmax(t/T) || softmax(s/T)) * T^2, batch-mean (authors' ``kdloss``, CDFKD ICME'21)."""
    log_p = F.log_softmax(student_logits / temperature, dim=1)
    q = F.softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_p, q, reduction="batchmean") * temperature**2


def header_kl(student_logits: Sequence[Tensor], teacher_logits: Sequence[Tensor]) -> Tensor:
    """(1/N) sum_i KL(t_i || s_i): CDFKD's header term."""
    return torch.stack(
        [kd_kl(s, t) for s, t in zip(student_logits, teacher_logits, strict=True)]
    ).mean()


def ensemble_kl(
    student_logits: Sequence[Tensor],
    teacher_logits: Sequence[Tensor],
    teacher_weights: Tensor | None = None,
) -> Tensor:
    """KL(mean t || mean s): CDFKD's ensemble term (``teacher_weights`` as in ensemble_l1)."""
    return kd_kl(
        torch.stack(list(student_logits)).mean(0), mean_logits(teacher_logits, teacher_weights)
    )


def mean_logits(logits: Sequence[Tensor], weights: Tensor | None = None) -> Tensor:
    """(1/N) sum_i logits_i; with ``weights`` (N, B), per sample b sum_i w_ib logits_i[b]."""
    stacked = torch.stack(list(logits))
    if weights is None:
        return stacked.mean(0)
    return (weights.unsqueeze(2) * stacked).sum(0)


def confidence_weights(logits: Sequence[Tensor], temperature: float) -> Tensor:
    """Per-sample weights of N teachers, (N, B): softmax over teachers of max_k p_ik(x) / tau.

    p_i = softmax(t_i(x)); max_k p_ik is teacher i's confidence on x, in [1/K, 1] whatever
    the number of classes K, so tau means the same across label spaces (an entropy would
    range over [0, log K]). A teacher that saw a class in training tends to be confident on
    its samples, one that did not tends to spread its mass (label-skewed owners). Computed
    from the answers only, detached: no gradient flows through the weights.
    """
    with torch.no_grad():
        confidence = torch.stack([F.softmax(t.detach(), dim=1).amax(dim=1) for t in logits])
        return F.softmax(confidence / temperature, dim=0)


def student_confidence_ce(logits: Tensor) -> Tensor:
    """CE(S(x), argmax S(x)), batch mean: low where the student is confident (IDEAL, DAFL)."""
    return F.cross_entropy(logits, logits.detach().argmax(dim=1))


def batch_mean_entropy(logits: Tensor) -> Tensor:
    """H(mean_batch softmax(S(x))), natural log: high where the batch spreads over classes."""
    mean = F.softmax(logits, dim=1).mean(dim=0)
    return -(mean * torch.log(mean.clamp_min(1e-12))).sum()


def image_moments(images: Tensor) -> Tensor:
    """Mean over channels of mean_c(x)^2 + (std_c(x) - 1)^2, on standardized images (B, C, H, W).

    0 where each channel of the batch has the run normalization's mean and std, i.e. the
    first two moments the owners publish of their data (``TeacherInfo`` mean, std): the
    moments an affine-free BN output layer fixes by construction, here as a soft prior.
    """
    mean = images.mean(dim=(0, 2, 3))
    std = images.std(dim=(0, 2, 3))
    return (mean.pow(2) + (std - 1.0).pow(2)).mean()


def header_disagreement(logits: Sequence[Tensor]) -> Tensor:
    """Mean over samples of (1/N) sum_i ||softmax s_i - mean_j softmax s_j||_1, in [0, 2].

    How far the headers' predictions spread around their mean: 0 where they agree (and for
    one header). Bounded, so a generator cannot raise it by inflating logits.
    """
    probabilities = torch.stack([F.softmax(s, dim=1) for s in logits])
    spread = probabilities - probabilities.mean(dim=0, keepdim=True)
    return spread.abs().sum(dim=2).mean()
