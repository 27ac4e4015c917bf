"""Checkpoints: resume exactness, fingerprints, atomicity, no teacher tensors inside."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cdfkd.student_node.checkpoint import (
    config_fingerprint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from cdfkd.student_node.errors import CheckpointError
from cdfkd.student_node.trainer import TrainState, init_state, train
from tests.student_node.test_trainer import small_config


def _all_tensors(state: TrainState) -> dict[str, torch.Tensor]:
    tensors = {f"student.{k}": v for k, v in state.student.state_dict().items()}
    tensors |= {f"generator.{k}": v for k, v in state.generator.state_dict().items()}
    for name, optimizer in (("sopt", state.student_optimizer), ("gopt", state.generator_optimizer)):
        for index, values in optimizer.state_dict()["state"].items():
            for key, value in values.items():
                if torch.is_tensor(value):
                    tensors[f"{name}.{index}.{key}"] = value
    tensors["rng"] = state.rng.get_state()
    return tensors


@pytest.mark.parametrize("output", ["batchnorm", "pixel_range"])
def test_resume_gives_exactly_the_uninterrupted_state(
    digits_teachers, tmp_path: Path, output: str
) -> None:
    teachers = digits_teachers.load()
    infos = [t.info() for t in teachers]
    config = small_config(
        iterations_per_epoch=2,
        epochs=3,
        optimizer={"milestones": (2,)},
        generator={"latent_dim": 32, "width": 8, "output": output},
    )
    fingerprint = config_fingerprint(config)

    straight = init_state(config, infos, torch.device("cpu"))
    train(straight, teachers, config)

    first = init_state(config, infos, torch.device("cpu"))
    train(first, teachers, config, should_stop=lambda: first.iteration >= 3)
    assert first.iteration == 3
    save_checkpoint(tmp_path, first, fingerprint)
    resumed = init_state(config.model_copy(update={"seed": 99}), infos, torch.device("cpu"))
    load_checkpoint(latest_checkpoint(tmp_path), resumed, fingerprint)
    assert resumed.iteration == 3
    train(resumed, teachers, config)

    expected, found = _all_tensors(straight), _all_tensors(resumed)
    assert expected.keys() == found.keys()
    assert all(torch.equal(expected[k], found[k]) for k in expected)
    assert resumed.student_scheduler.state_dict() == straight.student_scheduler.state_dict()


def test_a_different_config_is_refused(digits_teachers, tmp_path: Path) -> None:
    teachers = digits_teachers.load()
    config = small_config()
    state = init_state(config, [t.info() for t in teachers], torch.device("cpu"))
    path = save_checkpoint(tmp_path, state, config_fingerprint(config))
    other = config.model_copy(update={"batch_size": 32})
    assert config_fingerprint(other) != config_fingerprint(config)
    assert config_fingerprint(config.model_copy(update={"epochs": 50})) == config_fingerprint(
        config
    )
    with pytest.raises(CheckpointError, match="fingerprint"):
        load_checkpoint(path, state, config_fingerprint(other))


def test_checkpoints_of_earlier_code_keep_their_fingerprint() -> None:
    """Fields added later leave the fingerprint alone at their defaults (values of 081ccd2;
    the replay one of 1ce42a0)."""
    from cdfkd.student_node.config import TrainConfig

    assert config_fingerprint(TrainConfig()) == (
        "4cebaadc185f17d07d07db4683dbb1f264b0ffedf9fb30f8119c1fabba048dc5"
    )
    dfad = TrainConfig(method="dfad", generator={"latent_dim": 64, "width": 4})
    assert config_fingerprint(dfad) == (
        "807d7a087c0bbded33809e09284e70133a9ae290a5501fc52398584951729295"
    )
    bounded = dfad.model_copy(
        update={"generator": dfad.generator.model_copy(update={"output": "pixel_range"})}
    )
    assert config_fingerprint(bounded) != config_fingerprint(dfad)
    replay = TrainConfig(replay={"size": 512, "new_batches": 2})
    assert config_fingerprint(replay) == (
        "f2898392e603f5d8610e7bdb9e66e00aa4f6fae0c7c707bb12b87e9489007df3"
    )


def test_garbage_and_pickles_are_refused(digits_teachers, tmp_path: Path) -> None:
    teachers = digits_teachers.load()
    config = small_config()
    state = init_state(config, [t.info() for t in teachers], torch.device("cpu"))
    garbage = tmp_path / "checkpoint-00000001.pt"
    garbage.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(garbage, state, config_fingerprint(config))

    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    evil = tmp_path / "checkpoint-00000002.pt"
    torch.save({"format_version": 1, "payload": Evil()}, evil)
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(evil, state, config_fingerprint(config))


def test_saving_is_atomic_and_keeps_the_last_k(digits_teachers, tmp_path: Path) -> None:
    teachers = digits_teachers.load()
    config = small_config()
    state = init_state(config, [t.info() for t in teachers], torch.device("cpu"))
    for iteration in range(5):
        state.iteration = iteration
        save_checkpoint(tmp_path, state, "f", keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "checkpoint-00000003.pt",
        "checkpoint-00000004.pt",
    ]
    assert not list(tmp_path.glob("*.tmp"))


def test_checkpoint_holds_no_teacher_tensor(digits_teachers, tmp_path: Path) -> None:
    teachers = digits_teachers.load()
    config = small_config()
    state = init_state(config, [t.info() for t in teachers], torch.device("cpu"))
    train(state, teachers, config)
    path = save_checkpoint(tmp_path, state, config_fingerprint(config))
    payload = path.read_bytes()
    for package in digits_teachers.packages:
        from cdfkd.teacher_node.package import load_package

        _, model = load_package(package)
        for name, tensor in model.state_dict().items():
            if tensor.numel() < 4 or not tensor.is_floating_point():
                continue
            needle = tensor.detach().float().contiguous().numpy().tobytes()[:64]
            assert needle not in payload, f"teacher tensor {name} found in the checkpoint"
