"""Attention training on its own (METHOD.md 3): it learns which header to trust, and only that.

The attention module scores each header's logits with one linear layer shared across headers,
so it can only learn what a header's logits look like when it is right. The first test gives it
label-skewed headers (as students of owners with skewed data have): on every sample one header
is confidently right and the others lean, less confidently, to a wrong class; which header is
right depends on the sample. The second fits the attention the way a run does
(``training_run._fit_attention``) on a real student and real digits, and checks that nothing of
the student changes.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from cdfkd.coordinator.config import parse_run_config
from cdfkd.coordinator.training_run import _fit_attention, _real_data
from cdfkd.student_node.models.aggregator import (
    AttentionAggregator,
    AttentionConfig,
    train_attention,
)
from cdfkd.student_node.teachers.run_space import resolve_image_space
from cdfkd.student_node.trainer import init_state, train
from tests.helpers import packages, small_run

CLASSES = 10
#: Header h is right on the samples of these classes (three owners with skewed labels).
RIGHT_HEADER_OF_CLASS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])


def _skewed_header_logits(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Header logits (3, count, 10) and labels: per sample one header right, two wrong."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (count,), generator=generator)
    logits = 0.3 * torch.randn(3, count, CLASSES, generator=generator)
    right = RIGHT_HEADER_OF_CLASS[labels]
    for header in range(3):
        mine = right == header
        # A wrong header leans to a wrong class (never the label), less confidently.
        offset = torch.randint(1, CLASSES, (count,), generator=generator)
        wrong = (labels + offset) % CLASSES
        logits[header, mine, labels[mine]] += 4.0
        logits[header, ~mine, wrong[~mine]] += 2.0
    return logits, labels


def _weight_on_the_right_header(aggregator: AttentionAggregator, logits, labels) -> torch.Tensor:
    """Per sample, the attention weight of the header that is right on it."""
    with torch.no_grad():
        alpha = aggregator.weights(logits)
    return alpha.gather(1, RIGHT_HEADER_OF_CLASS[labels].unsqueeze(1)).squeeze(1)


def test_attention_moves_to_the_header_that_is_right_and_its_loss_falls() -> None:
    logits, labels = _skewed_header_logits(600, seed=0)
    test_logits, test_labels = _skewed_header_logits(600, seed=1)
    torch.manual_seed(0)
    aggregator = AttentionAggregator(CLASSES)
    before = _weight_on_the_right_header(aggregator, test_logits, test_labels)
    with torch.no_grad():
        loss_before = F.cross_entropy(aggregator(test_logits), test_labels).item()
    # The method's settings (METHOD.md 3: Adam lr 0.01), on k = 600 samples as for MNIST.
    config = AttentionConfig(samples=600, epochs=60, learning_rate=0.01, batch_size=64)
    history = train_attention(aggregator, logits, labels, config, torch.Generator().manual_seed(0))

    assert len(history) == 60
    assert history[-1] < 0.5 * history[0], history  # the training loss falls ...
    assert history[-1] < min(history[:10])  # ... and keeps falling, not just one lucky epoch
    with torch.no_grad():
        loss_after = F.cross_entropy(aggregator(test_logits), test_labels).item()
    assert loss_after < 0.5 * loss_before  # on samples it never saw, too
    after = _weight_on_the_right_header(aggregator, test_logits, test_labels)
    # Untrained, no header is preferred (a third each); trained, on every group of classes
    # most of the weight sits on that group's header: which header depends on the sample.
    # (Measured: 0.78, 0.82, 0.76; a shared linear score cannot be sure on every sample.)
    assert before.mean() < 0.4
    for header in range(3):
        group = RIGHT_HEADER_OF_CLASS[test_labels] == header
        assert after[group].mean() > 0.7, (header, after[group].mean())
        assert after[group].mean() > before[group].mean() + 0.25  # from 0.33-0.42
    with torch.no_grad():
        attention_accuracy = (aggregator(test_logits).argmax(1) == test_labels).float().mean()
    assert attention_accuracy > 0.9  # measured 0.94


def test_fitting_the_attention_leaves_the_student_untouched(digits_teachers) -> None:
    teachers = digits_teachers.load()
    infos = [t.info() for t in teachers]
    config = parse_run_config(
        small_run(packages(digits_teachers.packages), {"attention": {"samples": 60, "epochs": 20}})
    )
    device = torch.device("cpu")
    space = resolve_image_space(infos, None, None)
    state = init_state(config.train, infos, device, space.image_shape)
    # A student as the run leaves it: trained a little, in train mode, with optimizer state.
    short = config.train.model_copy(update={"epochs": 1, "iterations_per_epoch": 2})
    train(state, teachers, short)
    assert state.student.training
    real = _real_data(config, space, infos[0].num_classes, device)
    assert real is not None
    snapshot = {k: v.clone() for k, v in state.student.state_dict().items()}
    parameters = list(state.student.parameters())
    grads = [None if p.grad is None else p.grad.clone() for p in parameters]
    momentum = [state.student_optimizer.state[p]["momentum_buffer"].clone() for p in parameters]
    # What the aggregator starts from in _fit_attention (same seed): training must move it.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.train.seed)
        initial = AttentionAggregator(infos[0].num_classes)
        initial.reset_parameters()

    aggregator = _fit_attention(state, real, space, config, device)

    assert aggregator is not None
    assert not aggregator.training
    assert any(
        not torch.equal(a, b)
        for a, b in zip(initial.parameters(), aggregator.parameters(), strict=True)
    )
    after = state.student.state_dict()
    assert after.keys() == snapshot.keys()
    # Bitwise: weights, BatchNorm running statistics and their batch counters.
    for name, value in snapshot.items():
        assert after[name].dtype == value.dtype, name
        assert torch.equal(after[name], value), name
    assert state.student.training  # its mode is restored
    # Its gradients and the optimizer's momentum are not touched either (no backward into it).
    for parameter, grad, buffer in zip(parameters, grads, momentum, strict=True):
        assert grad is not None
        assert parameter.grad is not None
        assert torch.equal(parameter.grad, grad)
        assert torch.equal(state.student_optimizer.state[parameter]["momentum_buffer"], buffer)
