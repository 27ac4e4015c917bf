"""Conventions of the wire contract that the .proto cannot express."""

from __future__ import annotations

#: Trailing metadata key of a RESOURCE_EXHAUSTED refusal for rate: milliseconds after which the
#: same request fits the caller's rate. Budget refusals carry no such key (do not retry them).
RETRY_AFTER_KEY = "cdfkd-retry-after-ms"
