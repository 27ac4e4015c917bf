"""Errors and exit codes of the coordinator (STYLE.md 7)."""

from __future__ import annotations

import enum

from cdfkd.protos.errors import CdfkdError


class ExitCode(enum.IntEnum):
    """Process exit codes of the ``cdfkd`` command."""

    OK = 0
    FAILURE = 1
    USAGE = 2
    FEDERATION = 3
    REFUSED = 4
    INTERRUPTED = 130


class ConfigError(CdfkdError):
    """A configuration file is missing, malformed, or has a bad key (exit code 2)."""


class RunInterrupted(CdfkdError):
    """The run was interrupted by the user after writing a checkpoint (exit code 130)."""


class FederationCheckFailed(CdfkdError):
    """A teacher node is unreachable, untrusted or incompatible (exit code 3)."""


class FlowerRunFailed(CdfkdError):
    """A Flower run (simulation or deployment runtime) did not finish (exit code 1)."""
