"""bench/privacy.py's rows: the images each plans for are the images the loop asks."""

from __future__ import annotations

import pytest

from bench.federation_cost import timed_iterations
from bench.privacy import ROWS, images_per_iteration, row_train, train_config


@pytest.mark.parametrize(
    ("row", "batches"),
    [
        ("full", 5 + 2),  # K fresh batches, the generator step's Query and InputGrad
        ("full, replay", 1 + 2),  # one fresh batch for the memory
        ("all logits_only, IDEAL generator", 5),  # the generator step asks no teacher
        ("all logits_only, IDEAL generator, replay", 1),
        ("all logits_only, IDEAL + disagreement generator, replay", 1),
        ("all logits_only, IDEAL + moments generator, replay", 1),
    ],
)
def test_a_rows_planned_images_are_those_the_loop_asks_of_each_teacher(
    digits_teachers, row: str, batches: int
) -> None:
    # In-process digits teachers give input gradients: the rows' white-box arithmetic. The
    # IDEAL rows' generator step asks no teacher, so a black-box node changes nothing there.
    assert row in {name for name, _ in ROWS}
    teachers = digits_teachers.load()
    train = train_config(50, **row_train(row))
    planned = images_per_iteration(train, black_box=False)
    assert planned == batches * train.batch_size
    measured = timed_iterations(teachers, train, count=2, warmup=1)
    assert measured.images == planned * len(teachers)
    if "IDEAL" in row:
        assert images_per_iteration(train, black_box=True) == planned


def test_the_disagreement_row_is_the_ideal_memory_row_plus_its_weight() -> None:
    plain = train_config(50, **row_train("all logits_only, IDEAL generator, replay"))
    row = "all logits_only, IDEAL + disagreement generator, replay"
    weighted = train_config(50, **row_train(row, disagreement=2.5))
    assert weighted.ideal_weights().disagreement == 2.5
    assert plain.ideal_weights().disagreement == 0.0
    assert weighted.model_copy(update={"ideal": None}) == plain


def test_the_moments_row_is_the_ideal_memory_row_with_the_prior_and_pixel_range() -> None:
    plain = train_config(50, **row_train("all logits_only, IDEAL generator, replay"))
    row = train_config(50, **row_train("all logits_only, IDEAL + moments generator, replay"))
    assert row.ideal_weights().moments > 0.0
    assert plain.ideal_weights().moments == 0.0
    assert row.generator.output == "pixel_range"
    same_generator = row.generator.model_copy(update={"output": plain.generator.output})
    assert row.model_copy(update={"ideal": None, "generator": same_generator}) == plain
