"""A federation of owners' own models (tests/owner_models.py): different sizes, normalizations.

Three organizations package their own classifiers with ``cdfkd teacher package``: a small RGB
network with BatchNorm at 3x20x20, a torchvision-style ResNet at 3x32x32 with ImageNet-style
normalization, and a network without BatchNorm at 3x24x24. Each is served by a real gRPC
server with mutual TLS on 127.0.0.1:0 (an explicit ``[policy.callers.student]`` rule), then
checked with ``cdfkd federation check``, compared with in-process teachers bit for bit, and
distilled for a few iterations.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from cdfkd.coordinator.cli import main
from cdfkd.student_node.artifact import load_student, save_student, student_image_space
from cdfkd.student_node.config import GeneratorConfig, StudentConfig, TrainConfig
from cdfkd.student_node.errors import TeacherRejectedRequest
from cdfkd.student_node.export import Aggregation, load_edge_model
from cdfkd.student_node.teachers.local import InProcessTeacher
from cdfkd.student_node.teachers.remote import RemoteTeacher
from cdfkd.student_node.teachers.run_space import RunSpaceTeacher, resolve_image_space
from cdfkd.student_node.trainer import init_state, train
from cdfkd.teacher_node.server import build_server
from tests import owner_models
from tests.conftest import client_config, node_config
from tests.helpers import small_run, write_toml
from tests.student_node.test_replay import _memory_tensors

pytestmark = [pytest.mark.slow, pytest.mark.integration]

#: The student caller, named explicitly as every node's policy must (deny by default).
STUDENT_POLICY = {"callers": {"student": {"mode": "full"}}}


@dataclass(frozen=True)
class Owner:
    """One organization's model and how it is packaged."""

    name: str
    factory: str
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    extra: tuple[str, ...] = ()


OWNERS = (
    Owner("clinic", "tests.owner_models:small_bn_net", (3, 20, 20), (0.5, 0.5, 0.5), (0.25,) * 3),
    Owner(
        "hospital",
        "tests.owner_models:tiny_resnet",
        (3, 32, 32),
        (0.485, 0.456, 0.406),
        (0.229, 0.224, 0.225),
    ),
    Owner(
        "lab",
        "tests.owner_models:plain_net",
        (3, 24, 24),
        (0.4, 0.4, 0.4),
        (0.3, 0.3, 0.3),
        ("--feature-layer", "hidden"),
    ),
)


def _calibrated(model: nn.Module, owner: Owner, seed: int) -> nn.Module:
    """Running BatchNorm statistics of coloured noise, so R(x) is not trivially zero."""
    generator = torch.Generator().manual_seed(seed)
    mean = torch.tensor(owner.mean).view(1, -1, 1, 1)
    std = torch.tensor(owner.std).view(1, -1, 1, 1)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            pixels = torch.rand((16, *owner.input_shape), generator=generator) * 0.6 + 0.2
            model((pixels - mean) / std)
    return model.eval()


