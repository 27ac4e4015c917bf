"""TeacherNodeConfig: the ``teacher.toml`` of one organization, validated before serving."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cdfkd.protos.codec import WIRE_DTYPES
from cdfkd.teacher_node.config_files import read_toml, resolve_path, validate
from cdfkd.teacher_node.errors import TeacherConfigError
from cdfkd.teacher_node.policy import PolicyConfig, is_sha256

_FROZEN = ConfigDict(extra="forbid", frozen=True)


class Output(enum.StrEnum):
    """What a teacher node can return."""

    LOGITS = "logits"
    FEATURES = "features"
    BN_LOSS = "bn_loss"
    INPUT_GRAD = "input_grad"


class NodeSettings(BaseModel):
    """What is served and where."""

    model_config = _FROZEN

    package: Path
    address: str = Field(default="127.0.0.1:0", description="host:port; port 0 picks one")
    address_file: Path | None = None
    workers: int = Field(
        default=8,
        ge=1,
        le=256,
        description="calls in flight at most (queued for the engine or running); beyond, "
        "RESOURCE_EXHAUSTED with a retry hint",
    )
    threads: int | None = Field(default=None, ge=1, le=256)
    drain_seconds: float = Field(default=10.0, ge=0.0, le=3600.0)

    @model_validator(mode="after")
    def _check(self) -> NodeSettings:
        host, _, port = self.address.rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"address {self.address!r} must be HOST:PORT")
        return self


class TlsSettings(BaseModel):
    """Mutual TLS (the default) or, only when asked for, plaintext."""

    model_config = _FROZEN

    insecure: bool = False
    cert: Path | None = None
    key: Path | None = None
    client_ca: Path | None = None

    @model_validator(mode="after")
    def _check(self) -> TlsSettings:
        missing = [k for k in ("cert", "key", "client_ca") if getattr(self, k) is None]
        if not self.insecure and missing:
            raise ValueError(
                f"mutual TLS needs cert, key and client_ca (missing {missing}); create them with "
                "'cdfkd pki dev --out DIR', or set insecure = true for plaintext on a test network"
            )
        return self


class Limits(BaseModel):
    """What one request may cost the node."""

    model_config = _FROZEN

    max_batch: int = Field(default=512, ge=2, le=65536)
    max_image_side: int | None = Field(
        default=None,
        ge=8,
        le=4096,
        description="largest query height or width; default: twice the teacher's larger side",
    )
    max_message_bytes: int | None = Field(
        default=None,
        ge=1024,
        le=2**31 - 1,
        description="default: what a batch of max_batch of the largest accepted images needs",
    )
    max_in_flight_per_caller: int = Field(default=4, ge=1, le=256)
    request_id_ttl_s: float = Field(default=600.0, ge=0.0, le=86_400.0)
    request_id_memory_bytes: int = Field(default=64 * 1024 * 1024, ge=0, le=2**34)
    kept_batch_ttl_s: float = Field(
        default=120.0, ge=0.0, le=3600.0, description="a Query's kept batch waits this long"
    )
    kept_batches_per_caller: int = Field(
        default=4, ge=0, le=256, description="batches kept per caller for InputGrad; 0: none"
    )
    kept_batch_bytes_per_caller: int = Field(default=32 * 1024 * 1024, ge=0, le=2**34)
    kept_batch_memory_bytes: int = Field(default=256 * 1024 * 1024, ge=0, le=2**36)


class Choices(BaseModel):
    """The owner's choices about what leaves the node."""

    model_config = _FROZEN

    allowed_outputs: tuple[Output, ...] = tuple(Output)
    wire_dtypes: tuple[str, ...] = tuple(WIRE_DTYPES)

    @model_validator(mode="after")
    def _check(self) -> Choices:
        unknown = [d for d in self.wire_dtypes if d not in WIRE_DTYPES]
        if unknown or "float32" not in self.wire_dtypes:
            raise ValueError(
                f"wire_dtypes must include float32 and only {sorted(WIRE_DTYPES)}; got "
                f"{list(self.wire_dtypes)}"
            )
        if Output.LOGITS not in self.allowed_outputs:
            raise ValueError("allowed_outputs must include logits")
        return self


