"""Teacher packages: weights in safetensors (never unpickled) plus ``teacher.json`` metadata.

A package is a folder::

    teacher.json          metadata (architecture spec, normalization, accuracy, weights digest)
    weights.safetensors   the state dict

Only the owner's node ever loads a package; its contents never go on the wire and never into
the student's checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from cdfkd.teacher_node.datasets import Normalization
from cdfkd.teacher_node.errors import PackageError
from cdfkd.teacher_node.zoo import ArchitectureSpec, build_classifier

logger = logging.getLogger(__name__)

METADATA_FILE = "teacher.json"
WEIGHTS_FILE = "weights.safetensors"
FORMAT_VERSION = 1


class TeacherMetadata(BaseModel):
    """What ``teacher.json`` holds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: int = FORMAT_VERSION
    name: str = Field(min_length=1)
    spec: ArchitectureSpec
    normalization: Normalization
    feature_dim: int = Field(ge=1)
    num_parameters: int = Field(ge=1)
    test_accuracy: float | None = Field(default=None, ge=0.0, le=1.0)
    train_samples: int | None = None
    weights_sha256: str


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_package(
    directory: Path,
    model: nn.Module,
    *,
    name: str,
    spec: ArchitectureSpec,
    normalization: Normalization,
    feature_dim: int,
    test_accuracy: float | None,
    train_samples: int | None,
) -> TeacherMetadata:
    """Write ``model`` as a teacher package into ``directory`` (atomic per file)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / WEIGHTS_FILE
    state = {key: value.detach().contiguous() for key, value in model.state_dict().items()}
    save_file(state, str(weights.with_suffix(".tmp")))
    os.replace(weights.with_suffix(".tmp"), weights)
    metadata = TeacherMetadata(
        name=name,
        spec=spec,
        normalization=normalization,
        feature_dim=feature_dim,
        num_parameters=sum(p.numel() for p in model.parameters()),
        test_accuracy=test_accuracy,
        train_samples=train_samples,
        weights_sha256=_sha256(weights),
    )
    target = directory / METADATA_FILE
    target.with_suffix(".tmp").write_text(metadata.model_dump_json(indent=2) + "\n")
    os.replace(target.with_suffix(".tmp"), target)
    return metadata


def read_metadata(directory: Path) -> TeacherMetadata:
    """Read and validate ``teacher.json``.

    Raises:
        PackageError: missing, unreadable or invalid metadata.
    """
    path = Path(directory) / METADATA_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as error:
        raise PackageError(
            f"{path} not found: is {directory} a teacher package made by 'cdfkd teacher train'?"
        ) from error
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PackageError(f"{path} is not valid JSON: {error}") from error
    try:
        metadata = TeacherMetadata.model_validate(raw)
    except ValidationError as error:
        raise PackageError(f"{path} is not valid teacher metadata: {error}") from error
    if metadata.format_version != FORMAT_VERSION:
        raise PackageError(
            f"{path} has format_version {metadata.format_version}; this cdfkd reads "
            f"{FORMAT_VERSION}: re-create the package with this version"
        )
    return metadata


def load_package(directory: Path) -> tuple[TeacherMetadata, nn.Module]:
    """Load a teacher package, verifying its digest and its architecture.

    Returns:
        The metadata and the classifier in eval mode.

    Raises:
        PackageError: the package is missing, corrupt, truncated or of another architecture.
    """
    metadata = read_metadata(directory)
    weights = Path(directory) / WEIGHTS_FILE
    if not weights.is_file():
        raise PackageError(f"{weights} not found: the package is incomplete")
    digest = _sha256(weights)
    if digest != metadata.weights_sha256:
        raise PackageError(
            f"{weights} is corrupt or truncated: sha256 {digest[:12]}... does not match "
            f"{metadata.weights_sha256[:12]}... recorded in {METADATA_FILE}"
        )
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as error:
        raise PackageError(f"{weights} cannot be read as safetensors: {error}") from error
    model = build_classifier(metadata.spec)
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    found = {key: tuple(value.shape) for key, value in state.items()}
    if expected != found:
        missing = sorted(set(expected) - set(found))[:3]
        unexpected = sorted(set(found) - set(expected))[:3]
        reshaped = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])[:3]
        raise PackageError(
            f"{weights} does not hold a {metadata.spec.architecture.value} with this spec "
            f"(missing {missing}, unexpected {unexpected}, other shapes {reshaped}): the weights "
            "are of another architecture"
        )
    model.load_state_dict(state)
    return metadata, model.eval()
