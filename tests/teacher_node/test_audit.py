"""The audit log: one JSON line per decision, no image contents, rotation, per-caller summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cdfkd.coordinator.cli import main
from cdfkd.teacher_node.audit import AuditLog, AuditUnavailable, audit_files, summarize


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


def test_refusals_are_rate_limited_per_peer_host_and_counted(tmp_path: Path) -> None:
    now = [1_700_000_000.0]
    log = AuditLog(tmp_path / "audit.jsonl", 10**7, 1, clock=lambda: now[0], refusals_per_minute=6)

    def refuse(port: int, host: str = "10.0.0.1") -> bool:
        return log.record(
            caller="intruder",
            rpc="Query",
            images=1,
            mode="-",
            decision="denied",
            reason="PermissionDenied",
            peer=f"ipv4:{host}:{port}",
        )

    log.record(caller="student", rpc="Query", images=8, mode="full", decision="allowed")
    # A new connection per request (a new port) does not reset the peer's limit.
    written = [refuse(port) for port in range(40000, 40100)]
    assert written.count(True) == 6
    assert log.suppressed == 94
    assert refuse(1, host="10.0.0.2")  # another peer has its own budget of lines
    log.record(caller="student", rpc="Query", images=8, mode="full", decision="allowed")
    now[0] += 10.0  # one more line's worth (6 per minute)
    assert refuse(2)
    lines = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [r["decision"] for r in lines].count("allowed") == 2  # answers are never dropped
    assert lines[-1]["suppressed"] == 94  # the gap is stated on the peer's next line
    assert summarize(tmp_path / "audit.jsonl")["intruder"]["suppressed"] == 94


def test_a_failed_write_raises_a_typed_error_and_marks_the_log_unhealthy(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, 10**6, 1, clock=lambda: 1_700_000_000.0)
    path.mkdir()  # the file cannot be opened for appending
    with pytest.raises(AuditUnavailable, match="cannot write the audit log"):
        log.record(caller="s", rpc="Query", images=1, mode="full", decision="allowed")
    assert not log.healthy
    path.rmdir()
    assert log.record(caller="s", rpc="Query", images=1, mode="full", decision="allowed")
    assert log.healthy
