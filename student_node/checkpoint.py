"""TrainState checkpoints: atomic writes, ``weights_only`` loads, config fingerprints.

A checkpoint holds the student, the generator, both optimizers and schedulers, the iteration,
the RNG state, the replay memory (when the run keeps one: generated images and the teachers'
answers to them), the config fingerprint and the code version. Never a teacher's parameters.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pickle
import re
import subprocess
from pathlib import Path
from typing import Any

import torch

from cdfkd.student_node.config import TrainConfig
from cdfkd.student_node.errors import CheckpointError
from cdfkd.student_node.trainer import TrainState

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d{8})\.pt$")
FORMAT_VERSION = 1
#: Fields that do not change the math of an iteration: a run may be extended or re-evaluated.
#: (``prefetch`` changes when the teachers are asked, not what: the same state bit for bit.)
_NON_MATH_FIELDS = {"epochs", "attention", "prefetch"}


#: Fields added later and their defaults: left out while at their default, so earlier
#: checkpoints keep their fingerprint.
_LATER_FIELDS: dict[str, object] = {
    "image_shape": None,
    "normalization": None,
    "replay": None,
    "generator_objective": "adversarial",
    "ideal": None,
    "ensemble_weighting": "equal",
    "confidence_temperature": 0.1,
}


#: The same for fields added later inside a section: ``{section: {field: default}}``.
_LATER_SECTION_FIELDS: dict[str, dict[str, object]] = {
    "generator": {"output": "batchnorm"},
    "replay": {"keep_generator_batch": False},
    "ideal": {"disagreement": 0.0, "moments": 0.0},
}


def config_fingerprint(config: TrainConfig) -> str:
    """sha256 of every config field that changes the math of training."""
    exclude: dict[str, Any] = {name: True for name in _NON_MATH_FIELDS}
    exclude |= {
        name: True for name, default in _LATER_FIELDS.items() if getattr(config, name) == default
    }
    for section, fields in _LATER_SECTION_FIELDS.items():
        value = getattr(config, section)
        if value is None:  # an optional section that is off
            continue
        unset = {name for name, default in fields.items() if getattr(value, name) == default}
        if unset:
            exclude[section] = unset
    data = config.model_dump_json(exclude=exclude)
    return hashlib.sha256(data.encode()).hexdigest()


@functools.cache
def code_version() -> str:
    """The git commit of the running code, or 'unknown'."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def checkpoint_path(directory: Path, iteration: int) -> Path:
    """``directory/checkpoint-<iteration:08d>.pt``."""
    return Path(directory) / f"checkpoint-{iteration:08d}.pt"


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoints in ``directory`` by increasing iteration."""
    if not Path(directory).is_dir():
        return []
    found = [p for p in Path(directory).iterdir() if CHECKPOINT_PATTERN.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))  # type: ignore[union-attr]


def latest_checkpoint(directory: Path) -> Path | None:
    """The checkpoint with the highest iteration, or None."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


def _cloned(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: _cloned(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_cloned(item) for item in value)
    return value


def state_payload(state: TrainState, fingerprint: str) -> dict[str, Any]:
    """Everything a checkpoint holds, copied to CPU: a snapshot that later steps cannot change."""
    return _cloned(
        {
            "format_version": FORMAT_VERSION,
            "iteration": state.iteration,
            "config_fingerprint": fingerprint,
            "student": state.student.state_dict(),
            "generator": state.generator.state_dict(),
            "student_optimizer": state.student_optimizer.state_dict(),
            "generator_optimizer": state.generator_optimizer.state_dict(),
            "student_scheduler": state.student_scheduler.state_dict(),
            "generator_scheduler": state.generator_scheduler.state_dict(),
            "rng": state.rng.get_state(),
            # The replay memory with its cached answers: what later iterations draw from.
            **({} if state.replay is None else {"replay": state.replay.state_dict()}),
        }
    )


def write_checkpoint(directory: Path, payload: dict[str, Any], keep: int = 3) -> Path:
    """Write a payload atomically (tmp file, fsync, ``os.replace``); keep the last ``keep``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {**payload, "code_version": code_version()}
    target = checkpoint_path(directory, int(payload["iteration"]))
    temporary = target.with_suffix(".tmp")
    torch.save(payload, temporary)
    with temporary.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, target)
    for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return target


def save_checkpoint(directory: Path, state: TrainState, fingerprint: str, keep: int = 3) -> Path:
    """Write ``state`` as a checkpoint (see :func:`write_checkpoint`)."""
    return write_checkpoint(directory, state_payload(state, fingerprint), keep)


def load_checkpoint(path: Path, state: TrainState, fingerprint: str) -> dict[str, Any]:
    """Restore ``state`` in place from ``path``; return the whole payload.

    The payload may hold entries beyond the state, written by the run that owns the
    checkpoint (``coordinator/training_run.py`` keeps its teacher accounting there).

    Raises:
        CheckpointError: unreadable file, other format, or a config whose math differs.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as error:
        raise CheckpointError(f"{path} cannot be read as a checkpoint: {error}") from error
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a cdfkd checkpoint of format {FORMAT_VERSION}")
    if payload["config_fingerprint"] != fingerprint:
        raise CheckpointError(
            f"{path} was written by a run whose configuration changes the math differently "
            "(fingerprint mismatch): resume with the same config, or start a new output folder"
        )
    restore_payload(state, payload)
    logger.info("resumed from %s at iteration %d", path, state.iteration)
    return payload


def restore_payload(state: TrainState, payload: dict[str, Any]) -> None:
    """Put ``state`` back to a :func:`state_payload` snapshot (e.g. after a failed iteration).

    The snapshot is copied first: optimizers keep the tensors they load, and later steps must
    not change a snapshot that may still be written as a checkpoint.
    """
    payload = _cloned(payload)
    state.student.load_state_dict(payload["student"])
    state.generator.load_state_dict(payload["generator"])
    state.student_optimizer.load_state_dict(payload["student_optimizer"])
    state.generator_optimizer.load_state_dict(payload["generator_optimizer"])
    state.student_scheduler.load_state_dict(payload["student_scheduler"])
    state.generator_scheduler.load_state_dict(payload["generator_scheduler"])
    state.rng.set_state(payload["rng"])
    state.iteration = int(payload["iteration"])
    if state.replay is not None:
        if "replay" not in payload:
            raise CheckpointError("this run keeps a replay memory but the checkpoint holds none")
        device = next(state.student.parameters()).device
        state.replay.load_state_dict(payload["replay"])
        state.replay.to(device)
