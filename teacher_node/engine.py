"""TeacherEngine: everything the distillation loop needs from one teacher, in pure torch.

The engine answers, for a batch of *synthetic* images ``x``: the teacher's logits ``t(x)``,
its penultimate features ``g(x)``, the BatchNorm-prior term ``R(x)`` of METHOD.md section 2,
and the input vector-Jacobian product of METHOD.md "What the system adds":

    d/dx [ <v, t(x)> + bn_weight * R(x) ]

It never returns parameters or BN running statistics, only values computed on ``x``.

The targets of R(x) are the BatchNorm layers' running statistics, or, for a differentially
private teacher (GroupNorm, no running statistics), the statistics released with the Gaussian
mechanism when it was trained (``statistics``: per normalization layer, the noised per-channel
mean and variance of the layer's input over the owner's records).

``x`` is in the run image space (``teacher_node/image_space.py``): float (B, C, H, W) pixels on
the [0, 1] scale at the run's size. The engine brings it to the teacher's own size (bilinear)
and normalization inside the differentiable forward pass, so ``input_grad`` is the exact
gradient with respect to the run-space images, and an in-process teacher and a teacher node
compute the same thing bit for bit.

Forward hooks live only for the duration of one call and hand their values back through
a local list, so no state survives between calls (STYLE.md anti-pattern 7).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
from torch import Tensor, nn

from cdfkd.teacher_node.datasets import Normalization
from cdfkd.teacher_node.errors import InvalidInput
from cdfkd.teacher_node.image_space import resize
from cdfkd.teacher_node.zoo import ClassifierOutput

logger = logging.getLogger(__name__)

#: c_1 of METHOD.md: the first BN layer's term is scaled by 5, the others by 1 (authors' code).
FIRST_BN_SCALE = 5.0
#: Largest height or width of a query image a node accepts by default (``limits.max_image_side``).
MAX_IMAGE_SIDE = 512


class EngineOutputs(NamedTuple):
    """Teacher answers for one batch.

    Attributes:
        logits: ``(B, num_classes)`` t_i(x).
        features: ``(B, feature_dim)`` g_i(x).
        bn_loss: scalar R_i(x) (0-dim tensor); None when not asked for.
    """

    logits: Tensor
    features: Tensor
    bn_loss: Tensor | None


@dataclass(frozen=True)
class EngineInfo:
    """Shape facts about the hosted teacher (no parameters)."""

    input_shape: tuple[int, int, int]
    num_classes: int
    feature_dim: int
    #: Layers of the prior R(x): BatchNorm layers, or those of a DP teacher's released statistics.
    num_bn_layers: int
    max_image_side: int = MAX_IMAGE_SIDE

    @property
    def has_bn_prior(self) -> bool:
        """Whether the teacher has BatchNorm layers or released statistics, so R(x) exists."""
        return self.num_bn_layers > 0


def bn_prior(
    batch_means: Sequence[Tensor],
    batch_vars: Sequence[Tensor],
    running_means: Sequence[Tensor],
    running_vars: Sequence[Tensor],
    scales: Sequence[float],
) -> Tensor:
    """R(x) = sum_l c_l * (||mu_l(x) - mu_hat_l||_2 + ||var_l(x) - var_hat_l||_2) (METHOD.md 2).

    Args:
        batch_means: per BN layer, ``(C_l,)`` mean of the layer's input over batch and space.
        batch_vars: per BN layer, ``(C_l,)`` biased variance of the same.
        running_means: per BN layer, ``(C_l,)`` the layer's running mean.
        running_vars: per BN layer, ``(C_l,)`` the layer's running variance.
        scales: per BN layer, c_l.

    Returns:
        A 0-dim tensor.
    """
    terms = [
        scale * (torch.linalg.vector_norm(mean - r_mean) + torch.linalg.vector_norm(var - r_var))
        for mean, var, r_mean, r_var, scale in zip(
            batch_means, batch_vars, running_means, running_vars, scales, strict=True
        )
    ]
    return torch.stack(terms).sum()


def _channel_stats(inputs: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and biased variance per channel (dim 1) of a BN layer's input ``(B, C, *)``."""
    dims = [0, *range(2, inputs.dim())]
    return inputs.mean(dim=dims), inputs.var(dim=dims, unbiased=False)


