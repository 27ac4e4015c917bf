"""``cdfkd teacher package``: an owner's own model (tests/owner_models.py) as a teacher package.

Packaging runs in this process (``main([...])``); every refusal exits 2 with a message that
names the problem and no traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from cdfkd.coordinator.cli import main
from cdfkd.student_node.teachers.local import InProcessTeacher
from cdfkd.teacher_node.engine import TeacherEngine
from cdfkd.teacher_node.image_space import to_model_input
from cdfkd.teacher_node.owner_model import FeatureTap
from cdfkd.teacher_node.package import METADATA_FILE, load_package, read_metadata
from tests import owner_models

RGB = ("--mean", "0.5,0.4,0.3", "--std", "0.25,0.25,0.25")


def _weights(model: nn.Module, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _package(out: Path, factory: str, weights: Path, *extra: str, shape: str = "3,20,20") -> int:
    return main(
        [
            "teacher",
            "package",
            "--out",
            str(out),
            "--factory",
            factory,
            "--weights",
            str(weights),
            "--input-shape",
            shape,
            "--num-classes",
            "4",
            *RGB,
            *extra,
        ]
    )


@pytest.fixture
def bn_weights(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return _weights(owner_models.small_bn_net(), tmp_path / "bn.safetensors")


def test_a_model_with_batchnorm_is_packaged_and_loads(tmp_path: Path, bn_weights: Path, capsys):
    out = tmp_path / "package"
    assert _package(out, "tests.owner_models:small_bn_net", bn_weights, "--name", "clinic") == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["has_batchnorm"] is True
    metadata = read_metadata(out)
    assert metadata.format_version == 2
    assert metadata.name == "clinic"
    assert metadata.factory is not None
    assert metadata.factory.reference == "tests.owner_models:small_bn_net"
    assert metadata.spec is None
    assert metadata.input_shape == (3, 20, 20)
    assert metadata.num_classes == 4
    assert metadata.normalization.mean == (0.5, 0.4, 0.3)
    # Default feature: the input of the last nn.Linear ("11"): the 12-wide hidden layer.
    assert (metadata.feature_layer, metadata.feature_from_input, metadata.feature_dim) == (
        "11",
        True,
        12,
    )
    assert metadata.has_batchnorm
    loaded, classifier = load_package(out)
    reference = owner_models.small_bn_net().eval()
    reference.load_state_dict(_state(bn_weights))
    pixels = torch.rand(5, 3, 20, 20, generator=torch.Generator().manual_seed(1))
    inputs = to_model_input(pixels, (3, 20, 20), loaded.normalization)
    with torch.no_grad():
        assert torch.equal(classifier(inputs).logits, reference(inputs))
    teacher = InProcessTeacher.from_package(out)
    assert torch.equal(teacher.query(pixels).logits, classifier(inputs).logits)


def _state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_a_model_without_batchnorm_serves_without_a_bn_term(tmp_path: Path) -> None:
    torch.manual_seed(0)
    weights = _weights(owner_models.plain_net(), tmp_path / "plain.safetensors")
    out = tmp_path / "plain"
    code = _package(
        out, "tests.owner_models:plain_net", weights, "--feature-layer", "hidden", shape="3,24,24"
    )
    assert code == 0
    metadata = read_metadata(out)
    assert not metadata.has_batchnorm
    assert (metadata.feature_layer, metadata.feature_from_input) == ("hidden", False)
    teacher = InProcessTeacher.from_package(out)
    assert "bn_loss" not in teacher.info().allowed_outputs
    pixels = torch.rand(4, 3, 32, 32)
    answer = teacher.query(pixels, bn_loss=False)
    assert answer.features is not None
    assert answer.features.shape == (4, 16)
    from cdfkd.teacher_node.errors import InvalidInput

    with pytest.raises(InvalidInput, match="no BatchNorm layers"):
        teacher.query(pixels, bn_loss=True)
    gradient = teacher.input_grad(pixels, torch.ones(4, 4), 0.0)
    assert gradient.shape == pixels.shape
    assert bool(gradient.abs().sum() > 0)


def test_eval_data_npz_records_the_accuracy(tmp_path: Path, bn_weights: Path) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    data = tmp_path / "test.npz"
    np.savez(
        data,
        images=rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8),
        labels=rng.integers(0, 4, 40),
    )
    out = tmp_path / "package"
    assert (
        _package(out, "tests.owner_models:small_bn_net", bn_weights, "--eval-data", str(data)) == 0
    )
    metadata = read_metadata(out)
    assert metadata.eval_data == str(data)
    # The accuracy the package records is the one of the loaded model on those images.
    _, classifier = load_package(out)
    with np.load(data) as archive:
        images = torch.from_numpy(archive["images"].astype(np.float32) / 255).permute(0, 3, 1, 2)
        labels = torch.from_numpy(archive["labels"])
    with torch.no_grad():
        logits = classifier(to_model_input(images, (3, 20, 20), metadata.normalization)).logits
    measured = float((logits.argmax(1) == labels).float().mean())
    assert metadata.test_accuracy == pytest.approx(measured)


def test_eval_data_image_folder_records_the_accuracy(
    tmp_path: Path, bn_weights: Path, capsys
) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    folder = tmp_path / "owner-test"
    pixels, labels = [], []
    for label, name in enumerate(("circle", "square", "star", "triangle")):
        (folder / name).mkdir(parents=True)
        for index in range(5):
            array = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)  # resized to 20x20 inside
            Image.fromarray(array).save(folder / name / f"{index}.png")
            pixels.append(torch.from_numpy(array.astype(np.float32) / 255).permute(2, 0, 1))
            labels.append(label)
    out = tmp_path / "package"
    assert (
        _package(out, "tests.owner_models:small_bn_net", bn_weights, "--eval-data", str(folder))
        == 0
    )
    metadata = read_metadata(out)
    assert metadata.eval_data == str(folder)
    _, classifier = load_package(out)
    images = torch.stack(pixels)
    with torch.no_grad():
        logits = classifier(to_model_input(images, (3, 20, 20), metadata.normalization)).logits
    measured = float((logits.argmax(1) == torch.tensor(labels)).float().mean())
    assert metadata.test_accuracy == pytest.approx(measured)

    # A folder with more classes than the model has is refused, naming it (exit 2).
    for extra in ("a", "b", "c"):
        (folder / extra).mkdir()
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(
            folder / extra / "0.png"
        )
    capsys.readouterr()
    code = _package(
        tmp_path / "refused",
        "tests.owner_models:small_bn_net",
        bn_weights,
        "--eval-data",
        str(folder),
    )
    captured = capsys.readouterr()
    assert code == 2
    assert str(folder) in captured.err
    assert "Traceback" not in captured.err


def test_feature_tap_leaves_no_hook_behind(bn_weights: Path) -> None:
    model = owner_models.small_bn_net()
    tap = FeatureTap(model, "7")  # the AdaptiveAvgPool2d output, pooled and flattened
    engine = TeacherEngine(tap, (3, 20, 20))
    outputs = engine.query(torch.rand(3, 3, 20, 20))
    assert outputs.features.shape == (3, 16)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def _refused(capsys, code: int, *fragments: str) -> None:
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


def test_a_factory_that_does_not_import(tmp_path: Path, bn_weights: Path, capsys) -> None:
    code = _package(tmp_path / "p", "no_such_owner_module:build", bn_weights)
    _refused(capsys, code, "no_such_owner_module", "does not import", "PYTHONPATH")
    assert not (tmp_path / "p").exists()


def test_a_factory_that_is_missing(tmp_path: Path, bn_weights: Path, capsys) -> None:
    code = _package(tmp_path / "p", "tests.owner_models:nothing_here", bn_weights)
    _refused(capsys, code, "has no callable 'nothing_here'")


def test_a_factory_that_returns_no_module(tmp_path: Path, bn_weights: Path, capsys) -> None:
    code = _package(tmp_path / "p", "tests.owner_models:not_a_module", bn_weights)
    _refused(capsys, code, "returned dict, not a torch.nn.Module")


def test_a_malformed_factory_reference(tmp_path: Path, bn_weights: Path, capsys) -> None:
    code = _package(tmp_path / "p", "tests.owner_models", bn_weights)
    _refused(capsys, code, "MODULE:CALLABLE")


def test_weights_with_missing_and_unexpected_keys_are_named(
    tmp_path: Path, bn_weights: Path, capsys
) -> None:
    state = _state(bn_weights)
    state["extra.weight"] = torch.zeros(2)
    del state["0.weight"]
    weights = tmp_path / "broken.safetensors"
    save_file(state, str(weights))
    code = _package(tmp_path / "p", "tests.owner_models:small_bn_net", weights)
    _refused(capsys, code, "missing keys 0.weight", "unexpected keys extra.weight")


def test_a_feature_layer_that_does_not_exist(tmp_path: Path, bn_weights: Path, capsys) -> None:
    code = _package(
        tmp_path / "p", "tests.owner_models:small_bn_net", bn_weights, "--feature-layer", "layer9"
    )
    _refused(capsys, code, "feature layer 'layer9' does not exist")


def test_an_input_shape_the_model_rejects(tmp_path: Path, capsys) -> None:
    weights = _weights(owner_models.plain_net(), tmp_path / "plain.safetensors")
    code = _package(tmp_path / "p", "tests.owner_models:plain_net", weights, shape="3,20,20")
    _refused(capsys, code, "rejects inputs of shape (B, 3, 20, 20)", "--input-shape")


def test_non_finite_outputs(tmp_path: Path, bn_weights: Path, capsys) -> None:
    state = _state(bn_weights)
    state["11.bias"] = torch.full_like(state["11.bias"], float("nan"))
    weights = tmp_path / "nan.safetensors"
    save_file(state, str(weights))
    code = _package(tmp_path / "p", "tests.owner_models:small_bn_net", weights)
    _refused(capsys, code, "not finite")


def test_a_wrong_number_of_classes(tmp_path: Path, capsys) -> None:
    weights = _weights(owner_models.small_bn_net(num_classes=7), tmp_path / "w.safetensors")
    code = _package(
        tmp_path / "p",
        "tests.owner_models:small_bn_net",
        weights,
        "--factory-kwargs",
        '{"num_classes": 7}',
    )
    _refused(capsys, code, "answers 7 classes, but --num-classes is 4")


def test_normalization_of_the_wrong_width(tmp_path: Path, bn_weights: Path, capsys) -> None:
    code = main(
        [
            "teacher",
            "package",
            "--out",
            str(tmp_path / "p"),
            "--factory",
            "tests.owner_models:small_bn_net",
            "--weights",
            str(bn_weights),
            "--input-shape",
            "3,20,20",
            "--num-classes",
            "4",
            "--mean",
            "0.5",
            "--std",
            "0.2",
        ]
    )
    _refused(capsys, code, "--mean has 1 values for 3 channels")


def test_missing_weights_and_bad_kwargs(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "none.safetensors"
    code = _package(tmp_path / "p", "tests.owner_models:small_bn_net", missing)
    _refused(capsys, code, "none.safetensors not found")
    code = _package(
        tmp_path / "p",
        "tests.owner_models:small_bn_net",
        tmp_path / "none.safetensors",
        "--factory-kwargs",
        "[1]",
    )
    _refused(capsys, code, "--factory-kwargs must be a JSON object")


def test_format_1_packages_still_load(tmp_path: Path) -> None:
    from tests.helpers import untrained_lenet_package

    untrained_lenet_package(tmp_path, name="old")
    raw = json.loads((tmp_path / METADATA_FILE).read_text())
    # Built-in packages stay in format 1, readable by earlier versions: only spec-based keys.
    assert raw["format_version"] == 1
    assert {"input_shape", "num_classes", "has_batchnorm", "factory"}.isdisjoint(raw)
    metadata, model = load_package(tmp_path)
    assert (metadata.format_version, metadata.input_shape, metadata.num_classes) == (
        1,
        (1, 16, 16),
        10,
    )
    assert InProcessTeacher.from_package(tmp_path).info().input_shape == (1, 16, 16)
