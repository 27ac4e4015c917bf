"""Differential privacy of a teacher: calibration, accounting and the released statistics.

A DP teacher is trained with DP-SGD (Opacus: Poisson sampling, per-sample clipping to
``max_grad_norm``, Gaussian noise ``noise_multiplier * max_grad_norm``), and the per-layer
statistics the generator's prior R(x) needs are released once with the Gaussian mechanism.
Both are charged to one accountant (Opacus's PRV accountant) as one history::

    [(noise_multiplier, sample_rate, steps), (statistics_noise_multiplier, 1.0, 1)]

so the recorded ``epsilon`` is the accountant's own figure for training *and* statistics.

The budget split: the statistics release gets a fixed share (``statistics_share``, default
10 %) of the squared Gaussian-DP parameter mu that meets (epsilon, delta) alone
(mu-GDP composes as sqrt(sum mu_i^2)); training gets the noise multiplier that brings the
composed PRV epsilon to the target. The accountant, not the GDP split, has the last word.

Adjacency is add/remove one training record, as in Opacus. The shard size ``n`` is treated
as public, as Opacus does when it derives the sample rate from it; statistics are divided by
it.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from cdfkd.teacher_node.errors import TeacherConfigError

logger = logging.getLogger(__name__)

#: The accountant recorded in ``teacher.json``.
ACCOUNTANT = "prv"
#: Absolute error of the PRV accountant's epsilon (its figure is an upper bound within it).
EPS_ERROR = 0.01
#: Floor of a released variance (the noised second moment minus the squared mean may dip).
MIN_VARIANCE = 1e-6
#: Bisection steps for the training noise multiplier (relative precision 2^-40 of the range).
_BISECTION_STEPS = 40


class PrivacySettings(BaseModel):
    """What the owner asks for (``--dp-epsilon``, ``--dp-delta``, ``--dp-max-grad-norm``, ...).

    Attributes:
        epsilon: Target epsilon of the whole package (training and statistics).
        delta: Target delta.
        max_grad_norm: Per-sample gradient clipping bound C of DP-SGD.
        statistics_clip: Norm bound of one record's statistics (all layers together).
        statistics_share: Share of the squared GDP mu spent on the statistics release.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    epsilon: float = Field(gt=0.0, allow_inf_nan=False)
    delta: float = Field(gt=0.0, lt=1.0)
    max_grad_norm: float = Field(default=1.0, gt=0.0, allow_inf_nan=False)
    statistics_clip: float = Field(default=30.0, gt=0.0, allow_inf_nan=False)
    statistics_share: float = Field(default=0.1, gt=0.0, lt=1.0)


