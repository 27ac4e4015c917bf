"""Label-skewed owners: the paper's equal ensemble weights against confidence weighting.

    python bench/ensemble_weighting.py --out DIR [--iterations 100 | --minutes M] [--seeds 2]
                                       [--federation lenet|heterogeneous]
                                       [--weightings equal confidence]
                                       [--teacher-epochs 3] [--temperature 0.1]

Three owners on Dirichlet(0.3) shards of Fashion-MNIST's training split (bench/quality.py's
label-skewed jobs; trained once, cached in DIR/teachers): three LeNet-5-BN (``lenet``) or
LeNet-5-BN, ResNet-8 (w8) and ResNet-14 (w6) (``heterogeneous``). For each seed, the same
CDFKD-MFS run (bench/privacy.py's demo settings, in-process teachers) with each
``ensemble_weighting`` asked for (tau fixed beforehand, not tuned).

Two readings of the student: the mean of its headers, and the attention aggregate of METHOD.md
section 3 (trained on k = 60 class-balanced labelled training samples, as every ``cdfkd`` run
trains it). The ensemble is the mean of the teachers' logits, which reads no labelled sample;
so the table also gives the teachers' ensemble weighted by the same attention trained on the
same k samples (teachers frozen): the fair reference for the student's attention aggregate.

The budget is ``--iterations``, or ``--minutes`` of wall-clock on this machine: then each run is
bounded by that many seconds (``run.max_seconds``) and its learning-rate schedule is planned for
90 % of the iterations a short calibration of that run's settings predicts (as in
bench/federation_cost.py), so the clock does not cut it off before its decay. Nothing is chosen
here: the test split is read once per run, at its end. Writes DIR/ensemble_weighting.json and
appends a table to bench/RESULTS.md.
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

from bench.federation_cost import PLANNING_MARGIN, timed_iterations  # noqa: E402
from bench.privacy import distill_in_process, train_config  # noqa: E402
from bench.quality import ensure_teachers, heterogeneous_jobs, homogeneous_jobs  # noqa: E402
from bench.results import append_section  # noqa: E402
from cdfkd.student_node.evaluate import teacher_logits  # noqa: E402
from cdfkd.student_node.models.aggregator import (  # noqa: E402
    AttentionConfig,
    new_aggregator,
    train_attention,
)
from cdfkd.student_node.teachers.local import InProcessTeacher  # noqa: E402
from cdfkd.teacher_node.datasets import DatasetName, Split, load_dataset, stratified_sample  # noqa: E402
from cdfkd.teacher_node.metrics import accuracy  # noqa: E402
from cdfkd.teacher_node.training import Partition  # noqa: E402

WEIGHTINGS = ("equal", "confidence")
FEDERATIONS = {
    "lenet": ("three LeNet-5-BN", homogeneous_jobs),
    "heterogeneous": ("LeNet-5-BN, ResNet-8 (w8) and ResNet-14 (w6)", heterogeneous_jobs),
}


def run(
    packages: list[Path],
    weighting: str,
    seed: int,
    budget: dict[str, float],
    tau: float,
    out: Path,
) -> dict[str, Any]:
    """One run: ``budget`` is ``{"iterations": N}`` or ``{"seconds": S, "calibration": C}``."""
    settings = {"seed": seed, "ensemble_weighting": weighting, "confidence_temperature": tau}
    seconds = budget.get("seconds")
    per_iteration = None
    if seconds is None:
        iterations = int(budget["iterations"])
    else:
        probe = train_config(10**4, **settings)
        teachers = [InProcessTeacher.from_package(p, torch.device("cpu")) for p in packages]
        per_iteration = timed_iterations(teachers, probe, int(budget["calibration"])).seconds
        iterations = max(3, int(PLANNING_MARGIN * seconds / per_iteration))
    result = distill_in_process(packages, train_config(iterations, **settings), out, seconds)
    return {
        "weighting": weighting,
        "seed": seed,
        "student_mean": result.student.mean,
        "student_attention": result.student.attention,
        "student_headers": result.student.headers,
        "teachers": result.teachers.teachers,
        "ensemble": result.teachers.ensemble,
        "iterations": result.iterations,
        "planned_iterations": iterations,
        "calibrated_seconds_per_iteration": per_iteration,
        "ended_by": result.ended_by["reason"],
        "train_seconds": round(result.train_seconds, 1),
    }


def teacher_attention(
    packages: list[Path], seeds: list[int], dataset: DatasetName = DatasetName.FASHION_MNIST
) -> dict[int, float]:
    """Per seed, the test accuracy of the teachers' ensemble weighted by attention (METHOD.md 3).

    Trained as a run trains the student's (``AttentionConfig()``: the same k class-balanced
    training samples for the seed, the same initial scorer and batch order), teachers frozen.
    """
    config = AttentionConfig()
    train = load_dataset(dataset, Split.TRAIN)
    test = load_dataset(dataset, Split.TEST)
    teachers = [InProcessTeacher.from_package(p, torch.device("cpu")) for p in packages]

    def logits(pixels: torch.Tensor) -> torch.Tensor:
        return torch.stack([teacher_logits(t, pixels) for t in teachers])

    test_logits = logits(test.images)
    accuracies = {}
    for seed in seeds:
        chosen = stratified_sample(train.labels, config.samples, seed=seed)
        aggregator = new_aggregator(train.num_classes, seed)
        train_attention(
            aggregator,
            logits(train.images[chosen]),
            train.labels[chosen],
            config,
            torch.Generator().manual_seed(seed),
        )
        aggregator.eval()
        with torch.no_grad():
            accuracies[seed] = accuracy(aggregator(test_logits), test.labels)
    return accuracies


def budget_of(args: argparse.Namespace) -> dict[str, float]:
    if args.minutes is None:
        return {"iterations": args.iterations}
    return {"seconds": 60.0 * args.minutes, "calibration": args.calibration_iterations}


def _spread(values: list[float]) -> float:
    return statistics.pstdev(values) if len(values) > 1 else 0.0


def _mean_and_spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": _spread(values)}


def summarise(runs: list[dict[str, Any]], weightings: list[str]) -> dict[str, Any]:
    """Per weighting, the student's mean and std over seeds and its gap to the ensemble.

    With both weightings, also the mean paired (same seed) difference confidence - equal.
    """
    student = {w: [r["student_mean"] for r in runs if r["weighting"] == w] for w in weightings}
    gap = {
        w: [r["student_mean"] - r["ensemble"] for r in runs if r["weighting"] == w]
        for w in weightings
    }
    summary: dict[str, Any] = {
        "mean_student": {w: statistics.fmean(v) for w, v in student.items()},
        "std_student": {w: _spread(v) for w, v in student.items()},
        "gap_to_ensemble": {w: _mean_and_spread(v) for w, v in gap.items()},
    }
    if all(r.get("student_attention") is not None for r in runs):
        summary["student_attention"] = {
            w: _mean_and_spread([r["student_attention"] for r in runs if r["weighting"] == w])
            for w in weightings
        }
        summary["attention_gap_to_ensemble"] = {
            w: _mean_and_spread(
                [r["student_attention"] - r["ensemble"] for r in runs if r["weighting"] == w]
            )
            for w in weightings
        }
    if all(r.get("teacher_attention") is not None for r in runs):
        first_of_seed = {r["seed"]: r["teacher_attention"] for r in runs}
        summary["teacher_attention"] = _mean_and_spread(list(first_of_seed.values()))
    if set(weightings) == set(WEIGHTINGS):  # runs are seed-major, so the lists pair by seed
        summary["mean_difference_confidence_minus_equal"] = statistics.fmean(
            c - e for e, c in zip(student["equal"], student["confidence"], strict=True)
        )
    return summary


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def markdown(args: argparse.Namespace, report: dict[str, Any]) -> str:
    runs = report["runs"]
    owners = FEDERATIONS[args.federation][0]
    budget = (
        f"for {args.iterations} iterations"
        if args.minutes is None
        else f"for {args.minutes:g} minutes of wall-clock each (schedule planned from a "
        f"{args.calibration_iterations}-iteration calibration)"
    )
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    weightings = args.weightings
    lines = [
        f"\n### Ensemble weighting on label-skewed owners, {stamp}\n",
        f"Command: `python bench/ensemble_weighting.py {' '.join(sys.argv[1:])}`; {owners} "
        f"owners on Dirichlet(0.3) shards ({args.teacher_epochs} epochs), CDFKD-MFS {budget} "
        f"(the demo's settings, in-process teachers, 2 threads), tau {args.temperature:g} fixed "
        "beforehand; the 10,000 test images read once per run. A student cell is the mean of "
        "headers / the attention aggregate (k = 60 labelled training samples); the teachers' "
        "attention is their ensemble weighted by the same attention on the same samples.\n",
        "| seed | teachers % | ensemble % | teachers' attention % | "
        + " | ".join(f"{w}: headers / attention % (iterations)" for w in weightings)
        + " | headers - ensemble (points) |",
        "|---|---|---|---|" + "---|" * len(weightings) + "---|",
    ]
    by_seed: dict[int, list[dict[str, Any]]] = {}
    for r in runs:
        by_seed.setdefault(r["seed"], []).append(r)
    for seed, cells in by_seed.items():
        first = cells[0]
        teachers = " / ".join(f"{100 * t:.2f}" for t in first["teachers"])
        students = " | ".join(
            f"{100 * c['student_mean']:.2f} / {_pct(c.get('student_attention'))} "
            f"({c['iterations']}"
            + ("" if c["ended_by"] == "completed" else f", stopped by {c['ended_by']}")
            + ")"
            for c in cells
        )
        gaps = " / ".join(f"{100 * (c['student_mean'] - c['ensemble']):+.2f}" for c in cells)
        lines.append(
            f"| {seed} | {teachers} | {100 * first['ensemble']:.2f} | "
            f"{_pct(first.get('teacher_attention'))} | {students} | {gaps} |"
        )
    for w, gap in report["gap_to_ensemble"].items():
        lines.append(
            f"\n{w}: student {100 * report['mean_student'][w]:.2f} ± "
            f"{100 * report['std_student'][w]:.2f} %, {100 * gap['mean']:+.2f} ± "
            f"{100 * gap['std']:.2f} points from the ensemble over {args.seeds} seed(s)."
        )
        if "student_attention" in report:
            attention = report["student_attention"][w]
            attention_gap = report["attention_gap_to_ensemble"][w]
            lines.append(
                f"{w}: attention aggregate {100 * attention['mean']:.2f} ± "
                f"{100 * attention['std']:.2f} %, {100 * attention_gap['mean']:+.2f} ± "
                f"{100 * attention_gap['std']:.2f} points from the ensemble."
            )
    if "teacher_attention" in report:
        reference = report["teacher_attention"]
        lines.append(
            f"\nTeachers' ensemble weighted by attention on the same samples: "
            f"{100 * reference['mean']:.2f} ± {100 * reference['std']:.2f} %."
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument(
        "--minutes", type=float, default=None, help="a wall-clock budget (replaces --iterations)"
    )
    parser.add_argument("--calibration-iterations", type=int, default=6)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--federation", choices=list(FEDERATIONS), default="lenet")
    parser.add_argument("--weightings", nargs="+", choices=WEIGHTINGS, default=list(WEIGHTINGS))
    parser.add_argument("--teacher-epochs", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=0.1)
    args = parser.parse_args()
    if args.minutes is not None and args.minutes <= 0:
        parser.error("--minutes must be positive")
    args.weightings = list(dict.fromkeys(args.weightings))  # each once: one folder per run
    torch.set_num_threads(2)
    started = time.monotonic()
    args.out = args.out.resolve()
    jobs = FEDERATIONS[args.federation][1](args.teacher_epochs, None, Partition.DIRICHLET)
    packages = ensure_teachers(args.out / "teachers", jobs)
    budget = budget_of(args)
    references = teacher_attention(packages, list(range(args.seeds)))
    runs = [
        {
            **run(packages, w, seed, budget, args.temperature, args.out / f"{w}-seed{seed}"),
            "teacher_attention": references[seed],
        }
        for seed in range(args.seeds)
        for w in args.weightings
    ]

    report: dict[str, Any] = {
        "federation": args.federation,
        "budget": budget,
        "seeds": args.seeds,
        "temperature": args.temperature,
        "teacher_epochs": args.teacher_epochs,
        "runs": runs,
        **summarise(runs, args.weightings),
    }
    report["total_seconds"] = round(time.monotonic() - started, 1)
    (args.out / "ensemble_weighting.json").write_text(json.dumps(report, indent=2) + "\n")
    append_section(markdown(args, report))
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
