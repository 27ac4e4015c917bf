"""DP-SGD training of a teacher with Opacus, and the release of its prior's statistics.

``train_private_classifier`` calibrates the noise (:func:`cdfkd.teacher_node.privacy.calibrate`)
so that training *and* the statistics release together meet the owner's (epsilon, delta),
trains with Opacus (Poisson sampling, per-sample clipping, Gaussian noise), releases the
per-layer statistics with the Gaussian mechanism, and returns the accountant's own epsilon
for the whole history.
"""

from __future__ import annotations

import logging
import math
import secrets
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from cdfkd.teacher_node.datasets import ImageDataset, Normalization
from cdfkd.teacher_node.errors import TeacherConfigError
from cdfkd.teacher_node.privacy import (
    ACCOUNTANT,
    LayerStatistics,
    PrivacyGuarantee,
    PrivacySettings,
    calibrate,
    composed_epsilon,
    normalization_layers,
    release_statistics,
    steps_and_rate,
)

logger = logging.getLogger(__name__)


def unpredictable_generator() -> torch.Generator:
    """A generator for privacy noise and sampling, seeded from the OS's entropy, never ``--seed``.

    Noise drawn from a known seed could be regenerated and subtracted (the released statistics
    would become exact), and a known Poisson sample voids the amplification by subsampling the
    accountant counts on; so no seed the owner passes, defaults or records reaches them.
    """
    return torch.Generator().manual_seed(secrets.randbits(63))


@dataclass(frozen=True)
class PrivateTraining:
    """What DP training produced besides the model."""

    guarantee: PrivacyGuarantee
    statistics: list[LayerStatistics]


def check_private_model(model: nn.Module) -> None:
    """Refuse a model Opacus cannot train with per-sample gradients (e.g. BatchNorm).

    Raises:
        TeacherConfigError: naming ``--architecture`` and Opacus's findings.
    """
    problems = ModuleValidator.validate(model, strict=False)
    if problems:
        raise TeacherConfigError(
            "--architecture: DP-SGD cannot train this model ("
            + "; ".join(map(str, problems))
            + "): use lenet5_gn (GroupNorm) with --dp-epsilon"
        )
    if not normalization_layers(model):
        raise TeacherConfigError(
            "--architecture: a DP teacher needs GroupNorm layers for its statistics prior: use "
            "lenet5_gn"
        )


def train_private_classifier(
    model: nn.Module,
    train: ImageDataset,
    normalization: Normalization,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    settings: PrivacySettings,
    on_epoch: Callable[[int, float], None] | None = None,
) -> PrivateTraining:
    """Train ``model`` in place with DP-SGD on ``train`` and release its prior's statistics.

    Args:
        model: A classifier without BatchNorm (GroupNorm), returning ``ClassifierOutput``.
        train: The owner's [0, 1] images.
        normalization: A data-independent normalization (it is not charged to the budget).
        epochs: Passes over the data (in expectation: Poisson sampling).
        batch_size: Expected records per step.
        learning_rate: Adam's learning rate.
        seed: Recorded for the caller's bookkeeping; it seeds neither the Poisson sampling
            nor the noise, which are unpredictable (:func:`unpredictable_generator`). The
            initialization (public, as DP-SGD assumes) is seeded by the caller.
        settings: The owner's (epsilon, delta) and clipping bounds.
        on_epoch: Called with (epoch, mean training loss).

    Returns:
        The guarantee (with the accountant's epsilon) and the released statistics; the model
        is left in eval mode with no Opacus hooks.

    Raises:
        TeacherConfigError: the model has BatchNorm, or the target is unreachable.
    """
    check_private_model(model)
    records = len(train)
    steps, sample_rate = steps_and_rate(records, batch_size, epochs)
    calibration = calibrate(settings, sample_rate, steps, records * sample_rate)
    logger.info(
        "DP-SGD: noise multiplier %.4f over %d steps at sample rate %.5f; statistics noise "
        "multiplier %.3f; accountant epsilon %.4f",
        calibration.noise_multiplier,
        steps,
        sample_rate,
        calibration.statistics_noise_multiplier,
        calibration.epsilon,
    )
    images = normalization.apply(train.images)
    # Poisson sampling amplifies privacy only if nobody can tell which records a step used: its
    # generator is as unpredictable as the noise (Opacus takes the loader's generator).
    loader = DataLoader(
        TensorDataset(images, train.labels),
        batch_size=batch_size,
        generator=unpredictable_generator(),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    with warnings.catch_warnings():
        # Opacus warns that its secure RNG is off: the noise generator is seeded from the OS's
        # entropy instead (README, "Differentially private teachers").
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant=ACCOUNTANT)
        private_model, private_optimizer, private_loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=calibration.noise_multiplier,
            max_grad_norm=settings.max_grad_norm,
            poisson_sampling=True,
            noise_generator=unpredictable_generator(),
        )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(private_optimizer, T_max=steps)
    private_model.train()
    with warnings.catch_warnings():
        # The first layer's input needs no gradient; Opacus's hooks still get what they need.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for epoch in range(epochs):
            total, batches = 0.0, 0
            for batch_images, batch_labels in private_loader:
                private_optimizer.zero_grad(set_to_none=True)
                # An empty Poisson batch is a step too: zero per-sample gradients, noise, accounted.
                loss = F.cross_entropy(
                    private_model(batch_images).logits, batch_labels, reduction="sum"
                ) / max(1, batch_images.shape[0])
                loss.backward()
                private_optimizer.step()
                scheduler.step()
                if batch_images.shape[0] > 0:
                    total += loss.item()
                    batches += 1
            if on_epoch is not None:
                on_epoch(epoch, total / max(1, batches))
    private_model.remove_hooks()
    model.eval()
    history = list(engine.accountant.history)
    expected = [(calibration.noise_multiplier, sample_rate, steps)]
    if history != expected:
        raise RuntimeError(f"the accountant saw {history}, the calibration assumed {expected}")
    layers = normalization_layers(model)
    statistics = release_statistics(
        model,
        layers,
        images,
        settings.statistics_clip,
        calibration.statistics_noise_multiplier,
        unpredictable_generator(),
    )
    epsilon = composed_epsilon(
        calibration.noise_multiplier,
        sample_rate,
        steps,
        calibration.statistics_noise_multiplier,
        settings.delta,
    )
    if not math.isfinite(epsilon) or epsilon > settings.epsilon + 1e-9:
        raise RuntimeError(f"the accountant's epsilon {epsilon} exceeds {settings.epsilon}")
    guarantee = PrivacyGuarantee(
        epsilon=epsilon,
        delta=settings.delta,
        max_grad_norm=settings.max_grad_norm,
        noise_multiplier=calibration.noise_multiplier,
        target_epsilon=settings.epsilon,
        sample_rate=sample_rate,
        steps=steps,
        epochs=epochs,
        statistics_noise_multiplier=calibration.statistics_noise_multiplier,
        statistics_clip=settings.statistics_clip,
        statistics_layers=tuple(layers),
    )
    return PrivateTraining(guarantee, statistics)
