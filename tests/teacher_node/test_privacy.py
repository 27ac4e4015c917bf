"""Differential privacy of teachers: accounting, the statistics release, and the engine's prior.

The accountant's figures are checked against an independent closed form: at sample rate 1 a
composition of Gaussian mechanisms with noise multipliers sigma_i is exactly mu-GDP with
mu = sqrt(sum 1/sigma_i^2) (Dong, Roth and Su 2022, Corollary 3.3), whose (epsilon, delta)
curve is delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2). The PRV accountant
is tight up to its discretization (its reported figure is an upper bound within eps_error
= 0.01 absolute), so at epsilons of 1 and more the two agree within 1 %. The RDP accountant
is not tight (its conversion to (eps, delta) is lossy), so it is not the reference.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from scipy.optimize import brentq
from scipy.stats import norm

from cdfkd.teacher_node.datasets import Normalization
from cdfkd.teacher_node.dp_training import check_private_model
from cdfkd.teacher_node.engine import FIRST_BN_SCALE, TeacherEngine
from cdfkd.teacher_node.errors import TeacherConfigError
from cdfkd.teacher_node.privacy import (
    EPS_ERROR,
    LayerStatistics,
    PrivacySettings,
    calibrate,
    clipped_sums,
    composed_epsilon,
    noisy_moments,
    normalization_layers,
    per_record_moments,
    release_statistics,
    steps_and_rate,
)
from cdfkd.teacher_node.training import DP_RECIPE, TeacherJob
from cdfkd.teacher_node.zoo import Architecture, ArchitectureSpec, build_classifier


def closed_form_epsilon(mu: float, delta: float) -> float:
    """Epsilon of mu-GDP at ``delta``, solved here independently of the package's code."""

    def delta_at(eps: float) -> float:
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)

    return brentq(lambda eps: delta_at(eps) - delta, 0.0, 200.0)


@pytest.mark.parametrize(
    ("noise", "steps", "statistics_noise"),
    [(2.0, 10, 8.0), (5.0, 30, 16.0), (1.2, 3, 4.0), (20.0, 50, 10.0)],
)
def test_the_accountant_matches_gaussian_dp_at_sample_rate_one(
    noise: float, steps: int, statistics_noise: float
) -> None:
    delta = 1e-5
    mu = math.sqrt(steps / noise**2 + 1 / statistics_noise**2)
    expected = closed_form_epsilon(mu, delta)
    measured = composed_epsilon(noise, 1.0, steps, statistics_noise, delta)
    assert expected >= 1.0  # where an absolute eps_error of 0.01 is within 1 %
    # An upper bound: never below the exact figure (beyond float noise), and within 1 %.
    assert measured >= expected - 1e-6
    assert abs(measured - expected) <= 0.01 * expected


@pytest.mark.slow  # a bisection of about 15 accountant runs: 10 s on two loaded cores
def test_calibration_meets_the_target_with_the_statistics_included() -> None:
    settings = PrivacySettings(epsilon=3.0, delta=1e-5)
    steps, rate = steps_and_rate(20_000, 256, 4)
    calibration = calibrate(settings, rate, steps, 20_000 * rate)
    assert calibration.epsilon <= settings.epsilon
    assert calibration.epsilon >= 0.98 * settings.epsilon  # no budget left on the table
    # Training alone spends less than the total: the statistics release is charged too.
    training_only = composed_epsilon(calibration.noise_multiplier, rate, steps, 1e9, 1e-5)
    assert training_only < calibration.epsilon - EPS_ERROR


def test_an_unreachable_epsilon_is_refused_naming_the_setting() -> None:
    steps, rate = steps_and_rate(1000, 32, 50)
    with pytest.raises(TeacherConfigError, match="--dp-epsilon 0.01 .*unreachable"):
        calibrate(PrivacySettings(epsilon=0.01, delta=1e-5), rate, steps, 1000 * rate)


def _gn_model() -> torch.nn.Module:
    torch.manual_seed(0)
    spec = ArchitectureSpec(
        architecture=Architecture.LENET5_GN, input_shape=(1, 16, 16), num_classes=10
    )
    return build_classifier(spec).eval()


