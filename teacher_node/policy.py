"""The owner's policy, pure and deterministic: who may ask, for what, how much, how fast.

Clock and randomness are injected, so every rule is tested deterministically. Nothing here
imports grpc: the servicer maps the errors raised here to status codes.

What output perturbation protects, and what it does not: Gaussian noise on the returned logits
(and input gradients), temperature scaling and top-k truncation make each answer less exact, so
copying the teacher's function from answers (model extraction) or reading fine details of its
decision surface takes more queries, and the budget bounds the queries. It is *not* a
differential-privacy guarantee for the owner's training data: no privacy accounting is done
here, and repeated queries on the same image average the noise away unless the budget stops
them.
"""

from __future__ import annotations

import datetime
import enum
import json
import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from cdfkd.teacher_node.errors import LimitExceeded, PermissionDenied, TeacherError

Clock = Callable[[], float]


class Mode(enum.StrEnum):
    """What a caller may receive."""

    FULL = "full"
    NO_FEATURES = "no_features"
    LOGITS_ONLY = "logits_only"


#: Outputs by mode: logits_only gives no gradients, no features, no BN statistics of any kind.
MODE_OUTPUTS: dict[Mode, frozenset[str]] = {
    Mode.FULL: frozenset({"logits", "features", "bn_loss", "input_grad"}),
    Mode.NO_FEATURES: frozenset({"logits", "bn_loss", "input_grad"}),
    Mode.LOGITS_ONLY: frozenset({"logits"}),
}


class BudgetExhausted(LimitExceeded):
    """The caller's image budget is used up (RESOURCE_EXHAUSTED, not worth retrying)."""


class RateLimited(LimitExceeded):
    """The caller is over its rate (RESOURCE_EXHAUSTED with a retry hint).

    Attributes:
        retry_after_s: Seconds after which the same request fits the rate.
    """

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple[type, tuple[str, float]]:
        return (type(self), (str(self), self.retry_after_s))


class Perturbation(BaseModel):
    """Output perturbation for one caller (all off by default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    logits_sigma: float = Field(default=0.0, ge=0.0, le=1e3)
    gradient_sigma: float = Field(default=0.0, ge=0.0, le=1e3)
    temperature: float = Field(default=1.0, gt=0.0, le=1e3)
    top_k: int = Field(default=0, ge=0, description="0 keeps every logit")

    @property
    def active(self) -> bool:
        """Whether any perturbation applies."""
        return bool(self.logits_sigma or self.gradient_sigma or self.top_k) or self.temperature != 1


class CallerRule(BaseModel):
    """What one caller identity may do."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Mode = Mode.FULL
    budget_images: int | None = Field(default=None, ge=0, description="lifetime image budget")
    budget_images_per_day: int | None = Field(default=None, ge=0, description="UTC days")
    rate_images_per_s: float | None = Field(default=None, gt=0.0)
    burst_images: int | None = Field(default=None, ge=1, description="default: a second's rate")
    perturbation: Perturbation = Perturbation()


class PolicyConfig(BaseModel):
    """``[policy]`` of teacher.toml: an allow-list of callers with their rules."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    callers: dict[str, CallerRule] = Field(default_factory=dict)
    budget_file: Path | None = None
    noise_seed: int | None = Field(
        default=None, description="fixed seed for output noise (tests); default: unpredictable"
    )


def perturb_logits(logits: Tensor, rule: Perturbation, generator: torch.Generator) -> Tensor:
    """Temperature, then top-k truncation, then Gaussian noise, as configured.

    Top-k keeps the k largest logits of each row and sets the others to the k-th largest, so
    the ranking below the k-th is hidden.
    """
    out = logits / rule.temperature if rule.temperature != 1.0 else logits
    if 0 < rule.top_k < out.shape[1]:
        kth = out.topk(rule.top_k, dim=1).values[:, -1:]
        out = torch.maximum(out, kth)
    if rule.logits_sigma:
        noise = torch.randn(out.shape, generator=generator, dtype=out.dtype)
        out = out + rule.logits_sigma * noise.to(out.device)
    return out


def perturb_gradient(gradient: Tensor, rule: Perturbation, generator: torch.Generator) -> Tensor:
    """Gaussian noise on an input gradient, as configured."""
    if not rule.gradient_sigma:
        return gradient
    noise = torch.randn(gradient.shape, generator=generator, dtype=gradient.dtype)
    return gradient + rule.gradient_sigma * noise.to(gradient.device)


@dataclass
class TokenBucket:
    """Images per second with a burst; refilled continuously from the injected clock."""

    rate: float
    burst: float
    clock: Clock
    tokens: float = field(default=-1.0)
    updated: float = field(default=-1.0)

    def __post_init__(self) -> None:
        self.tokens = self.burst
        self.updated = self.clock()

    def take(self, amount: int) -> None:
        """Take ``amount`` tokens or raise :class:`RateLimited` (nothing is taken then)."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if amount > self.burst:
            raise RateLimited(
                f"a request of {amount} images exceeds the burst of {self.burst:.0f}: "
                "send smaller batches",
                retry_after_s=math.inf,
            )
        if amount > self.tokens:
            wait = (amount - self.tokens) / self.rate
            raise RateLimited(
                f"over the rate of {self.rate:g} images/s: retry after {wait:.2f} s",
                retry_after_s=wait,
            )
        self.tokens -= amount


