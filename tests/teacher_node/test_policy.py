"""The owner's policy, deterministically: modes, budgets, rates, perturbation."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from cdfkd.teacher_node.answers import KeyedNoise, perturb_logits
from cdfkd.teacher_node.config import parse_teacher_config
from cdfkd.teacher_node.errors import PermissionDenied, TeacherConfigError, TeacherError
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
    open_node = Policy(PolicyConfig(allow_any_trusted_caller=True), FakeClock(), torch.Generator())
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
    with pytest.raises(BudgetExhausted, match="daily budget exhausted: 50 of 50") as refused:
        ledger.charge("a", 1, rule)
    fields = ("budget", "limit", "used", "requested")
    assert [getattr(refused.value, f) for f in fields] == ["budget_images_per_day", 50, 50, 1]
    copy = pickle.loads(pickle.dumps(refused.value))  # crosses process boundaries (Ray)
    assert [getattr(copy, f) for f in fields] == ["budget_images_per_day", 50, 50, 1]
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
        PolicyConfig(callers={"a": rule}, budget_file=tmp_path / "b.json"),
        clock,
        torch.Generator(),
        monotonic=clock,
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


def test_perturbation_is_deterministic_given_the_noise() -> None:
    logits = torch.tensor([[4.0, 2.0, 1.0, -1.0], [0.0, 3.0, 1.0, 2.0]])
    scaled = perturb_logits(logits, Perturbation(temperature=2.0))
    assert torch.equal(scaled, logits / 2)
    truncated = perturb_logits(logits, Perturbation(top_k=2))
    assert torch.equal(truncated, torch.tensor([[4.0, 2.0, 2.0, 2.0], [2.0, 3.0, 2.0, 2.0]]))
    noise = KeyedNoise(b"secret")
    keys = [b"row-0", b"row-1"]
    noisy = perturb_logits(
        logits, Perturbation(logits_sigma=0.5), noise.normal(keys, (4,), torch.float32)
    )
    again = perturb_logits(
        logits, Perturbation(logits_sigma=0.5), noise.normal(keys, (4,), torch.float32)
    )
    assert torch.equal(noisy, again)
    assert not torch.equal(noisy, logits)
    other = KeyedNoise(b"another secret").normal(keys, (4,), torch.float32)
    assert not torch.equal(other, noise.normal(keys, (4,), torch.float32))
    many = noise.normal([str(i).encode() for i in range(2000)], (10,), torch.float32)
    sample = perturb_logits(torch.zeros(2000, 10), Perturbation(logits_sigma=0.5), many)
    assert sample.std().item() == pytest.approx(0.5, rel=0.05)


def _config(policy: dict) -> dict:
    return {"node": {"package": "p"}, "tls": {"insecure": True}, "policy": policy}


def test_a_node_with_no_caller_rules_refuses_to_start_unless_told() -> None:
    for policy in ({}, {"budget_file": "b.json"}):
        with pytest.raises(TeacherConfigError, match=r"'policy'.*no \[policy.callers.NAME\]"):
            parse_teacher_config(_config(policy))
    with pytest.raises(TeacherConfigError, match="allow_any_trusted_caller"):
        parse_teacher_config({"node": {"package": "p"}, "tls": {"insecure": True}})
    config = parse_teacher_config(_config({"allow_any_trusted_caller": True}))
    assert config.policy.allow_any_trusted_caller
    assert parse_teacher_config(_config({"callers": {"student": {}}})).policy.callers


def test_budgets_without_a_budget_file_refuse_to_start() -> None:
    for rule in ({"budget_images": 10}, {"budget_images_per_day": 10}):
        with pytest.raises(TeacherConfigError, match="no budget_file"):
            parse_teacher_config(_config({"callers": {"student": rule}}))
    rates_only = {"callers": {"student": {"rate_images_per_s": 5}}}
    assert parse_teacher_config(_config(rates_only)).policy.budget_file is None
    budgeted = {"callers": {"student": {"budget_images": 10}}, "budget_file": "b.json"}
    assert parse_teacher_config(_config(budgeted), base=Path("/srv")).policy.budget_file == Path(
        "/srv/b.json"
    )


def test_rates_follow_the_monotonic_clock_not_the_wall_clock(tmp_path: Path) -> None:
    wall, monotonic = FakeClock(), FakeClock(100.0)
    rule = CallerRule(rate_images_per_s=10, burst_images=10)
    policy = Policy(PolicyConfig(callers={"a": rule}), wall, torch.Generator(), monotonic)
    policy.admit("a", rule, 10)
    wall.now += 3600  # the wall clock jumps (NTP, an operator): no refill
    with pytest.raises(RateLimited, match="retry after 1.00 s"):
        policy.admit("a", rule, 10)
    wall.now -= 7200  # and back: no stall either
    monotonic.now += 1.0
    policy.admit("a", rule, 10)


def test_a_budget_refusal_takes_no_rate_tokens_even_after_a_concurrent_charge(
    tmp_path: Path,
) -> None:
    rule = CallerRule(budget_images=100, rate_images_per_s=10, burst_images=50)
    wall = FakeClock()
    concurrent: list[int] = []

    def monotonic() -> float:
        # Between this request's budget check and its charge (the bucket reads the clock),
        # a concurrent request of the same caller uses the budget up.
        if concurrent:
            policy.ledger.charge("a", concurrent.pop(), rule)
        return 0.0

    policy = Policy(
        PolicyConfig(callers={"a": rule}, budget_file=tmp_path / "b.json"),
        wall,
        torch.Generator(),
        monotonic,
    )
    policy.admit("a", rule, 10)
    assert policy.tokens("a") == 40
    concurrent.append(85)
    with pytest.raises(BudgetExhausted, match="95 of 100"):
        policy.admit("a", rule, 10)
    assert policy.ledger.used("a") == (95, 95)
    assert policy.tokens("a") == 40  # the refused request's tokens are back


def test_the_budget_file_folder_is_fsynced_after_the_replace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os
    import stat

    events: list[tuple[str, object]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor: int) -> None:
        mode = os.fstat(descriptor).st_mode
        events.append(("fsync-dir" if stat.S_ISDIR(mode) else "fsync-file", descriptor))
        real_fsync(descriptor)

    def replace(source, target) -> None:  # noqa: ANN001 - os.replace's signature
        events.append(("replace", Path(target)))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    BudgetLedger(tmp_path / "budget.json", FakeClock()).charge("a", 1, CallerRule())
    kinds = [kind for kind, _ in events]
    assert kinds == ["fsync-file", "replace", "fsync-dir"], events
    assert events[1][1] == tmp_path / "budget.json"
