"""The replay memory: cached teacher answers, the paper's loop where it should be, exact resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cdfkd.student_node.checkpoint import (
    config_fingerprint,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from cdfkd.student_node.config import Method
from cdfkd.student_node.replay import ReplayMemory
from cdfkd.student_node.trainer import TrainState, init_state, train
from tests.student_node.test_checkpoint import _all_tensors
from tests.student_node.test_trainer import small_config

BATCH, K = 16, 2  # small_config


def _memory_tensors(state: TrainState) -> dict[str, torch.Tensor]:
    assert state.replay is not None
    assert state.replay.images is not None
    tensors = {"images": state.replay.images}
    tensors |= {f"logits.{i}": t for i, t in enumerate(state.replay.logits)}
    tensors |= {f"features.{i}": f for i, f in enumerate(state.replay.features) if f is not None}
    return tensors


def _assert_cached_answers_are_the_teachers(state: TrainState, teachers) -> None:
    """Every cached answer (logits and features) is the teachers' answer to its image."""
    assert state.replay is not None
    images, logits, features = state.replay.newest(len(state.replay))
    for teacher, cached, cached_features in zip(teachers, logits, features, strict=True):
        asked = teacher.query(images, bn_loss=False)
        assert torch.equal(asked.logits, cached)
        assert cached_features is not None
        assert torch.equal(asked.features, cached_features)


def test_the_memory_is_a_ring_buffer_of_samples_and_answers() -> None:
    memory = ReplayMemory(5)
    for start in (0, 3):  # 3 samples, then 3 more: the oldest is overwritten
        images = torch.arange(start, start + 3, dtype=torch.float32).view(3, 1, 1, 1)
        memory.add(images, [images.view(3, 1) * 10], [None])
    assert len(memory) == 5
    images, logits, features = memory.newest(4)
    assert images.flatten().tolist() == [2.0, 3.0, 4.0, 5.0]  # oldest of the four first
    assert logits[0].flatten().tolist() == [20.0, 30.0, 40.0, 50.0]
    assert features == [None]
    drawn, answers, _ = memory.sample(100, torch.Generator().manual_seed(0))
    assert set(drawn.flatten().tolist()) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert torch.equal(answers[0], drawn.view(100, 1) * 10)  # each answer beside its image
    copy = ReplayMemory(5)
    copy.load_state_dict(memory.state_dict())
    assert torch.equal(copy.newest(5)[0], memory.newest(5)[0])
    before = memory.state_dict()
    three = torch.ones(3, 1, 1, 1)
    with pytest.raises(ValueError, match="features must be cached for every batch or none"):
        memory.add(three, [three.view(3, 1)], [three.view(3, 1)])
    assert torch.equal(memory.images, before["images"])  # refused whole: nothing written
    with pytest.raises(ValueError, match="holds 5 samples, not 6"):
        memory.newest(6)


def test_replay_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="kd_real"):
        small_config(Method.KD_REAL, replay={"size": 64})
    with pytest.raises(ValueError, match="smaller than one iteration's fresh samples"):
        small_config(replay={"size": 20, "new_batches": 2})
    with pytest.raises(ValueError, match="needs new_batches = K"):
        small_config(replay={"size": 64, "new_batches": 1, "sampling": "newest"})
    assert config_fingerprint(small_config(replay={"size": 64})) != config_fingerprint(
        small_config()
    )
    with pytest.raises(ValueError, match="new_batches 0 needs keep_generator_batch"):
        small_config(replay={"size": 64, "new_batches": 0})
    with pytest.raises(ValueError, match="keep_generator_batch needs sampling 'uniform'"):
        small_config(
            replay={
                "size": 64,
                "new_batches": K,
                "sampling": "newest",
                "keep_generator_batch": True,
            }
        )
    with pytest.raises(ValueError, match="'ideal' asks them nothing"):
        small_config(generator_objective="ideal", replay={"size": 64, "keep_generator_batch": True})
    with pytest.raises(ValueError, match="smaller than one iteration's fresh samples"):
        small_config(replay={"size": BATCH - 1, "new_batches": 0, "keep_generator_batch": True})
    kept = small_config(replay={"size": 64, "keep_generator_batch": True})
    assert config_fingerprint(kept) != config_fingerprint(small_config(replay={"size": 64}))


def test_newest_sampling_is_exactly_the_paper_loop(digits_teachers) -> None:
    """K fresh batches per iteration, step k on batch k: the same queries, the same state."""
    results = {}
    for name, replay in (("paper", None), ("replay", {"size": K * BATCH, "new_batches": K})):
        teachers = digits_teachers.load()
        extra = {} if replay is None else {"replay": {**replay, "sampling": "newest"}}
        config = small_config(**extra)
        state = init_state(config, [t.info() for t in teachers], torch.device("cpu"))
        train(state, teachers, config)
        results[name] = (_all_tensors(state), [t.images_answered for t in teachers])
    (paper, paper_images), (replayed, replay_images) = results["paper"], results["replay"]
    assert paper.keys() == replayed.keys()
    assert all(torch.equal(paper[k], replayed[k]) for k in paper)
    assert replay_images == paper_images == [4 * (K + 2) * BATCH] * 3