class BudgetLedger:
    """Images answered per caller, persisted atomically before every answer.

    The file holds ``{caller: {"total": n, "day": "YYYY-MM-DD", "today": n}}``. A charge is on
    disk (tmp file, fsync, ``os.replace``) before the request is answered, so after a kill -9
    the count is at least what was answered; a restart never refills a budget.
    """

    def __init__(self, path: Path | None, clock: Clock) -> None:
        self.path = None if path is None else Path(path)
        self.clock = clock
        self._lock = threading.Lock()
        self.counts: dict[str, dict[str, int | str]] = {}
        if self.path is not None and self.path.exists():
            try:
                loaded = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError) as error:
                raise TeacherError(
                    f"budget file {self.path} is unreadable ({error}); refusing to start with "
                    "budgets reset: restore it or remove it deliberately"
                ) from error
            self.counts = {str(k): dict(v) for k, v in loaded.items()}

    def _day(self) -> str:
        return datetime.datetime.fromtimestamp(self.clock(), datetime.UTC).strftime("%Y-%m-%d")

    def used(self, caller: str) -> tuple[int, int]:
        """(lifetime images, images today) of ``caller``."""
        entry = self.counts.get(caller, {})
        today = int(entry.get("today", 0)) if entry.get("day") == self._day() else 0
        return int(entry.get("total", 0)), today

    def check(self, caller: str, images: int, rule: CallerRule) -> None:
        """Raise :class:`BudgetExhausted` if ``images`` more would exceed a budget."""
        total, today = self.used(caller)
        if rule.budget_images is not None and total + images > rule.budget_images:
            raise BudgetExhausted(
                f"budget exhausted: {total} of {rule.budget_images} images used, this request "
                f"needs {images}; ask the node's owner for more"
            )
        daily = rule.budget_images_per_day
        if daily is not None and today + images > daily:
            raise BudgetExhausted(
                f"daily budget exhausted: {today} of {daily} images used today (UTC), this "
                f"request needs {images}"
            )

    def charge(self, caller: str, images: int, rule: CallerRule) -> None:
        """Count ``images`` for ``caller`` or raise :class:`BudgetExhausted` (nothing counted)."""
        with self._lock:
            self.check(caller, images, rule)
            total, today = self.used(caller)
            self.counts[caller] = {
                "total": total + images,
                "day": self._day(),
                "today": today + images,
            }
            self._persist()

    def _persist(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(self.path.suffix + ".tmp")
        with temporary.open("w") as handle:
            json.dump(self.counts, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.path)


class Policy:
    """Authorization, modes, rates and budgets of one node.

    With no callers configured every caller is allowed in ``full`` mode without limits (a node
    for a single trusted student); otherwise only listed identities get answers.

    Args:
        config: The ``[policy]`` section.
        clock: Seconds since the epoch (``time.time`` in production).
        generator: Randomness for output perturbation.
    """

    def __init__(self, config: PolicyConfig, clock: Clock, generator: torch.Generator) -> None:
        self.config = config
        self.clock = clock
        self.generator = generator
        self.ledger = BudgetLedger(config.budget_file, clock)
        self._buckets: dict[str, TokenBucket] = {}
        self._lock = threading.Lock()

    def rule(self, caller: str) -> CallerRule:
        """The caller's rule, or :class:`PermissionDenied` for identities not on the list."""
        if not self.config.callers:
            return CallerRule()
        try:
            return self.config.callers[caller]
        except KeyError:
            raise PermissionDenied(
                f"caller {caller!r} is not on this node's allow-list: ask the owner to add it"
            ) from None

    def check_outputs(self, caller: str, rule: CallerRule, wanted: set[str]) -> None:
        """:class:`PermissionDenied` if the caller's mode forbids one of ``wanted``."""
        forbidden = sorted(wanted - MODE_OUTPUTS[rule.mode])
        if forbidden:
            raise PermissionDenied(
                f"mode {rule.mode.value} of caller {caller!r} does not allow {forbidden}; "
                f"allowed: {sorted(MODE_OUTPUTS[rule.mode])} (see GetMetadata)"
            )

    def admit(self, caller: str, rule: CallerRule, images: int) -> None:
        """Check the budget, take from the rate, then charge; a refusal counts nothing."""
        self.ledger.check(caller, images, rule)
        if rule.rate_images_per_s is not None:
            with self._lock:
                bucket = self._buckets.get(caller)
                if bucket is None:
                    burst = rule.burst_images or max(1.0, rule.rate_images_per_s)
                    bucket = TokenBucket(rule.rate_images_per_s, float(burst), self.clock)
                    self._buckets[caller] = bucket
                bucket.take(images)
        self.ledger.charge(caller, images, rule)

    def remaining(self, caller: str, rule: CallerRule) -> int | None:
        """Images the caller may still have answered (None: unlimited)."""
        total, today = self.ledger.used(caller)
        limits = []
        if rule.budget_images is not None:
            limits.append(rule.budget_images - total)
        if rule.budget_images_per_day is not None:
            limits.append(rule.budget_images_per_day - today)
        return max(0, min(limits)) if limits else None
