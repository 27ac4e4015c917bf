"""An owner's own classifier: built by the owner's factory, its feature tapped per call.

An owner's model is any ``nn.Module`` whose forward maps a normalized image batch to a logits
tensor. The engine needs logits *and* the feature g of METHOD.md, so :class:`FeatureTap`
wraps the model: for the duration of one forward pass it hooks the feature layer (a module
named by the owner, or by default the last ``nn.Linear``, whose *input* is the feature), and
returns :class:`ClassifierOutput`. The hook is registered and removed inside the call and hands
its value back through a local, so no state survives a call (STYLE.md anti-pattern 7).

The factory is the owner's own code, imported on the owner's own node: a teacher package names
it (``MODULE:CALLABLE``), never a student or a config from elsewhere.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn

from cdfkd.teacher_node.errors import PackageError
from cdfkd.teacher_node.zoo import ClassifierOutput

logger = logging.getLogger(__name__)


class FactoryRef(BaseModel):
    """``MODULE:CALLABLE`` plus keyword arguments: how the owner's code builds the model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    reference: str = Field(description="MODULE:CALLABLE, importable on the owner's node")
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("reference")
    @classmethod
    def _check_reference(cls, value: str) -> str:
        module, _, attribute = value.partition(":")
        if not module or not attribute or ":" in attribute:
            raise ValueError(f"factory {value!r} must be MODULE:CALLABLE, e.g. my_models:resnet18")
        return value


def build_from_factory(factory: FactoryRef) -> nn.Module:
    """Import the owner's factory and call it with its keyword arguments.

    Raises:
        PackageError: the module does not import, the callable is missing, the call fails, or
            it returns something other than an ``nn.Module``.
    """
    module_name, _, attribute = factory.reference.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # noqa: BLE001 - any failure of the owner's import is reported
        raise PackageError(
            f"factory {factory.reference}: module {module_name!r} does not import "
            f"({type(error).__name__}: {error}); install it or add its folder to PYTHONPATH"
        ) from error
    builder: Callable[..., object] | None = getattr(module, attribute, None)
    if builder is None or not callable(builder):
        raise PackageError(
            f"factory {factory.reference}: module {module_name!r} has no callable {attribute!r}"
        )
    try:
        model = builder(**factory.kwargs)
    except Exception as error:  # noqa: BLE001 - the owner's code may raise anything
        raise PackageError(
            f"factory {factory.reference}({_kwargs_text(factory.kwargs)}) failed: "
            f"{type(error).__name__}: {error}"
        ) from error
    if not isinstance(model, nn.Module):
        raise PackageError(
            f"factory {factory.reference} returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def _kwargs_text(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in kwargs.items())


def last_linear_name(model: nn.Module) -> str:
    """The name of the last ``nn.Linear`` in ``model.named_modules()`` order.

    Raises:
        PackageError: the model has no ``nn.Linear``.
    """
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise PackageError(
            "the model has no nn.Linear, so there is no default feature layer: name the module "
            "whose output is the feature with --feature-layer"
        )
    return names[-1]


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` has a BatchNorm layer (the BN prior R(x) needs one)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def pool_features(value: Tensor) -> Tensor:
    """A layer's output as a feature ``(B, D)``: global average over space if 4-D, flattened."""
    if value.dim() == 4:
        value = value.mean(dim=(2, 3))
    return value.flatten(1)


class FeatureTap(nn.Module):
    """An owner's classifier returning :class:`ClassifierOutput` (logits and feature g).

    Args:
        model: The owner's module; its forward returns a logits tensor ``(B, K)``.
        feature_layer: Name of the module (``model.named_modules()``) whose output, pooled and
            flattened, is g; None takes the *input* of the last ``nn.Linear``.
        from_input: Take the module's input instead of its output.

    Raises:
        PackageError: the feature layer does not exist (or, for None, there is no nn.Linear).
    """

    def __init__(
        self, model: nn.Module, feature_layer: str | None = None, from_input: bool = False
    ) -> None:
        super().__init__()
        self.model = model
        modules = dict(model.named_modules())
        if feature_layer is None:
            feature_layer, from_input = last_linear_name(model), True
        if feature_layer not in modules or feature_layer == "":
            nearby = [n for n in modules if n][:8]
            raise PackageError(
                f"feature layer {feature_layer!r} does not exist in the model; its modules "
                f"include {nearby}"
            )
        self._layer_name = feature_layer
        self._use_input = from_input

    @property
    def feature_layer(self) -> str:
        """The tapped module's name."""
        return self._layer_name

    @property
    def from_input(self) -> bool:
        """Whether the feature is the tapped module's input (else its output)."""
        return self._use_input

    def forward(self, images: Tensor) -> ClassifierOutput:
        """Logits and feature of ``images`` float (B, C, H, W), normalized as the model expects."""
        captured: list[Tensor] = []
        layer = self.model.get_submodule(self._layer_name)

        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            captured.append(inputs[0] if self._use_input else output)

        handle = layer.register_forward_hook(hook)
        try:
            logits = self.model(images)
        finally:
            handle.remove()
        if not isinstance(logits, Tensor):
            raise PackageError(
                f"the model returned {type(logits).__name__}, expected a logits tensor (B, K)"
            )
        if not captured:
            raise PackageError(
                f"feature layer {self._layer_name!r} did not run in the forward pass"
            )
        # A layer that runs more than once per pass (shared weights): its last call counts.
        return ClassifierOutput(logits, pool_features(captured[-1]))
