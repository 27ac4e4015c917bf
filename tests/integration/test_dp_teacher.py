"""Differentially private teachers end to end: DP-SGD training, the package, a node over mTLS.

Real parts throughout: Opacus trains a LeNet-5-GN on a third of scikit-learn's digits, the
package is read back from disk, a ``cdfkd teacher serve`` process serves it with mutual TLS,
and ``cdfkd federation check`` and ``cdfkd train`` run against it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from scipy.optimize import brentq
from scipy.stats import norm

from cdfkd.coordinator.cli import main
from cdfkd.coordinator.errors import ExitCode
from cdfkd.coordinator.nodes import TeacherNodeProcess
from cdfkd.student_node.artifact import load_student
from cdfkd.student_node.teachers.local import InProcessTeacher
from cdfkd.student_node.teachers.remote import RemoteTeacher, RemoteTeacherConfig
from cdfkd.teacher_node.data_sources import load_train_and_test
from cdfkd.teacher_node.datasets import DatasetName, Normalization
from cdfkd.teacher_node.package import load_package, read_metadata
from cdfkd.teacher_node.privacy import PrivacySettings, clipped_sums, per_record_moments
from cdfkd.teacher_node.training import TeacherJob, owner_shard, train_teacher_package
from tests.helpers import small_run, write_toml

EPSILON, DELTA = 8.0, 1e-5
#: Everything a DP teacher.json may hold; nothing else (no statistic measured without noise).
DP_METADATA_KEYS = {
    "format_version",
    "name",
    "spec",
    "input_shape",
    "num_classes",
    "normalization",  # fixed (0.5, 0.5), not measured
    "feature_from_input",
    "has_batchnorm",
    "feature_dim",
    "num_parameters",
    "test_accuracy",  # on the test split, which is not the training data
    "eval_data",
    "train_samples",  # the record count, public under Opacus's accounting as here
    "weights_sha256",
    "privacy",
    "released_statistics",  # noised
}


def _job(**changes) -> TeacherJob:
    fields = dict(
        name="dp-owner",
        dataset=DatasetName.DIGITS,
        shard=0,
        num_shards=3,
        epochs=4,
        batch_size=32,
        learning_rate=5e-3,
        seed=0,
        privacy=PrivacySettings(epsilon=EPSILON, delta=DELTA),
    )
    return TeacherJob(**{**fields, **changes})


@pytest.fixture(scope="module")
def dp_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("dp") / "dp-owner"
    train_teacher_package(_job(), directory)
    return directory


def _closed_form_epsilon(mu: float, delta: float) -> float:
    """mu-GDP at ``delta`` (see tests/teacher_node/test_privacy.py)."""

    def delta_at(eps: float) -> float:
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)

    return brentq(lambda eps: delta_at(eps) - delta, 0.0, 200.0)


@pytest.mark.slow
def test_a_training_runs_epsilon_matches_the_closed_form(tmp_path: Path) -> None:
    """Full-batch DP-SGD (sample rate 1): the run is a composition of Gaussian mechanisms.

    steps releases with noise multiplier sigma and one statistics release with sigma_s are
    exactly mu-GDP with mu = sqrt(steps / sigma^2 + 1 / sigma_s^2); the accountant's recorded
    epsilon, computed by Opacus during and after the run, must agree within 1 %.
    """
    job = _job(
        num_shards=1, batch_size=4096, epochs=3, privacy=PrivacySettings(epsilon=3.0, delta=DELTA)
    )
    metadata = train_teacher_package(job, tmp_path / "full-batch")
    privacy = metadata.privacy
    assert privacy is not None
    assert privacy.sample_rate == 1.0
    assert privacy.steps == 3
    mu = math.sqrt(
        privacy.steps / privacy.noise_multiplier**2 + 1 / privacy.statistics_noise_multiplier**2
    )
    expected = _closed_form_epsilon(mu, DELTA)
    assert privacy.epsilon == pytest.approx(expected, rel=0.01)
    assert privacy.epsilon <= 3.0
    assert privacy.accountant == "prv"

    # The attacker's replay: the same job, the same --seed. Were the noise seeded by it, the
    # released statistics would repeat and the noise could be regenerated and subtracted.
    again = train_teacher_package(job, tmp_path / "same-seed")
    assert again.privacy == privacy  # the same calibration and accounting...
    assert again.released_statistics != metadata.released_statistics  # ...fresh noise
    assert again.weights_sha256 != metadata.weights_sha256


@pytest.mark.slow
def test_federation_check_shows_a_local_dp_packages_guarantee(
    dp_package: Path, tmp_path: Path, capsys
) -> None:
    guarantee = read_metadata(dp_package).privacy
    assert guarantee is not None
    config = write_toml(tmp_path / "run.toml", small_run([{"package": str(dp_package)}]))
    assert main(["federation", "check", "--config", str(config)]) == ExitCode.OK
    table = capsys.readouterr().out
    assert "privacy" in table.splitlines()[0]
    assert f"({guarantee.epsilon:.3g}, 1e-05)-DP (dp-sgd, prv accountant)" in table


@pytest.mark.slow
def test_a_dp_package_holds_no_unnoised_statistics(dp_package: Path) -> None:
    raw = json.loads((dp_package / "teacher.json").read_text())
    assert set(raw) <= DP_METADATA_KEYS
    assert raw["has_batchnorm"] is False
    assert raw["normalization"] == {"mean": [0.5], "std": [0.5]}
    assert raw["spec"]["architecture"] == "lenet5_gn"
    assert "test split" in raw["eval_data"]
    privacy = raw["privacy"]
    assert privacy["mechanism"] == "dp-sgd"
    assert privacy["delta"] == DELTA
    assert 0.97 * EPSILON <= privacy["epsilon"] <= EPSILON
    assert privacy["accountant"] == "prv"
    assert privacy["max_grad_norm"] == 1.0
    assert privacy["noise_multiplier"] > 0
    # The weights are parameters only: no BatchNorm running statistics, no buffer at all.
    metadata, model = load_package(dp_package)
    keys = set(load_file(str(dp_package / "weights.safetensors")))
    assert keys == {name for name, _ in model.named_parameters()}
    assert not any("running" in key or "num_batches" in key for key in keys)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())

    # The released statistics carry noise: they differ from the exact clipped statistics of
    # the owner's records by about the calibrated std, sigma_s * clip / n.
    train, _ = load_train_and_test(DatasetName.DIGITS)
    shard = owner_shard(_job(), train)
    layers = list(privacy["statistics_layers"])
    assert [s["layer"] for s in raw["released_statistics"]] == layers
    inputs = Normalization(mean=(0.5,), std=(0.5,)).apply(shard.images)
    sums = clipped_sums(per_record_moments(model, layers, inputs), privacy["statistics_clip"])
    released_means = torch.cat(
        [torch.tensor(s["mean"], dtype=torch.float64) for s in raw["released_statistics"]]
    )
    exact_means = torch.cat([total[: total.shape[0] // 2] for total in sums]) / len(shard)
    noise = released_means - exact_means
    expected_std = privacy["statistics_noise_multiplier"] * privacy["statistics_clip"] / len(shard)
    # 226 draws: their std is within 20 % of sigma with overwhelming probability (about 4 SE).
    assert float(noise.std()) == pytest.approx(expected_std, rel=0.2)
    assert metadata.train_samples == len(shard)


@pytest.mark.integration
@pytest.mark.slow
def test_a_dp_teacher_serves_over_mtls_and_a_distillation_runs(
    dp_package: Path, dev_pki, tmp_path: Path, capsys
) -> None:
    pki = dev_pki["trusted"]
    guarantee = read_metadata(dp_package).privacy
    assert guarantee is not None
    with TeacherNodeProcess(dp_package, tmp_path / "node", pki, threads=2) as node:
        entry = {
            "address": node.address,
            "ca": pki.ca.cert,
            "cert": pki.client.cert,
            "key": pki.client.key,
            "deadline_s": 30,
        }
        remote = RemoteTeacher(RemoteTeacherConfig.model_validate(entry))
        try:
            info = remote.info()
            assert info.privacy is not None
            assert info.privacy.epsilon == guarantee.epsilon
            assert info.privacy.noise_multiplier == guarantee.noise_multiplier
            assert "bn_loss" in info.allowed_outputs  # the released statistics' prior
            images = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
            answer = remote.query(images, features=False, bn_loss=True)
            assert answer.bn_loss is not None
            assert float(answer.bn_loss) > 0
            # The node computes what the same package computes in-process, released prior
            # included, bit for bit.
            local = InProcessTeacher.from_package(dp_package)
            assert local.info().privacy == info.privacy
            expected = local.query(images, features=False, bn_loss=True)
            assert torch.equal(answer.logits, expected.logits)
            assert torch.equal(answer.bn_loss, expected.bn_loss)
            cotangent = torch.randn(4, 10, generator=torch.Generator().manual_seed(1))
            assert torch.equal(
                remote.input_grad(images, cotangent, 0.05),
                local.input_grad(images, cotangent, 0.05),
            )
        finally:
            remote.close()

        config = write_toml(tmp_path / "run.toml", small_run([entry]))
        assert main(["federation", "check", "--config", str(config)]) == ExitCode.OK
        table = capsys.readouterr().out
        assert f"({guarantee.epsilon:.3g}, 1e-05)-DP (dp-sgd, prv accountant)" in table

        out = tmp_path / "out"
        assert main(["train", "--in-process", "--config", str(config), "--out", str(out)]) == 0
    summary = json.loads((out / "result.json").read_text())
    assert summary["iterations"] == 6
    assert summary["teacher_privacy"][0]["epsilon"] == guarantee.epsilon
    # The student's own record names the guarantee it was distilled under (no teacher data).
    _, _, _, infos = load_student(out / "student")
    assert infos[0].privacy == info.privacy
    report = (out / "report.md").read_text()
    assert f"teacher 0: ({guarantee.epsilon:.3g}, 1e-05)-DP on its owner's training records" in (
        report
    )
