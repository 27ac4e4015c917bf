"""Errors of the teacher side: packages, engine input, training data."""

from __future__ import annotations

from cdfkd.protos.errors import CdfkdError


class TeacherError(CdfkdError):
    """Base class of teacher-side errors."""


class InvalidInput(TeacherError):
    """A tensor handed to the teacher engine has the wrong shape, dtype or values."""


class PackageError(TeacherError):
    """A teacher package is missing, corrupt, truncated or of another architecture."""


class DatasetError(TeacherError):
    """A dataset cannot be read (missing files, bad format)."""


class TeacherConfigError(TeacherError):
    """A teacher.toml is missing, malformed or has a bad key (exit code 2)."""


class LimitExceeded(TeacherError):
    """A request is larger than the node's configured limits (RESOURCE_EXHAUSTED)."""


class PermissionDenied(TeacherError):
    """The caller asked for something the owner does not allow it (PERMISSION_DENIED)."""


class PkiError(TeacherError):
    """Certificates cannot be written or issued (an existing CA, a bad CA file; exit code 2)."""


class Unauthenticated(TeacherError):
    """The caller's certificate establishes no single identity (UNAUTHENTICATED)."""
