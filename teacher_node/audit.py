"""The node's append-only audit log: one JSON object per line, rotated by size.

Each record: time (UTC, ISO 8601), caller identity, RPC, number of images, mode, decision
(``allowed`` / ``denied``), the reason of a denial, and bytes returned. Never image contents.
"""

from __future__ import annotations

import datetime
import json
import os
import threading
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any


class AuditLog:
    """Appends records to ``path``; past ``max_bytes`` it rotates to ``path.1`` ... ``path.N``.

    Args:
        path: The log file.
        max_bytes: Size at which the file is rotated.
        backups: Rotated files kept.
        clock: Seconds since the epoch (injected for tests).
    """

    def __init__(
        self, path: Path, max_bytes: int, backups: int, clock: Callable[[], float]
    ) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self.clock = clock
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def record(
        self,
        *,
        caller: str,
        rpc: str,
        images: int,
        mode: str,
        decision: str,
        reason: str = "",
        bytes_returned: int = 0,
    ) -> None:
        """Append one record (flushed and synced to the file system)."""
        entry = {
            "time": datetime.datetime.fromtimestamp(self.clock(), datetime.UTC).isoformat(),
            "caller": caller,
            "rpc": rpc,
            "images": images,
            "mode": mode,
            "decision": decision,
            "reason": reason,
            "bytes_returned": bytes_returned,
        }
        line = json.dumps(entry) + "\n"
        with self._lock:
            if self.path.exists() and self.path.stat().st_size + len(line) > self.max_bytes:
                self._rotate()
            with self.path.open("a") as handle:
                handle.write(line)
                handle.flush()
                os.fsync(handle.fileno())

    def _rotate(self) -> None:
        oldest = self.path.with_name(f"{self.path.name}.{self.backups}")
        oldest.unlink(missing_ok=True)
        for index in range(self.backups - 1, 0, -1):
            source = self.path.with_name(f"{self.path.name}.{index}")
            if source.exists():
                os.replace(source, self.path.with_name(f"{self.path.name}.{index + 1}"))
        if self.backups > 0:
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink()


def audit_files(path: Path) -> list[Path]:
    """``path`` and its rotated files, oldest first."""
    path = Path(path)
    rotated = sorted(
        (p for p in path.parent.glob(f"{path.name}.*") if p.suffix[1:].isdigit()),
        key=lambda p: -int(p.suffix[1:]),
    )
    return [*rotated, *([path] if path.exists() else [])]


def summarize(path: Path) -> dict[str, dict[str, Any]]:
    """Per-caller totals over ``path`` and its rotations."""
    totals: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"requests": 0, "allowed": 0, "denied": 0, "images": 0, "bytes_returned": 0}
    )
    for file in audit_files(path):
        for line in file.read_text().splitlines():
            if not line.strip():
                continue
            entry = json.loads(line)
            row = totals[entry["caller"]]
            row["requests"] += 1
            row[entry["decision"]] += 1
            if entry["decision"] == "allowed":
                row["images"] += entry["images"]
            row["bytes_returned"] += entry["bytes_returned"]
    return dict(totals)


def format_summary(totals: dict[str, dict[str, Any]]) -> str:
    """A plain-text table of :func:`summarize`."""
    header = ("caller", "requests", "allowed", "denied", "images", "bytes_returned")
    rows = [header] + [
        (caller, *(str(row[key]) for key in header[1:])) for caller, row in sorted(totals.items())
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)
