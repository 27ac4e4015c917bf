"""What leaves the node: one caller rule's answers, perturbed or refused. Pure torch.

A rule that perturbs (:attr:`Perturbation.active`) protects every output derived from the
model, because any exact one gives the noise away:

- features: ``logits = W g(x) + b``, so least squares on one batch of exact features and noisy
  logits recovers the last layer and with it the exact logits. Features are refused, or carry
  ``features_sigma`` noise.
- ``bn_loss``: refused, or carries ``bn_loss_sigma`` noise.
- input gradients: the VJP of the logits *as answered* (after temperature and top-k), so they
  cannot reveal what those hide; with noise in the rule they are refused unless
  ``gradient_sigma`` is set. Before the VJP each row ``v_i`` of ``grad_logits`` is clipped to
  ``grad_logits_max_norm`` and ``|bn_weight|`` capped to ``bn_weight_max``; row i's noise std
  is ``gradient_sigma * (||v_i|| + |bn_weight|)`` of the clipped values. The answer is linear in
  the cotangent, so its noise-to-signal ratio is the same at every scale: scaling a request by
  1e6 (and the answer back) no longer divides the noise by 1e6, and no answer exceeds what the
  bounds allow.

Noise is keyed: a node secret and the request's content (the image's bytes, for gradients also
the cotangent row, ``bn_weight`` and, where the BN term couples the batch, the batch as a set)
seed it, so the same question asked again gets the same answer and averaging exact repeats
gains nothing. Near-copies of an image get fresh noise: n of them average it down by sqrt(n),
and each costs budget; only the budget bounds that.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from cdfkd.teacher_node.engine import TeacherEngine
from cdfkd.teacher_node.errors import PermissionDenied
from cdfkd.teacher_node.policy import Perturbation

LogitsTransform = Callable[[Tensor], Tensor]


def refused_outputs(rule: Perturbation) -> frozenset[str]:
    """Outputs a perturbing rule refuses, so that none of them undoes its perturbation."""
    if not rule.active:
        return frozenset()
    refused = set()
    if rule.features_sigma is None:
        refused.add("features")
    if rule.bn_loss_sigma is None:
        refused.add("bn_loss")
    if rule.noisy and not rule.gradient_sigma:
        refused.add("input_grad")
    return frozenset(refused)


def check_outputs(rule: Perturbation, wanted: set[str]) -> None:
    """:class:`PermissionDenied` if ``wanted`` holds an output the rule's perturbation refuses."""
    refused = sorted(wanted & refused_outputs(rule))
    if refused:
        raise PermissionDenied(
            f"this caller's answers are perturbed, and {refused} would undo that (exact "
            "features give the last layer and the exact logits; exact gradients or BN terms "
            "the exact model): the owner refuses them unless it sets features_sigma, "
            "bn_loss_sigma or gradient_sigma (see GetMetadata)"
        )


class KeyedNoise:
    """Standard normal noise fixed by a node secret and one key per row.

    Args:
        secret: The node's noise secret (unpredictable unless ``policy.noise_seed`` is set).
    """

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    @classmethod
    def from_generator(cls, generator: torch.Generator) -> KeyedNoise:
        """A secret drawn from ``generator``."""
        draw = torch.randint(0, 256, (32,), generator=generator, dtype=torch.uint8)
        return cls(bytes(draw.tolist()))

    def normal(self, keys: Sequence[bytes], row_shape: Sequence[int], dtype: torch.dtype) -> Tensor:
        """``(len(keys), *row_shape)`` standard normal noise, each row fixed by its key."""
        rows = []
        for key in keys:
            digest = hmac.new(self._secret, key, hashlib.sha256).digest()
            generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
            rows.append(torch.randn(tuple(row_shape), generator=generator, dtype=torch.float32))
        return torch.stack(rows).to(dtype)


def _rows(tensor: Tensor) -> list[bytes]:
    """The bytes of each row; ``+ 0.0`` makes -0.0 and 0.0 the same question."""
    flat = (tensor.detach() + 0.0).to("cpu", torch.float64).contiguous()
    return [row.numpy().tobytes() for row in flat]


def _keys(kind: str, rule: Perturbation, *columns: Sequence[bytes]) -> list[bytes]:
    head = kind.encode() + b"\0" + rule.model_dump_json().encode()
    return [
        hashlib.sha256(head + b"".join(b"\0" + part for part in parts)).digest()
        for parts in zip(*columns, strict=True)
    ]


def _batch_key(images: Tensor) -> bytes:
    """The batch as a set: R(x) does not change when the batch is reordered."""
    return hashlib.sha256(b"".join(sorted(_rows(images)))).digest()


def logits_transform(rule: Perturbation) -> LogitsTransform | None:
    """Temperature, then top-k truncation (differentiable), or None when neither is set.

    Top-k keeps the k largest logits of each row and sets the others to the k-th largest, so
    the ranking below the k-th is hidden.
    """
    if rule.temperature == 1.0 and not rule.top_k:
        return None

    def transform(logits: Tensor) -> Tensor:
        out = logits / rule.temperature if rule.temperature != 1.0 else logits
        if 0 < rule.top_k < out.shape[1]:
            kth = out.topk(rule.top_k, dim=1).values[:, -1:]
            out = torch.maximum(out, kth)
        return out

    return transform


