"""Ray's cost: the same CDFKD-MFS iterations in a Ray actor and directly in the driver.

    python bench/ray_overhead.py --out DIR [--quick]

Both run the demo's training settings with three in-process LeNet-5-BN teachers and two torch
threads; blocks of iterations alternate between the driver and the actor (so machine noise hits
both), and each block is timed where it runs. Also measures the embedded local Ray's start-up
and shut-down. Writes DIR/ray_overhead.json and appends a table to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import ray
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.remote import TRAIN, make_packages  # noqa: E402
from bench.results import append_section  # noqa: E402
from cdfkd.student_node.teachers.local import InProcessTeacher  # noqa: E402
from cdfkd.student_node.trainer import init_state, run_iteration  # noqa: E402

logger = logging.getLogger("bench.ray_overhead")


class Loop:
    """A training state and its teachers, advanced block by block."""

    def __init__(self, packages: list[str]) -> None:
        torch.set_num_threads(2)
        self.teachers = [InProcessTeacher.from_package(Path(p)) for p in packages]
        self.state = init_state(TRAIN, [t.info() for t in self.teachers], torch.device("cpu"))
        run_iteration(self.state, self.teachers, TRAIN)  # warm-up

    def block(self, iterations: int) -> float:
        """Seconds for ``iterations`` iterations, timed here."""
        started = time.perf_counter()
        for _ in range(iterations):
            run_iteration(self.state, self.teachers, TRAIN)
        return time.perf_counter() - started


RemoteLoop = ray.remote(num_cpus=2)(Loop)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=4, help="per block")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(2)
    rounds, per_block = (2, 2) if args.quick else (args.rounds, args.iterations)
    args.out.mkdir(parents=True, exist_ok=True)
    packages = [str(p) for p in make_packages(args.out / "teachers", 3)]

    started = time.perf_counter()
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        logging_level=logging.WARNING,
    )
    startup = time.perf_counter() - started
    results: dict[str, Any] = {"ray_startup_s": round(startup, 2)}
    try:
        started = time.perf_counter()
        actor: Any = RemoteLoop.remote(packages)  # type: ignore[attr-defined]
        ray.get(actor.block.remote(0))
        results["actor_startup_s"] = round(time.perf_counter() - started, 2)
        local = Loop(packages)
        driver_seconds = worker_seconds = worker_round_trip = 0.0
        for index in range(rounds):
            driver_seconds += local.block(per_block)
            sent = time.perf_counter()
            worker_seconds += float(ray.get(actor.block.remote(per_block)))
            worker_round_trip += time.perf_counter() - sent
            logger.info(
                "round %d: driver %.1f s, worker %.1f s", index + 1, driver_seconds, worker_seconds
            )
        measured = rounds * per_block
        results.update(
            iterations_each=measured,
            driver_it_per_s=round(measured / driver_seconds, 4),
            worker_it_per_s=round(measured / worker_seconds, 4),
            worker_it_per_s_with_round_trips=round(measured / worker_round_trip, 4),
        )
        results["ratio"] = round(results["worker_it_per_s"] / results["driver_it_per_s"], 4)
        results["ratio_with_round_trips"] = round(
            results["worker_it_per_s_with_round_trips"] / results["driver_it_per_s"], 4
        )
    finally:
        started = time.perf_counter()
        ray.shutdown()
        results["ray_shutdown_s"] = round(time.perf_counter() - started, 2)

    (args.out / "ray_overhead.json").write_text(json.dumps(results, indent=2) + "\n")
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = f"python bench/ray_overhead.py --out {args.out}{' --quick' if args.quick else ''}"
    rows = [
        ("driver process", results["driver_it_per_s"], 1.0),
        ("Ray actor (timed in the actor)", results["worker_it_per_s"], results["ratio"]),
        (
            "Ray actor (timed at the driver, with round trips)",
            results["worker_it_per_s_with_round_trips"],
            results["ratio_with_round_trips"],
        ),
    ]
    lines = [
        f"\n### Ray overhead, {stamp}\n",
        f"Command: `{command}`; {rounds} alternating rounds of {per_block} iterations (batch "
        f"{TRAIN.batch_size}, K = 5, 3 in-process LeNet-5-BN teachers, 2 torch threads), "
        "embedded local Ray with 2 CPUs.\n",
        "| where | it/s | ratio to driver |",
        "|---|---|---|",
        *[f"| {where} | {speed:.3f} | {ratio:.3f} |" for where, speed, ratio in rows],
        "",
        f"Ray start-up {results['ray_startup_s']:.1f} s, actor start-up "
        f"{results['actor_startup_s']:.1f} s, shut-down {results['ray_shutdown_s']:.1f} s.\n",
    ]
    table = "\n".join(lines)
    append_section(table)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
