"""Owners' own image files written by tests: drawn coloured shapes, as folders and ``.npz``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

#: Class folder names; sorted, they give labels circle 0, cross 1, square 2.
SHAPES = ("circle", "cross", "square")
#: Four classes, for models of four classes (sorted: circle, cross, square, triangle).
FOUR_SHAPES = (*SHAPES, "triangle")


def draw_shape(shape: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One RGB picture: a shape of a random colour and place on a random dark background."""
    background = tuple(int(v) for v in rng.integers(0, 60, 3))
    colour = tuple(int(v) for v in rng.integers(120, 256, 3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    extent = int(rng.integers(size // 2, size - 2))
    left = int(rng.integers(0, size - extent + 1))
    top = int(rng.integers(0, size - extent + 1))
    box = (left, top, left + extent - 1, top + extent - 1)
    match shape:
        case "circle":
            draw.ellipse(box, fill=colour)
        case "square":
            draw.rectangle(box, fill=colour)
        case "triangle":
            draw.polygon(
                ((box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])), fill=colour
            )
        case "cross":
            width = max(2, extent // 4)
            draw.line((box[0], box[1], box[2], box[3]), fill=colour, width=width)
            draw.line((box[0], box[3], box[2], box[1]), fill=colour, width=width)
    return image


def write_shape_folder(
    root: Path,
    per_class: int,
    size: int = 32,
    seed: int = 0,
    suffix: str = ".png",
    shapes: tuple[str, ...] = SHAPES,
) -> Path:
    """``root/<shape>/<i>.png``: ``per_class`` drawn images of every shape in ``shapes``."""
    rng = np.random.default_rng(seed)
    for shape in shapes:
        folder = root / shape
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            draw_shape(shape, size, rng).save(folder / f"{index:04d}{suffix}")
    return root


def write_shape_splits(
    root: Path,
    train_per_class: int,
    test_per_class: int,
    size: int = 32,
    seed: int = 0,
    shapes: tuple[str, ...] = SHAPES,
) -> Path:
    """``root/train/<shape>/`` and ``root/test/<shape>/`` image folders."""
    write_shape_folder(root / "train", train_per_class, size, seed, shapes=shapes)
    write_shape_folder(root / "test", test_per_class, size, seed + 1000, shapes=shapes)
    return root


def shape_arrays(per_class: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images ``(N, H, W, 3)`` and int64 labels of drawn shapes."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, shape in enumerate(SHAPES):
        for _ in range(per_class):
            images.append(np.asarray(draw_shape(shape, size, rng)))
            labels.append(label)
    return np.stack(images), np.array(labels, dtype=np.int64)
