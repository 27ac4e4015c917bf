"""The owner's policy, pure and deterministic: who may ask, for what, how much, how fast.

Clock and randomness are injected, so every rule is tested deterministically. Nothing here
imports grpc: the servicer maps the errors raised here to status codes.

What output perturbation protects, and what it does not (the answers themselves are made in
:mod:`cdfkd.teacher_node.answers`): Gaussian noise, temperature scaling and top-k truncation
make each answer less exact, so copying the teacher's function from answers (model extraction)
or reading fine details of its decision surface takes more queries, and the budget bounds the
queries. It is *not* a differential-privacy guarantee for the owner's training data: no privacy
accounting is done. The same image asked again gets the same noise, but slightly different
images get fresh noise, so an attacker who pays for n near-copies of an image averages the
noise down by sqrt(n): only the budget bounds that.
"""

from __future__ import annotations

import datetime
import enum
import json
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

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
    """The caller's image budget is used up (RESOURCE_EXHAUSTED, not worth retrying).

    Attributes:
        budget: Which budget: ``"budget_images"`` (lifetime) or ``"budget_images_per_day"``.
        limit: That budget, in images.
        used: Images of it already answered.
        requested: Images the refused request needed.
    """

    def __init__(
        self, message: str, budget: str = "", limit: int = 0, used: int = 0, requested: int = 0
    ) -> None:
        super().__init__(message)
        self.budget = budget
        self.limit = limit
        self.used = used
        self.requested = requested

    def __reduce__(self) -> tuple[type, tuple[str, str, int, int, int]]:
        return (type(self), (str(self), self.budget, self.limit, self.used, self.requested))


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
    """Output perturbation for one caller (all off by default).

    Once any of it is set (:attr:`active`), every output derived from the model is perturbed
    or refused: features only with ``features_sigma``, the BN-prior term only with
    ``bn_loss_sigma``, input gradients through the same temperature and top-k as the logits,
    and, where the rule adds noise, only with ``gradient_sigma`` (each cotangent row clipped to
    ``grad_logits_max_norm``, ``|bn_weight|`` capped to ``bn_weight_max``, then noise in
    proportion to them, so that rescaling a request cannot shrink it relative to the answer).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    logits_sigma: float = Field(default=0.0, ge=0.0, le=1e3)
    gradient_sigma: float = Field(
        default=0.0,
        ge=0.0,
        le=1e3,
        description="noise std on an input gradient per unit of its (clipped) cotangent",
    )
    temperature: float = Field(default=1.0, gt=0.0, le=1e3)
    top_k: int = Field(default=0, ge=0, description="0 keeps every logit")
    features_sigma: float | None = Field(
        default=None, gt=0.0, le=1e3, description="noise std on features; None refuses them"
    )
    bn_loss_sigma: float | None = Field(
        default=None, gt=0.0, le=1e6, description="noise std on R(x); None refuses it"
    )
    grad_logits_max_norm: float | None = Field(
        default=None, gt=0.0, le=1e6, description="each row of grad_logits clipped to this L2 norm"
    )
    bn_weight_max: float | None = Field(
        default=None, ge=0.0, le=1e6, description="|bn_weight| capped to this"
    )

    @model_validator(mode="after")
    def _check(self) -> Perturbation:
        unbounded = self.grad_logits_max_norm is None or self.bn_weight_max is None
        if self.gradient_sigma and unbounded:
            raise ValueError(
                "gradient_sigma needs grad_logits_max_norm and bn_weight_max: the owner bounds "
                "what one request may weigh before noise in proportion to it is added"
            )
        return self

    @property
    def active(self) -> bool:
        """Whether any perturbation applies (then every model-derived output is protected)."""
        noisy = self.logits_sigma or self.gradient_sigma or self.features_sigma or self.top_k
        return bool(noisy or self.bn_loss_sigma) or self.temperature != 1

    @property
    def noisy(self) -> bool:
        """Whether the rule adds noise (exact input gradients would then give the noise away)."""
        return bool(self.logits_sigma or self.gradient_sigma or self.features_sigma) or bool(
            self.bn_loss_sigma
        )


class CallerRule(BaseModel):
    """Which certificates one caller identity is, and what it may do.

    A rule matches a client certificate by its issuing CA (``issuer``: the path of that CA's
    certificate or its SHA-256 fingerprint) and its subject (``subject_cn``, ``san_uri``,
    ``san_dns``; every one given must hold), or by a pinned key (``spki_sha256``: SHA-256 of
    the certificate's SubjectPublicKeyInfo). With no subject field and no pin the subject is
    CN = the rule's name; with no issuer the issuer is the one CA of ``tls.client_ca`` (a
    bundle of several CAs then needs ``issuer``). See :mod:`cdfkd.teacher_node.identity`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    issuer: str | None = Field(default=None, description="CA certificate path or SHA-256")
    subject_cn: str | None = Field(default=None, min_length=1)
    san_uri: str | None = Field(default=None, min_length=1)
    san_dns: str | None = Field(default=None, min_length=1)
    spki_sha256: str | None = Field(default=None, description="pinned public-key hash (hex)")
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
    allow_any_trusted_caller: bool = Field(
        default=False,
        description="answer callers that match no rule in full mode, without limits (insecure)",
    )
    budget_file: Path | None = None
    noise_seed: int | None = Field(
        default=None, description="fixed seed for output noise (tests); default: unpredictable"
    )

    @model_validator(mode="after")
    def _check(self) -> PolicyConfig:
        if not self.callers and not self.allow_any_trusted_caller:
            raise ValueError(
                "no [policy.callers.NAME] table: this node would answer nobody. List the "
                "identities it answers, or set [policy] allow_any_trusted_caller = true to answer "
                "every caller whose certificate chains to tls.client_ca (full mode, no limits)"
            )
        for name, rule in self.callers.items():
            if not name or name.startswith("<"):
                raise ValueError(f"caller name {name!r} must be non-empty and not start with '<'")
            if rule.spki_sha256 is not None and not is_sha256(rule.spki_sha256):
                raise ValueError(f"callers.{name}.spki_sha256 must be 64 hex digits")
        budgeted = [
            name
            for name, rule in self.callers.items()
            if rule.budget_images is not None or rule.budget_images_per_day is not None
        ]
        if budgeted and self.budget_file is None:
            raise ValueError(
                f"callers {budgeted} have budgets but there is no budget_file: in memory they "
                "would refill on every restart; set [policy] budget_file"
            )
        return self


