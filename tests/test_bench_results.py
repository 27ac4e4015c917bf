"""bench/results.py: each benchmark's section lands whole at the end of RESULTS.md."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import results


def test_sections_are_appended_in_order_each_ending_a_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "RESULTS.md"
    target.write_text("# Results\n")
    monkeypatch.setattr(results, "RESULTS", target)
    results.append_section("\n### one\n| a |")
    results.append_section("\n### two\n")
    assert target.read_text() == "# Results\n\n### one\n| a |\n\n### two\n"
