"""Settings of a federated attention + evaluation run, and their flat Flower run-config form.

Flower carries configuration as flat ``key -> scalar`` maps (``context.run_config``, the
``[tool.flwr.app.config]`` table, ``--run-config``, ``--node-config``). These settings are
validated once at either end from that flat form; keys are the field names with ``-``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cdfkd.coordinator.errors import ConfigError
from cdfkd.teacher_node.datasets import DatasetName
from cdfkd.teacher_node.training import Partition

#: Keys an organization may set for itself on its SuperNode (``--node-config``): where its own
#: copy of the student and its own data are. Everything else comes from the run.
NODE_LOCAL_KEYS = ("student-dir", "data-path")


class FederatedAttentionSettings(BaseModel):
    """One federated attention training and evaluation of a distilled student.

    With ``owner_files`` every organization reads its own ``data_path`` (an image folder or
    ``.npz`` pair with train and test splits), set per organization; otherwise the owners'
    data are shards of the named ``dataset`` (``data_path``: the Fashion-MNIST folder), cut by
    ``partition``, ``alpha`` and ``shard_seed`` as their teachers' were.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    student_dir: Path
    out_dir: Path
    dataset: DatasetName = DatasetName.FASHION_MNIST
    data_path: Path | None = None
    owner_files: bool = False
    num_owners: int = Field(default=3, ge=1, le=1000)
    partition: Partition = Partition.IID
    alpha: float = Field(default=0.5, gt=0.0)
    shard_seed: int = 0
    samples_per_owner: int = Field(default=20, ge=1)
    rounds: int = Field(default=10, ge=1, le=10_000)
    local_epochs: int = Field(default=20, ge=1, le=100_000)
    learning_rate: float = Field(default=0.01, gt=0.0)
    batch_size: int = Field(default=64, ge=1)
    seed: int = 0
    round_timeout_s: float = Field(default=600.0, gt=0.0)

    def to_flat(self) -> dict[str, Any]:
        """The Flower run-config form (paths as strings, no ``None``)."""
        flat: dict[str, Any] = {}
        for name, value in self.model_dump(mode="json").items():
            if value is not None:
                flat[name.replace("_", "-")] = value
        return flat

    @classmethod
    def from_flat(cls, flat: dict[str, Any]) -> FederatedAttentionSettings:
        """Validate a flat run config; unknown keys or bad values raise ``ConfigError``.

        Empty strings count as unset, so a FAB's ``pyproject.toml`` can leave a path blank.
        """
        fields = {
            key.replace("-", "_"): value
            for key, value in flat.items()
            if not (isinstance(value, str) and value == "")
        }
        try:
            return cls.model_validate(fields)
        except ValidationError as error:
            problems = "; ".join(
                f"{'.'.join(str(p).replace('_', '-') for p in e['loc'])}: {e['msg']}"
                for e in error.errors()
            )
            raise ConfigError(f"federated attention settings: {problems}") from error


def merge_node_config(run_config: dict[str, Any], node_config: dict[str, Any]) -> dict[str, Any]:
    """The run's settings with the organization's own paths (``NODE_LOCAL_KEYS``) on top."""
    merged = dict(run_config)
    merged.update({k: v for k, v in node_config.items() if k in NODE_LOCAL_KEYS})
    return merged


def owner_node_configs(
    settings: FederatedAttentionSettings, owner_data: Sequence[Path]
) -> dict[int, dict[str, Any]]:
    """Each organization's own ``data-path`` as node-config entries, by owner index.

    Raises:
        ConfigError: paths given without ``owner_files``, or not one per organization.
    """
    if not settings.owner_files:
        if owner_data:
            raise ConfigError("per-organization data paths need owner-files = true")
        return {}
    if len(owner_data) != settings.num_owners:
        raise ConfigError(
            f"owner-files: {len(owner_data)} data paths for {settings.num_owners} organizations "
            "(num-owners): give one per organization"
        )
    return {owner: {"data-path": str(path)} for owner, path in enumerate(owner_data)}