def normalize_sha256(text: str) -> str:
    """``sha256:AB:CD...`` or ``abcd...`` as lowercase hex digits."""
    return text.lower().removeprefix("sha256:").replace(":", "")


def is_sha256(text: str) -> bool:
    """Whether ``text`` is a SHA-256 digest in hex (colons and a ``sha256:`` prefix allowed)."""
    digits = normalize_sha256(text)
    return len(digits) == 64 and all(c in "0123456789abcdef" for c in digits)


@dataclass
class TokenBucket:
    """Images per second with a burst; refilled continuously from the injected clock.

    The clock must be monotonic (``time.monotonic``): a wall clock set back would stall the
    bucket, one set forward would fill it.
    """

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

    def give_back(self, amount: int) -> None:
        """Return ``amount`` tokens taken for a request that was then refused."""
        self.tokens = min(self.burst, self.tokens + amount)


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
                f"needs {images}; ask the node's owner for more",
                "budget_images",
                rule.budget_images,
                total,
                images,
            )
        daily = rule.budget_images_per_day
        if daily is not None and today + images > daily:
            raise BudgetExhausted(
                f"daily budget exhausted: {today} of {daily} images used today (UTC), this "
                f"request needs {images}",
                "budget_images_per_day",
                daily,
                today,
                images,
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
        # The rename itself is durable only once the folder's entry is on disk.
        folder = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


class Policy:
    """Authorization, modes, rates and budgets of one node.

    Only callers with a rule get answers, unless ``allow_any_trusted_caller`` is set: then a
    caller that matches no rule gets the default rule (``full``, without limits). Which rule a
    certificate matches is decided by :mod:`cdfkd.teacher_node.identity`.

    Args:
        config: The ``[policy]`` section.
        clock: Seconds since the epoch (``time.time``): the UTC day of the daily budgets.
        generator: Randomness for output perturbation.
        monotonic: A monotonic clock in seconds (``time.monotonic``) for the rates.
    """

    def __init__(
        self,
        config: PolicyConfig,
        clock: Clock,
        generator: torch.Generator,
        monotonic: Clock = time.monotonic,
    ) -> None:
        self.config = config
        self.clock = clock
        self.monotonic = monotonic
        self.generator = generator
        self.ledger = BudgetLedger(config.budget_file, clock)
        self._buckets: dict[str, TokenBucket] = {}
        self._lock = threading.Lock()

    def rule(self, caller: str) -> CallerRule:
        """The caller's rule, or :class:`PermissionDenied` for identities not on the list."""
        rule = self.config.callers.get(caller)
        if rule is not None:
            return rule
        if self.config.allow_any_trusted_caller:
            return CallerRule()
        raise PermissionDenied(
            f"caller {caller!r} is not on this node's allow-list: ask the owner to add it"
        )

    def check_outputs(self, caller: str, rule: CallerRule, wanted: set[str]) -> None:
        """:class:`PermissionDenied` if the caller's mode forbids one of ``wanted``."""
        forbidden = sorted(wanted - MODE_OUTPUTS[rule.mode])
        if forbidden:
            raise PermissionDenied(
                f"mode {rule.mode.value} of caller {caller!r} does not allow {forbidden}; "
                f"allowed: {sorted(MODE_OUTPUTS[rule.mode])} (see GetMetadata)"
            )

    def admit(self, caller: str, rule: CallerRule, images: int) -> None:
        """Check the budget, take from the rate, then charge; a refusal counts nothing.

        A budget refusal takes no rate tokens, also when a concurrent request used the budget
        up between the check and the charge: the tokens are given back.
        """
        self.ledger.check(caller, images, rule)
        if rule.rate_images_per_s is None:
            self.ledger.charge(caller, images, rule)
            return
        with self._lock:
            bucket = self._buckets.get(caller)
            if bucket is None:
                burst = rule.burst_images or max(1.0, rule.rate_images_per_s)
                bucket = TokenBucket(rule.rate_images_per_s, float(burst), self.monotonic)
                self._buckets[caller] = bucket
            bucket.take(images)
        try:
            self.ledger.charge(caller, images, rule)
        except BudgetExhausted:
            with self._lock:
                bucket.give_back(images)
            raise

    def tokens(self, caller: str) -> float | None:
        """Rate tokens the caller has now (None: no rate, or no request yet)."""
        with self._lock:
            bucket = self._buckets.get(caller)
            return None if bucket is None else bucket.tokens

    def remaining(self, caller: str, rule: CallerRule) -> int | None:
        """Images the caller may still have answered (None: unlimited)."""
        total, today = self.ledger.used(caller)
        limits = []
        if rule.budget_images is not None:
            limits.append(rule.budget_images - total)
        if rule.budget_images_per_day is not None:
            limits.append(rule.budget_images_per_day - today)
        return max(0, min(limits)) if limits else None