@pytest.mark.parametrize(
    ("architecture", "activation", "absent"),
    [
        (Architecture.LENET5_GN, torch.nn.ReLU, torch.nn.Tanh),
        (Architecture.LENET5_GN_TANH, torch.nn.Tanh, torch.nn.ReLU),
    ],
)
def test_private_architectures_pass_opacus_with_their_activation(
    architecture: Architecture, activation: type, absent: type
) -> None:
    spec = ArchitectureSpec(architecture=architecture, input_shape=(1, 16, 16), num_classes=10)
    model = build_classifier(spec)
    check_private_model(model)  # Opacus accepts it and it has GroupNorm layers for the prior
    model.eval()
    kinds = [type(m) for m in model.modules()]
    assert kinds.count(activation) == 4
    assert absent not in kinds
    assert torch.nn.BatchNorm2d not in kinds
    assert torch.nn.BatchNorm1d not in kinds
    with torch.no_grad():
        features = model(torch.randn(4, 1, 16, 16) * 10).features
    if activation is torch.nn.Tanh:
        assert float(features.abs().max()) < 1.0
        assert float(features.min()) < 0.0
    else:
        assert float(features.min()) >= 0.0


def test_clipping_bounds_each_records_contribution() -> None:
    model = _gn_model()
    layers = normalization_layers(model)
    images = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    images[0] *= 1000  # an outlier record
    moments = per_record_moments(model, layers, images)
    clip = 2.0
    with_outlier = clipped_sums(moments, clip)
    without = clipped_sums([(f[1:], s[1:]) for f, s in moments], clip)
    change = torch.cat([a - b for a, b in zip(with_outlier, without, strict=True)])
    # One record moves the whole release by at most the clip: the sensitivity charged for.
    assert float(torch.linalg.vector_norm(change)) <= clip * (1 + 1e-9)
    assert float(torch.linalg.vector_norm(change)) > 0.99 * clip  # the outlier was clipped