class TeacherEngine:
    """Answers queries about synthetic images for one frozen teacher.

    Args:
        model: A classifier returning :class:`ClassifierOutput`. It is put in eval mode
            (BN uses running statistics; R(x) uses the batch statistics of x) and frozen.
        input_shape: ``(C, H, W)`` the teacher expects.
        normalization: The teacher's per-channel mean and std, applied inside; None: the
            model takes the [0, 1] pixels as they are.
        first_bn_scale: c_1 of METHOD.md.
        max_image_side: Largest query height or width accepted (bounds the work per image).
        statistics: Released targets of R(x) for a teacher without BatchNorm (a DP teacher):
            per layer, its module name and the per-channel mean and variance of its input.
            None: the BatchNorm layers and their running statistics.
    """

    def __init__(
        self,
        model: nn.Module,
        input_shape: tuple[int, int, int],
        normalization: Normalization | None = None,
        first_bn_scale: float = FIRST_BN_SCALE,
        max_image_side: int = MAX_IMAGE_SIDE,
        statistics: Sequence[PriorTarget] | None = None,
    ) -> None:
        self._model = model.eval().requires_grad_(False)
        self._input_shape = (int(input_shape[0]), int(input_shape[1]), int(input_shape[2]))
        if max(self._input_shape[1:]) > max_image_side:
            raise InvalidInput(
                f"the teacher's input {self._input_shape} is larger than max_image_side "
                f"{max_image_side}"
            )
        self._max_image_side = max_image_side
        parameter = next(model.parameters())
        self._mean: Tensor | None = None
        self._std: Tensor | None = None
        if normalization is not None:
            counts = {len(normalization.mean), len(normalization.std)}
            if counts != {input_shape[0]}:
                raise InvalidInput(
                    f"normalization has {len(normalization.mean)} means and "
                    f"{len(normalization.std)} stds for {input_shape[0]} channels"
                )
            # As Normalization.apply computes it, on the model's device.
            view = (1, -1, 1, 1)
            options = {"dtype": parameter.dtype, "device": parameter.device}
            self._mean = torch.tensor(normalization.mean, **options).view(view)  # type: ignore[arg-type]
            self._std = torch.tensor(normalization.std, **options).view(view)  # type: ignore[arg-type]
        # modules() order, as the authors' hooks: c_1 applies to the first registered BN layer.
        self._bn_layers: list[nn.Module] = [
            m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ]
        # None: the BatchNorm layers' running statistics, read at each call.
        self._targets: list[tuple[Tensor, Tensor]] | None = None
        if statistics is not None:
            if self._bn_layers:
                raise InvalidInput(
                    "released statistics replace BatchNorm running statistics: this teacher "
                    "has BatchNorm layers"
                )
            self._bn_layers, self._targets = _released_targets(model, statistics, parameter)
        self._scales = [first_bn_scale] + [1.0] * (len(self._bn_layers) - 1)
        # Calls from several server threads share the modules the per-call hooks attach to.
        self._lock = threading.Lock()
        with torch.no_grad():
            probe = model(
                torch.zeros(2, *input_shape, dtype=parameter.dtype, device=parameter.device)
            )
        self._info = EngineInfo(
            input_shape=self._input_shape,
            num_classes=int(probe.logits.shape[1]),
            feature_dim=int(probe.features.shape[1]),
            num_bn_layers=len(self._bn_layers),
            max_image_side=max_image_side,
        )

    @property
    def info(self) -> EngineInfo:
        """Shape facts about the teacher."""
        return self._info

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the teacher computes in."""
        return next(self._model.parameters()).dtype

    def query(self, images: Tensor, with_bn_loss: bool = True) -> EngineOutputs:
        """Logits, features and (if asked) R(x) for run-space ``images``, no gradients.

        Without R(x) no hooks run: the student step needs only logits and features.

        Args:
            images: float (B, C, H, W) pixels on the [0, 1] scale, H and W up to
                ``max_image_side``; C as the teacher's.
            with_bn_loss: Also compute R(x); refused for a teacher without BatchNorm.
        """
        self._check_images(images)
        self._check_bn_prior(with_bn_loss)
        images = _as_on_the_wire(images)
        with self._lock, torch.no_grad():
            return self._forward(images, with_bn_loss)

    def input_grad(
        self,
        images: Tensor,
        grad_logits: Tensor,
        bn_weight: float,
        logits_transform: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:
        """The VJP d/dx [<grad_logits, T(t(x))> + bn_weight * R(x)].

        Args:
            images: float (B, C, H, W) synthetic run-space images (see :meth:`query`).
            grad_logits: float (B, num_classes) the cotangent v = dL_G/dt computed by the caller.
            bn_weight: the factor on R(x), w_bn / N in METHOD.md; 0 for a teacher without
                BatchNorm.
            logits_transform: T, a differentiable map of the logits (an owner's temperature and
                top-k); None is the identity.

        Returns:
            float (B, C, H, W), the gradient with respect to ``images``.
        """
        self._check_images(images)
        self._check_bn_prior(bn_weight != 0.0)
        images = _as_on_the_wire(images)
        expected = (images.shape[0], self._info.num_classes)
        if tuple(grad_logits.shape) != expected:
            raise InvalidInput(
                f"grad_logits has shape {tuple(grad_logits.shape)}, expected {expected}"
            )
        _check_finite("grad_logits", grad_logits)
        inputs = images.detach().requires_grad_(True)
        with self._lock, torch.enable_grad():
            outputs = self._forward(inputs, with_bn_loss=bn_weight != 0.0)
            logits = outputs.logits
            if logits_transform is not None:
                logits = logits_transform(logits)
            objective = (logits * grad_logits.to(logits.dtype)).sum()
            if outputs.bn_loss is not None:
                objective = objective + bn_weight * outputs.bn_loss
            (gradient,) = torch.autograd.grad(objective, inputs)
        return gradient

    def _model_input(self, images: Tensor) -> Tensor:
        """Run-space pixels brought to the teacher's size and normalization (differentiable)."""
        resized = resize(images, self._input_shape[1:])
        if self._mean is None or self._std is None:
            return resized
        return (resized - self._mean) / self._std

    def _forward(self, images: Tensor, with_bn_loss: bool) -> EngineOutputs:
        images = self._model_input(images)
        if not with_bn_loss:
            output: ClassifierOutput = self._model(images)
            return EngineOutputs(output.logits, output.features, None)
        stats: dict[int, tuple[Tensor, Tensor]] = {}

        def make_hook(index: int):  # noqa: ANN202 - closure factory
            def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
                stats[index] = _channel_stats(inputs[0])

            return hook

        handles = [bn.register_forward_hook(make_hook(i)) for i, bn in enumerate(self._bn_layers)]
        try:
            output = self._model(images)
        finally:
            for handle in handles:
                handle.remove()
        order = range(len(self._bn_layers))
        targets = self._targets or [
            (bn.running_mean, bn.running_var)  # type: ignore[misc]
            for bn in self._bn_layers
        ]
        bn_loss = bn_prior(
            [stats[i][0] for i in order],
            [stats[i][1] for i in order],
            [mean for mean, _ in targets],
            [var for _, var in targets],
            self._scales,
        )
        return EngineOutputs(output.logits, output.features, bn_loss)

    def _check_bn_prior(self, wanted: bool) -> None:
        if wanted and not self._bn_layers:
            raise InvalidInput(
                "this teacher has no BatchNorm layers (nor released statistics), so it has no "
                "BN-prior term R(x): ask "
                "without it (bn_weight 0; GetMetadata.has_bn_prior is false)"
            )

    def _check_images(self, images: Tensor) -> None:
        if not torch.is_floating_point(images):
            raise InvalidInput(f"images must be floating point, got {images.dtype}")
        channels, side = self._input_shape[0], self._max_image_side
        if (
            images.dim() != 4
            or images.shape[1] != channels
            or not 1 <= images.shape[2] <= side
            or not 1 <= images.shape[3] <= side
        ):
            raise InvalidInput(
                f"images have shape {tuple(images.shape)}, expected (B, {channels}, H, W) with "
                f"H and W at most {side}"
            )
        if images.shape[0] < 2:
            raise InvalidInput("a batch needs at least 2 images for BatchNorm batch statistics")
        _check_finite("images", images)


