"""The quality protocol's ledger: finished runs, committed, so the protocol adds up across sessions.

The whole protocol needs about a day of 2 CPU cores, more than one session or one machine gives.
Each finished run (tuning or final) leaves one small JSON record here, in git, named by where it
sits in the protocol::

    bench/quality_ledger/<federation>/<phase>/<objective>__<student>/<setting>_seed<S>.json

A record holds the run's figures and a ``key``: the sha256 of everything that decides the run's
result (its ``TrainConfig``, which split it was scored on, the sha256 of every teacher's weights).
``--reuse`` takes a record only when its key is the key the run would have now, so a changed
setting, split or teacher is run again, never mixed in. Threads and the machine do not enter the
key: budgets are iterations, so they change the seconds, not what is computed (the record keeps
the host beside the figures). Nor does the code: a change to what a run computes (the trainer,
the losses, the models) must raise :data:`FORMAT`, which retires every earlier record.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any

#: Where the ledger lives (committed).
LEDGER = Path(__file__).resolve().parent / "quality_ledger"
#: The record's format; a record of another format is not reused. Raise it when a change to
#: the code changes what a protocol run computes.
FORMAT = 1


def run_key(
    train: dict[str, Any], split: dict[str, Any], role: str, teacher_digests: list[str]
) -> str:
    """The sha256 of what decides a run's result.

    Args:
        train: The run's ``TrainConfig`` as a JSON dict.
        split: How the data were cut (``split.json``: validation size and seed, test size).
        role: Which images score the run: ``validation`` (tuning) or ``test`` (final).
        teacher_digests: The sha256 of each teacher's weights, in the federation's order.
    """
    content = {
        "format": FORMAT,
        "train": train,
        "split": split,
        "role": role,
        "teachers": list(teacher_digests),
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def record_path(
    ledger: Path, federation: str, phase: str, cell_name: str, setting_key: str, seed: int
) -> Path:
    """Where the record of one run lives."""
    return (
        ledger
        / federation
        / phase
        / cell_name.replace("/", "__")
        / f"{setting_key}_seed{seed}.json"
    )


def read_record(path: Path, key: str) -> dict[str, Any] | None:
    """The figures recorded at ``path`` if its key is ``key``; None if absent or stale."""
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("format") != FORMAT or record.get("key") != key:
        return None
    figures = record.get("figures")
    return figures if isinstance(figures, dict) else None


def write_record(path: Path, key: str, figures: dict[str, Any], threads: int) -> None:
    """Record one finished run (atomically: a half-written record is never read)."""
    record = {
        "format": FORMAT,
        "key": key,
        "figures": {k: v for k, v in figures.items() if k != "reused"},
        "host": {
            "processor": _processor(),
            "threads": threads,
        },
        "recorded": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    os.replace(partial, path)


def _processor() -> str:
    """The CPU's model name where Linux tells it, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
