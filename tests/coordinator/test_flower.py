"""Federated attention and evaluation with Flower: a simulation and the deployment runtime.

Owners' test splits partition the test set, so the sample-weighted federated accuracy must equal
the accuracy measured centrally on the whole test set; and FedAvg's result must equal the
sample-weighted mean of the owners' local updates, recomputed here round by round.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cdfkd.coordinator.config import parse_run_config
from cdfkd.coordinator.errors import ConfigError
from cdfkd.coordinator.flower.owner import owner_logits, train_locally
from cdfkd.coordinator.flower.settings import FederatedAttentionSettings, merge_node_config
from cdfkd.coordinator.training_run import run_training
from cdfkd.student_node.artifact import load_student
from cdfkd.student_node.evaluate import evaluate_student
from cdfkd.student_node.models.aggregator import AttentionAggregator, new_aggregator
from cdfkd.teacher_node.datasets import (
    DatasetName,
    Normalization,
    Split,
    dirichlet_shards,
    load_dataset,
    mirrored_shards,
)
from cdfkd.teacher_node.pki import create_dev_pki
from tests.helpers import packages, small_run


@pytest.fixture(scope="module")
def digits_student(digits_teachers, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("student-run")
    run_training(
        parse_run_config(
            small_run(packages(digits_teachers.packages), {"epochs": 4, "iterations_per_epoch": 5})
        ),
        out,
    )
    return out / "student"


def _central(student_dir: Path, aggregator_file: Path) -> tuple[float, float]:
    student, _, _, infos = load_student(student_dir)
    test = load_dataset(DatasetName.DIGITS, Split.TEST)
    normalization = Normalization(mean=infos[0].normalization_mean, std=infos[0].normalization_std)
    aggregator = AttentionAggregator(infos[0].num_classes)
    aggregator.load_state_dict(load_file(str(aggregator_file)))
    result = evaluate_student(student, normalization.apply(test.images), test.labels, aggregator)
    assert result.attention is not None
    return result.mean, result.attention


def _fedavg_by_hand(settings: FederatedAttentionSettings) -> dict[str, torch.Tensor]:
    state = new_aggregator(10, settings.seed).state_dict()
    for server_round in range(1, settings.rounds + 1):
        updates = [
            train_locally(settings, owner, state, server_round)
            for owner in range(settings.num_owners)
        ]
        total = sum(count for _, count, _ in updates)
        state = {
            key: sum(update[key] * (count / total) for update, count, _ in updates) for key in state
        }
    return state


def _check_summary(summary: dict, settings: FederatedAttentionSettings) -> None:
    test_size = len(load_dataset(DatasetName.DIGITS, Split.TEST))
    assert [o["owner"] for o in summary["owners"]] == list(range(settings.num_owners))
    assert sum(o["test_samples"] for o in summary["owners"]) == test_size
    assert len(summary["rounds"]) == settings.rounds
    mean, attention = _central(settings.student_dir, Path(summary["aggregator"]))
    assert summary["accuracy_mean"] == pytest.approx(mean, abs=1e-9)
    assert summary["accuracy_attention"] == pytest.approx(attention, abs=1e-9)
    federated = load_file(summary["aggregator"])
    by_hand = _fedavg_by_hand(settings)
    assert set(federated) == set(by_hand) == {"score.weight", "score.bias"}
    # The scoring bias is shared by all headers, so the softmax over headers ignores it: its
    # gradient is rounding noise that Adam scales up, and it differs between processes. The
    # weights decide the prediction and must agree.
    torch.testing.assert_close(federated["score.weight"], by_hand["score.weight"])


def test_settings_round_trip_and_name_bad_keys(tmp_path: Path) -> None:
    settings = FederatedAttentionSettings(student_dir=tmp_path, out_dir=tmp_path, rounds=3)
    assert FederatedAttentionSettings.from_flat(settings.to_flat()) == settings
    assert FederatedAttentionSettings.from_flat({**settings.to_flat(), "data-path": ""}) == settings
    with pytest.raises(ConfigError, match="local-epoch"):
        FederatedAttentionSettings.from_flat({**settings.to_flat(), "local-epoch": 3})
    with pytest.raises(ConfigError, match="rounds"):
        FederatedAttentionSettings.from_flat({**settings.to_flat(), "rounds": 0})
    run = {"rounds": 3, "student-dir": "/a"}
    merged = merge_node_config(run, {"student-dir": "/b", "rounds": 9})
    assert merged == {"rounds": 3, "student-dir": "/b"}  # a node sets its paths, not the run


@pytest.mark.slow
def test_cli_refuses_a_missing_student_and_a_deployment_without_pki(
    digits_student: Path, tmp_path: Path
) -> None:
    from cdfkd.coordinator.cli import main

    missing = ["flower", "run", "--student", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]
    assert main(missing) == 2
    no_pki = ["flower", "run", "--runtime", "deployment", "--student", str(digits_student)]
    assert main([*no_pki, "--out", str(tmp_path / "o")]) == 2
    bad = ["flower", "run", "--student", str(digits_student), "--rounds", "0"]
    assert main([*bad, "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o" / "flower.json").exists()


def test_owner_test_splits_partition_and_mirror_the_training_skew() -> None:
    train = load_dataset(DatasetName.DIGITS, Split.TRAIN)
    test = load_dataset(DatasetName.DIGITS, Split.TEST)
    shards = dirichlet_shards(train.labels, 3, alpha=0.3, seed=0)
    splits = mirrored_shards(train.labels, shards, test.labels)
    joined = torch.cat(splits).sort().values
    assert torch.equal(joined, torch.arange(len(test)))  # disjoint and complete
    for shard, split in zip(shards, splits, strict=True):
        train_mix = torch.bincount(train.labels[shard], minlength=10) / len(shard)
        test_mix = torch.bincount(test.labels[split], minlength=10) / len(split)
        # The same skew (digits' test classes are not exactly balanced, hence a correlation).
        assert torch.corrcoef(torch.stack([train_mix, test_mix]))[0, 1] > 0.9
        assert train_mix.max() > 0.2  # skewed at all: IID would be near 0.1


@pytest.mark.integration
@pytest.mark.flower
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_simulation_fedavg_and_weighted_evaluation_are_exact(
    digits_student: Path, tmp_path: Path
) -> None:
    from cdfkd.coordinator.flower.simulation import simulate

    settings = FederatedAttentionSettings(
        student_dir=digits_student,
        out_dir=tmp_path / "flower",
        dataset=DatasetName.DIGITS,
        partition="dirichlet",
        alpha=0.3,
        samples_per_owner=15,
        rounds=2,
        local_epochs=5,
    )
    summary = simulate(settings, num_cpus=2)
    _check_summary(summary, settings)
    # Label skew: owners see different mixes, so their figures differ.
    assert len({o["accuracy_mean"] for o in summary["owners"]}) > 1
    counts = [len(owner_logits(settings, o).sample_labels) for o in range(3)]
    assert all(0 < c <= 15 for c in counts)


@pytest.mark.integration
@pytest.mark.flower
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_deployment_runtime_superlink_and_supernodes_with_tls(
    digits_student: Path, tmp_path: Path
) -> None:
    from cdfkd.coordinator.flower.deployment import FlowerTls, run_local_deployment

    pki = create_dev_pki(tmp_path / "pki")
    settings = FederatedAttentionSettings(
        student_dir=digits_student,
        out_dir=tmp_path / "flower",
        dataset=DatasetName.DIGITS,
        samples_per_owner=10,
        rounds=1,
        local_epochs=5,
    )
    work = tmp_path / "deployment"
    summary = run_local_deployment(
        settings, FlowerTls(ca=pki.ca.cert, cert=pki.server.cert, key=pki.server.key), work, 600
    )
    _check_summary(summary, settings)
    superlink_log = (work / "superlink.log").read_text()
    assert re.search(r"running on https://127\.0\.0\.1:\d+", superlink_log), superlink_log[-2000:]
    for owner in range(3):
        assert "SuperNode ID" in (work / f"supernode-{owner}.log").read_text()
    assert json.loads((tmp_path / "flower" / "flower.json").read_text()) == summary
