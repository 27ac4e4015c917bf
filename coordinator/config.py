"""RunConfig: the TOML file of one distillation run, validated before any work (STYLE.md 5).

Unknown keys, wrong types and out-of-range values raise :class:`ConfigError` naming the
dotted key; the CLI turns it into exit code 2.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from cdfkd.coordinator.errors import ConfigError
from cdfkd.student_node.config import Method, TrainConfig
from cdfkd.student_node.teachers.remote import RemoteTeacherConfig
from cdfkd.teacher_node.config_files import read_toml, resolve_path, validate
from cdfkd.teacher_node.data_sources import DataSource
from cdfkd.teacher_node.datasets import DatasetName

_FROZEN = ConfigDict(extra="forbid", frozen=True)


class DeviceChoice(enum.StrEnum):
    """Where the student trains: ``auto`` is CUDA when present, else CPU."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


def resolve_device(choice: DeviceChoice) -> torch.device:
    """Resolve the device once; everything below receives the result."""
    match DeviceChoice(choice):
        case DeviceChoice.AUTO:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        case DeviceChoice.CPU:
            return torch.device("cpu")
        case DeviceChoice.CUDA:
            if not torch.cuda.is_available():
                raise ConfigError("run.device = 'cuda' but no CUDA device is available")
            return torch.device("cuda")


class DataConfig(BaseModel):
    """Real data the coordinator may use.

    Test data for evaluation, k samples for attention, and the owners' training data for the
    kd_real upper bound: a named ``dataset`` (``path``: the Fashion-MNIST folder), or ``files``,
    an image folder or ``.npz`` pair with ``train`` and ``test`` splits. A run config without a
    ``[data]`` table uses no real data at all (data-free).
    """

    model_config = _FROZEN

    dataset: DatasetName | None = None
    path: Path | None = None
    files: Path | None = None
    eval_samples: int = Field(default=2000, ge=10, description="test images used during training")

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if self.files is not None and (self.dataset is not None or self.path is not None):
            raise ValueError(
                "give data.files (the owners' image folder or .npz) or data.dataset/data.path "
                "(a named dataset), not both"
            )
        return self

    @property
    def source(self) -> DataSource:
        """The files, else the named dataset (Fashion-MNIST by default)."""
        if self.files is not None:
            return self.files
        return self.dataset or DatasetName.FASHION_MNIST


class PackageTeacher(BaseModel):
    """A teacher loaded in-process from its package folder (tests, single-owner runs)."""

    model_config = _FROZEN

    package: Path


def _teacher_kind(value: Any) -> str:
    if isinstance(value, dict):
        return "remote" if "address" in value else "package"
    return "remote" if isinstance(value, RemoteTeacherConfig) else "package"


#: A teacher by package folder, or by address of its teacher node (plus TLS files).
TeacherEntry = Annotated[
    Annotated[PackageTeacher, Tag("package")] | Annotated[RemoteTeacherConfig, Tag("remote")],
    Discriminator(_teacher_kind),
]


class RunSettings(BaseModel):
    """How the run executes (nothing here changes the math)."""

    model_config = _FROZEN

    device: DeviceChoice = DeviceChoice.AUTO
    checkpoint_every: int = Field(default=50, ge=1)
    keep_checkpoints: int = Field(default=3, ge=1)
    eval_every: int = Field(default=50, ge=1)
    log_every: int = Field(default=10, ge=1)
    max_seconds: float | None = Field(default=None, gt=0)
    threads: int | None = Field(default=None, ge=1, le=1024)
    cpus: float = Field(default=2.0, gt=0.0, le=1024.0, description="Ray worker CPUs")
    gpus: float = Field(default=0.0, ge=0.0, le=64.0, description="Ray worker GPUs")
    max_restarts: int = Field(default=2, ge=0, le=100, description="Ray worker restarts")


class RunConfig(BaseModel):
    """A whole run: data, teachers, the training loop, execution settings."""

    model_config = _FROZEN

    data: DataConfig | None = None
    teachers: tuple[TeacherEntry, ...] = Field(min_length=1)
    train: TrainConfig = TrainConfig()
    run: RunSettings = RunSettings()


def parse_run_config(data: dict[str, Any], base: Path | None = None) -> RunConfig:
    """Validate a parsed TOML mapping; relative package and data paths resolve against ``base``.

    Raises:
        ConfigError: naming every offending dotted key.
    """
    config = validate(
        RunConfig, data, "run config", ConfigError, union_tags=frozenset({"package", "remote"})
    )
    check_data_for_method(config)
    if base is None:
        return config

    def resolve(path: Path | None) -> Path | None:
        return resolve_path(path, base)

    teachers = tuple(
        entry.model_copy(update={"package": resolve(entry.package)})
        if isinstance(entry, PackageTeacher)
        else entry.model_copy(update={k: resolve(getattr(entry, k)) for k in ("ca", "cert", "key")})
        for entry in config.teachers
    )
    data_config = config.data
    if data_config is not None:
        data_config = data_config.model_copy(
            update={key: resolve(getattr(data_config, key)) for key in ("path", "files")}
        )
    return config.model_copy(update={"teachers": teachers, "data": data_config})


def check_data_for_method(config: RunConfig) -> None:
    """Refuse a method that trains on real images in a run without a ``[data]`` table.

    Raises:
        ConfigError: ``train.method = "kd_real"`` and no ``data``.
    """
    if config.data is None and config.train.method is Method.KD_REAL:
        raise ConfigError(
            "invalid run config: 'data': train.method = 'kd_real' trains on the owners' real "
            "images and needs a [data] table (dataset = ... or files = ...)"
        )


def load_run_config(path: Path) -> RunConfig:
    """Read and validate a run TOML file.

    Raises:
        ConfigError: missing file, TOML syntax error, or invalid keys.
    """
    data = read_toml(path, ConfigError)
    return parse_run_config(data, base=Path(path).resolve().parent)


def dump_run_config(config: RunConfig) -> str:
    """The resolved config as JSON (written beside the checkpoints as ``config.json``)."""
    return config.model_dump_json(indent=2, exclude_none=True)
