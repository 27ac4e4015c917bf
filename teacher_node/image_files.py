"""An owner's own labelled images: an image folder or an ``.npz`` file, read into ImageDataset.

Two formats, both giving float32 ``(N, C, H, W)`` images in [0, 1] and int64 labels:

* **Image folder**: ``ROOT/<class name>/*.png|*.jpg|*.jpeg``, read with Pillow. Classes are
  numbered in the sorted order of their folder names; an empty class folder stands for a class
  without images (so every party can keep the same numbering). Grayscale images (``1``, ``L``,
  ``LA``) give one channel; every other 8-bit mode is converted to RGB (alpha dropped, palettes
  expanded). All images of one folder must share one size and one channel count: they are not
  resized (a resize would change the data behind the owner's back), the refusal names a file
  of each kind. Other files and hidden files are skipped with one warning.
* **.npz** (read with ``allow_pickle=False``): ``images`` uint8 ``(N, H, W, C)`` (raw
  pixels, divided by 255 here) or float ``(N, C, H, W)`` with values in [0, 1], and ``labels``
  integers ``(N,)``.

Every problem is a :class:`DatasetError` that names the file and what is wrong with it.
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from cdfkd.teacher_node.datasets import ImageDataset
from cdfkd.teacher_node.errors import DatasetError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
_GRAYSCALE_MODES = frozenset({"1", "L", "LA"})
_HIGH_DEPTH_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_CHANNEL_COUNTS = (1, 3)


def class_folders(root: Path) -> list[str]:
    """The sorted names of the class folders of image folder ``root`` (hidden ones skipped).

    Raises:
        DatasetError: ``root`` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such image folder")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _read_image(path: Path) -> np.ndarray:
    """One image file as uint8 ``(H, W, C)``, C 1 or 3."""
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            if mode in _HIGH_DEPTH_MODES:
                raise DatasetError(
                    f"{path}: image mode {mode} (16-bit or float) is not supported: "
                    "save 8-bit grayscale or RGB images"
                )
            converted = image.convert("L" if mode in _GRAYSCALE_MODES else "RGB")
            pixels = np.asarray(converted, dtype=np.uint8)
    except DatasetError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise DatasetError(f"{path}: not a readable image ({error})") from error
    return pixels[:, :, None] if pixels.ndim == 2 else pixels


def read_image_folder(root: Path, classes: list[str] | None = None) -> ImageDataset:
    """Read ``root/<class>/*.png|*.jpg`` into an ImageDataset.

    Args:
        root: The folder of class folders.
        classes: Class names in label order; default: ``root``'s class folders, sorted. A
            name without a folder under ``root`` is a class this folder has no images of.

    Raises:
        DatasetError: a missing folder, no class folders, no images, an unreadable image, or
            images of different sizes or channel counts (both files named).
    """
    root = Path(root)
    found = class_folders(root)
    if not found:
        raise DatasetError(
            f"{root}: no class folders (expected {root}/<class name>/*.png or *.jpg)"
        )
    classes = found if classes is None else classes
    images: list[np.ndarray] = []
    labels: list[int] = []
    skipped: list[Path] = []
    reference: tuple[Path, tuple[int, ...]] | None = None
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.name.startswith(".") or path.is_dir():
                continue
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                skipped.append(path)
                continue
            pixels = _read_image(path)
            if reference is None:
                reference = (path, pixels.shape)
            elif pixels.shape != reference[1]:
                raise DatasetError(_mismatch(path, pixels.shape, *reference))
            images.append(pixels)
            labels.append(label)
    if skipped:
        logger.warning(
            "%s: skipped %d files that are not .png/.jpg images (e.g. %s)",
            root,
            len(skipped),
            skipped[0],
        )
    if not images:
        raise DatasetError(f"{root}: the class folders hold no .png or .jpg images")
    stacked = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(255.0)
    return ImageDataset(
        stacked.contiguous(), torch.tensor(labels, dtype=torch.int64), num_classes=len(classes)
    )


