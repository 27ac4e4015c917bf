"""The audit log: one JSON line per decision, no image contents, rotation, per-caller summary."""

from __future__ import annotations

import json
from pathlib import Path

from cdfkd.coordinator.cli import main
from cdfkd.teacher_node.audit import AuditLog, audit_files, summarize


def test_records_rotate_and_summarize(tmp_path: Path, capsys) -> None:
    log = AuditLog(
        tmp_path / "audit.jsonl", max_bytes=1200, backups=2, clock=lambda: 1_700_000_000.0
    )
    for index in range(30):
        log.record(
            caller="student" if index % 3 else "intruder",
            rpc="Query",
            images=32,
            mode="full" if index % 3 else "-",
            decision="allowed" if index % 3 else "denied",
            reason="" if index % 3 else "PermissionDenied: not on the allow-list",
            bytes_returned=1000 if index % 3 else 0,
        )
    files = audit_files(tmp_path / "audit.jsonl")
    assert [f.name for f in files] == ["audit.jsonl.2", "audit.jsonl.1", "audit.jsonl"]
    assert all(f.stat().st_size <= 1200 for f in files)
    first = json.loads(files[-1].read_text().splitlines()[0])
    assert set(first) == {
        "time",
        "caller",
        "rpc",
        "images",
        "mode",
        "decision",
        "reason",
        "bytes_returned",
        "request_id",
        "peer",
        "latency_ms",
        "suppressed",
    }
    assert first["time"].startswith("2023-11-14T22:13:20")
    totals = summarize(tmp_path / "audit.jsonl")
    kept = sum(len(f.read_text().splitlines()) for f in files)
    assert totals["student"]["requests"] + totals["intruder"]["requests"] == kept < 30
    assert totals["intruder"]["allowed"] == 0
    assert totals["student"]["images"] == 32 * totals["student"]["allowed"]
    assert main(["teacher", "audit", "summary", str(tmp_path / "audit.jsonl")]) == 0
    table = capsys.readouterr().out
    assert "intruder" in table
    assert "student" in table
    assert main(["teacher", "audit", "summary", str(tmp_path / "missing.jsonl")]) == 2
