"""What leaves the node, on the engine directly: refusals, clipping, capping, keyed noise.

The attacks against a real node are in test_bad_input_corpus.py; these pin the pieces.
"""

from __future__ import annotations

import pytest
import torch

from cdfkd.teacher_node.answers import (
    KeyedNoise,
    answer_input_grad,
    answer_query,
    cap,
    check_outputs,
    clip_rows,
    refused_outputs,
)
from cdfkd.teacher_node.config import parse_teacher_config
from cdfkd.teacher_node.engine import TeacherEngine
from cdfkd.teacher_node.errors import PermissionDenied, TeacherConfigError
from cdfkd.teacher_node.policy import Perturbation
from cdfkd.teacher_node.zoo import ArchitectureSpec, build_classifier
from tests.helpers import randomize_running_stats

SHAPE = (1, 16, 16)


@pytest.fixture(scope="module")
def engine() -> TeacherEngine:
    torch.manual_seed(0)
    model = build_classifier(
        ArchitectureSpec(architecture="lenet5_bn", input_shape=SHAPE, num_classes=10)
    )
    randomize_running_stats(model, 0.5, (0.5, 2.0))
    return TeacherEngine(model, SHAPE)


def test_a_perturbing_rule_refuses_what_would_undo_it() -> None:
    assert refused_outputs(Perturbation()) == frozenset()
    assert refused_outputs(Perturbation(logits_sigma=1.0)) == {"features", "bn_loss", "input_grad"}
    # Temperature and top-k add no noise: gradients through them are consistent, so allowed.
    assert refused_outputs(Perturbation(temperature=2.0, top_k=3)) == {"features", "bn_loss"}
    everything = Perturbation(
        logits_sigma=1.0,
        features_sigma=1.0,
        bn_loss_sigma=0.1,
        gradient_sigma=0.1,
        grad_logits_max_norm=1.0,
        bn_weight_max=0.1,
    )
    assert refused_outputs(everything) == frozenset()
    check_outputs(Perturbation(logits_sigma=1.0), {"logits"})
    with pytest.raises(PermissionDenied, match=r"\['features'\] would undo that"):
        check_outputs(Perturbation(logits_sigma=1.0), {"logits", "features"})


def test_gradient_noise_needs_its_bounds() -> None:
    base = {"node": {"package": "p"}, "tls": {"insecure": True}}
    rule = {"perturbation": {"gradient_sigma": 0.1, "grad_logits_max_norm": 1.0}}
    with pytest.raises(TeacherConfigError, match="gradient_sigma needs grad_logits_max_norm"):
        parse_teacher_config({**base, "policy": {"callers": {"student": rule}}})


def test_rows_are_clipped_and_the_bn_weight_capped() -> None:
    rows = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]])
    clipped = clip_rows(rows, 1.0)
    torch.testing.assert_close(clipped, torch.tensor([[0.6, 0.8], [0.3, 0.4], [0.0, 0.0]]))
    assert torch.equal(clip_rows(rows, None), rows)
    assert cap(5.0, 0.1) == 0.1
    assert cap(-5.0, 0.1) == -0.1
    assert cap(0.05, 0.1) == 0.05
    assert cap(5.0, None) == 5.0


def test_an_unperturbed_rule_answers_exactly(engine: TeacherEngine) -> None:
    images = torch.randn(8, *SHAPE)
    exact = engine.query(images)
    answer = answer_query(
        engine, images, Perturbation(), KeyedNoise(b"s"), features=True, bn_loss=True
    )
    assert torch.equal(answer.logits, exact.logits)
    assert answer.features is not None
    assert torch.equal(answer.features, exact.features)
    assert answer.bn_loss == float(exact.bn_loss)  # type: ignore[arg-type]
    cotangent = torch.randn(8, 10)
    gradient = answer_input_grad(engine, images, cotangent, 0.1, Perturbation(), KeyedNoise(b"s"))
    assert torch.equal(gradient, engine.input_grad(images, cotangent, 0.1))


def test_gradient_noise_is_in_proportion_to_the_clipped_request(engine: TeacherEngine) -> None:
    rule = Perturbation(
        logits_sigma=1.0,
        gradient_sigma=0.5,
        grad_logits_max_norm=1.0,
        bn_weight_max=0.1,
        bn_loss_sigma=0.1,
    )
    noise = KeyedNoise(b"secret")
    images = torch.randn(32, *SHAPE)
    unit = torch.nn.functional.normalize(torch.randn(32, 10), dim=1)
    for scale, expected_row_norm in ((0.01, 0.01), (1.0, 1.0), (1e6, 1.0)):
        answer = answer_input_grad(engine, images, scale * unit, 0.0, rule, noise)
        signal = engine.input_grad(images, expected_row_norm * unit, 0.0)
        noise_std = (answer - signal).std().item()
        assert noise_std == pytest.approx(0.5 * expected_row_norm, rel=0.05), scale
    # bn_weight beyond its cap is capped, and the noise follows the capped value.
    answer = answer_input_grad(engine, images, torch.zeros(32, 10), 1e6, rule, noise)
    signal = engine.input_grad(images, torch.zeros(32, 10), 0.1)
    assert (answer - signal).std().item() == pytest.approx(0.5 * 0.1, rel=0.05)


def test_the_same_question_gets_the_same_noise(engine: TeacherEngine) -> None:
    rule = Perturbation(logits_sigma=1.0, features_sigma=1.0, bn_loss_sigma=0.1)
    noise = KeyedNoise(b"secret")
    images = torch.randn(8, *SHAPE)

    def ask(batch: torch.Tensor):  # noqa: ANN202 - the answer
        return answer_query(engine, batch, rule, noise, features=True, bn_loss=True)

    first, again = ask(images), ask(images.clone())
    assert torch.equal(first.logits, again.logits)
    assert first.bn_loss == again.bn_loss
    # Per image: the same image in another batch, at another position, gets the same noise.
    other = torch.cat([torch.randn(3, *SHAPE), images[:1]])
    assert torch.equal(ask(other).logits[-1], first.logits[0])
    # -0.0 and 0.0 are the same question; another secret or a slightly different image is not.
    zeros = torch.zeros(2, *SHAPE)
    assert torch.equal(ask(zeros).logits, ask(-zeros).logits)
    moved = ask(images + 1e-6)
    assert not torch.equal(moved.logits, first.logits)
    other_node = answer_query(
        engine, images, rule, KeyedNoise(b"other"), features=True, bn_loss=True
    )
    assert not torch.equal(other_node.logits, first.logits)