def _mismatch(path: Path, shape: tuple[int, ...], first: Path, first_shape: tuple[int, ...]) -> str:
    height, width, channels = shape
    first_height, first_width, first_channels = first_shape
    if channels != first_channels:
        return (
            f"{path}: {channels} channel(s) but {first} has {first_channels}: "
            "an image folder must be all grayscale or all colour"
        )
    return (
        f"{path}: {width}x{height} pixels but {first} has {first_width}x{first_height}: "
        "images of one folder must share one size (they are not resized; resize them first)"
    )


def read_npz(path: Path) -> ImageDataset:
    """Read an ``.npz`` with ``images`` and ``labels`` (no pickled objects are loaded).

    Raises:
        DatasetError: unreadable file, a missing array, wrong dtype or rank, values outside
            [0, 1] or not finite, negative labels, or a label count that differs from the
            image count.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such .npz file")
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [key for key in ("images", "labels") if key not in archive.files]
            if missing:
                raise DatasetError(
                    f"{path}: no {' and no '.join(repr(k) for k in missing)} array "
                    f"(found {sorted(archive.files)}); an .npz needs 'images' and 'labels'"
                )
            images = archive["images"]
            labels = archive["labels"]
    except DatasetError:
        raise
    except ValueError as error:
        # numpy refuses object arrays when allow_pickle is False.
        raise DatasetError(f"{path}: not a plain-array .npz ({error})") from error
    except (OSError, zipfile.BadZipFile, EOFError) as error:
        raise DatasetError(f"{path}: not a readable .npz file ({error})") from error
    image_tensor = _npz_images(path, images)
    label_tensor = _npz_labels(path, labels, image_tensor.shape[0])
    return ImageDataset(image_tensor, label_tensor, num_classes=int(label_tensor.max()) + 1)


def _npz_images(path: Path, images: np.ndarray) -> torch.Tensor:
    if images.dtype == np.uint8:
        if images.ndim != 4 or images.shape[3] not in _CHANNEL_COUNTS:
            raise DatasetError(
                f"{path}: uint8 'images' must be (N, H, W, C) with C 1 or 3, got shape "
                f"{images.shape}"
            )
        return torch.from_numpy(images.copy()).permute(0, 3, 1, 2).float().div(255.0).contiguous()
    if images.dtype in (np.float16, np.float32, np.float64):
        if images.ndim != 4 or images.shape[1] not in _CHANNEL_COUNTS:
            raise DatasetError(
                f"{path}: float 'images' must be (N, C, H, W) with C 1 or 3, got shape "
                f"{images.shape}"
            )
        if images.size and not np.isfinite(images).all():
            raise DatasetError(f"{path}: 'images' holds NaN or infinite values")
        if images.size and (images.min() < 0.0 or images.max() > 1.0):
            raise DatasetError(
                f"{path}: float 'images' must lie in [0, 1] (found {float(images.min()):.3g} .. "
                f"{float(images.max()):.3g}): store raw pixels divided by 255, not normalized "
                "images"
            )
        return torch.from_numpy(images.astype(np.float32)).contiguous()
    raise DatasetError(
        f"{path}: 'images' has dtype {images.dtype}; expected uint8 (N, H, W, C) or float "
        "(N, C, H, W)"
    )


def _npz_labels(path: Path, labels: np.ndarray, count: int) -> torch.Tensor:
    if not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(f"{path}: 'labels' has dtype {labels.dtype}; expected integers")
    if labels.ndim != 1:
        raise DatasetError(f"{path}: 'labels' must be (N,), got shape {labels.shape}")
    if len(labels) != count:
        raise DatasetError(f"{path}: {count} images but {len(labels)} labels")
    if count == 0:
        raise DatasetError(f"{path}: holds no images")
    if labels.min() < 0:
        raise DatasetError(f"{path}: label {int(labels.min())} is negative")
    return torch.from_numpy(labels.astype(np.int64))
