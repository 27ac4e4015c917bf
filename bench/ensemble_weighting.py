"""Label-skewed owners: the paper's equal ensemble weights against confidence weighting.

    python bench/ensemble_weighting.py --out DIR [--iterations 100] [--seeds 2]
                                       [--teacher-epochs 3] [--temperature 0.1]

Three LeNet-5-BN owners on Dirichlet(0.3) shards of Fashion-MNIST's training split
(bench/quality.py's label-skewed jobs; trained once, cached in DIR/teachers). For each seed, the
same CDFKD-MFS run (bench/privacy.py's demo settings, in-process teachers) with
``ensemble_weighting = "equal"`` and ``"confidence"`` (tau fixed beforehand, not tuned). Nothing
is chosen here: the test split is read once per run, at its end. Writes
DIR/ensemble_weighting.json and appends a table to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.privacy import distill_in_process, train_config  # noqa: E402
from bench.quality import ensure_teachers, homogeneous_jobs  # noqa: E402
from bench.results import append_section  # noqa: E402
from cdfkd.teacher_node.training import Partition  # noqa: E402

WEIGHTINGS = ("equal", "confidence")


def run(
    packages: list[Path], weighting: str, seed: int, iterations: int, tau: float, out: Path
) -> dict[str, Any]:
    train = train_config(
        iterations, seed=seed, ensemble_weighting=weighting, confidence_temperature=tau
    )
    result = distill_in_process(packages, train, out)
    return {
        "weighting": weighting,
        "seed": seed,
        "student_mean": result.student.mean,
        "student_headers": result.student.headers,
        "teachers": result.teachers.teachers,
        "ensemble": result.teachers.ensemble,
        "iterations": result.iterations,
        "train_seconds": round(result.train_seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--teacher-epochs", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=0.1)
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.monotonic()
    args.out = args.out.resolve()
    jobs = homogeneous_jobs(args.teacher_epochs, None, Partition.DIRICHLET)
    packages = ensure_teachers(args.out / "teachers", jobs)
    runs = [
        run(packages, w, seed, args.iterations, args.temperature, args.out / f"{w}-seed{seed}")
        for seed in range(args.seeds)
        for w in WEIGHTINGS
    ]
    summary = {
        w: statistics.fmean(r["student_mean"] for r in runs if r["weighting"] == w)
        for w in WEIGHTINGS
    }
    pairs = [
        c["student_mean"] - e["student_mean"] for e, c in zip(runs[0::2], runs[1::2], strict=True)
    ]
    report = {
        "iterations": args.iterations,
        "seeds": args.seeds,
        "temperature": args.temperature,
        "teacher_epochs": args.teacher_epochs,
        "runs": runs,
        "mean_student": summary,
        "mean_difference_confidence_minus_equal": statistics.fmean(pairs),
        "total_seconds": round(time.monotonic() - started, 1),
    }
    (args.out / "ensemble_weighting.json").write_text(json.dumps(report, indent=2) + "\n")
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"\n### Ensemble weighting on label-skewed owners, {stamp}\n",
        f"Command: `python bench/ensemble_weighting.py {' '.join(sys.argv[1:])}`; three "
        f"LeNet-5-BN owners on Dirichlet(0.3) shards ({args.teacher_epochs} epochs), CDFKD-MFS "
        f"for {args.iterations} iterations (the demo's settings, in-process teachers), tau "
        f"{args.temperature:g} fixed beforehand; mean of headers on the 10,000 test images.\n",
        "| seed | teachers % | ensemble % | equal % | confidence % | difference (points) |",
        "|---|---|---|---|---|---|",
    ]
    for equal, confident in zip(runs[0::2], runs[1::2], strict=True):
        teachers = " / ".join(f"{100 * t:.2f}" for t in equal["teachers"])
        lines.append(
            f"| {equal['seed']} | {teachers} | {100 * equal['ensemble']:.2f} | "
            f"{100 * equal['student_mean']:.2f} | {100 * confident['student_mean']:.2f} | "
            f"{100 * (confident['student_mean'] - equal['student_mean']):+.2f} |"
        )
    append_section("\n".join(lines) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