def test_uniform_replay_asks_each_fresh_batch_once(digits_teachers) -> None:
    teachers = digits_teachers.load()
    config = small_config(replay={"size": 4 * BATCH, "new_batches": 1})
    state = init_state(config, [t.info() for t in teachers], torch.device("cpu"))
    train(state, teachers, config)
    iterations = config.total_iterations
    # Per iteration: one fresh batch for the student steps, the generator step's query and VJP.
    assert [t.images_answered for t in teachers] == [iterations * (1 + 2) * BATCH] * 3
    assert state.replay is not None
    assert len(state.replay) == iterations * BATCH
    _assert_cached_answers_are_the_teachers(state, teachers)


@pytest.mark.parametrize("new_batches", [1, 0])
def test_the_generator_batch_joins_the_memory_at_no_teacher_image(
    digits_teachers, new_batches: int
) -> None:
    teachers = digits_teachers.load()
    replay = {"size": 64 * BATCH, "new_batches": new_batches, "keep_generator_batch": True}
    config = small_config(replay=replay)
    state = init_state(config, [t.info() for t in teachers], torch.device("cpu"))
    train(state, teachers, config)
    iterations = config.total_iterations
    # Per iteration: the fresh batches and the generator step's query and VJP, as without the
    # option; with no fresh batches, one in the first iteration, whose memory is empty.
    warm_up = 1 if new_batches == 0 else 0
    expected = (iterations * (new_batches + 2) + warm_up) * BATCH
    assert [t.images_answered for t in teachers] == [expected] * 3
    assert state.replay is not None
    # Every generator batch went in beside the fresh ones.
    assert len(state.replay) == (iterations * (new_batches + 1) + warm_up) * BATCH
    _assert_cached_answers_are_the_teachers(state, teachers)


def test_a_kept_generator_batch_is_the_batch_the_generator_step_used(digits_teachers) -> None:
    """Recording teachers: the last batch in the memory is the last batch asked for a VJP."""
    teachers = digits_teachers.load()
    config = small_config(replay={"size": 64, "new_batches": 1, "keep_generator_batch": True})
    state = init_state(config, [t.info() for t in teachers], torch.device("cpu"))
    asked: list[torch.Tensor] = []
    original = teachers[0].input_grad

    def recording_input_grad(images, *args, **kwargs):
        asked.append(images.clone())
        return original(images, *args, **kwargs)

    teachers[0].input_grad = recording_input_grad  # type: ignore[method-assign]
    train(state, teachers, config)
    assert state.replay is not None
    last = state.replay.newest(BATCH)[0]
    assert len(asked) == config.total_iterations
    assert torch.equal(last, asked[-1])


@pytest.mark.parametrize(
    "replay",
    [{"new_batches": 1}, {"new_batches": 0, "keep_generator_batch": True}],
    ids=["fresh", "generator-batch"],
)
def test_resume_with_a_memory_is_exact(digits_teachers, tmp_path: Path, replay: dict) -> None:
    teachers = digits_teachers.load()
    infos = [t.info() for t in teachers]
    # A memory smaller than the run's fresh samples, so it wraps around after the resume.
    config = small_config(
        epochs=3, replay={"size": 3 * BATCH, **replay}, optimizer={"milestones": (2,)}
    )
    fingerprint = config_fingerprint(config)

    straight = init_state(config, infos, torch.device("cpu"))
    train(straight, teachers, config)

    first = init_state(config, infos, torch.device("cpu"))
    train(first, teachers, config, should_stop=lambda: first.iteration >= 3)
    save_checkpoint(tmp_path, first, fingerprint)
    resumed = init_state(config.model_copy(update={"seed": 99}), infos, torch.device("cpu"))
    load_checkpoint(latest_checkpoint(tmp_path), resumed, fingerprint)
    assert resumed.replay is not None
    assert len(resumed.replay) == 3 * BATCH
    train(resumed, teachers, config)

    expected, found = _all_tensors(straight), _all_tensors(resumed)
    assert expected.keys() == found.keys()
    assert all(torch.equal(expected[k], found[k]) for k in expected)
    expected, found = _memory_tensors(straight), _memory_tensors(resumed)
    assert expected.keys() == found.keys()
    assert all(torch.equal(expected[k], found[k]) for k in expected)


def test_a_run_config_turns_the_memory_on(digits_teachers, tmp_path: Path) -> None:
    from cdfkd.coordinator.config import load_run_config
    from tests.helpers import packages, small_run, write_toml

    replay = {"size": 512, "new_batches": 2, "sampling": "uniform", "keep_generator_batch": True}
    path = write_toml(
        tmp_path / "run.toml", small_run(packages(digits_teachers.packages), {"replay": replay})
    )
    config = load_run_config(path)
    assert config.train.replay is not None
    assert config.train.replay.model_dump() == replay
    paper = write_toml(tmp_path / "paper.toml", small_run(packages(digits_teachers.packages)))
    assert load_run_config(paper).train.replay is None