@pytest.fixture(scope="module")
def owner_packages(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("owners")
    packages = []
    for index, owner in enumerate(OWNERS):
        torch.manual_seed(index)
        module_name, _, attribute = owner.factory.partition(":")
        model = _calibrated(getattr(owner_models, attribute)(), owner, index)
        weights = root / f"{owner.name}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
        out = root / owner.name
        code = main(
            [
                "teacher",
                "package",
                "--out",
                str(out),
                "--factory",
                owner.factory,
                "--weights",
                str(weights),
                "--input-shape",
                ",".join(map(str, owner.input_shape)),
                "--num-classes",
                "4",
                "--mean",
                ",".join(map(str, owner.mean)),
                "--std",
                ",".join(map(str, owner.std)),
                *owner.extra,
            ]
        )
        assert code == 0, owner.name
        packages.append(out)
    return packages


@pytest.fixture(scope="module")
def owner_nodes(
    owner_packages: list[Path], dev_pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[str]]:
    """One real mTLS server per owner, served from this process on 127.0.0.1:0."""
    servers, addresses = [], []
    for package in owner_packages:
        tmp = tmp_path_factory.mktemp("node")
        server, port, _ = build_server(node_config(package, dev_pki, tmp, policy=STUDENT_POLICY))
        server.start()
        servers.append(server)
        addresses.append(f"127.0.0.1:{port}")
    yield addresses
    for server in servers:
        server.stop(grace=None).wait()


def test_federation_check_accepts_different_sizes_and_normalizations(
    owner_nodes: list[str], dev_pki, tmp_path: Path, capsys
) -> None:
    entries = [
        client_config(a, dev_pki).model_dump(mode="json", exclude_none=True) for a in owner_nodes
    ]
    config = write_toml(tmp_path / "run.toml", {"teachers": entries})
    assert main(["federation", "check", "--config", str(config)]) == 0
    table = capsys.readouterr().out
    for owner, address in zip(OWNERS, owner_nodes, strict=True):
        line = next(line for line in table.splitlines() if line.startswith(address))
        assert owner.name in line
        assert "x".join(map(str, owner.input_shape)) in line
        assert line.endswith("ok")


def test_remote_answers_equal_in_process_answers(owner_packages, owner_nodes, dev_pki) -> None:
    local = [InProcessTeacher.from_package(p) for p in owner_packages]
    remote = [RemoteTeacher(client_config(a, dev_pki)) for a in owner_nodes]
    try:
        for near, far, owner in zip(local, remote, OWNERS, strict=True):
            assert near.info() == far.info()
            assert far.info().input_shape == owner.input_shape
        assert [t.metadata.has_bn_prior for t in remote] == [True, True, False]
        assert "bn_loss" not in remote[2].info().allowed_outputs
        # The run image space (the largest input, 32x32) and another size (28x28): each node
        # resizes to its own input and normalizes with its own mean and std.
        for size in ((32, 32), (28, 28)):
            pixels = torch.rand((8, 3, *size), generator=torch.Generator().manual_seed(3))
            cotangent = torch.randn(8, 4, generator=torch.Generator().manual_seed(4))
            for near, far in zip(local, remote, strict=True):
                bn = "bn_loss" in near.info().allowed_outputs
                a, b = near.query(pixels, bn_loss=bn), far.query(pixels, bn_loss=bn)
                assert torch.equal(a.logits, b.logits)
                assert a.features is not None
                assert b.features is not None
                assert torch.equal(a.features, b.features)
                if bn:
                    assert a.bn_loss is not None
                    assert b.bn_loss is not None
                    assert torch.equal(a.bn_loss, b.bn_loss)
                    assert float(a.bn_loss) > 0
                weight = 0.1 if bn else 0.0
                gradient = near.input_grad(pixels, cotangent, weight)
                assert gradient.shape == pixels.shape
                assert torch.equal(gradient, far.input_grad(pixels, cotangent, weight))
        # The node without BatchNorm refuses R(x), naming why, and keeps serving.
        with pytest.raises(TeacherRejectedRequest, match="no BatchNorm layers"):
            remote[2].query(torch.rand(4, 3, 32, 32), bn_loss=True)
        with pytest.raises(TeacherRejectedRequest, match="no BatchNorm layers"):
            remote[2].input_grad(torch.rand(4, 3, 32, 32), torch.ones(4, 4), 0.1)
        # Images beyond the node's max_image_side are refused before any work.
        with pytest.raises(Exception, match="max_image_side"):
            remote[0].query(torch.rand(2, 3, 600, 8), bn_loss=False)
        assert remote[2].query(torch.rand(4, 3, 32, 32), bn_loss=False).logits.shape == (4, 4)
    finally:
        for teacher in remote:
            teacher.close()


def _small_train(**extra: object) -> TrainConfig:
    return TrainConfig(
        batch_size=16,
        epochs=1,
        iterations_per_epoch=2,
        student_steps_per_generator_step=2,
        student=StudentConfig(widths=(8, 16, 16)),
        generator=GeneratorConfig(latent_dim=16, width=8),
        **extra,
    )


@pytest.mark.parametrize(
    "extra",
    # The paper's loop; and a memory fed by the generator step's batch alone, whose kept Query
    # also asks for features (and the lab's node shares no R(x)).
    [{}, {"replay": {"size": 64, "new_batches": 0, "keep_generator_batch": True}}],
    ids=["paper", "replay-generator-batch"],
)
def test_training_is_identical_in_process_and_over_the_wire(
    owner_packages, owner_nodes, dev_pki, tmp_path: Path, extra: dict
) -> None:
    # The trainer API on both sides, so the two runs compare weight for weight; `cdfkd train`
    # against these nodes is the next test.
    local = [InProcessTeacher.from_package(p) for p in owner_packages]
    remote = [RemoteTeacher(client_config(a, dev_pki)) for a in owner_nodes]
    try:
        infos = [t.info() for t in local]
        space = resolve_image_space(infos)
        assert space.image_shape == (3, 32, 32)
        # Three normalizations: the run's is their per-channel average.
        for channel in range(3):
            assert space.normalization.mean[channel] == pytest.approx(
                sum(o.mean[channel] for o in OWNERS) / 3
            )
            assert space.normalization.std[channel] == pytest.approx(
                sum(o.std[channel] for o in OWNERS) / 3
            )
        config = _small_train(**extra)
        in_process = init_state(config, infos, torch.device("cpu"), space.image_shape)
        train(in_process, [RunSpaceTeacher(t, space) for t in local], config)
        over_the_wire = init_state(config, infos, torch.device("cpu"), space.image_shape)
        with ThreadPoolExecutor(3) as executor:
            train(
                over_the_wire,
                [RunSpaceTeacher(t, space) for t in remote],
                config,
                executor=executor,
            )
        assert over_the_wire.iteration == config.total_iterations
        for module in ("student", "generator"):
            near = getattr(in_process, module).state_dict()
            far = getattr(over_the_wire, module).state_dict()
            assert all(torch.equal(near[k], far[k]) for k in near), module
        if in_process.replay is not None:  # the memory, cached answers included
            near_memory, far_memory = _memory_tensors(in_process), _memory_tensors(over_the_wire)
            assert near_memory.keys() == far_memory.keys()
            assert all(torch.equal(near_memory[k], far_memory[k]) for k in near_memory)
            # Features are cached where the owner shares them: the same on both sides.
            assert any(k.startswith("features.") for k in near_memory)
        # The lab's node was never asked for R(x): every one of its calls succeeded.
        assert remote[2].calls > 0

        directory = tmp_path / "student"
        save_student(directory, in_process.student, None, config, infos, space)
        assert json.loads((directory / "student.json").read_text())["image_space"] == (
            space.to_json()
        )
        assert student_image_space(directory) == space
        student, _, _, loaded_infos = load_student(directory)
        assert [i.input_shape for i in loaded_infos] == [o.input_shape for o in OWNERS]
        edge = load_edge_model(directory, Aggregation.MEAN)
        description = json.loads(edge.description())
        assert description["input_shape"] == ["batch", 3, 32, 32]
        assert description["normalization_mean"] == list(space.normalization.mean)
    finally:
        for teacher in remote:
            teacher.close()


def test_cdfkd_train_against_the_owners_nodes_without_data_and_with_their_images(
    owner_nodes: list[str], dev_pki, tmp_path: Path, capsys
) -> None:
    """`cdfkd train` over mutual TLS: once data-free (no [data]), once with an image folder."""
    from tests.image_data import FOUR_SHAPES, write_shape_splits

    entries = [
        client_config(a, dev_pki).model_dump(mode="json", exclude_none=True) for a in owner_nodes
    ]
    train = {"epochs": 1, "iterations_per_epoch": 2, "attention": {"samples": 8, "epochs": 5}}
    data_free = small_run(entries, train, eval_every=2)
    del data_free["data"]
    out = tmp_path / "data-free"
    capsys.readouterr()
    config = write_toml(tmp_path / "data-free.toml", data_free)
    assert main(["train", "--config", str(config), "--out", str(out), "--in-process"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["iterations"] == 2
    assert summary["data"] is None
    assert summary["student_accuracy_mean"] is None  # no real image was read
    assert student_image_space(out / "student").image_shape == (3, 32, 32)

    # The same nodes, with labelled RGB images of 24x24 as [data] (resized to the run's 32x32).
    shapes = write_shape_splits(tmp_path / "shapes", 6, 5, size=24, seed=3, shapes=FOUR_SHAPES)
    with_files = small_run(entries, train, eval_every=2)
    with_files["data"] = {"files": str(shapes), "eval_samples": 20}
    out = tmp_path / "with-files"
    config = write_toml(tmp_path / "with-files.toml", with_files)
    assert main(["train", "--config", str(config), "--out", str(out), "--in-process"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["data"] == str(shapes)
    assert 0.0 <= summary["student_accuracy_mean"] <= 1.0
    assert len(summary["teacher_accuracies"]) == 3


def _package_one_channel(out: Path, weights_dir: Path, num_classes: int) -> Path:
    torch.manual_seed(7)
    model = owner_models.small_bn_net(channels=1, num_classes=num_classes)
    weights = weights_dir / f"gray-{num_classes}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    code = main(
        [
            "teacher",
            "package",
            "--out",
            str(out),
            "--factory",
            "tests.owner_models:small_bn_net",
            "--factory-kwargs",
            json.dumps({"channels": 1, "num_classes": num_classes}),
            "--weights",
            str(weights),
            "--input-shape",
            "1,20,20",
            "--num-classes",
            str(num_classes),
            "--mean",
            "0.2",
            "--std",
            "0.35",
        ]
    )
    assert code == 0
    return out


def test_channel_counts_that_differ_fail_the_check_naming_the_teachers(
    owner_packages, tmp_path: Path, capsys
) -> None:
    gray = _package_one_channel(tmp_path / "gray", tmp_path, num_classes=4)
    teachers = [{"package": str(owner_packages[0])}, {"package": str(gray)}]
    config = write_toml(tmp_path / "run.toml", {"teachers": teachers})
    assert main(["federation", "check", "--config", str(config)]) == 3
    captured = capsys.readouterr()
    line = next(line for line in captured.out.splitlines() if line.startswith(str(gray)))
    assert "incompatible input channels: gray takes 1, clinic" in line
    assert "Traceback" not in captured.err


def test_cdfkd_train_bridges_sizes_and_normalizations(tmp_path: Path, capsys) -> None:
    """`cdfkd train` with a built-in 1x16x16 teacher and an owner's 1x20x20 model on digits."""
    from tests.helpers import untrained_lenet_package

    # Untrained weights: the test is about shapes, spaces and the run, not accuracy.
    builtin = untrained_lenet_package(tmp_path / "builtin", name="builtin")
    gray = _package_one_channel(tmp_path / "gray", tmp_path, num_classes=10)
    run = small_run(
        [{"package": str(builtin)}, {"package": str(gray)}],
        {"epochs": 1, "iterations_per_epoch": 2},
        eval_every=2,
    )
    config = write_toml(tmp_path / "run.toml", run)
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", "--config", str(config), "--out", str(out), "--in-process"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["iterations"] == 2
    space = student_image_space(out / "student")
    assert space.image_shape == (1, 20, 20)  # the larger input
    assert space.normalization.mean == pytest.approx((0.25,))  # (0.3 + 0.2) / 2
    assert space.normalization.std == pytest.approx((0.375,))  # (0.4 + 0.35) / 2
    assert main(["evaluate", "--run", str(out)]) == 0
