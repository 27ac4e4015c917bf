"""Owners' own files: image folders and .npz, both split layouts, and every refusal."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cdfkd.teacher_node.data_sources import load_labelled_images, load_train_and_test
from cdfkd.teacher_node.datasets import DatasetName, Split
from cdfkd.teacher_node.errors import DatasetError
from tests.image_data import SHAPES, shape_arrays, write_shape_folder, write_shape_splits


def test_an_image_folder_is_read_in_sorted_class_order(tmp_path: Path) -> None:
    root = write_shape_folder(tmp_path / "shapes", per_class=4, size=20)
    dataset = load_labelled_images(root, Split.TEST)
    assert dataset.images.dtype == torch.float32
    assert dataset.images.shape == (12, 3, 20, 20)
    assert dataset.num_classes == 3
    assert dataset.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    # Pixels are the PNG's bytes divided by 255.
    first = np.array(Image.open(root / SHAPES[0] / "0000.png"))
    assert torch.equal(dataset.images[0], torch.from_numpy(first).permute(2, 0, 1).float() / 255)
    # The same folder serves as any split; a string path works as a path.
    assert torch.equal(load_labelled_images(str(root), Split.TRAIN).images, dataset.images)


def test_jpeg_grayscale_and_rgba_images(tmp_path: Path) -> None:
    jpegs = write_shape_folder(tmp_path / "jpg", per_class=2, size=16, suffix=".jpg")
    assert load_labelled_images(jpegs, Split.TEST).input_shape == (3, 16, 16)
    gray = tmp_path / "gray"
    for name in ("a", "b"):
        (gray / name).mkdir(parents=True)
        Image.new("L", (12, 10), 200).save(gray / name / "x.png")
    dataset = load_labelled_images(gray, Split.TEST)
    assert dataset.input_shape == (1, 10, 12)
    assert torch.allclose(dataset.images, torch.full_like(dataset.images, 200 / 255))
    rgba = tmp_path / "rgba"
    (rgba / "a").mkdir(parents=True)
    Image.new("RGBA", (9, 9), (10, 20, 30, 40)).save(rgba / "a" / "x.png")
    (rgba / "a" / "notes.txt").write_text("skipped")
    assert load_labelled_images(rgba, Split.TEST).input_shape == (3, 9, 9)


def test_split_folders_share_one_class_numbering(tmp_path: Path) -> None:
    root = write_shape_splits(tmp_path / "data", train_per_class=3, test_per_class=2, size=16)
    shutil.rmtree(root / "test" / "circle")  # the test split lacks the first class
    train, test = load_train_and_test(root)
    assert train.num_classes == test.num_classes == 3
    assert train.labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3
    assert test.labels.tolist() == [1, 1, 2, 2]  # cross and square keep their labels


def test_npz_uint8_and_float_layouts_agree(tmp_path: Path) -> None:
    images, labels = shape_arrays(per_class=3, size=12)
    np.savez(tmp_path / "u8.npz", images=images, labels=labels)
    as_float = images.transpose(0, 3, 1, 2).astype(np.float32) / 255
    np.savez(tmp_path / "f32.npz", images=as_float, labels=labels.astype(np.uint8))
    from_uint8 = load_labelled_images(tmp_path / "u8.npz", Split.TEST)
    from_float = load_labelled_images(tmp_path / "f32.npz", Split.TEST, num_classes=5)
    assert from_uint8.images.shape == (9, 3, 12, 12)
    assert torch.equal(from_uint8.images, from_float.images)
    assert from_uint8.labels.dtype == torch.int64
    assert torch.equal(from_uint8.labels, from_float.labels)
    assert (from_uint8.num_classes, from_float.num_classes) == (3, 5)


def test_npz_splits(tmp_path: Path) -> None:
    train_images, train_labels = shape_arrays(per_class=4, size=12, seed=1)
    test_images, test_labels = shape_arrays(per_class=2, size=12, seed=2)
    root = tmp_path / "owner"
    root.mkdir()
    np.savez(root / "train.npz", images=train_images, labels=train_labels)
    np.savez(root / "test.npz", images=test_images, labels=test_labels * 0)  # labels 0 only
    train, test = load_train_and_test(root)
    assert (len(train), len(test)) == (12, 6)
    assert train.num_classes == test.num_classes == 3


def test_named_datasets_stay_named() -> None:
    by_string = load_labelled_images("digits", Split.TEST)
    by_name = load_labelled_images(DatasetName.DIGITS, Split.TEST)
    assert torch.equal(by_string.images, by_name.images)


def _bad_png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\nnot really")


def _folder_cases(tmp_path: Path) -> list[tuple[Path, str]]:
    cases = []
    empty = tmp_path / "empty"
    empty.mkdir()
    cases.append((empty, "no class folders"))
    no_images = tmp_path / "no-images"
    (no_images / "a").mkdir(parents=True)
    (no_images / "a" / "readme.txt").write_text("x")
    cases.append((no_images, "hold no .png or .jpg images"))
    broken = write_shape_folder(tmp_path / "broken", per_class=2, size=16)
    _bad_png(broken / "cross" / "0005.png")
    cases.append((broken, "0005.png: not a readable image"))
    sizes = write_shape_folder(tmp_path / "sizes", per_class=2, size=16)
    Image.new("RGB", (20, 16)).save(sizes / "square" / "0009.png")
    cases.append((sizes, "0009.png: 20x16 pixels but .*0000.png has 16x16.*resize them first"))
    channels = write_shape_folder(tmp_path / "channels", per_class=2, size=16)
    Image.new("L", (16, 16)).save(channels / "square" / "0009.png")
    cases.append((channels, "0009.png: 1 channel.* has 3.*all grayscale or all colour"))
    deep = tmp_path / "deep"
    (deep / "a").mkdir(parents=True)
    Image.new("I;16", (8, 8)).save(deep / "a" / "x.png")
    cases.append((deep, "x.png: image mode I;16.* not supported"))
    cases.append((tmp_path / "missing", "missing: no such file or folder"))
    text = tmp_path / "labels.csv"
    text.write_text("1,2")
    cases.append((text, "labels.csv: not an image folder or an .npz file"))
    return cases


def test_bad_image_folders_are_refused_naming_the_file(tmp_path: Path) -> None:
    for path, message in _folder_cases(tmp_path):
        with pytest.raises(DatasetError, match=message):
            load_labelled_images(path, Split.TEST)


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def test_bad_npz_files_are_refused_naming_the_problem(tmp_path: Path) -> None:
    images, labels = shape_arrays(per_class=2, size=8)
    as_float = images.transpose(0, 3, 1, 2).astype(np.float32) / 255
    cases = [
        (_npz(tmp_path / "a.npz", labels=labels), "a.npz: no 'images' array"),
        (_npz(tmp_path / "b.npz", images=images), "b.npz: no 'labels' array"),
        (_npz(tmp_path / "c.npz", images=images.astype(np.int32), labels=labels), "dtype int32"),
        (_npz(tmp_path / "d.npz", images=images[..., 0], labels=labels), r"\(N, H, W, C\)"),
        (_npz(tmp_path / "e.npz", images=images / 255.0, labels=labels), r"\(N, C, H, W\)"),
        (_npz(tmp_path / "f.npz", images=as_float * 4 - 2, labels=labels), "lie in \\[0, 1\\]"),
        (
            _npz(tmp_path / "g.npz", images=np.full_like(as_float, np.nan), labels=labels),
            "NaN",
        ),
        (_npz(tmp_path / "h.npz", images=images, labels=labels * 1.0), "'labels' has dtype"),
        (_npz(tmp_path / "i.npz", images=images, labels=labels[:, None]), r"must be \(N,\)"),
        (_npz(tmp_path / "j.npz", images=images, labels=labels[:-1]), "6 images but 5 labels"),
        (_npz(tmp_path / "k.npz", images=images, labels=labels - 1), "label -1 is negative"),
        (
            _npz(tmp_path / "l.npz", images=np.array([object()]), labels=labels),
            "not a plain-array .npz",
        ),
    ]
    (tmp_path / "m.npz").write_bytes(b"PK\x03\x04 truncated")
    cases.append((tmp_path / "m.npz", "m.npz: not a readable .npz"))
    for path, message in cases:
        with pytest.raises(DatasetError, match=message):
            load_labelled_images(path, Split.TEST)


def test_labels_and_class_folders_beyond_the_model_are_refused(tmp_path: Path) -> None:
    images, labels = shape_arrays(per_class=2, size=8)
    path = _npz(tmp_path / "owner.npz", images=images, labels=labels)
    with pytest.raises(DatasetError, match="label 2 is out of range for a model of 2 classes"):
        load_labelled_images(path, Split.TEST, num_classes=2)
    folder = write_shape_folder(tmp_path / "shapes", per_class=1, size=16)
    with pytest.raises(DatasetError, match="3 class folders but the model has 10 classes"):
        load_labelled_images(folder, Split.TEST, num_classes=10)


def test_split_layout_refusals(tmp_path: Path) -> None:
    root = write_shape_splits(tmp_path / "data", train_per_class=2, test_per_class=1, size=16)
    images, labels = shape_arrays(per_class=1, size=16)
    _npz(root / "test.npz", images=images, labels=labels)
    with pytest.raises(DatasetError, match="both test/ and test.npz exist"):
        load_labelled_images(root, Split.TEST)
    (root / "test.npz").unlink()
    shutil.rmtree(root / "test")
    with pytest.raises(DatasetError, match="no test split"):
        load_labelled_images(root, Split.TEST)
    with pytest.raises(DatasetError, match="has no test split"):
        load_train_and_test(root)
    single = _npz(tmp_path / "one.npz", images=images, labels=labels)
    with pytest.raises(DatasetError, match="holds one set of images"):
        load_train_and_test(single)
    with pytest.raises(DatasetError, match="holds one set of images"):
        load_train_and_test(root / "train")
    write_shape_folder(root / "test", per_class=1, size=24)
    with pytest.raises(DatasetError, match=r"\(3, 16, 16\) but test images are \(3, 24, 24\)"):
        load_train_and_test(root)
