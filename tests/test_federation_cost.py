"""bench/federation_cost.py without training: its modes, schedules, aggregation and report."""

from __future__ import annotations

import argparse
import socket
import threading

import pytest

from bench.federation_cost import (
    MODES,
    Calibration,
    ProxyProcess,
    aggregate,
    iterations_within,
    markdown,
    timed_iterations,
    train_config,
)


def _run(seed: int, accuracy: float) -> dict:
    return {
        "seed": seed,
        "accuracy": accuracy,
        "teacher_images": 1000 * (seed + 1),
        "wire_bytes": 10**6 * (seed + 1),
        "iterations": 10 + seed,
        "seconds": 60.0,
        "ended_by": "completed",
    }


def test_the_issue_modes_are_the_paper_loop_and_the_cheaper_ones() -> None:
    assert {"paper", "replay", "replay_pipelined"} <= MODES.keys()
    paper = train_config("paper", 90, seed=0)
    assert paper.replay is None
    assert paper.prefetch == 0
    assert train_config("replay", 90, seed=0).replay is not None
    piped = train_config("replay_pipelined", 90, seed=0)
    assert piped.replay is not None
    assert piped.prefetch > 0
    assert MODES["replay_pipelined_float16"]["wire_dtype"] == "float16"
    kept = train_config("replay_generator_batch_pipelined_float16", 90, seed=0).replay
    assert kept is not None
    assert kept.keep_generator_batch
    assert kept.new_batches == 1
    k10 = train_config("replay_generator_batch_k10_pipelined_float16", 90, seed=0)
    assert k10.replay == kept
    assert k10.student_steps_per_generator_step == 2 * paper.student_steps_per_generator_step
    alone = train_config("generator_batch_only_pipelined_float16", 90, seed=0).replay
    assert alone is not None
    assert alone.keep_generator_batch
    assert alone.new_batches == 0
    alone_k10 = train_config("generator_batch_only_k10_pipelined_float16", 90, seed=0)
    assert alone_k10.replay == alone
    assert alone_k10.student_steps_per_generator_step == k10.student_steps_per_generator_step


@pytest.mark.parametrize("iterations", [3, 29, 30, 900, 1234])
def test_a_planned_schedule_decays_once_at_two_thirds(iterations: int) -> None:
    config = train_config("paper", iterations, seed=2)
    assert config.seed == 2
    assert abs(config.total_iterations - iterations) < config.iterations_per_epoch
    (milestone,) = config.optimizer.milestones
    assert milestone < config.epochs
    assert milestone == max(1, config.epochs * 2 // 3)


def test_aggregate_gives_the_issue_keys_as_means_over_seeds() -> None:
    cell = aggregate([_run(0, 0.80), _run(1, 0.84), _run(2, 0.82)])
    for key in ("accuracy", "accuracy_std", "teacher_images", "wire_bytes", "iterations"):
        assert key in cell
    assert cell["accuracy"] == pytest.approx(0.82)
    assert cell["accuracy_std"] == pytest.approx(0.016329931, rel=1e-6)
    assert cell["teacher_images"] == pytest.approx(2000)
    assert cell["seconds"] == pytest.approx(60.0)
    assert aggregate([_run(0, 0.5)])["accuracy_std"] == 0.0


def _report(budgets: dict[str, dict], **extra: object) -> dict:
    """A report of the paper mode at ``budgets`` with a one-row emulated-link table."""
    wan_row = {
        "loopback_it_per_s": 1.0,
        "emulated_it_per_s": 0.5,
        "ratio": 0.5,
        "emulated_bytes_per_iteration": 2e6,
    }
    return {
        "modes": {"paper": {"budgets": budgets}},
        "wan": {**wan_row, "per_mode": {"paper": wan_row}},
        "wan_iterations": 2,
        "wan_rounds": 1,
        "seeds": 1,
        "total_seconds": 120.0,
        **extra,
    }


def test_the_report_table_has_a_row_per_mode_and_budget() -> None:
    cell = aggregate([_run(0, 0.8)])
    report = _report({"5 min": cell, "15 min": cell})
    text = markdown(argparse.Namespace(quick=True), report)
    assert "| paper | 5 min | 80.00 (0.00) |" in text
    assert "| paper | 15 min |" in text
    assert "| paper | 1.00 | 0.50 | 0.50 | 2.0 MB |" in text
    # A link-only run (a bare --minutes) has no accuracy table, and says so.
    link_only = markdown(argparse.Namespace(quick=False), {**report, "modes": {}})
    assert "| mode | budget |" not in link_only
    assert "the emulated link only" in link_only
    assert "seed(s) per cell" not in link_only
    assert "| paper | 1.00 | 0.50 | 0.50 | 2.0 MB |" in link_only


def test_a_proxy_process_forwards_and_reports_its_bytes() -> None:
    # A real echo server on loopback (port 0) behind bench/tcp_proxy.py in its own process.
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(30)

    def echo() -> None:
        connection, _ = server.accept()
        with connection:
            data = b""
            while len(data) < 5000:
                data += connection.recv(65536)
            connection.sendall(data)

    thread = threading.Thread(target=echo, daemon=True)
    thread.start()
    with ProxyProcess(f"127.0.0.1:{server.getsockname()[1]}") as proxy:
        host, port = proxy.address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=30) as client:
            client.sendall(b"x" * 5000)
            received = b""
            while len(received) < 5000:
                received += client.recv(65536)
    thread.join(timeout=30)
    server.close()
    assert received == b"x" * 5000
    assert proxy.total == 10_000  # both directions, counted by the proxy process


@pytest.mark.parametrize(
    ("mode", "batches"),
    [
        ("paper", 5 + 2),  # K fresh batches, the generator step's Query and VJP
        ("replay_generator_batch_pipelined_float16", 1 + 2),
        ("generator_batch_only_k10_pipelined_float16", 0 + 2),
    ],
)
def test_the_calibration_counts_the_images_each_iteration_asks_of_the_teachers(
    digits_teachers, mode: str, batches: int
) -> None:
    teachers = digits_teachers.load()
    train = train_config(mode, 10**4, seed=0)
    measured = timed_iterations(teachers, train, count=2, warmup=1)
    per_iteration = batches * train.batch_size * len(teachers)
    assert measured.images == per_iteration
    assert measured.first_images >= per_iteration
    assert measured.seconds > 0
    # A run planned within a budget stays within it, the next iteration would not.
    budget = measured.first_images + 40 * per_iteration + per_iteration // 2
    planned = iterations_within(budget, measured)
    assert planned == 40
    assert measured.first_images + (planned - 1) * per_iteration <= budget
    assert measured.first_images + (planned + 1) * per_iteration > budget


def test_an_image_budget_too_small_or_a_mode_that_asks_nothing_is_refused() -> None:
    with pytest.raises(ValueError, match="fewer than 3 iterations"):
        iterations_within(5000, Calibration(seconds=1.0, first_images=3000, images=768.0))
    with pytest.raises(ValueError, match="asks the teachers nothing"):
        iterations_within(10**6, Calibration(seconds=1.0, first_images=0, images=0.0))


def test_the_report_names_an_image_budget_and_how_its_runs_were_planned() -> None:
    report = _report({"569,632 images": aggregate([_run(0, 0.8)])}, teacher_images=[569632])
    text = markdown(argparse.Namespace(quick=False), report)
    assert "| paper | 569,632 images | 80.00 (0.00) |" in text
    assert "no wall-clock bound" in text
    assert "no wall-clock bound" not in markdown(
        argparse.Namespace(quick=False), {**report, "teacher_images": []}
    )
