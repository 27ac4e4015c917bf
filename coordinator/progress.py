"""Training events -> ``metrics.jsonl``, one human line per interval, a bar on a terminal."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from cdfkd.student_node.trainer import IterationMetrics, TrainState

logger = logging.getLogger(__name__)


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl`` (flushed per line)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle: IO[str] = self.path.open("a")

    def write(self, kind: str, **fields: Any) -> None:
        """Write ``{"type": kind, **fields}``."""
        self._handle.write(json.dumps({"type": kind, **fields}) + "\n")
        self._handle.flush()

    def iteration(self, metrics: IterationMetrics, elapsed: float) -> None:
        """Write an iteration record."""
        self.write("iteration", elapsed=round(elapsed, 3), **dataclasses.asdict(metrics))

    def close(self) -> None:
        """Close the file."""
        self._handle.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Records of ``metrics.jsonl``; of records repeated after a resume, the last wins."""
    if not Path(path).exists():
        return []
    records: dict[tuple[str, int], dict[str, Any]] = {}
    others: list[dict[str, Any]] = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if "iteration" in record:
            records[(record["type"], int(record["iteration"]))] = record
        else:
            others.append(record)
    return others + sorted(records.values(), key=lambda r: (r["iteration"], r["type"]))


def show_bar() -> bool:
    """Progress bars only on a terminal and never under CI."""
    return sys.stderr.isatty() and os.environ.get("CI", "").lower() not in ("1", "true", "yes")


class ProgressReporter:
    """Logs a summary line every ``every`` iterations; drives a tqdm bar on a TTY."""

    def __init__(self, total: int, start: int, every: int, label: str = "train") -> None:
        self.every = every
        self.started = time.monotonic()
        self.label = label
        self._bar = (
            tqdm(total=total, initial=start, desc=label, unit="it", dynamic_ncols=True)
            if show_bar()
            else None
        )

    def __call__(self, state: TrainState, metrics: IterationMetrics) -> None:
        """Report one iteration."""
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss_s=f"{metrics.student_loss:.3f}", refresh=False)
        if metrics.iteration % self.every == 0:
            logger.info(
                "%s it %d epoch %d | L_S %.4f (header %.4f feature %.4f ensemble %.4f) | "
                "L_G %.4f (adv %.4f bn %.4f) | lr %.3g/%.3g | %.2f s/it | %.0f s",
                self.label,
                metrics.iteration,
                metrics.epoch,
                metrics.student_loss,
                metrics.header_loss,
                metrics.feature_loss,
                metrics.ensemble_loss,
                metrics.generator_loss,
                metrics.adversarial_loss,
                metrics.bn_loss,
                metrics.student_lr,
                metrics.generator_lr,
                metrics.seconds,
                time.monotonic() - self.started,
            )

    def close(self) -> None:
        """Close the bar."""
        if self._bar is not None:
            self._bar.close()
