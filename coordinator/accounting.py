"""What a run cost its teachers: images answered and wire bytes, per teacher.

A remote teacher counts the images of every answer it received (Query and InputGrad; the
probes of a zeroth-order estimate are queries) and the serialized size of every message with
gRPC's 5-byte prefix (``RemoteTeacher.bytes_sent``/``bytes_received``: HTTP/2 and TLS framing
come on top). An in-process teacher counts images; no byte crosses a wire, so its wire bytes
are 0. Any other teacher (a test's wrapper) is not metered: None.

Training usage is carried in the run's checkpoints (:data:`USAGE_KEY`), so a resumed run
reports the cost of its whole trajectory: the answers of the iterations it kept, in every
invocation, plus those of an iteration cut short by a spent budget. Work redone after a
crash (the iterations after the checkpoint it resumed from) is counted once; the nodes charged
it twice, and their ledgers say so.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from cdfkd.student_node.teachers.local import InProcessTeacher
from cdfkd.student_node.teachers.protocol import Teacher
from cdfkd.student_node.teachers.remote import RemoteTeacher

logger = logging.getLogger(__name__)

#: The checkpoint entry of the training usage: one ``{field: int}`` (or None) per teacher.
USAGE_KEY = "teacher_usage"
FIELDS = ("images", "bytes_sent", "bytes_received", "rpc_calls", "retries")

Usage = dict[str, int]


def counters(teacher: Teacher) -> Usage | None:
    """The teacher's counters now, since it was built (None: a teacher that is not metered)."""
    if isinstance(teacher, RemoteTeacher):
        return {
            "images": teacher.images_answered,
            "bytes_sent": teacher.bytes_sent,
            "bytes_received": teacher.bytes_received,
            "rpc_calls": teacher.calls,
            "retries": teacher.retries,
        }
    if isinstance(teacher, InProcessTeacher):
        return dict.fromkeys(FIELDS, 0) | {"images": teacher.images_answered}
    return None


def _minus(a: Usage | None, b: Usage | None) -> Usage | None:
    if a is None or b is None:
        return None
    return {k: a[k] - b[k] for k in FIELDS}


def _plus(a: Usage | None, b: Usage | None) -> Usage | None:
    if a is None or b is None:
        return None
    return {k: a[k] + b[k] for k in FIELDS}


def _valid(carried: Any, count: int) -> list[Usage | None] | None:
    """A checkpoint's usage list if it fits ``count`` teachers, else None."""
    if not isinstance(carried, list) or len(carried) != count:
        return None
    for entry in carried:
        if entry is not None and not (
            isinstance(entry, dict) and all(isinstance(entry.get(k), int) for k in FIELDS)
        ):
            return None
    return carried


class TeacherMeter:
    """Training and evaluation usage per teacher, training cumulative over resumes.

    Args:
        teachers: The run's teachers in header order (the objects that talk to the owners,
            not the run-space wrappers).
        carried: The :data:`USAGE_KEY` entry of the checkpoint the run resumed from.
    """

    def __init__(self, teachers: Sequence[Teacher], carried: Any = None) -> None:
        self.teachers = list(teachers)
        self._start = [counters(t) for t in self.teachers]
        valid = _valid(carried, len(self.teachers))
        if carried is not None and valid is None:
            logger.warning("the checkpoint's teacher usage does not fit these teachers: dropped")
        zero = dict.fromkeys(FIELDS, 0)
        self._carried: list[Usage | None] = valid or [dict(zero) for _ in self.teachers]
        self._frozen: list[Usage | None] | None = None
        self._at_freeze: list[Usage | None] = []

    def training(self) -> list[Usage | None]:
        """Training usage so far, per teacher (frozen once :meth:`end_training` was called)."""
        if self._frozen is not None:
            return self._frozen
        return [
            _plus(carried, _minus(counters(t), start))
            for t, start, carried in zip(self.teachers, self._start, self._carried, strict=True)
        ]

    def end_training(self) -> None:
        """Freeze the training usage; what the teachers answer from now on is evaluation."""
        self._frozen = self.training()
        self._at_freeze = [counters(t) for t in self.teachers]

    def evaluation(self) -> list[Usage | None]:
        """Usage since :meth:`end_training` (the final teacher evaluation)."""
        pairs = zip(self.teachers, self._at_freeze, strict=True)
        return [_minus(counters(t), at) for t, at in pairs]

    def traffic(self) -> list[dict[str, Any]]:
        """One record per teacher for ``result.json``'s ``teacher_traffic``.

        ``training_*`` is the run's training cost (cumulative over resumes), ``evaluation_*``
        the final evaluation of the teachers in this invocation, and ``rpc_calls``,
        ``retries``, ``bytes_sent``, ``bytes_received`` everything this process exchanged
        with the node (metadata, training, evaluation).
        """
        records = []
        evaluation = self.evaluation() if self._frozen is not None else [None] * len(self.teachers)
        for teacher, trained, evaluated in zip(
            self.teachers, self.training(), evaluation, strict=True
        ):
            now = counters(teacher)
            address = teacher.config.address if isinstance(teacher, RemoteTeacher) else None
            records.append(
                {
                    "teacher": teacher.info().name,
                    "address": address,
                    "transport": "grpc" if address else "in_process" if now is not None else None,
                    "training_images": None if trained is None else trained["images"],
                    "training_wire_bytes": None
                    if trained is None
                    else trained["bytes_sent"] + trained["bytes_received"],
                    "evaluation_images": None if evaluated is None else evaluated["images"],
                    "evaluation_wire_bytes": None
                    if evaluated is None
                    else evaluated["bytes_sent"] + evaluated["bytes_received"],
                    **{k: None if now is None else now[k] for k in FIELDS[1:]},
                }
            )
        return records


def totals(traffic: Sequence[dict[str, Any]], accuracy: float | None) -> dict[str, Any]:
    """The summary's top-level cost keys from ``teacher_traffic`` (None where not metered).

    ``accuracy_per_million_teacher_images`` is ``accuracy`` (the student's mean of headers,
    in [0, 1]) divided by the training images of all teachers, in millions.
    """

    def total(key: str) -> int | None:
        values = [t[key] for t in traffic]
        return None if any(v is None for v in values) else sum(values)

    images = total("training_images")
    return {
        "teacher_images": images,
        "teacher_images_per_teacher": [t["training_images"] for t in traffic],
        "training_wire_bytes": total("training_wire_bytes"),
        "training_wire_bytes_per_teacher": [t["training_wire_bytes"] for t in traffic],
        "evaluation_teacher_images": total("evaluation_images"),
        "accuracy_per_million_teacher_images": None
        if accuracy is None or not images
        else accuracy * 1e6 / images,
        "rpc_calls": sum(t["rpc_calls"] or 0 for t in traffic),
        "rpc_retries": sum(t["retries"] or 0 for t in traffic),
        "wire_bytes": sum((t["bytes_sent"] or 0) + (t["bytes_received"] or 0) for t in traffic),
    }
