"""The owner's policy, deterministically: modes, budgets, rates, perturbation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cdfkd.teacher_node.errors import PermissionDenied, TeacherError
from cdfkd.teacher_node.policy import (
    MODE_OUTPUTS,
    BudgetExhausted,
    BudgetLedger,
    CallerRule,
    Mode,
    Perturbation,
    Policy,
    PolicyConfig,
    RateLimited,
    TokenBucket,
    perturb_gradient,
    perturb_logits,
)

DAY = 86_400.0


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_modes_give_only_their_outputs() -> None:
    assert MODE_OUTPUTS[Mode.FULL] == {"logits", "features", "bn_loss", "input_grad"}
    assert MODE_OUTPUTS[Mode.NO_FEATURES] == {"logits", "bn_loss", "input_grad"}
    assert MODE_OUTPUTS[Mode.LOGITS_ONLY] == {"logits"}
    policy = Policy(
        PolicyConfig(callers={"a": CallerRule(mode="logits_only")}), FakeClock(), torch.Generator()
    )
    rule = policy.rule("a")
    policy.check_outputs("a", rule, {"logits"})
    for forbidden in ({"features"}, {"bn_loss"}, {"input_grad"}, {"logits", "input_grad"}):
        with pytest.raises(PermissionDenied, match="logits_only"):
            policy.check_outputs("a", rule, forbidden)


def test_allow_list() -> None:
    open_node = Policy(PolicyConfig(), FakeClock(), torch.Generator())
    assert open_node.rule("anyone") == CallerRule()
    listed = Policy(PolicyConfig(callers={"student": CallerRule()}), FakeClock(), torch.Generator())
    assert listed.rule("student").mode is Mode.FULL
    with pytest.raises(PermissionDenied, match="'intruder' is not on this node's allow-list"):
        listed.rule("intruder")


def test_token_bucket_refills_with_the_clock() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=100.0, burst=150.0, clock=clock)
    bucket.take(100)
    bucket.take(50)
    with pytest.raises(RateLimited, match="retry after 0.20 s") as raised:
        bucket.take(20)
    assert raised.value.retry_after_s == pytest.approx(0.2)
    clock.now += 0.2
    bucket.take(20)
    with pytest.raises(RateLimited, match="exceeds the burst") as too_big:
        bucket.take(151)
    assert too_big.value.retry_after_s == float("inf")
    clock.now += 100
    bucket.take(150)  # refilled to the burst, not beyond


def test_budget_exhaustion_says_used_and_limit_and_counts_nothing(tmp_path: Path) -> None:
    clock = FakeClock()
    rule = CallerRule(budget_images=100)
    ledger = BudgetLedger(tmp_path / "budget.json", clock)
    ledger.charge("a", 60, rule)
    ledger.charge("a", 40, rule)
    with pytest.raises(BudgetExhausted, match="100 of 100 images used, this request needs 1"):
        ledger.charge("a", 1, rule)
    assert ledger.used("a") == (100, 100)
    ledger.charge("b", 100, rule)  # budgets are per caller


def test_budget_survives_a_restart_and_is_never_refilled(tmp_path: Path) -> None:
    clock = FakeClock()
    rule = CallerRule(budget_images=100)
    BudgetLedger(tmp_path / "budget.json", clock).charge("a", 70, rule)
    again = BudgetLedger(tmp_path / "budget.json", clock)
    assert again.used("a") == (70, 70)
    with pytest.raises(BudgetExhausted, match="70 of 100"):
        again.charge("a", 31, rule)
    assert not list(tmp_path.glob("*.tmp"))
    assert json.loads((tmp_path / "budget.json").read_text())["a"]["total"] == 70


def test_daily_budget_resets_at_utc_midnight(tmp_path: Path) -> None:
    clock = FakeClock(1_700_006_400.0)  # 2023-11-15 00:00 UTC
    rule = CallerRule(budget_images_per_day=50, budget_images=120)
    ledger = BudgetLedger(tmp_path / "budget.json", clock)
    ledger.charge("a", 50, rule)
    with pytest.raises(BudgetExhausted, match="daily budget exhausted: 50 of 50"):
        ledger.charge("a", 1, rule)
    clock.now += DAY
    ledger.charge("a", 50, rule)
    clock.now += DAY
    with pytest.raises(BudgetExhausted, match="100 of 120"):
        ledger.charge("a", 21, rule)


def test_a_corrupt_budget_file_refuses_to_reset(tmp_path: Path) -> None:
    (tmp_path / "budget.json").write_text("{broken")
    with pytest.raises(TeacherError, match="refusing to start with budgets reset"):
        BudgetLedger(tmp_path / "budget.json", FakeClock())


def test_admit_refuses_without_counting(tmp_path: Path) -> None:
    clock = FakeClock()
    rule = CallerRule(budget_images=100, rate_images_per_s=10, burst_images=40)
    policy = Policy(
        PolicyConfig(callers={"a": rule}, budget_file=tmp_path / "b.json"), clock, torch.Generator()
    )
    policy.admit("a", rule, 40)
    with pytest.raises(RateLimited):
        policy.admit("a", rule, 10)
    assert policy.ledger.used("a") == (40, 40)  # the refused request was not charged
    clock.now += 4
    policy.admit("a", rule, 40)
    assert policy.remaining("a", rule) == 20
    clock.now += 10
    with pytest.raises(BudgetExhausted):
        policy.admit("a", rule, 30)
    policy.admit("a", rule, 20)  # the budget refusal took no rate tokens
    assert policy.remaining("a", rule) == 0


def test_perturbation_is_deterministic_given_the_generator() -> None:
    logits = torch.tensor([[4.0, 2.0, 1.0, -1.0], [0.0, 3.0, 1.0, 2.0]])
    scaled = perturb_logits(logits, Perturbation(temperature=2.0), torch.Generator())
    assert torch.equal(scaled, logits / 2)
    truncated = perturb_logits(logits, Perturbation(top_k=2), torch.Generator())
    assert torch.equal(truncated, torch.tensor([[4.0, 2.0, 2.0, 2.0], [2.0, 3.0, 2.0, 2.0]]))
    noisy = perturb_logits(logits, Perturbation(logits_sigma=0.5), torch.Generator().manual_seed(1))
    again = perturb_logits(logits, Perturbation(logits_sigma=0.5), torch.Generator().manual_seed(1))
    assert torch.equal(noisy, again)
    assert not torch.equal(noisy, logits)
    big = torch.zeros(2000, 10)
    sample = perturb_logits(big, Perturbation(logits_sigma=0.5), torch.Generator().manual_seed(2))
    assert sample.std().item() == pytest.approx(0.5, rel=0.05)
    gradient = torch.zeros(100, 1, 8, 8)
    assert torch.equal(perturb_gradient(gradient, Perturbation(), torch.Generator()), gradient)
    noisy_gradient = perturb_gradient(gradient, Perturbation(gradient_sigma=0.1), torch.Generator())
    assert noisy_gradient.std().item() == pytest.approx(0.1, rel=0.05)