def perturb_logits(logits: Tensor, rule: Perturbation, noise: Tensor | None = None) -> Tensor:
    """Temperature, then top-k, then ``logits_sigma * noise`` (standard normal, logits' shape)."""
    transform = logits_transform(rule)
    out = logits if transform is None else transform(logits)
    if rule.logits_sigma:
        if noise is None:
            raise ValueError("logits_sigma is set: pass the standard normal noise")
        out = out + rule.logits_sigma * noise.to(out.device, out.dtype)
    return out


def clip_rows(grad_logits: Tensor, max_norm: float | None) -> Tensor:
    """Each row scaled down to L2 norm ``max_norm`` where longer; unchanged when None."""
    if max_norm is None:
        return grad_logits
    norms = torch.linalg.vector_norm(grad_logits, dim=1, keepdim=True)
    return grad_logits * torch.clamp(max_norm / norms.clamp_min(1e-30), max=1.0)


def cap(bn_weight: float, max_abs: float | None) -> float:
    """``bn_weight`` with its magnitude capped to ``max_abs`` (unchanged when None)."""
    if max_abs is None or abs(bn_weight) <= max_abs:
        return bn_weight
    return math.copysign(max_abs, bn_weight)


@dataclass(frozen=True)
class QueryAnswer:
    """What a Query returns: ``(B, K)`` logits, ``(B, D)`` features or None, R(x) or None."""

    logits: Tensor
    features: Tensor | None
    bn_loss: float | None


def answer_query(
    engine: TeacherEngine,
    images: Tensor,
    rule: Perturbation,
    noise: KeyedNoise,
    *,
    features: bool,
    bn_loss: bool,
) -> QueryAnswer:
    """The rule's answer to a Query (its refusals are checked before, by :func:`check_outputs`).

    Args:
        engine: The teacher.
        images: float (B, C, H, W) synthetic images.
        rule: The caller's perturbation.
        noise: The node's keyed noise.
        features: Whether features are returned.
        bn_loss: Whether R(x) is returned.
    """
    out = engine.query(images, with_bn_loss=bn_loss)
    if not rule.active:
        prior = None if out.bn_loss is None else float(out.bn_loss)
        return QueryAnswer(out.logits, out.features if features else None, prior)
    digests = _rows(images)
    logits_noise = None
    if rule.logits_sigma:
        keys = _keys("logits", rule, digests)
        logits_noise = noise.normal(keys, out.logits.shape[1:], out.logits.dtype)
    logits = perturb_logits(out.logits, rule, logits_noise)
    returned_features = None
    if features and rule.features_sigma is not None:
        keys = _keys("features", rule, digests)
        feature_noise = noise.normal(keys, out.features.shape[1:], out.features.dtype)
        returned_features = out.features + rule.features_sigma * feature_noise
    prior = None
    if bn_loss and out.bn_loss is not None and rule.bn_loss_sigma is not None:
        (key,) = _keys("bn_loss", rule, [_batch_key(images)])
        draw = float(noise.normal([key], (), torch.float64))
        prior = float(out.bn_loss) + rule.bn_loss_sigma * draw
    return QueryAnswer(logits, returned_features, prior)


def answer_input_grad(
    engine: TeacherEngine,
    images: Tensor,
    grad_logits: Tensor,
    bn_weight: float,
    rule: Perturbation,
    noise: KeyedNoise,
) -> Tensor:
    """The rule's input gradient d/dx [<v, T(t(x))> + w R(x)], clipped, capped, noised.

    ``v`` is ``grad_logits`` with each row clipped to ``grad_logits_max_norm``, ``w`` is
    ``bn_weight`` capped to ``bn_weight_max``, ``T`` the rule's temperature and top-k; row i's
    noise std is ``gradient_sigma * (||v_i|| + |w|)``, in proportion to the request, so no
    rescaling of it changes the answer's noise-to-signal ratio.

    Args:
        engine: The teacher.
        images: float (B, C, H, W) synthetic images.
        grad_logits: float (B, K) the caller's cotangent.
        bn_weight: The caller's factor on R(x).
        rule: The caller's perturbation.
        noise: The node's keyed noise.

    Returns:
        float (B, C, H, W).
    """
    clipped = clip_rows(grad_logits, rule.grad_logits_max_norm)
    weight = cap(bn_weight, rule.bn_weight_max)
    gradient = engine.input_grad(images, clipped, weight, logits_transform(rule))
    if not rule.gradient_sigma:
        return gradient
    scale = torch.linalg.vector_norm(clipped.to(torch.float64), dim=1) + abs(weight)
    std = (rule.gradient_sigma * scale).to(gradient.dtype).view(-1, *[1] * (gradient.dim() - 1))
    batch = _batch_key(images) if weight else b""
    keys = _keys(
        "input_grad",
        rule,
        _rows(images),
        _rows(clipped),
        [repr(weight).encode() + batch] * images.shape[0],
    )
    return gradient + std * noise.normal(keys, gradient.shape[1:], gradient.dtype)
