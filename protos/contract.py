"""Conventions of the wire contract that the .proto cannot express."""

from __future__ import annotations

#: Trailing metadata key of a RESOURCE_EXHAUSTED refusal for rate: milliseconds after which the
#: same request fits the caller's rate. Budget refusals carry no such key (do not retry them).
RETRY_AFTER_KEY = "cdfkd-retry-after-ms"

#: Invocation metadata key of a request id: the client sends a fresh one per request and the same
#: one on every retry of it, so the node answers a retry from its stored reply and charges once.
REQUEST_ID_KEY = "cdfkd-request-id"

#: Trailing metadata key of a RESOURCE_EXHAUSTED refusal because a budget is used up: JSON
#: ``{"budget": "budget_images" | "budget_images_per_day", "limit": n, "used": n,
#: "requested": n}``, so that the student can say which budget ended its run (and never retry).
BUDGET_EXHAUSTED_KEY = "cdfkd-budget-exhausted"

#: Length of a Query's ``batch_handle`` (random bytes): an InputGrad whose handle has another
#: length is refused with INVALID_ARGUMENT before any lookup.
BATCH_HANDLE_BYTES = 16
