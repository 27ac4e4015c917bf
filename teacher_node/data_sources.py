"""Where real labelled images come from: a named dataset, or an owner's own files.

A data source is a :class:`DatasetName` (``fashion_mnist``, ``digits``) or a path to the
owner's files (see :mod:`cdfkd.teacher_node.image_files` for the two formats). A path holds
either

* **both splits**: ``PATH/train`` and ``PATH/test``, each an image folder of class folders or an
  ``.npz`` (``PATH/train.npz``, ``PATH/test.npz``); class folders of the two splits are numbered
  together (the sorted union of their names), so labels mean the same in both; or
* **one set**: an image folder of class folders, or one ``.npz`` file, which serves as whichever
  split is asked for (e.g. the test images of ``cdfkd evaluate --data``).

What needs a training and a test split (teacher training, a run's ``[data]``, a Flower
organization's data) reads them with :func:`load_train_and_test`, which refuses one set.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeAlias

from cdfkd.teacher_node.datasets import DatasetName, ImageDataset, Split, load_dataset
from cdfkd.teacher_node.errors import DatasetError
from cdfkd.teacher_node.image_files import class_folders, read_image_folder, read_npz

#: A named dataset, or the path of an owner's image folder or ``.npz``.
DataSource: TypeAlias = DatasetName | Path


def describe_source(source: DataSource) -> str:
    """A short name of ``source`` for messages and reports."""
    return source.value if isinstance(source, DatasetName) else str(source)


def _split_files(path: Path) -> dict[Split, Path]:
    """The split entries of ``path`` (``train``/``test`` folders or ``.npz``); empty for one set."""
    found: dict[Split, Path] = {}
    for split in Split:
        folder, archive = path / split.value, path / f"{split.value}.npz"
        if folder.is_dir() and archive.is_file():
            raise DatasetError(
                f"{path}: both {folder.name}/ and {archive.name} exist: keep one of them"
            )
        if folder.is_dir():
            found[split] = folder
        elif archive.is_file():
            found[split] = archive
    return found


def _read(path: Path, classes: list[str] | None = None) -> ImageDataset:
    if path.is_dir():
        return read_image_folder(path, classes)
    if path.suffix.lower() == ".npz":
        return read_npz(path)
    raise DatasetError(
        f"{path}: not an image folder or an .npz file"
        if path.exists()
        else f"{path}: no such file or folder"
    )


def _check_classes(dataset: ImageDataset, num_classes: int | None, where: Path) -> ImageDataset:
    """``dataset`` with ``num_classes`` classes, refusing labels or class folders beyond it."""
    if num_classes is None:
        return dataset
    if where.is_dir() and dataset.num_classes != num_classes:
        raise DatasetError(
            f"{where}: {dataset.num_classes} class folders but the model has {num_classes} "
            "classes: every party needs the same class folders (sorted names give the labels; "
            "an empty folder stands for a class without images)"
        )
    highest = int(dataset.labels.max())
    if highest >= num_classes:
        raise DatasetError(
            f"{where}: label {highest} is out of range for a model of {num_classes} classes "
            f"(labels are 0..{num_classes - 1})"
        )
    return ImageDataset(dataset.images, dataset.labels, num_classes)


def load_labelled_images(
    source: DataSource | str,
    split: Split,
    *,
    root: Path | None = None,
    num_classes: int | None = None,
) -> ImageDataset:
    """One split of a named dataset or of an owner's files, as float32 [0, 1] images.

    Args:
        source: A dataset name, or the path of an image folder or ``.npz`` (with or without
            ``train``/``test`` splits; see the module docstring). A string that is a dataset
            name is that dataset; any other string is a path.
        split: Which split; a path holding one set serves it as any split.
        root: Folder of the Fashion-MNIST IDX files (named datasets only).
        num_classes: The model's class count, when known: labels at or beyond it, and an image
            folder with another number of class folders, are refused.

    Returns:
        Images float32 ``(N, C, H, W)`` in [0, 1], labels int64 ``(N,)``.

    Raises:
        DatasetError: the data are missing or malformed; the message names the file.
    """
    source = _as_source(source)
    if isinstance(source, DatasetName):
        return load_dataset(source, split, root)
    splits = _split_files(source) if source.is_dir() else {}
    if not splits:
        return _check_classes(_read(source), num_classes, source)
    if split not in splits:
        raise DatasetError(
            f"{source}: no {split.value} split (expected {source}/{split.value}/ with class "
            f"folders, or {source}/{split.value}.npz)"
        )
    return _check_classes(_read(splits[split], _joint_classes(splits)), num_classes, splits[split])


def load_train_and_test(
    source: DataSource | str, *, root: Path | None = None, num_classes: int | None = None
) -> tuple[ImageDataset, ImageDataset]:
    """The training and test splits of ``source`` (a path must hold both).

    Both splits come with the same number of classes (for ``.npz`` files: one more than the
    largest label of either, unless ``num_classes`` says).

    Raises:
        DatasetError: as :func:`load_labelled_images`, a path holding one set, or splits of
            different image shapes.
    """
    source = _as_source(source)
    if isinstance(source, Path):
        splits = _split_files(source) if source.is_dir() else {}
        missing = [s.value for s in Split if s not in splits]
        if not source.exists():
            raise DatasetError(f"{source}: no such file or folder")
        if len(missing) == len(Split):
            raise DatasetError(
                f"{source}: holds one set of images, but a training and a test split are "
                "needed: a folder with train/ and test/ (class folders), or with train.npz "
                "and test.npz"
            )
        if missing:
            raise DatasetError(
                f"{source}: has no {missing[0]} split (expected {source}/{missing[0]}/ with "
                f"class folders, or {source}/{missing[0]}.npz)"
            )
    train = load_labelled_images(source, Split.TRAIN, root=root, num_classes=num_classes)
    test = load_labelled_images(source, Split.TEST, root=root, num_classes=num_classes)
    if train.input_shape != test.input_shape:
        raise DatasetError(
            f"{describe_source(source)}: training images are {train.input_shape} but test "
            f"images are {test.input_shape} (C, H, W): both splits need one shape"
        )
    classes = max(train.num_classes, test.num_classes)
    return (
        ImageDataset(train.images, train.labels, classes),
        ImageDataset(test.images, test.labels, classes),
    )


def _as_source(source: DataSource | str) -> DataSource:
    if isinstance(source, DatasetName | Path):
        return source
    if source in {name.value for name in DatasetName}:
        return DatasetName(source)
    return Path(source)


def _joint_classes(splits: dict[Split, Path]) -> list[str] | None:
    """Class names shared by the image-folder splits (sorted union); None if none is a folder."""
    folders = [path for path in splits.values() if path.is_dir()]
    if not folders:
        return None
    return sorted({name for folder in folders for name in class_folders(folder)})