class LayerStatistics(BaseModel):
    """Released (noised) statistics of the input of one normalization layer.

    Attributes:
        layer: The module's name in ``model.named_modules()``.
        mean: Per-channel mean of the layer's input over records and space.
        var: Per-channel (biased) variance of the same, floored at ``MIN_VARIANCE``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    layer: str = Field(min_length=1)
    mean: tuple[float, ...]
    var: tuple[float, ...]


class PrivacyGuarantee(BaseModel):
    """``teacher.json``'s ``privacy``: the guarantee and how it was reached.

    Attributes:
        mechanism: ``dp-sgd``.
        epsilon: The accountant's epsilon for training and statistics together (an upper
            bound within ``eps_error``); at most ``target_epsilon``.
        delta: The delta it holds at.
        accountant: Which accountant (``prv``: Opacus's privacy random variable accountant).
        max_grad_norm: DP-SGD's per-sample clipping bound.
        noise_multiplier: DP-SGD's noise std over ``max_grad_norm``.
        target_epsilon: What the owner asked for.
        sample_rate: Poisson sampling rate of a record per step.
        steps: DP-SGD steps.
        epochs: Training epochs (``steps * sample_rate``).
        statistics_noise_multiplier: The statistics release's noise std over its clip.
        statistics_clip: Norm bound of one record's statistics (all layers together).
        statistics_layers: Normalization layers whose input statistics were released.
        eps_error: The accountant's absolute error on ``epsilon``.
        adjacency: Which datasets count as neighbours.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    mechanism: Literal["dp-sgd"] = "dp-sgd"
    epsilon: float = Field(gt=0.0)
    delta: float = Field(gt=0.0, lt=1.0)
    accountant: str = ACCOUNTANT
    max_grad_norm: float = Field(gt=0.0)
    noise_multiplier: float = Field(gt=0.0)
    target_epsilon: float = Field(gt=0.0)
    sample_rate: float = Field(gt=0.0, le=1.0)
    steps: int = Field(ge=1)
    epochs: int = Field(ge=1)
    statistics_noise_multiplier: float = Field(gt=0.0)
    statistics_clip: float = Field(gt=0.0)
    statistics_layers: tuple[str, ...] = ()
    eps_error: float = EPS_ERROR
    adjacency: str = "add/remove one training record"

    def describe(self) -> str:
        """One line: ``(epsilon, delta)-DP (dp-sgd, prv accountant)``."""
        return (
            f"({self.epsilon:.3g}, {self.delta:.3g})-DP ({self.mechanism}, {self.accountant} "
            "accountant)"
        )


@dataclass(frozen=True)
class Calibration:
    """Noise levels that meet a target, and the accountant's epsilon for them."""

    noise_multiplier: float
    statistics_noise_multiplier: float
    epsilon: float


def gdp_epsilon(mu: float, delta: float) -> float:
    """Epsilon of mu-Gaussian DP at ``delta`` (Dong, Roth and Su 2022, Corollary 2.13).

    delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2), solved for eps.
    """
    # SciPy and Opacus are imported where calibration needs them: a node serving a DP package
    # reads the guarantee's model only (the deploy image installs neither).
    from scipy.optimize import brentq
    from scipy.stats import norm

    def excess(eps: float) -> float:
        # e^eps Phi(.) in log space: e^eps alone overflows for large mu.
        tail = math.exp(eps + float(norm.logcdf(-eps / mu - mu / 2)))
        return float(norm.cdf(-eps / mu + mu / 2)) - tail

    if excess(0.0) <= delta:
        return 0.0
    return float(brentq(lambda eps: excess(eps) - delta, 0.0, 10.0 + 10.0 * mu * mu))


def gdp_mu(epsilon: float, delta: float) -> float:
    """The mu whose mu-GDP holds at exactly (epsilon, delta)."""
    from scipy.optimize import brentq

    return float(brentq(lambda mu: gdp_epsilon(mu, delta) - epsilon, 1e-6, 50.0))


def composed_epsilon(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    statistics_noise_multiplier: float,
    delta: float,
) -> float:
    """The PRV accountant's epsilon for DP-SGD followed by one statistics release."""
    from opacus.accountants import PRVAccountant

    accountant = PRVAccountant()
    accountant.history = [
        (noise_multiplier, sample_rate, steps),
        (statistics_noise_multiplier, 1.0, 1),
    ]
    with warnings.catch_warnings():
        # At sample rate 1 the PRV code takes log(0) on a branch np.where discards, and its
        # RDP-based domain bound warns that its alpha range is narrow (only a wider domain).
        warnings.simplefilter("ignore")
        return float(accountant.get_epsilon(delta, eps_error=EPS_ERROR))


def steps_and_rate(records: int, batch_size: int, epochs: int) -> tuple[int, float]:
    """DP-SGD steps and Poisson sample rate, as Opacus's DPDataLoader derives them."""
    batches = math.ceil(records / batch_size)
    return epochs * batches, 1.0 / batches


def calibrate(
    settings: PrivacySettings, sample_rate: float, steps: int, expected_batch: float
) -> Calibration:
    """Noise multipliers for training and statistics that meet ``settings``' (epsilon, delta).

    Raises:
        TeacherConfigError: the target cannot be met in ``steps`` steps with a noise that
            leaves any signal (more noise than the expected batch has records), naming
            ``--dp-epsilon``.
    """
    mu = gdp_mu(settings.epsilon, settings.delta)
    statistics_sigma = 1.0 / (math.sqrt(settings.statistics_share) * mu)
    ceiling = max(1.0, expected_batch)

    def epsilon_at(sigma: float) -> float:
        return composed_epsilon(sigma, sample_rate, steps, statistics_sigma, settings.delta)

    if epsilon_at(ceiling) > settings.epsilon:
        raise TeacherConfigError(
            f"--dp-epsilon {settings.epsilon:g} (delta {settings.delta:g}) is unreachable in "
            f"{steps} steps at sample rate {sample_rate:.4g}: even a noise multiplier of "
            f"{ceiling:g} (the expected batch size; more noise than records per batch) spends "
            "more: raise --dp-epsilon, train fewer --epochs or use a larger --batch-size"
        )
    low, high = 0.0, ceiling
    for _ in range(_BISECTION_STEPS):
        middle = (low + high) / 2
        if middle > 0 and epsilon_at(middle) <= settings.epsilon:
            high = middle
        else:
            low = middle
        if high - low < 1e-3 * high:
            break
    return Calibration(high, statistics_sigma, epsilon_at(high))


def per_record_moments(
    model: nn.Module, layers: Sequence[str], images: Tensor, batch_size: int = 512
) -> list[tuple[Tensor, Tensor]]:
    """Each record's per-channel mean and second moment of each layer's input.

    Args:
        model: The trained classifier (no batch coupling: GroupNorm, not BatchNorm).
        layers: Names of the normalization modules.
        images: float32 (n, C, H, W), normalized as the model takes them.
        batch_size: Records per forward pass.

    Returns:
        Per layer, ``(first, second)`` each float32 (n, C_l): the mean over space of the
        layer's input and of its square, for each record.
    """
    modules = [model.get_submodule(name) for name in layers]
    firsts: list[list[Tensor]] = [[] for _ in layers]
    seconds: list[list[Tensor]] = [[] for _ in layers]

    def make_hook(index: int):  # noqa: ANN202 - closure factory
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            values = inputs[0].detach().flatten(2) if inputs[0].dim() > 2 else inputs[0][..., None]
            firsts[index].append(values.mean(dim=2))
            seconds[index].append(values.square().mean(dim=2))

        return hook

    handles = [module.register_forward_hook(make_hook(i)) for i, module in enumerate(modules)]
    try:
        with torch.no_grad():
            for start in range(0, images.shape[0], batch_size):
                model(images[start : start + batch_size])
    finally:
        for handle in handles:
            handle.remove()
    return [
        (torch.cat(first), torch.cat(second)) for first, second in zip(firsts, seconds, strict=True)
    ]


def clipped_sums(moments: Sequence[tuple[Tensor, Tensor]], clip: float) -> list[Tensor]:
    """Per layer, the sum over records of ``concat(first, second)`` clipped per record.

    Each record's vector for layer l is scaled to norm at most ``clip / sqrt(L)``, so one
    record's whole contribution over all L layers has norm at most ``clip``: the release's
    L2 sensitivity under adding or removing a record.
    """
    bound = clip / math.sqrt(len(moments))
    sums = []
    for first, second in moments:
        vectors = torch.cat([first, second], dim=1).double()
        norms = torch.linalg.vector_norm(vectors, dim=1, keepdim=True)
        scale = (bound / norms.clamp_min(1e-12)).clamp(max=1.0)
        sums.append((vectors * scale).sum(dim=0))
    return sums


def noisy_moments(
    sums: Sequence[Tensor],
    records: int,
    clip: float,
    noise_multiplier: float,
    generator: torch.Generator,
) -> list[tuple[Tensor, Tensor]]:
    """The Gaussian mechanism on the clipped sums, divided by the (public) record count.

    Each coordinate gets N(0, (noise_multiplier * clip)^2) noise: ``clip`` is the sums' L2
    sensitivity (:func:`clipped_sums`).

    Returns:
        Per layer, noised ``(first, second)`` moments, float64 (C_l,).
    """
    released = []
    for total in sums:
        noise = torch.randn(total.shape, generator=generator, dtype=torch.float64)
        value = (total + noise * noise_multiplier * clip) / records
        channels = total.shape[0] // 2
        released.append((value[:channels], value[channels:]))
    return released


def release_statistics(
    model: nn.Module,
    layers: Sequence[str],
    images: Tensor,
    clip: float,
    noise_multiplier: float,
    generator: torch.Generator,
) -> list[LayerStatistics]:
    """Released per-channel mean and variance of each layer's input (the prior's targets).

    The variance is the noised second moment minus the squared noised mean, floored at
    ``MIN_VARIANCE`` (post-processing: it costs no privacy).
    """
    moments = per_record_moments(model, layers, images)
    sums = clipped_sums(moments, clip)
    released = noisy_moments(sums, images.shape[0], clip, noise_multiplier, generator)
    return [
        LayerStatistics(
            layer=name,
            mean=tuple(first.tolist()),
            var=tuple((second - first.square()).clamp_min(MIN_VARIANCE).tolist()),
        )
        for name, (first, second) in zip(layers, released, strict=True)
    ]


def normalization_layers(model: nn.Module) -> list[str]:
    """Names of the GroupNorm layers of ``model`` in ``modules()`` order."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.GroupNorm)]


__all__ = [
    "ACCOUNTANT",
    "Calibration",
    "LayerStatistics",
    "PrivacyGuarantee",
    "PrivacySettings",
    "calibrate",
    "clipped_sums",
    "composed_epsilon",
    "gdp_epsilon",
    "gdp_mu",
    "noisy_moments",
    "normalization_layers",
    "per_record_moments",
    "release_statistics",
    "steps_and_rate",
]
