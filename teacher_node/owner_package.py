"""``cdfkd teacher package``: an owner's own trained classifier as a teacher package.

The owner names a factory (``MODULE:CALLABLE`` and keyword arguments) that builds the model in
the owner's code, and a safetensors state dict. Packaging builds and loads the model, taps its
feature, and does a dry forward pass through the same engine a node serves; any problem is a
:class:`PackageError` naming it (exit code 2), and nothing is written.

``--exported FILE.pt2`` (a ``torch.export`` program) is not offered: in torch 2.13,
``torch.export.load`` reads a flag stored in the archive that makes it load weights and
constants with an unrestricted ``torch.load`` (weights-only off) or with plain pickle, so a
crafted file runs code when it is loaded (see README, "Teacher nodes").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from cdfkd.teacher_node.datasets import ImageDataset, Normalization
from cdfkd.teacher_node.engine import MAX_IMAGE_SIDE, TeacherEngine
from cdfkd.teacher_node.errors import InvalidInput, PackageError
from cdfkd.teacher_node.metrics import accuracy, batched
from cdfkd.teacher_node.owner_model import (
    FactoryRef,
    FeatureTap,
    build_from_factory,
    has_batchnorm,
)
from cdfkd.teacher_node.package import (
    TeacherMetadata,
    load_weights,
    read_weights,
    weights_digest,
    write_metadata,
    write_weights,
)

logger = logging.getLogger(__name__)

#: Images of the dry forward pass (at least 2: BatchNorm batch statistics).
DRY_RUN_BATCH = 4
#: Images per forward pass when measuring ``--eval-data`` accuracy.
EVAL_BATCH = 256


@dataclass(frozen=True)
class OwnerModelSpec:
    """What the owner states about the model (the flags of ``cdfkd teacher package``)."""

    name: str
    factory: FactoryRef
    weights: Path
    input_shape: tuple[int, int, int]
    num_classes: int
    normalization: Normalization
    feature_layer: str | None = None


def _check_spec(spec: OwnerModelSpec) -> None:
    channels, height, width = spec.input_shape
    if channels < 1 or height < 1 or width < 1:
        raise PackageError(f"--input-shape {spec.input_shape} must be positive C,H,W")
    if max(height, width) > MAX_IMAGE_SIDE:
        raise PackageError(
            f"--input-shape {spec.input_shape}: height and width must be at most {MAX_IMAGE_SIDE}"
        )
    if spec.num_classes < 2:
        raise PackageError(f"--num-classes {spec.num_classes} must be at least 2")
    for flag, values in (("--mean", spec.normalization.mean), ("--std", spec.normalization.std)):
        if len(values) != channels:
            raise PackageError(f"{flag} has {len(values)} values for {channels} channels")
    if min(spec.normalization.std) <= 0:
        raise PackageError(f"--std {spec.normalization.std} must be positive")


def build_owner_classifier(spec: OwnerModelSpec) -> FeatureTap:
    """The owner's model with its weights loaded and its feature tapped, in eval mode.

    Raises:
        PackageError: the factory, the weights or the feature layer is wrong.
    """
    model = build_from_factory(spec.factory)
    what = f"the model of {spec.factory.reference}"
    load_weights(model, read_weights(spec.weights), spec.weights, what)
    return FeatureTap(model, spec.feature_layer).eval()


def dry_run(classifier: FeatureTap, spec: OwnerModelSpec) -> TeacherEngine:
    """A forward pass (and an input gradient) through the engine a node would serve.

    Raises:
        PackageError: the model rejects the input shape, answers a wrong number of classes,
            or gives non-finite logits, features or gradients.
    """
    try:
        engine = TeacherEngine(classifier, spec.input_shape, spec.normalization)
    except PackageError:
        raise
    except Exception as error:  # noqa: BLE001 - the owner's forward may raise anything
        raise PackageError(
            f"the model rejects inputs of shape (B, {', '.join(map(str, spec.input_shape))}) "
            f"(--input-shape): {type(error).__name__}: {error}"
        ) from error
    if engine.info.num_classes != spec.num_classes:
        raise PackageError(
            f"the model answers {engine.info.num_classes} classes, but --num-classes is "
            f"{spec.num_classes}"
        )
    pixels = torch.rand(
        (DRY_RUN_BATCH, *spec.input_shape), generator=torch.Generator().manual_seed(0)
    ).to(engine.dtype)
    try:
        outputs = engine.query(pixels, with_bn_loss=engine.info.has_bn_prior)
        gradient = engine.input_grad(
            pixels, torch.ones_like(outputs.logits), 1.0 if engine.info.has_bn_prior else 0.0
        )
    except (PackageError, InvalidInput):
        raise
    except Exception as error:  # noqa: BLE001
        raise PackageError(
            f"the dry forward pass failed: {type(error).__name__}: {error}"
        ) from error
    answers = {"logits": outputs.logits, "features": outputs.features, "input gradient": gradient}
    if outputs.bn_loss is not None:
        answers["BatchNorm prior"] = outputs.bn_loss
    for what, value in answers.items():
        if not bool(torch.isfinite(value).all()):
            raise PackageError(
                f"the model's {what} on a dry run of uniform random images are not finite "
                "(NaN or Inf): check the weights and --mean/--std"
            )
    return engine


def read_eval_data(source: str, num_classes: int | None = None) -> tuple[ImageDataset, str]:
    """The labelled test images of ``--eval-data``: a dataset name, an image folder or ``.npz``.

    Read by the same readers as every other real data (``teacher_node/data_sources.py``): the
    test split of a dataset or of files with ``train``/``test`` splits, else the one set.

    Returns:
        The images in [0, 1] and a description for ``teacher.json``.

    Raises:
        DatasetError: the source cannot be read (the message names the file).
    """
    from cdfkd.teacher_node.data_sources import describe_source, load_labelled_images
    from cdfkd.teacher_node.datasets import Split

    data = load_labelled_images(source, Split.TEST, num_classes=num_classes)
    return data, describe_source(source)


def evaluate_accuracy(classifier: FeatureTap, data: ImageDataset, spec: OwnerModelSpec) -> float:
    """Top-1 accuracy of the packaged model on [0, 1] images ``data`` (resized if needed).

    Raises:
        PackageError: the data's channels or classes do not fit the model.
    """
    from cdfkd.teacher_node.image_space import to_model_input

    if data.input_shape[0] != spec.input_shape[0]:
        raise PackageError(
            f"--eval-data has {data.input_shape[0]}-channel images, the model takes "
            f"{spec.input_shape[0]}"
        )
    if int(data.labels.max()) >= spec.num_classes:
        raise PackageError(
            f"--eval-data has label {int(data.labels.max())}, the model has {spec.num_classes} "
            "classes"
        )

    def logits_of(batch: torch.Tensor) -> torch.Tensor:
        return classifier(to_model_input(batch, spec.input_shape, spec.normalization)).logits

    logits = batched(logits_of, data.images, EVAL_BATCH)
    return accuracy(logits, data.labels)


def package_owner_model(
    spec: OwnerModelSpec,
    out: Path,
    eval_data: ImageDataset | None = None,
    eval_description: str | None = None,
) -> TeacherMetadata:
    """Check the owner's model end to end, then write the package into ``out``.

    Raises:
        PackageError: naming the problem; nothing is written then.
    """
    _check_spec(spec)
    classifier = build_owner_classifier(spec)
    engine = dry_run(classifier, spec)
    test_accuracy = None
    if eval_data is not None:
        test_accuracy = evaluate_accuracy(classifier, eval_data, spec)
        logger.info(
            "teacher %s: accuracy %.2f %% on %s", spec.name, 100 * test_accuracy, eval_description
        )
    owner_model = classifier.model
    weights = write_weights(Path(out), owner_model)
    metadata = TeacherMetadata(
        name=spec.name,
        factory=spec.factory,
        input_shape=spec.input_shape,
        num_classes=spec.num_classes,
        normalization=spec.normalization,
        feature_layer=classifier.feature_layer,
        feature_from_input=classifier.from_input,
        has_batchnorm=has_batchnorm(owner_model),
        feature_dim=engine.info.feature_dim,
        num_parameters=sum(p.numel() for p in owner_model.parameters()),
        test_accuracy=test_accuracy,
        eval_data=eval_description if eval_data is not None else None,
        weights_sha256=weights_digest(weights),
    )
    write_metadata(Path(out), metadata)
    return metadata
