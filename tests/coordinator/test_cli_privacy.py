"""`cdfkd teacher train --dp-*`: bad settings exit 2 naming the setting, before any training."""

from __future__ import annotations

from pathlib import Path

import pytest

from cdfkd.coordinator.cli import main
from cdfkd.coordinator.errors import ExitCode


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--dp-epsilon", "0", "--dp-delta", "1e-5"], "--dp-epsilon 0 must be"),
        (["--dp-epsilon", "-1", "--dp-delta", "1e-5"], "--dp-epsilon -1 must be"),
        (["--dp-epsilon", "inf", "--dp-delta", "1e-5"], "--dp-epsilon inf must be"),
        (["--dp-epsilon", "nan", "--dp-delta", "1e-5"], "--dp-epsilon nan must be"),
        (["--dp-epsilon", "3", "--dp-delta", "1"], "--dp-delta 1 must be in (0, 1)"),
        (["--dp-epsilon", "3", "--dp-delta", "2"], "--dp-delta 2 must be in (0, 1)"),
        (["--dp-epsilon", "3", "--dp-delta", "0"], "--dp-delta 0 must be in (0, 1)"),
        (["--dp-epsilon", "3"], "--dp-delta is required"),
        (["--dp-delta", "1e-5"], "--dp-delta only with --dp-epsilon"),
        (
            ["--dp-epsilon", "3", "--dp-delta", "1e-5", "--dp-max-grad-norm", "0"],
            "--dp-max-grad-norm 0 must be",
        ),
        (
            ["--dp-epsilon", "3", "--dp-delta", "1e-5", "--architecture", "lenet5_bn"],
            "--architecture lenet5_bn has BatchNorm",
        ),
        (
            ["--dp-epsilon", "3", "--dp-delta", "1e-5", "--architecture", "resnet"],
            "--architecture resnet has BatchNorm",
        ),
    ],
)
def test_bad_dp_settings_exit_2_naming_the_setting(
    flags: list[str], named: str, tmp_path: Path, caplog
) -> None:
    out = tmp_path / "teacher"
    code = main(["teacher", "train", "--out", str(out), "--dataset", "digits", *flags])
    assert code == ExitCode.USAGE
    assert named in caplog.text
    assert not out.exists()


def test_an_epsilon_unreachable_in_the_given_epochs_exits_2(tmp_path: Path, caplog) -> None:
    """Refused by the calibration, before the first DP-SGD step (no package written)."""
    out = tmp_path / "teacher"
    flags = ["--dp-epsilon", "0.01", "--dp-delta", "1e-5", "--epochs", "50", "--batch-size", "32"]
    code = main(["teacher", "train", "--out", str(out), "--dataset", "digits", *flags])
    assert code == ExitCode.USAGE
    assert "--dp-epsilon 0.01" in caplog.text
    assert "unreachable" in caplog.text
    assert "--epochs" in caplog.text
    assert not out.exists()
