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


def ensemble_l1(student_logits: Sequence[Tensor], teacher_logits: Sequence[Tensor]) -> Tensor:
    """L1((1/N) sum_i s_i, (1/N) sum_i t_i): the ensemble term (w_e)."""
    return l1(torch.stack(list(student_logits)).mean(0), torch.stack(list(teacher_logits)).mean(0))


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


def ensemble_kl(student_logits: Sequence[Tensor], teacher_logits: Sequence[Tensor]) -> Tensor:
    """KL(mean t || mean s): CDFKD's ensemble term."""
    return kd_kl(
        torch.stack(list(student_logits)).mean(0), torch.stack(list(teacher_logits)).mean(0)
    )


def mean_logits(logits: Sequence[Tensor]) -> Tensor:
    """(1/N) sum_i logits_i."""
    return torch.stack(list(logits)).mean(0)
