"""A replay memory of generated images with the teachers' answers cached beside them.

Queries cross organizations and cost the owners compute and budget, so a generated batch is
asked once and its answers (logits, and features where the student loss uses them) are kept
with it: student steps drawn from the memory cost no teacher query (as the memory banks of CMI
and Fast-DFKD, here with the answers cached). A ring buffer of ``size`` samples, oldest
overwritten first; its whole content is part of the training state, so a resumed run draws
exactly what an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

#: Images, per-teacher logits, per-teacher features (None where not cached).
Batch = tuple[Tensor, list[Tensor], list[Tensor | None]]


class ReplayMemory:
    """Images (B, C, H, W) and, per teacher, logits and optional features, in a ring buffer.

    Args:
        size: Capacity in samples.
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("a replay memory holds at least one sample")
        self.size = size
        self.images: Tensor | None = None
        self.logits: list[Tensor] = []
        self.features: list[Tensor | None] = []
        self.count = 0  # samples held
        self.next = 0  # slot the next sample goes to

    def __len__(self) -> int:
        return self.count

    def _allocate(
        self, images: Tensor, logits: Sequence[Tensor], features: Sequence[Tensor | None]
    ) -> None:
        def empty(like: Tensor) -> Tensor:
            return like.new_zeros((self.size, *like.shape[1:]))

        self.images = empty(images)
        self.logits = [empty(t) for t in logits]
        self.features = [None if f is None else empty(f) for f in features]

    def add(
        self, images: Tensor, logits: Sequence[Tensor], features: Sequence[Tensor | None]
    ) -> None:
        """Keep a batch and the teachers' answers for it (detached copies)."""
        if self.images is None:
            self._allocate(images, logits, features)
        if len(logits) != len(self.logits) or len(features) != len(self.features):
            raise ValueError("every batch needs an answer of every teacher of the memory")
        if any((k is None) != (g is None) for k, g in zip(self.features, features, strict=True)):
            raise ValueError("a teacher's features must be cached for every batch or none")
        slots = (torch.arange(images.shape[0], device=images.device) + self.next) % self.size
        assert self.images is not None
        self.images[slots] = images.detach()
        for store, answer in zip(self.logits, logits, strict=True):
            store[slots] = answer.detach()
        for kept, given in zip(self.features, features, strict=True):
            if kept is not None and given is not None:
                kept[slots] = given.detach()
        self.next = (self.next + images.shape[0]) % self.size
        self.count = min(self.size, self.count + images.shape[0])

    def sample(self, count: int, generator: torch.Generator) -> Batch:
        """``count`` samples drawn uniformly with replacement: (images, logits, features)."""
        if self.images is None or self.count == 0:
            raise ValueError("the replay memory is empty")
        device = generator.device
        chosen = torch.randint(0, self.count, (count,), generator=generator, device=device)
        chosen = chosen.to(self.images.device)
        return (
            self.images[chosen],
            [t[chosen] for t in self.logits],
            [None if f is None else f[chosen] for f in self.features],
        )

    def newest(self, count: int) -> Batch:
        """The ``count`` samples added last, oldest of them first."""
        if self.images is None or count > self.count:
            raise ValueError(f"the replay memory holds {self.count} samples, not {count}")
        slots = (torch.arange(count, device=self.images.device) + self.next - count) % self.size
        return (
            self.images[slots],
            [t[slots] for t in self.logits],
            [None if f is None else f[slots] for f in self.features],
        )

    @staticmethod
    def part(batch: Batch, start: int, count: int) -> Batch:
        """Samples ``start`` to ``start + count`` of a batch from :meth:`newest`."""
        images, logits, features = batch
        window = slice(start, start + count)
        return (
            images[window],
            [t[window] for t in logits],
            [None if f is None else f[window] for f in features],
        )

    def state_dict(self) -> dict[str, Any]:
        """Everything the memory holds (for checkpoints; plain tensors, ints and lists)."""
        return {
            "size": self.size,
            "count": self.count,
            "next": self.next,
            "images": self.images,
            "logits": list(self.logits),
            "features": list(self.features),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (tensors moved to where this memory's would live)."""
        if int(state["size"]) != self.size:
            raise ValueError(f"a memory of {state['size']} samples does not fit one of {self.size}")
        self.count, self.next = int(state["count"]), int(state["next"])
        self.images = None if state["images"] is None else state["images"].clone()
        self.logits = [t.clone() for t in state["logits"]]
        self.features = [None if f is None else f.clone() for f in state["features"]]

    def to(self, device: torch.device) -> ReplayMemory:
        """Move the stored tensors to ``device`` (in place); returns self."""
        if self.images is not None:
            self.images = self.images.to(device)
        self.logits = [t.to(device) for t in self.logits]
        self.features = [None if f is None else f.to(device) for f in self.features]
        return self