def test_statistics_are_released_with_the_charged_noise() -> None:
    """Repeat the release on one dataset; the noise's empirical std is sigma * clip / n.

    400 releases of 452 moments each give 180,800 noise samples; the relative standard error
    of their standard deviation is 1/sqrt(2 * 180,800) = 0.17 %, so 1 % is six of them.
    """
    model = _gn_model()
    layers = normalization_layers(model)
    images = torch.rand(16, 1, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    clip, sigma, records = 30.0, 3.0, images.shape[0]
    moments = per_record_moments(model, layers, images)
    sums = clipped_sums(moments, clip)
    exact = torch.cat(sums) / records
    # The release the training calls is this mechanism on these sums, draw for draw.
    released = release_statistics(model, layers, images, clip, sigma, torch.Generator())
    first = noisy_moments(sums, records, clip, sigma, torch.Generator())
    for layer, (mean, _) in zip(released, first, strict=True):
        assert torch.equal(torch.tensor(layer.mean, dtype=torch.float64), mean)
    deviations = []
    for seed in range(400):
        noised = noisy_moments(sums, records, clip, sigma, torch.Generator().manual_seed(seed))
        deviations.append(torch.cat([torch.cat(pair) for pair in noised]) - exact)
    noise = torch.stack(deviations)
    expected_std = sigma * clip / records
    assert noise.numel() == 400 * 2 * sum(m[0].shape[1] for m in moments)
    assert abs(float(noise.mean())) < 0.01 * expected_std
    assert float(noise.std()) == pytest.approx(expected_std, rel=0.01)
    # Independent across coordinates and releases, as the Gaussian mechanism's noise is.
    correlation = torch.corrcoef(noise[:, :2].T)[0, 1]
    assert abs(float(correlation)) < 0.2


def test_released_variances_are_positive_and_targets_of_the_prior() -> None:
    model = _gn_model()
    layers = normalization_layers(model)
    images = torch.rand(32, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    released = release_statistics(model, layers, images, 30.0, 50.0, torch.Generator())
    assert all(min(layer.var) > 0 for layer in released)


def test_the_engine_uses_released_statistics_as_the_priors_targets() -> None:
    """R(x) is zero when the targets are x's own statistics, and a known value otherwise."""
    model = _gn_model()
    layers = normalization_layers(model)
    normalization = Normalization(mean=(0.5,), std=(0.5,))
    pixels = torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    inputs = normalization.apply(pixels)
    own = []
    for first, second in per_record_moments(model, layers, inputs):
        mean = first.mean(dim=0)
        # Pooled over records and space: the batch variance R(x) computes.
        own.append((mean, second.mean(dim=0) - mean.square()))
    exact = [
        LayerStatistics(layer=name, mean=tuple(m.tolist()), var=tuple(v.tolist()))
        for name, (m, v) in zip(layers, own, strict=True)
    ]
    engine = TeacherEngine(model, (1, 16, 16), normalization, statistics=exact)
    assert engine.info.has_bn_prior
    assert engine.info.num_bn_layers == 4
    assert float(engine.query(pixels).bn_loss) == pytest.approx(0.0, abs=1e-4)

    shifted = [
        LayerStatistics(layer=s.layer, mean=tuple(v + 0.5 for v in s.mean), var=s.var)
        for s in exact
    ]
    engine = TeacherEngine(model, (1, 16, 16), normalization, statistics=shifted)
    # Each layer's mean term is ||0.5 * 1||_2 = 0.5 sqrt(C_l); c_1 = 5 for the first layer.
    channels = [len(s.mean) for s in exact]
    expected = FIRST_BN_SCALE * 0.5 * math.sqrt(channels[0]) + sum(
        0.5 * math.sqrt(c) for c in channels[1:]
    )
    assert float(engine.query(pixels).bn_loss) == pytest.approx(expected, rel=1e-3)
    gradient = engine.input_grad(pixels, torch.zeros(6, 10), 1.0)
    assert bool(torch.isfinite(gradient).all())
    assert float(gradient.abs().sum()) > 0  # the prior's gradient reaches the images


def test_released_statistics_must_fit_the_model() -> None:
    from cdfkd.teacher_node.errors import InvalidInput

    model = _gn_model()
    wrong = [LayerStatistics(layer="head.2", mean=(0.0,) * 3, var=(1.0,) * 3)]
    with pytest.raises(InvalidInput, match="head.2"):
        TeacherEngine(model, (1, 16, 16), statistics=wrong)
    with pytest.raises(InvalidInput, match="no.such"):
        TeacherEngine(
            model, (1, 16, 16), statistics=[LayerStatistics(layer="no.such", mean=(), var=())]
        )


def test_a_dp_job_defaults_to_the_tuned_recipe_and_the_owner_overrides_it() -> None:
    settings = PrivacySettings(epsilon=8.0, delta=1e-5)
    private = TeacherJob(name="dp", privacy=settings)
    assert (private.epochs, private.batch_size, private.learning_rate) == (
        DP_RECIPE["epochs"],
        DP_RECIPE["batch_size"],
        DP_RECIPE["learning_rate"],
    )
    chosen = TeacherJob(name="dp", privacy=settings, epochs=3, batch_size=64)
    assert (chosen.epochs, chosen.batch_size) == (3, 64)
    assert chosen.learning_rate == DP_RECIPE["learning_rate"]
    plain = TeacherJob(name="plain")
    assert (plain.epochs, plain.batch_size, plain.learning_rate) == (6, 128, 2e-3)


def test_the_train_commands_help_states_the_recipe_the_job_takes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The CLI builds its parser without importing torch, so its help spells the recipe out;
    # this keeps those words and TeacherJob's defaults (DP_RECIPE for DP jobs) together.
    from cdfkd.coordinator.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["teacher", "train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    plain = TeacherJob(name="plain")
    assert (
        f"--epochs EPOCHS default {plain.epochs}; {DP_RECIPE['epochs']} with --dp-epsilon" in text
    )
    assert (
        f"--batch-size BATCH_SIZE default {plain.batch_size}; {DP_RECIPE['batch_size']} "
        "(expected) with --dp-epsilon"
    ) in text
    rates = re.search(r"--lr LR default (\S+); (\S+) with --dp-epsilon", text)
    assert rates is not None
    assert float(rates[1]) == plain.learning_rate
    assert float(rates[2]) == DP_RECIPE["learning_rate"]
