"""The run image space on the student side: its shape and normalization, and teachers in it.

Teachers of one federation may differ in input height, width and normalization
(``teacher_node/image_space.py``). The generator and the student work on *standardized* images
of the run image shape; what crosses the wire is the same images as [0, 1]-scale pixels,
``pixels = images * std + mean`` with the *run normalization*. Each teacher (node or
in-process engine) resizes the pixels to its own size and normalizes them with its own mean
and std. :class:`RunSpaceTeacher` does the student side of that mapping, so the trainer keeps
working on standardized images, and the input gradient it gets back is exact (chain rule:
``dL/dimages = dL/dpixels * std``). In a homogeneous federation (one shape, one
normalization) the teachers see what they saw before, up to float rounding.

Defaults: the run image shape is the largest teacher input (by H*W; the first of equals); the
run normalization is the teachers' own when they all agree, else the per-channel average of
their means and of their stds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from cdfkd.student_node.errors import IncompatibleTeachers
from cdfkd.student_node.teachers.protocol import Teacher, TeacherInfo, TeacherOutputs
from cdfkd.teacher_node.datasets import Normalization
from cdfkd.teacher_node.errors import DatasetError
from cdfkd.teacher_node.image_space import to_model_input


@dataclass(frozen=True)
class RunImageSpace:
    """The images a run's generator and student work on.

    Attributes:
        image_shape: ``(C, H, W)`` of one image.
        normalization: Maps [0, 1] pixels to the standardized images the generator makes and
            the student reads (``(pixels - mean) / std``).
    """

    image_shape: tuple[int, int, int]
    normalization: Normalization

    def prepare(self, pixels: Tensor, source: str) -> Tensor:
        """Real images of any size as the student reads them (resized, then normalized).

        Args:
            pixels: float32 ``(N, C, H, W)`` in [0, 1], e.g. ``ImageDataset.images``.
            source: Where they come from, for the error message.

        Raises:
            DatasetError: their channel count is not the student's.
        """
        channels = int(pixels.shape[1])
        if channels != self.image_shape[0]:
            raise DatasetError(
                f"{source}: {channels}-channel images, but the student takes "
                f"{self.image_shape[0]} channels (grayscale and colour data cannot be mixed)"
            )
        return to_model_input(pixels, self.image_shape, self.normalization)

    def to_json(self) -> dict[str, object]:
        """A JSON-ready description (``student.json``)."""
        return {
            "image_shape": list(self.image_shape),
            "normalization": self.normalization.model_dump(mode="json"),
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> RunImageSpace:
        """Inverse of :meth:`to_json`."""
        shape = tuple(int(v) for v in data["image_shape"])  # type: ignore[attr-defined]
        if len(shape) != 3:
            raise ValueError(f"image_shape {shape} is not (C, H, W)")
        return cls(
            image_shape=(shape[0], shape[1], shape[2]),
            normalization=Normalization.model_validate(data["normalization"]),
        )


def check_channels(infos: Sequence[TeacherInfo]) -> int:
    """The channel count all teachers share.

    Raises:
        IncompatibleTeachers: naming the teachers whose channel counts differ.
    """
    if not infos:
        raise IncompatibleTeachers("a run needs at least one teacher")
    channels = {info.name: info.input_shape[0] for info in infos}
    if len(set(channels.values())) > 1:
        listed = ", ".join(f"{name!r} has {count}" for name, count in channels.items())
        raise IncompatibleTeachers(
            f"the teachers' input channel counts differ ({listed}): the teachers of one run "
            "must take images with the same number of channels"
        )
    return infos[0].input_shape[0]


def default_normalization(infos: Sequence[TeacherInfo]) -> Normalization:
    """The teachers' normalization if they agree, else the per-channel mean of theirs."""
    pairs = {(info.normalization_mean, info.normalization_std) for info in infos}
    if len(pairs) == 1:
        mean, std = pairs.pop()
        return Normalization(mean=mean, std=std)
    count = len(infos)
    channels = len(infos[0].normalization_mean)
    return Normalization(
        mean=tuple(sum(i.normalization_mean[c] for i in infos) / count for c in range(channels)),
        std=tuple(sum(i.normalization_std[c] for i in infos) / count for c in range(channels)),
    )


def resolve_image_space(
    infos: Sequence[TeacherInfo],
    image_shape: tuple[int, int, int] | None = None,
    normalization: Normalization | None = None,
) -> RunImageSpace:
    """The run image space: configured values, else the defaults of this module's docstring.

    Raises:
        IncompatibleTeachers: the teachers' channel counts differ, or differ from the
            configured shape or normalization.
    """
    channels = check_channels(infos)
    if image_shape is None:
        largest = max(infos, key=lambda info: info.input_shape[1] * info.input_shape[2])
        image_shape = largest.input_shape
    if normalization is None:
        normalization = default_normalization(infos)
    if image_shape[0] != channels or len(normalization.mean) != channels:
        raise IncompatibleTeachers(
            f"the run's image_shape {tuple(image_shape)} and normalization "
            f"({len(normalization.mean)} channels) must match the teachers' {channels} channels"
        )
    shape = (int(image_shape[0]), int(image_shape[1]), int(image_shape[2]))
    return RunImageSpace(shape, normalization)


class RunSpaceTeacher:
    """A teacher seen from the trainer: standardized run-space images in, exact gradients out.

    Args:
        teacher: The in-process or remote teacher; it receives [0, 1]-scale pixels.
        space: The run image space.
    """

    def __init__(self, teacher: Teacher, space: RunImageSpace) -> None:
        self.teacher = teacher
        self.space = space

    def _scale(self, images: Tensor) -> tuple[Tensor, Tensor]:
        view = (1, -1, 1, 1)
        mean = torch.tensor(self.space.normalization.mean, dtype=images.dtype, device=images.device)
        std = torch.tensor(self.space.normalization.std, dtype=images.dtype, device=images.device)
        return mean.view(view), std.view(view)

    def to_pixels(self, images: Tensor) -> Tensor:
        """Standardized run images float (B, C, H, W) -> [0, 1]-scale pixels (the wire)."""
        mean, std = self._scale(images)
        return images * std + mean

    def info(self) -> TeacherInfo:
        """The teacher's own facts (its own input shape and normalization)."""
        return self.teacher.info()

    def query(
        self,
        images: Tensor,
        *,
        features: bool = True,
        bn_loss: bool = True,
        keep_for_grad: bool = False,
    ) -> TeacherOutputs:
        """The teacher's answers for standardized run images ``images``."""
        pixels = self.to_pixels(images)
        if not keep_for_grad:  # a teacher that predates keep_for_grad still works
            return self.teacher.query(pixels, features=features, bn_loss=bn_loss)
        return self.teacher.query(pixels, features=features, bn_loss=bn_loss, keep_for_grad=True)

    def input_grad(self, images: Tensor, grad_logits: Tensor, bn_weight: float) -> Tensor:
        """d/d(images) of the teacher's objective: its pixel gradient times the run std."""
        _, std = self._scale(images)
        return self.teacher.input_grad(self.to_pixels(images), grad_logits, bn_weight) * std
