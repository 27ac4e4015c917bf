"""The generator step written with teacher VJPs equals plain end-to-end autograd (float64)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from cdfkd.student_node.config import (
    GeneratorConfig,
    LossWeights,
    Method,
    StudentConfig,
    TrainConfig,
)
from cdfkd.student_node.teachers.local import InProcessTeacher
from cdfkd.student_node.trainer import generator_step, init_state
from cdfkd.teacher_node.datasets import Normalization
from cdfkd.teacher_node.engine import TeacherEngine
from cdfkd.teacher_node.zoo import ArchitectureSpec, build_classifier
from tests.helpers import randomize_running_stats, reference_logits_and_bn_prior

SHAPE = (1, 16, 16)


def _teacher_models() -> list[nn.Module]:
    specs = [
        ArchitectureSpec(architecture="lenet5_bn", input_shape=SHAPE, num_classes=10),
        ArchitectureSpec(
            architecture="resnet", input_shape=SHAPE, num_classes=10, depth=1, width=4
        ),
        ArchitectureSpec(architecture="lenet5_bn", input_shape=SHAPE, num_classes=10),
    ]
    models = []
    for seed, spec in enumerate(specs):
        torch.manual_seed(seed)
        model = build_classifier(spec).double()
        randomize_running_stats(model, 0.3, (0.5, 1.5))
        models.append(model.eval())
    return models


def _reference_loss(
    method: Method,
    weights: LossWeights,
    student_logits: list[torch.Tensor],
    teachers: list[nn.Module],
    images: torch.Tensor,
) -> torch.Tensor:
    """L_G written directly from METHOD.md, with its own BN hooks."""
    n = len(teachers)
    logits, priors = [], []
    for model in teachers:
        teacher_logits, prior = reference_logits_and_bn_prior(model, images)
        logits.append(teacher_logits)
        priors.append(prior)
    bn = sum(weights.bn * r / n for r in priors)
    match method:
        case Method.CDFKD_MFS:
            adv = sum(
                -weights.generator * F.l1_loss(s, t) / n
                for s, t in zip(student_logits, logits, strict=True)
            )
        case Method.DFAD:
            adv = -weights.generator * F.l1_loss(student_logits[0], torch.stack(logits).mean(0))
        case Method.CDFKD:

            def kl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                return F.kl_div(
                    F.log_softmax(s, 1), F.softmax(t.detach(), 1), reduction="batchmean"
                )

            adv = -(
                weights.header
                * sum(kl(s, t) for s, t in zip(student_logits, logits, strict=True))
                / n
                + weights.ensemble
                * kl(torch.stack(student_logits).mean(0), torch.stack(logits).mean(0))
            )
    return adv + bn


@pytest.mark.parametrize(
    ("method", "output"),
    [
        (Method.CDFKD_MFS, "batchnorm"),
        (Method.CDFKD, "batchnorm"),
        (Method.DFAD, "batchnorm"),
        (Method.DFAD, "pixel_range"),
    ],
)
def test_vjp_generator_gradient_equals_end_to_end_autograd(method: Method, output: str) -> None:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        models = _teacher_models()
        norm = Normalization(mean=(0.0,), std=(1.0,))
        teachers = [
            InProcessTeacher(TeacherEngine(copy.deepcopy(m), SHAPE), f"t{i}", norm)
            for i, m in enumerate(models)
        ]
        weights = LossWeights(header=1.0, feature=0.2, ensemble=5.0, generator=1.0, bn=0.1)
        config = TrainConfig(
            method=method,
            batch_size=8,
            weights=weights,
            student=StudentConfig(widths=(4, 8, 8)),
            generator=GeneratorConfig(latent_dim=16, width=4, output=output),
        )
        state = init_state(config, [t.info() for t in teachers], torch.device("cpu"))
        state.student.double()
        state.generator.double()
        generator_before = copy.deepcopy(state.generator)
        student_before = copy.deepcopy(state.student)
        rng_state = state.rng.get_state()

        generator_step(state, teachers, config, weights)
        vjp_grads = [p.grad.clone() for p in state.generator.parameters()]

        latent = torch.randn(8, 16, generator=torch.Generator().set_state(rng_state))
        images = generator_before(latent)
        student_logits = student_before(images).logits
        _reference_loss(method, weights, student_logits, models, images).backward()
        reference = [p.grad for p in generator_before.parameters()]
    finally:
        torch.set_default_dtype(previous)
    differences = [(a - b).abs().max().item() for a, b in zip(vjp_grads, reference, strict=True)]
    assert max(differences) <= 1e-10
    assert max(g.abs().max().item() for g in reference) > 1e-4  # the check is not vacuous
