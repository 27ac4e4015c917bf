"""Accuracy per header, of the mean of headers, of the attention aggregate and of the teachers."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cdfkd.student_node.errors import TeacherBudgetExhausted
from cdfkd.student_node.models.aggregator import AttentionAggregator
from cdfkd.student_node.teachers.protocol import Teacher
from cdfkd.teacher_node.metrics import accuracy, batched

logger = logging.getLogger(__name__)

#: Below a teacher node's default max_batch (512), so remote teachers answer evaluation batches.
EVAL_BATCH_SIZE = 500


@dataclass(frozen=True)
class StudentEvaluation:
    """Accuracies in [0, 1]; ``attention`` is None when no aggregator was trained."""

    headers: list[float]
    mean: float
    attention: float | None


@dataclass(frozen=True)
class TeacherEvaluation:
    """Each teacher's accuracy and that of the mean of their logits.

    A teacher whose owner's budget could not pay for the evaluation has accuracy None, and
    then so has the ensemble (an ensemble of the others would be another model).
    """

    teachers: list[float | None]
    ensemble: float | None


def header_logits(student: nn.Module, images: Tensor, batch_size: int = EVAL_BATCH_SIZE) -> Tensor:
    """The student's header logits ``(N, B, K)`` in eval mode (the previous mode is restored)."""
    was_training = student.training
    student.eval()
    try:
        with torch.no_grad():
            return torch.cat(
                [torch.stack(student(chunk).logits) for chunk in images.split(batch_size)], dim=1
            )
    finally:
        student.train(was_training)


def evaluate_student(
    student: nn.Module,
    images: Tensor,
    labels: Tensor,
    aggregator: AttentionAggregator | None = None,
    batch_size: int = EVAL_BATCH_SIZE,
) -> StudentEvaluation:
    """Accuracy of each header, of (1/N) sum_i s_i, and of the attention aggregate if given."""
    logits = header_logits(student, images, batch_size)
    attention = None
    if aggregator is not None:
        aggregator.eval()
        with torch.no_grad():
            attention = accuracy(aggregator(logits), labels)
    return StudentEvaluation(
        headers=[accuracy(h, labels) for h in logits],
        mean=accuracy(logits.mean(dim=0), labels),
        attention=attention,
    )


def teacher_logits(teacher: Teacher, images: Tensor, batch_size: int = EVAL_BATCH_SIZE) -> Tensor:
    """``teacher``'s logits ``(B, K)`` on ``images``, asked ``batch_size`` at a time."""
    return batched(
        lambda x: teacher.query(x, features=False, bn_loss=False).logits, images, batch_size
    )


def evaluate_teachers(
    teachers: Sequence[Teacher],
    images: Tensor,
    labels: Tensor,
    batch_size: int = EVAL_BATCH_SIZE,
    *,
    skip_exhausted: bool = False,
) -> TeacherEvaluation:
    """Accuracy of each teacher and of their mean logits on normalized ``images``.

    Args:
        teachers: The teachers, in header order.
        images: Normalized test images.
        labels: Their labels.
        batch_size: Images per query.
        skip_exhausted: A teacher whose budget runs out gets accuracy None (logged) instead
            of failing the evaluation.

    Raises:
        TeacherBudgetExhausted: a budget ran out and ``skip_exhausted`` is False.
    """
    logits: list[Tensor | None] = []
    for teacher in teachers:
        try:
            logits.append(teacher_logits(teacher, images, batch_size))
        except TeacherBudgetExhausted as error:
            if not skip_exhausted:
                raise
            logger.warning("teacher %s not evaluated: %s", teacher.info().name, error)
            logits.append(None)
    answered = [t for t in logits if t is not None]
    return TeacherEvaluation(
        teachers=[None if t is None else accuracy(t, labels) for t in logits],
        ensemble=accuracy(torch.stack(answered).mean(dim=0), labels)
        if len(answered) == len(logits)
        else None,
    )