class PriorTarget(Protocol):
    """One layer's target of R(x): the module's name and its input's per-channel statistics."""

    @property
    def layer(self) -> str: ...  # noqa: D102

    @property
    def mean(self) -> Sequence[float]: ...  # noqa: D102

    @property
    def var(self) -> Sequence[float]: ...  # noqa: D102


def _released_targets(
    model: nn.Module, statistics: Sequence[PriorTarget], parameter: Tensor
) -> tuple[list[nn.Module], list[tuple[Tensor, Tensor]]]:
    """The modules the released statistics name and their targets as tensors.

    Raises:
        InvalidInput: a named module is missing or the channel counts do not fit.
    """
    modules = dict(model.named_modules())
    layers, targets = [], []
    options = {"dtype": parameter.dtype, "device": parameter.device}
    for entry in statistics:
        module = modules.get(entry.layer)
        if module is None or entry.layer == "":
            raise InvalidInput(f"released statistics name layer {entry.layer!r}, not in the model")
        channels = getattr(module, "num_channels", None)
        if len(entry.mean) != len(entry.var) or (
            channels is not None and len(entry.mean) != channels
        ):
            raise InvalidInput(
                f"released statistics of {entry.layer!r} have {len(entry.mean)} means and "
                f"{len(entry.var)} variances for {channels} channels"
            )
        layers.append(module)
        targets.append(
            (
                torch.tensor(entry.mean, **options),  # type: ignore[arg-type]
                torch.tensor(entry.var, **options),  # type: ignore[arg-type]
            )
        )
    return layers, targets


def _as_on_the_wire(images: Tensor) -> Tensor:
    """Images in the contiguous layout a node decodes from the wire.

    Resizing and normalizing take other kernels (other rounding) on, e.g., channels-last
    tensors such as the generator's; an in-process teacher must compute what a node does.
    """
    return images.contiguous()


def _check_finite(name: str, tensor: Tensor) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise InvalidInput(f"{name} contains NaN or Inf")
