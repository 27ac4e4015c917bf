"""Errors of the student side."""

from __future__ import annotations

from cdfkd.protos.errors import CdfkdError


class StudentError(CdfkdError):
    """Base class of student-side errors."""


class NonFiniteLossError(StudentError):
    """A loss or a synthetic batch became NaN/Inf; the step was not applied.

    Attributes:
        term: Which quantity was non-finite.
        iteration: The iteration (0-based) that failed.
    """

    def __init__(self, term: str, iteration: int) -> None:
        super().__init__(
            f"{term} is not finite at iteration {iteration}; the step was not applied. Resume "
            "from the last checkpoint with lower learning rates or loss weights"
        )
        self.term = term
        self.iteration = iteration

    def __reduce__(self) -> tuple[type, tuple[str, int]]:
        return (type(self), (self.term, self.iteration))


class CheckpointError(StudentError):
    """A checkpoint is missing, unreadable, or belongs to a different configuration."""


class IncompatibleTeachers(StudentError):
    """The teachers of a run do not share a label space, input shape or normalization."""


class RemoteTeacherError(StudentError):
    """A remote teacher could not answer; the message names the node and what to do.

    Attributes:
        address: The node's address.
        code: The gRPC status name (e.g. "UNAVAILABLE").
    """

    def __init__(self, message: str, address: str = "", code: str = "") -> None:
        super().__init__(message)
        self.address = address
        self.code = code

    def __reduce__(self) -> tuple[type, tuple[str, str, str]]:
        return (type(self), (str(self), self.address, self.code))


class TeacherUnavailable(RemoteTeacherError):
    """The node did not answer within the retries (down, unreachable, or TLS failed)."""


class TeacherRefused(RemoteTeacherError):
    """The node refused the caller: unauthenticated, not permitted, or out of budget."""


class TeacherBudgetExhausted(TeacherRefused):
    """The node refused because this caller's image budget is used up (never retried).

    A run that meets it ends cleanly after its last completed iteration
    (``coordinator/training_run.py``).

    Attributes:
        budget: ``"budget_images"`` (lifetime) or ``"budget_images_per_day"``; "" if the node
            did not say.
        limit: That budget in images (0 if not said).
        used: Images of it used before the refused request.
        requested: Images the refused request needed.
    """

    def __init__(
        self,
        message: str,
        address: str = "",
        code: str = "",
        budget: str = "",
        limit: int = 0,
        used: int = 0,
        requested: int = 0,
    ) -> None:
        super().__init__(message, address, code)
        self.budget = budget
        self.limit = limit
        self.used = used
        self.requested = requested

    def __reduce__(self) -> tuple[type, tuple[str, str, str, str, int, int, int]]:  # type: ignore[override]
        return (
            type(self),
            (
                str(self),
                self.address,
                self.code,
                self.budget,
                self.limit,
                self.used,
                self.requested,
            ),
        )


class TeacherRejectedRequest(RemoteTeacherError):
    """The node judged the request malformed (a bug on the student side, or a version skew)."""


class TeacherFailed(RemoteTeacherError):
    """The node failed internally; its operator has the incident id in the node's log."""
