"""Teacher packages: weights in safetensors (never unpickled) plus ``teacher.json`` metadata.

A package is a folder::

    teacher.json          metadata (the model's origin, input shape, classes, normalization,
                          feature layer, BatchNorm or not, accuracy, weights digest)
    weights.safetensors   the state dict

The model comes either from a built-in architecture (``spec``, made by ``cdfkd teacher train``)
or from the owner's own code (``factory``: ``MODULE:CALLABLE`` and keyword arguments, made by
``cdfkd teacher package``); the owner's code is imported only on the owner's node. Format 1
packages (built-in only, before owners' models) stay readable.

Only the owner's node ever loads a package; its contents never go on the wire and never into
the student's checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from cdfkd.teacher_node.datasets import Normalization
from cdfkd.teacher_node.errors import PackageError
from cdfkd.teacher_node.owner_model import (
    FactoryRef,
    FeatureTap,
    build_from_factory,
    has_batchnorm,
)
from cdfkd.teacher_node.privacy import LayerStatistics, PrivacyGuarantee
from cdfkd.teacher_node.zoo import ArchitectureSpec, build_classifier

logger = logging.getLogger(__name__)

METADATA_FILE = "teacher.json"
WEIGHTS_FILE = "weights.safetensors"
FORMAT_VERSION = 2
#: Built-in packages keep format 1 (their new fields follow from ``spec``), so that earlier
#: cdfkd versions (a Ray cluster not yet upgraded, a cached demo) still read them.
BUILTIN_FORMAT_VERSION = 1
#: Formats this cdfkd reads: 1 (built-in architectures only) and 2.
READABLE_FORMATS = (1, 2)
#: What format 1 does not hold.
_FORMAT_2_FIELDS = frozenset(
    {
        "factory",
        "input_shape",
        "num_classes",
        "feature_layer",
        "feature_from_input",
        "has_batchnorm",
        "eval_data",
        "privacy",
        "released_statistics",
    }
)


class TeacherMetadata(BaseModel):
    """What ``teacher.json`` holds.

    Attributes:
        spec: A built-in architecture (``cdfkd teacher train``); None for an owner's model.
        factory: The owner's ``MODULE:CALLABLE`` and its keyword arguments; None for built-ins.
        input_shape: ``(C, H, W)`` the model takes.
        num_classes: Size of its label space.
        normalization: Per-channel mean and std the model expects of [0, 1] pixels.
        feature_layer: The tapped module of an owner's model; None for built-ins, which
            return their feature themselves.
        feature_from_input: The feature is the tapped module's input (the default tap: the
            input of the last ``nn.Linear``), else its output.
        has_batchnorm: Whether the model has BatchNorm layers (else it has no BN prior).
        eval_data: What ``test_accuracy`` was measured on.
        privacy: A DP teacher's guarantee (``cdfkd teacher train --dp-epsilon``); None for a
            teacher trained without differential privacy.
        released_statistics: A DP teacher's noised per-layer statistics, the targets of its
            prior R(x) (it has no BatchNorm running statistics); charged to ``privacy``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: int = FORMAT_VERSION
    name: str = Field(min_length=1)
    spec: ArchitectureSpec | None = None
    factory: FactoryRef | None = None
    input_shape: tuple[int, int, int]
    num_classes: int = Field(ge=2)
    normalization: Normalization
    feature_layer: str | None = None
    feature_from_input: bool = False
    has_batchnorm: bool = True
    feature_dim: int = Field(ge=1)
    num_parameters: int = Field(ge=1)
    test_accuracy: float | None = Field(default=None, ge=0.0, le=1.0)
    eval_data: str | None = None
    train_samples: int | None = None
    weights_sha256: str
    privacy: PrivacyGuarantee | None = None
    released_statistics: tuple[LayerStatistics, ...] | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_format_1(cls, data: Any) -> Any:
        """Format 1 held only ``spec``: input shape and classes come from it."""
        if isinstance(data, dict) and isinstance(data.get("spec"), dict):
            spec = data["spec"]
            data = {
                "input_shape": spec.get("input_shape"),
                "num_classes": spec.get("num_classes"),
                **data,
            }
        return data

    @model_validator(mode="after")
    def _one_origin(self) -> TeacherMetadata:
        if (self.spec is None) == (self.factory is None):
            raise ValueError("a package names exactly one of spec (built-in) and factory")
        channels = self.input_shape[0]
        if len(self.normalization.mean) != channels or len(self.normalization.std) != channels:
            raise ValueError(
                f"normalization has {len(self.normalization.mean)} means and "
                f"{len(self.normalization.std)} stds for {channels} channels"
            )
        if self.released_statistics is not None and self.privacy is None:
            raise ValueError("released_statistics come only with a privacy guarantee")
        return self

    @property
    def has_statistics_prior(self) -> bool:
        """Whether the teacher has a prior R(x): BatchNorm or released statistics."""
        return self.has_batchnorm or bool(self.released_statistics)


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
    """Write a built-in ``model`` as a teacher package into ``directory`` (atomic per file)."""
    return _write_package(
        directory,
        model,
        format_version=BUILTIN_FORMAT_VERSION,
        name=name,
        spec=spec,
        input_shape=spec.input_shape,
        num_classes=spec.num_classes,
        normalization=normalization,
        feature_dim=feature_dim,
        test_accuracy=test_accuracy,
        train_samples=train_samples,
    )


