"""The one way the student side talks to a teacher (STYLE.md 3).

The trainer sees ``Sequence[Teacher]``; an in-process teacher and a remote one implement the
same protocol over the same engine code, so their results compare with ``torch.equal``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import Tensor

#: Everything a teacher can answer.
ALL_OUTPUTS = frozenset({"logits", "features", "bn_loss", "input_grad"})


@dataclass(frozen=True)
class PrivacyInfo:
    """A teacher's differential-privacy guarantee about its owner's training records.

    Attributes:
        mechanism: ``dp-sgd``.
        epsilon: The owner's accountant's epsilon (training and the prior's statistics).
        delta: Its delta.
        accountant: Which accountant computed it.
        max_grad_norm: DP-SGD's clipping bound.
        noise_multiplier: DP-SGD's noise std over the clipping bound.
        statistics_noise_multiplier: The statistics release's noise std over its bound.
    """

    mechanism: str
    epsilon: float
    delta: float
    accountant: str
    max_grad_norm: float
    noise_multiplier: float
    statistics_noise_multiplier: float

    def describe(self) -> str:
        """``(epsilon, delta)-DP (mechanism, accountant accountant)``."""
        return (
            f"({self.epsilon:.3g}, {self.delta:.3g})-DP ({self.mechanism}, {self.accountant} "
            "accountant)"
        )


def describe_privacy(privacy: PrivacyInfo | None) -> str:
    """A teacher's guarantee in words, ``none`` without one."""
    return "none" if privacy is None else privacy.describe()


@dataclass(frozen=True)
class TeacherInfo:
    """What the student side may know about a teacher: shapes, never parameters.

    Attributes:
        name: The owner's name for the teacher.
        input_shape: ``(C, H, W)`` of the teacher's own input (queries may have another H, W:
            the teacher resizes them).
        num_classes: Size of the label space.
        feature_dim: Width of the penultimate feature g_i.
        normalization_mean: Per-channel mean the teacher was trained with.
        normalization_std: Per-channel std the teacher was trained with.
        allowed_outputs: What the owner lets this caller have, of "logits", "features",
            "bn_loss" and "input_grad"; without "input_grad" the teacher's ``input_grad`` is a
            zeroth-order estimate from logits.
        privacy: The teacher's DP guarantee; None for a teacher trained without one.
    """

    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    feature_dim: int
    normalization_mean: tuple[float, ...]
    normalization_std: tuple[float, ...]
    allowed_outputs: frozenset[str] = ALL_OUTPUTS
    privacy: PrivacyInfo | None = None


@dataclass(frozen=True)
class TeacherOutputs:
    """A teacher's answers for a batch ``x``.

    Attributes:
        logits: float32 (B, num_classes) t_i(x).
        features: float32 (B, feature_dim) g_i(x); None when not asked for.
        bn_loss: 0-dim R_i(x) (METHOD.md 2); None when not asked for.
    """

    logits: Tensor
    features: Tensor | None
    bn_loss: Tensor | None


@runtime_checkable
class Teacher(Protocol):
    """A teacher as the distillation loop sees it."""

    def info(self) -> TeacherInfo:
        """Shapes and normalization of the teacher."""
        ...

    def query(
        self,
        images: Tensor,
        *,
        features: bool = True,
        bn_loss: bool = True,
        keep_for_grad: bool = False,
    ) -> TeacherOutputs:
        """Logits (and features, R(x) when asked) for ``images`` float32 (B, C, H, W).

        ``images`` are run-space pixels on the [0, 1] scale (``teacher_node/image_space.py``);
        the trainer sees teachers through ``RunSpaceTeacher``, which takes standardized images
        and maps them. No gradient flows. The student step asks for features, the generator
        step for R(x); what is not asked for is neither computed nor sent. ``keep_for_grad``
        says an ``input_grad`` of the same images follows (the generator step): a remote
        teacher then asks its node to keep them, so they cross the wire once; the answers are
        the same either way.
        """
        ...

    def input_grad(self, images: Tensor, grad_logits: Tensor, bn_weight: float) -> Tensor:
        """d/dx [<grad_logits, t(x)> + bn_weight * R(x)], float32 (B, C, H, W)."""
        ...
