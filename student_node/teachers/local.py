"""InProcessTeacher: the Teacher protocol over a TeacherEngine in the same process."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from cdfkd.student_node.teachers.protocol import (
    ALL_OUTPUTS,
    PrivacyInfo,
    TeacherInfo,
    TeacherOutputs,
)
from cdfkd.teacher_node.datasets import Normalization
from cdfkd.teacher_node.engine import TeacherEngine
from cdfkd.teacher_node.package import load_package

if TYPE_CHECKING:
    from cdfkd.teacher_node.privacy import PrivacyGuarantee


class InProcessTeacher:
    """A teacher computed locally by the same engine a teacher node serves.

    It takes run-space images (``teacher_node/image_space.py``) as a node does; the engine
    resizes and normalizes them. A teacher without BatchNorm does not offer ``bn_loss``.

    Args:
        engine: The engine over the teacher model (built with ``normalization``).
        name: The teacher's name.
        normalization: The normalization the teacher expects.
    """

    def __init__(
        self,
        engine: TeacherEngine,
        name: str,
        normalization: Normalization,
        privacy: PrivacyInfo | None = None,
    ) -> None:
        self._engine = engine
        #: Images answered (queries and input gradients); nothing crosses a wire here.
        self.images_answered = 0
        info = engine.info
        self._info = TeacherInfo(
            name=name,
            input_shape=info.input_shape,
            num_classes=info.num_classes,
            feature_dim=info.feature_dim,
            normalization_mean=normalization.mean,
            normalization_std=normalization.std,
            allowed_outputs=ALL_OUTPUTS if info.has_bn_prior else ALL_OUTPUTS - {"bn_loss"},
            privacy=privacy,
        )

    @classmethod
    def from_package(cls, directory: Path, device: torch.device | None = None) -> InProcessTeacher:
        """Load a teacher package (see ``cdfkd teacher train``) onto ``device`` (default CPU)."""
        metadata, model = load_package(directory)
        engine = TeacherEngine(
            model.to(device or torch.device("cpu")),
            metadata.input_shape,
            metadata.normalization,
            statistics=metadata.released_statistics,
        )
        privacy = privacy_info(metadata.privacy)
        return cls(engine, metadata.name, metadata.normalization, privacy)

    def info(self) -> TeacherInfo:
        """Shapes and normalization of the teacher."""
        return self._info

    def query(
        self,
        images: Tensor,
        *,
        features: bool = True,
        bn_loss: bool = True,
        keep_for_grad: bool = False,
    ) -> TeacherOutputs:
        """Logits (and features, R(x) when asked) for ``images``; no gradient.

        ``keep_for_grad`` changes nothing here: no image crosses a wire.
        """
        out = self._engine.query(images, with_bn_loss=bn_loss)
        self.images_answered += images.shape[0]
        return TeacherOutputs(out.logits, out.features if features else None, out.bn_loss)

    def input_grad(self, images: Tensor, grad_logits: Tensor, bn_weight: float) -> Tensor:
        """The input VJP of the engine."""
        gradient = self._engine.input_grad(images, grad_logits, bn_weight)
        self.images_answered += images.shape[0]
        return gradient


def privacy_info(guarantee: PrivacyGuarantee | None) -> PrivacyInfo | None:
    """What a package's DP guarantee tells a student (the ``GetMetadata.privacy`` fields)."""
    if guarantee is None:
        return None
    return PrivacyInfo(
        mechanism=guarantee.mechanism,
        epsilon=guarantee.epsilon,
        delta=guarantee.delta,
        accountant=guarantee.accountant,
        max_grad_norm=guarantee.max_grad_norm,
        noise_multiplier=guarantee.noise_multiplier,
        statistics_noise_multiplier=guarantee.statistics_noise_multiplier,
    )