def save_private_package(
    directory: Path,
    model: nn.Module,
    *,
    name: str,
    spec: ArchitectureSpec,
    normalization: Normalization,
    feature_dim: int,
    test_accuracy: float | None,
    eval_data: str,
    train_samples: int,
    privacy: PrivacyGuarantee,
    statistics: list[LayerStatistics],
) -> TeacherMetadata:
    """Write a DP teacher's package (format 2): weights, guarantee and released statistics.

    Raises:
        PackageError: the model holds BatchNorm running statistics (un-noised data
            statistics a DP package must not hold).
    """
    if has_batchnorm(model):
        raise PackageError("a DP package must not hold BatchNorm running statistics")
    return _write_package(
        directory,
        model,
        name=name,
        spec=spec,
        input_shape=spec.input_shape,
        num_classes=spec.num_classes,
        normalization=normalization,
        has_batchnorm=False,
        feature_dim=feature_dim,
        test_accuracy=test_accuracy,
        eval_data=eval_data,
        train_samples=train_samples,
        privacy=privacy,
        released_statistics=tuple(statistics),
    )


def _write_package(directory: Path, model: nn.Module, **fields: Any) -> TeacherMetadata:
    """Write ``model``'s weights, then ``teacher.json`` (``fields``, parameter count, sha256)."""
    directory = Path(directory)
    weights = write_weights(directory, model)
    metadata = TeacherMetadata(
        **fields,
        num_parameters=sum(p.numel() for p in model.parameters()),
        weights_sha256=_sha256(weights),
    )
    write_metadata(directory, metadata)
    return metadata


def write_weights(directory: Path, model: nn.Module) -> Path:
    """Write ``model``'s state dict as ``weights.safetensors`` in ``directory`` (atomic)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / WEIGHTS_FILE
    state = {key: value.detach().contiguous() for key, value in model.state_dict().items()}
    save_file(state, str(weights.with_suffix(".tmp")))
    os.replace(weights.with_suffix(".tmp"), weights)
    return weights


def weights_digest(path: Path) -> str:
    """The sha256 of a weights file, as recorded in ``teacher.json``."""
    return _sha256(Path(path))


def write_metadata(directory: Path, metadata: TeacherMetadata) -> None:
    """Write ``teacher.json`` (atomic)."""
    target = Path(directory) / METADATA_FILE
    if metadata.format_version == 1:
        text = metadata.model_dump_json(indent=2, exclude=set(_FORMAT_2_FIELDS))
    else:
        text = metadata.model_dump_json(indent=2, exclude_none=True)
    target.with_suffix(".tmp").write_text(text + "\n")
    os.replace(target.with_suffix(".tmp"), target)


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
            f"{path} not found: is {directory} a teacher package made by 'cdfkd teacher "
            "package' or 'cdfkd teacher train'?"
        ) from error
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PackageError(f"{path} is not valid JSON: {error}") from error
    try:
        metadata = TeacherMetadata.model_validate(raw)
    except ValidationError as error:
        raise PackageError(f"{path} is not valid teacher metadata: {error}") from error
    if metadata.format_version not in READABLE_FORMATS:
        raise PackageError(
            f"{path} has format_version {metadata.format_version}; this cdfkd reads "
            f"{list(READABLE_FORMATS)}: re-create the package with this version"
        )
    return metadata


def load_package(directory: Path) -> tuple[TeacherMetadata, nn.Module]:
    """Load a teacher package, verifying its digest and that the weights fit the model.

    An owner's model (``factory``) is built by the owner's code and wrapped in
    :class:`FeatureTap`, so every package yields a classifier returning ``ClassifierOutput``.

    Returns:
        The metadata and the classifier in eval mode.

    Raises:
        PackageError: the package is missing, corrupt, truncated, of another architecture, or
            its factory fails.
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
    state = read_weights(weights)
    if metadata.spec is not None:
        model = build_classifier(metadata.spec)
        what = (
            f"a {metadata.spec.architecture.value} with this spec (the weights are of another "
            "architecture)"
        )
        load_weights(model, state, weights, what)
        return metadata, model.eval()
    assert metadata.factory is not None  # one origin, checked by TeacherMetadata
    owner_model = build_from_factory(metadata.factory)
    load_weights(owner_model, state, weights, f"the model of {metadata.factory.reference}")
    tap = FeatureTap(owner_model, metadata.feature_layer, metadata.feature_from_input)
    return metadata, tap.eval()


def read_weights(path: Path) -> dict[str, Tensor]:
    """A safetensors state dict (never unpickled).

    Raises:
        PackageError: the file cannot be read as safetensors.
    """
    try:
        return load_file(str(path))
    except FileNotFoundError as error:
        raise PackageError(f"weights file {path} not found") from error
    except (SafetensorError, OSError, ValueError) as error:
        raise PackageError(f"{path} cannot be read as safetensors: {error}") from error


def load_weights(model: nn.Module, state: dict[str, Tensor], source: Path, what: str) -> None:
    """Load ``state`` into ``model``, naming missing, unexpected and reshaped keys.

    Raises:
        PackageError: the keys or shapes differ.
    """
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    found = {key: tuple(value.shape) for key, value in state.items()}
    if expected != found:
        missing = sorted(set(expected) - set(found))
        unexpected = sorted(set(found) - set(expected))
        reshaped = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
        raise PackageError(
            f"{source} does not fit {what}: missing keys {_listed(missing)}, unexpected keys "
            f"{_listed(unexpected)}, other shapes {_listed(reshaped)}"
        )
    model.load_state_dict(state)


def _listed(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit]) or "none"
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")
