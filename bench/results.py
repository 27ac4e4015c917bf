"""bench/RESULTS.md: where every benchmark appends its section."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def append_section(markdown: str) -> None:
    """Append ``markdown`` (one run's section) to bench/RESULTS.md, ending it with a newline."""
    with RESULTS.open("a") as handle:
        handle.write(markdown if markdown.endswith("\n") else markdown + "\n")
