"""The node's append-only audit log: one JSON object per line, rotated by size.

Each record: time (UTC, ISO 8601), caller identity, RPC, number of images, mode, decision
(``allowed``, ``denied``, ``dropped``: cancelled or expired before compute, never charged;
``replayed``: a retry answered from the stored reply, not charged), the reason, bytes returned,
the request id, the peer address, the latency in milliseconds, and ``suppressed``: refusals of
the same peer host left out before this line. Never image contents.

Refusals (``denied``, ``dropped``) are written at most ``refusals_per_minute`` per peer host
(a token bucket with a minute's burst), so a caller hammering the node with refused requests
cannot rotate the answered requests out of the log; the ones left out are counted, and the
count appears on the peer's next refusal line (and in :attr:`AuditLog.suppressed`).
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

from cdfkd.teacher_node.errors import TeacherError

#: Decisions that are refusals, rate-limited per peer.
REFUSALS = frozenset({"denied", "dropped"})
#: Peer buckets kept before full (idle) ones are forgotten.
MAX_TRACKED_PEERS = 10_000


class AuditUnavailable(TeacherError):
    """An audit record could not be written (the request is refused with UNAVAILABLE)."""


def peer_host(peer: str) -> str:
    """``ipv4:10.0.0.1:5555`` -> ``ipv4:10.0.0.1``: a new connection must not reset a limit."""
    host, separator, port = peer.rpartition(":")
    return host if separator and port.isdigit() else peer


class AuditLog:
    """Appends records to ``path``; past ``max_bytes`` it rotates to ``path.1`` ... ``path.N``.

    Args:
        path: The log file.
        max_bytes: Size at which the file is rotated.
        backups: Rotated files kept.
        clock: Seconds since the epoch (injected for tests); also refills the refusal buckets.
        refusals_per_minute: Refusal lines per peer host and minute (burst: one minute's).
    """

    def __init__(
        self,
        path: Path,
        max_bytes: int,
        backups: int,
        clock: Callable[[], float],
        refusals_per_minute: float = 60.0,
    ) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self.clock = clock
        self.refusals_per_minute = refusals_per_minute
        self.suppressed = 0
        self.healthy = True
        self._buckets: dict[str, tuple[float, float, int]] = {}  # tokens, updated, suppressed
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
        request_id: str = "",
        peer: str = "",
        latency_ms: float = 0.0,
    ) -> bool:
        """Append one record (flushed and synced); False if a refusal was left out (counted).

        Raises:
            AuditUnavailable: the file cannot be written (the message names it: log it, do not
                send it to the caller).
        """
        with self._lock:
            suppressed = 0
            if decision in REFUSALS:
                admitted, suppressed = self._take(peer_host(peer))
                if not admitted:
                    self.suppressed += 1
                    return False
            try:
                self._write(
                    caller=caller,
                    rpc=rpc,
                    images=images,
                    mode=mode,
                    decision=decision,
                    reason=reason,
                    bytes_returned=bytes_returned,
                    request_id=request_id,
                    peer=peer,
                    latency_ms=round(latency_ms, 3),
                    suppressed=suppressed,
                )
            except OSError as error:
                self.healthy = False
                message = f"cannot write the audit log {self.path}: {error}"
                raise AuditUnavailable(message) from error
            self.healthy = True
            return True

    def _take(self, host: str) -> tuple[bool, int]:
        """One refusal line for ``host``: (admitted, refusals suppressed before it)."""
        now = self.clock()
        rate = self.refusals_per_minute / 60.0
        tokens, updated, suppressed = self._buckets.get(host, (self.refusals_per_minute, now, 0))
        tokens = min(self.refusals_per_minute, tokens + max(0.0, now - updated) * rate)
        if tokens < 1.0:
            self._buckets[host] = (tokens, now, suppressed + 1)
            return False, 0
        self._buckets[host] = (tokens - 1.0, now, 0)
        if len(self._buckets) > MAX_TRACKED_PEERS:
            idle_hosts = [
                h
                for h, (t, _, s) in self._buckets.items()
                if t >= self.refusals_per_minute - 1 and not s
            ]
            for idle in idle_hosts:
                del self._buckets[idle]
        return True, suppressed

    def _write(self, **fields: Any) -> None:
        entry = {
            "time": datetime.datetime.fromtimestamp(self.clock(), datetime.UTC).isoformat(),
            **fields,
        }
        line = json.dumps(entry) + "\n"
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


#: Per-caller totals of :func:`summarize` (``suppressed``: refusals left out of the log).
SUMMARY_COLUMNS = (
    "requests",
    "allowed",
    "denied",
    "dropped",
    "replayed",
    "images",
    "bytes_returned",
    "suppressed",
)


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
    totals: dict[str, dict[str, Any]] = defaultdict(lambda: dict.fromkeys(SUMMARY_COLUMNS, 0))
    for file in audit_files(path):
        for line in file.read_text().splitlines():
            if not line.strip():
                continue
            entry = json.loads(line)
            row = totals[entry["caller"]]
            row["requests"] += 1
            row[entry["decision"]] = row.get(entry["decision"], 0) + 1
            row["suppressed"] += entry.get("suppressed", 0)
            if entry["decision"] == "allowed":
                row["images"] += entry["images"]
            row["bytes_returned"] += entry["bytes_returned"]
    return dict(totals)


def format_summary(totals: dict[str, dict[str, Any]]) -> str:
    """A plain-text table of :func:`summarize`."""
    header = ("caller", *SUMMARY_COLUMNS)
    rows = [header] + [
        (caller, *(str(row[key]) for key in header[1:])) for caller, row in sorted(totals.items())
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)
