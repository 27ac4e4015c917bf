"""The run config's [data] table: optional (data-free), a named dataset, or the owners' files."""

from __future__ import annotations

from pathlib import Path

import pytest

from cdfkd.coordinator.config import RunConfig, dump_run_config, parse_run_config
from cdfkd.coordinator.errors import ConfigError
from cdfkd.teacher_node.datasets import DatasetName

BASE = {"teachers": [{"package": "t1"}]}


def test_no_data_table_is_a_data_free_run(tmp_path: Path) -> None:
    config = parse_run_config(BASE, base=tmp_path)
    assert config.data is None
    assert '"data"' not in dump_run_config(config)
    # What the Ray driver sends to its worker comes back the same.
    assert RunConfig.model_validate_json(config.model_dump_json()) == config


def test_files_resolve_against_the_config_folder(tmp_path: Path) -> None:
    config = parse_run_config({**BASE, "data": {"files": "owners"}}, base=tmp_path)
    assert config.data is not None
    assert config.data.files == tmp_path / "owners"
    assert config.data.source == tmp_path / "owners"
    assert RunConfig.model_validate_json(config.model_dump_json()) == config
    named = parse_run_config({**BASE, "data": {"eval_samples": 100}}, base=tmp_path)
    assert named.data is not None
    assert named.data.source is DatasetName.FASHION_MNIST


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({**BASE, "train": {"method": "kd_real"}}, "'data': train.method = 'kd_real'"),
        ({**BASE, "data": {"files": "a", "dataset": "digits"}}, "'data': .*give data.files"),
        ({**BASE, "data": {"files": "a", "path": "b"}}, "'data': .*not both"),
        ({**BASE, "data": {"file": "a"}}, "unknown key 'data.file'"),
    ],
)
def test_bad_data_tables_name_the_key(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_run_config(data)
