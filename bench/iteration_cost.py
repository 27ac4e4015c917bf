"""Where one CDFKD-MFS iteration spends its time, and what NHWC generator weights save.

    python bench/iteration_cost.py --out DIR [--rounds R]

Three LeNet-5-BN teachers (cached in DIR/teachers, as bench/quality.py makes them), the bench's
training settings (``bench.quality.BASE_TRAIN``), in-process teachers, 2 CPU threads. Times each
part of an iteration, then whole iterations with the generator's weights channels-last (the
default) and contiguous (NCHW), interleaved round by round so that both see the same machine.
Writes DIR/iteration_cost.json and appends a table to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.quality import BASE_TRAIN, ensure_teachers, homogeneous_jobs  # noqa: E402
from bench.results import append_section  # noqa: E402
from cdfkd.student_node import trainer  # noqa: E402
from cdfkd.student_node.config import TrainConfig  # noqa: E402
from cdfkd.student_node.teachers.local import InProcessTeacher  # noqa: E402

logger = logging.getLogger("bench.iteration_cost")


def milliseconds(action: Callable[[], object], repeats: int) -> float:
    """Median wall-clock ms of ``action`` over ``repeats`` calls, after two warm-up calls."""
    action()
    action()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def part_costs(
    state: trainer.TrainState, teachers: list[InProcessTeacher], config: TrainConfig
) -> dict[str, float]:
    """Median ms of each part of an iteration at the config's batch size."""
    weights = config.loss_weights()
    latent = torch.randn(config.batch_size, config.generator.latent_dim)
    with torch.no_grad():
        images = state.generator(latent)
    cotangent = torch.randn(images.shape[0], teachers[0].info().num_classes)
    teacher = teachers[0]

    def generator_forward() -> None:
        with torch.no_grad():
            state.generator(latent)

    def student_forward_backward() -> None:
        outputs = state.student(images)
        total = sum(logits.sum() for logits in outputs.logits) + sum(
            feature.sum() for feature in outputs.features
        )
        total.backward()  # type: ignore[union-attr]

    return {
        "generator_forward_no_grad": milliseconds(generator_forward, 10),
        "teacher_query_logits_features": milliseconds(
            lambda: teacher.query(images, features=True, bn_loss=False), 10
        ),
        "teacher_query_logits_bn_prior": milliseconds(
            lambda: teacher.query(images, features=False, bn_loss=True), 10
        ),
        "teacher_input_vjp": milliseconds(
            lambda: teacher.input_grad(images, cotangent, weights.bn / len(teachers)), 10
        ),
        "student_forward_backward": milliseconds(student_forward_backward, 10),
        "student_step_3_teachers": milliseconds(
            lambda: trainer.student_step(state, teachers, images, config, weights), 10
        ),
        "generator_step_3_teachers": milliseconds(
            lambda: trainer.generator_step(state, teachers, config, weights), 10
        ),
    }


def iteration_seconds(
    states: dict[str, trainer.TrainState],
    teachers: list[InProcessTeacher],
    config: TrainConfig,
    rounds: int,
    per_round: int = 4,
) -> dict[str, list[float]]:
    """Seconds per iteration of each state, ``rounds`` interleaved rounds of ``per_round``."""
    seconds: dict[str, list[float]] = {name: [] for name in states}
    for state in states.values():  # warm-up
        trainer.run_iteration(state, teachers, config)
    for _ in range(rounds):
        for name, state in states.items():
            started = time.perf_counter()
            for _ in range(per_round):
                trainer.run_iteration(state, teachers, config)
            seconds[name].append((time.perf_counter() - started) / per_round)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--teacher-epochs", type=int, default=6)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    packages = ensure_teachers(args.out / "teachers", homogeneous_jobs(args.teacher_epochs))
    teachers = [InProcessTeacher.from_package(p) for p in packages]
    infos = [t.info() for t in teachers]
    config = TrainConfig.model_validate({**BASE_TRAIN, "method": "cdfkd_mfs"})
    device = torch.device("cpu")

    parts = part_costs(trainer.init_state(config, infos, device), teachers, config)
    logger.info("parts (ms): %s", parts)
    nchw = trainer.init_state(config, infos, device)
    nchw.generator.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    seconds = iteration_seconds(
        {"generator_nhwc": trainer.init_state(config, infos, device), "generator_nchw": nchw},
        teachers,
        config,
        args.rounds,
    )
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    report: dict[str, Any] = {
        "batch_size": config.batch_size,
        "student_steps_per_generator_step": config.student_steps_per_generator_step,
        "threads": torch.get_num_threads(),
        "part_ms": {k: round(v, 2) for k, v in parts.items()},
        "iteration_seconds": {k: [round(v, 4) for v in vs] for k, vs in seconds.items()},
        "iteration_seconds_median": {k: round(v, 4) for k, v in medians.items()},
        "speedup_nhwc_generator": round(medians["generator_nchw"] / medians["generator_nhwc"], 3),
    }
    (args.out / "iteration_cost.json").write_text(json.dumps(report, indent=2) + "\n")
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"\n### Iteration cost, {stamp}\n",
        f"Command: `python bench/iteration_cost.py --out {args.out} --rounds {args.rounds}`; "
        f"CDFKD-MFS, three in-process LeNet-5-BN teachers, batch {config.batch_size}, "
        f"K = {config.student_steps_per_generator_step}, {torch.get_num_threads()} CPU threads. "
        "Median ms of each part (one teacher where it says so):\n",
        "| part | ms |",
        "|---|---|",
        *(f"| {name.replace('_', ' ')} | {value:.1f} |" for name, value in parts.items()),
        "",
        f"Whole iterations, {args.rounds} interleaved rounds of 4: generator weights "
        f"channels-last {medians['generator_nhwc']:.3f} s, NCHW "
        f"{medians['generator_nchw']:.3f} s per iteration (median) -> "
        f"x{report['speedup_nhwc_generator']:.2f}.\n",
    ]
    append_section("\n".join(lines))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