class AuditSettings(BaseModel):
    """The append-only audit log (JSON lines, rotated by size)."""

    model_config = _FROZEN

    path: Path | None = None
    max_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    backups: int = Field(default=5, ge=0, le=1000)
    refusals_per_minute: float = Field(
        default=60.0, gt=0.0, le=1e6, description="refusal lines per peer host; more are counted"
    )


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"address {address!r} must be HOST:PORT")
    return host.strip("[]"), int(port)


class MetricsSettings(BaseModel):
    """Prometheus metrics and a plaintext health endpoint (both off unless set)."""

    model_config = _FROZEN

    address: str | None = Field(default=None, description="HOST:PORT of /metrics")
    health_address: str | None = Field(
        default=None, description="loopback HOST:PORT of the plaintext /healthz probe"
    )

    @model_validator(mode="after")
    def _check(self) -> MetricsSettings:
        if self.address is not None:
            _host_port(self.address)
        if self.health_address is not None:
            host, _ = _host_port(self.health_address)
            if host not in ("127.0.0.1", "::1", "localhost"):
                raise ValueError(
                    f"health_address {self.health_address!r} must be on loopback (127.0.0.1, "
                    "::1 or localhost): the probe is plaintext and unauthenticated"
                )
        return self


class TeacherNodeConfig(BaseModel):
    """A teacher node: what it serves, its TLS, limits, the owner's choices and policy."""

    model_config = _FROZEN

    node: NodeSettings
    tls: TlsSettings
    limits: Limits = Limits()
    choices: Choices = Choices()
    policy: PolicyConfig
    audit: AuditSettings = AuditSettings()
    metrics: MetricsSettings = MetricsSettings()

    @model_validator(mode="after")
    def _check(self) -> TeacherNodeConfig:
        if self.limits.max_in_flight_per_caller > self.node.workers:
            raise ValueError(
                f"limits.max_in_flight_per_caller ({self.limits.max_in_flight_per_caller}) "
                f"cannot exceed node.workers ({self.node.workers}), the calls in flight in total"
            )
        return self


def parse_teacher_config(data: dict[str, Any], base: Path | None = None) -> TeacherNodeConfig:
    """Validate a parsed ``teacher.toml``; relative paths resolve against ``base``.

    Raises:
        TeacherConfigError: naming every offending dotted key.
    """
    config = validate(
        TeacherNodeConfig, {"tls": {}, "policy": {}, **data}, "teacher config", TeacherConfigError
    )
    if base is None:
        return config
    node = config.node.model_copy(
        update={
            "package": resolve_path(config.node.package, base),
            "address_file": resolve_path(config.node.address_file, base),
        }
    )
    tls = config.tls.model_copy(
        update={
            key: resolve_path(getattr(config.tls, key), base)
            for key in ("cert", "key", "client_ca")
        }
    )
    callers = {
        name: rule
        if rule.issuer is None or is_sha256(rule.issuer)
        else rule.model_copy(update={"issuer": str(resolve_path(Path(rule.issuer), base))})
        for name, rule in config.policy.callers.items()
    }
    policy = config.policy.model_copy(
        update={"budget_file": resolve_path(config.policy.budget_file, base), "callers": callers}
    )
    audit = config.audit.model_copy(update={"path": resolve_path(config.audit.path, base)})
    return config.model_copy(update={"node": node, "tls": tls, "policy": policy, "audit": audit})


def load_teacher_config(path: Path) -> TeacherNodeConfig:
    """Read and validate a ``teacher.toml``.

    Raises:
        TeacherConfigError: missing file, bad TOML or invalid keys.
    """
    data = read_toml(path, TeacherConfigError)
    return parse_teacher_config(data, base=Path(path).resolve().parent)


def check_files_exist(config: TeacherNodeConfig, path: Path) -> None:
    """Name every file a node serving ``config`` (read from ``path``) needs that is missing.

    Raises:
        TeacherConfigError: naming each missing file and where relative paths resolve.
    """
    base = Path(path).resolve().parent
    wanted = {"node.package": config.node.package}
    if not config.tls.insecure:
        wanted.update(
            {f"tls.{key}": getattr(config.tls, key) for key in ("cert", "key", "client_ca")}
        )
    missing = [f"{key} = {file}" for key, file in wanted.items() if file and not file.exists()]
    if missing:
        raise TeacherConfigError(
            f"{path}: missing {'; '.join(missing)}. Relative paths resolve against the config "
            f"file's folder {base}: put the package ('cdfkd teacher package' or 'cdfkd teacher "
            "train') and the certificates ('cdfkd pki dev') there, or use absolute paths"
        )
