"""Run configs: unknown keys, wrong types and out-of-range values name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from cdfkd.coordinator.config import load_run_config, parse_run_config
from cdfkd.coordinator.errors import ConfigError

BASE = {"teachers": [{"package": "t1"}]}


def test_minimal_config_gets_method_defaults(tmp_path: Path) -> None:
    config = parse_run_config(BASE, base=tmp_path)
    assert config.teachers[0].package == tmp_path / "t1"
    assert config.train.method.value == "cdfkd_mfs"
    weights = config.train.loss_weights()
    assert (weights.header, weights.feature, weights.ensemble, weights.generator, weights.bn) == (
        1.0,
        0.2,
        5.0,
        1.0,
        0.1,
    )
    assert config.train.student_steps_per_generator_step == 5
    assert config.train.optimizer.milestones == (100, 200)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({**BASE, "trian": {}}, "unknown key 'trian'"),
        ({**BASE, "train": {"batchsize": 3}}, "unknown key 'train.batchsize'"),
        ({**BASE, "train": {"batch_size": "big"}}, "'train.batch_size'"),
        ({**BASE, "train": {"batch_size": 1}}, "'train.batch_size'"),
        ({**BASE, "train": {"method": "magic"}}, "'train.method'"),
        ({**BASE, "train": {"weights": {"feature": -1}}}, "'train.weights.feature'"),
        ({**BASE, "train": {"optimizer": {"milestones": [5, 2]}}}, "train.optimizer"),
        ({**BASE, "train": {"student": {"widths": [8, 16], "strides": [2]}}}, "train.student"),
        ({**BASE, "run": {"device": "tpu"}}, "'run.device'"),
        ({"teachers": []}, "'teachers'"),
        ({}, "'teachers'"),
        ({**BASE, "teachers": [{"package": "x", "command": "rm -rf /"}]}, "teachers.0.command"),
    ],
)
def test_bad_configs_name_the_key(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        parse_run_config(data)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_run_config(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[train\nbatch_size = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_run_config(broken)
    ok = tmp_path / "ok.toml"
    ok.write_text(
        '[[teachers]]\npackage = "a"\n[train]\nbatch_size = 64\n'
        "[train.optimizer]\ngenerator_lr = 1e-3\n"
    )
    config = load_run_config(ok)
    assert config.train.batch_size == 64
    assert config.train.optimizer.generator_lr == pytest.approx(1e-3)  # TOML reads 1e-3 as a float


def test_the_example_run_config_is_valid() -> None:
    example = Path(__file__).resolve().parents[2] / "deploy" / "run.example.toml"
    config = load_run_config(example)
    assert len(config.teachers) == 3
    assert config.train.total_iterations == 24 * 25
