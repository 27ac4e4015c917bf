"""Quality benchmark: every method gets the same wall-clock budget on the same machine.

    python bench/quality.py --out DIR [--budget-min M] [--quick] [--reuse]
        [--train JSON] [--decay-at FRACTION ...] [--schedule step|cosine]

Three LeNet-5-BN teachers on disjoint thirds of Fashion-MNIST (cached in DIR/teachers); each
method trains from scratch for the budget and is evaluated on the full test split. Writes
DIR/quality.json and appends a table to bench/RESULTS.md, with a second table for a
heterogeneous federation (LeNet-5-BN + two different ResNets) unless --no-hetero.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import math
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Literal

import torch

from cdfkd.coordinator.config import (
    DataConfig,
    PackageTeacher,
    RunConfig,
    RunSettings,
    dump_run_config,
)
from cdfkd.coordinator.training_run import run_training
from cdfkd.student_node.config import Method, TrainConfig
from cdfkd.teacher_node.datasets import DatasetName
from cdfkd.teacher_node.package import read_metadata
from cdfkd.teacher_node.training import TeacherJob, train_teacher_package

logger = logging.getLogger("bench.quality")
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"

#: Tuned for 2 CPU cores and a budget of minutes (see bench/RESULTS.md for the reasoning).
BASE_TRAIN: dict[str, Any] = {
    "batch_size": 128,
    "iterations_per_epoch": 25,
    "generator": {"latent_dim": 256, "width": 8},
    "attention": {"samples": 60},
}
#: Learning rates drop x0.1 at these fractions of the budget (METHOD.md: epochs 100, 200 of 300).
MILESTONE_FRACTIONS = (2 / 3,)


def homogeneous_jobs(epochs: int) -> list[TeacherJob]:
    return [
        TeacherJob(name=f"lenet-{i + 1}", shard=i, num_shards=3, epochs=epochs, seed=i)
        for i in range(3)
    ]


def heterogeneous_jobs(epochs: int) -> list[TeacherJob]:
    return [
        TeacherJob(name="lenet-1", shard=0, num_shards=3, epochs=epochs, seed=0),
        TeacherJob(
            name="resnet8-w8",
            architecture="resnet",
            depth=1,
            width=8,
            shard=1,
            num_shards=3,
            epochs=epochs,
            seed=1,
        ),
        TeacherJob(
            name="resnet14-w6",
            architecture="resnet",
            depth=2,
            width=6,
            shard=2,
            num_shards=3,
            epochs=epochs,
            seed=2,
        ),
    ]


def ensure_teachers(root: Path, jobs: list[TeacherJob]) -> list[Path]:
    packages = []
    for job in jobs:
        directory = root / job.name
        if not (directory / "teacher.json").exists():
            train_teacher_package(job, directory)
        packages.append(directory)
    return packages


class WallClockSchedule:
    """Multiplies both learning rates by ``gamma`` once ``fraction`` of the budget has elapsed.

    A budget in seconds on a shared, noisy machine does not map to a fixed iteration count, so
    the benchmark decays by elapsed time (METHOD.md decays at epochs 100 and 200 of 300).
    """

    def __init__(self, budget_s: float, fractions: tuple[float, ...], gamma: float = 0.1) -> None:
        self.started = time.monotonic()
        self.pending = sorted(f * budget_s for f in fractions)
        self.gamma = gamma
        self.decayed_at: list[int] = []

    def __call__(self, state, metrics) -> None:  # noqa: D102 - a TrainCallback
        while self.pending and time.monotonic() - self.started >= self.pending[0]:
            self.pending.pop(0)
            for optimizer in (state.student_optimizer, state.generator_optimizer):
                for group in optimizer.param_groups:
                    group["lr"] *= self.gamma
            self.decayed_at.append(metrics.iteration)


class WallClockCosine:
    """Sets both learning rates to ``base * (floor + (1 - floor) * (1 + cos(pi t / T)) / 2)``.

    t is the elapsed and T the budgeted wall-clock time, so the rates reach ``floor * base`` as
    the budget runs out, whatever the iteration count turns out to be.
    """

    def __init__(self, budget_s: float, floor: float = 0.01) -> None:
        self.started = time.monotonic()
        self.budget_s = budget_s
        self.floor = floor
        self.base: dict[int, float] = {}
        self.decayed_at: list[int] = []  # no steps: the rates change every iteration

    def __call__(self, state, metrics) -> None:  # noqa: D102 - a TrainCallback
        progress = min(1.0, (time.monotonic() - self.started) / self.budget_s)
        factor = self.floor + (1 - self.floor) * (1 + math.cos(math.pi * progress)) / 2
        for optimizer in (state.student_optimizer, state.generator_optimizer):
            for group in optimizer.param_groups:
                base = self.base.setdefault(id(group), group["lr"])
                group["lr"] = base * factor


def reused_run(run_dir: Path, config: RunConfig) -> dict[str, Any] | None:
    """A finished run's figures from its `result.json`, if it ran its whole budget with ``config``.

    The schedule is a callback, not part of the config: ``--reuse`` trusts the caller there.
    """
    path = run_dir / "result.json"
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if saved["train_seconds"] < 0.98 * (config.run.max_seconds or 0.0):
        return None
    ran = json.loads((run_dir / "config.json").read_text())["train"]
    if ran != json.loads(dump_run_config(config))["train"]:
        logger.info("%s: not reusing %s, it ran other settings", saved["method"], run_dir)
        return None
    logger.info("%s: reusing the finished run in %s", saved["method"], run_dir)
    return {
        "mean": saved["student_accuracy_mean"],
        "attention": saved["student_accuracy_attention"],
        "headers": saved["student_header_accuracies"],
        "iterations": saved["iterations"],
        "decayed_at_iteration": None,
        "seconds_per_iteration": round(saved["train_seconds"] / max(1, saved["iterations"]), 3),
        "train_seconds": saved["train_seconds"],
        "student_parameters": saved["student_parameters"],
        "teachers": saved["teacher_accuracies"],
        "teacher_ensemble": saved["teacher_ensemble_accuracy"],
        "reused": True,
    }


def _merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        both_tables = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merged(merged[key], value) if both_tables else value
    return merged


@dataclasses.dataclass(frozen=True)
class Plan:
    """How every method of one federation runs."""

    budget_s: float
    reuse: bool = False
    #: Merged into ``BASE_TRAIN`` for every method (``--train``).
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    fractions: tuple[float, ...] = MILESTONE_FRACTIONS
    #: "step" (x0.1 at ``fractions``) or "cosine" (over the budget).
    schedule: Literal["step", "cosine"] = "step"

    def settings(self) -> dict[str, Any]:
        """The training settings every method shares: ``BASE_TRAIN`` with the overrides."""
        return _merged(BASE_TRAIN, self.overrides)

    def learning_rates(self) -> str:
        """How the learning rates move over a budget, in words."""
        if self.schedule == "cosine":
            return "cosine over each budget"
        return f"x0.1 at {', '.join(f'{f:.3g}' for f in self.fractions)} of each budget"

    def new_schedule(self) -> WallClockSchedule | WallClockCosine:
        """A fresh wall-clock schedule callback for one run (it starts its clock now)."""
        if self.schedule == "cosine":
            return WallClockCosine(self.budget_s)
        return WallClockSchedule(self.budget_s, self.fractions)


def run_method(method: Method, packages: list[Path], out: Path, plan: Plan) -> dict[str, Any]:
    budget_s = plan.budget_s
    fixed = {"method": method, "epochs": 100_000, "optimizer": {"milestones": [100_000]}}
    train = TrainConfig.model_validate(_merged(plan.settings(), fixed))
    config = RunConfig(
        data=DataConfig(dataset=DatasetName.FASHION_MNIST),
        teachers=tuple(PackageTeacher(package=p) for p in packages),
        train=train,
        run=RunSettings(
            device="cpu", max_seconds=budget_s, checkpoint_every=10**6, eval_every=50, log_every=50
        ),
    )
    if plan.reuse and (saved := reused_run(out / method.value, config)) is not None:
        return saved
    logger.info("%s: %.0f s, learning rates %s", method.value, budget_s, plan.learning_rates())
    schedule = plan.new_schedule()
    result = run_training(config, out / method.value, callbacks=[schedule])
    return {
        "mean": result.student.mean,
        "attention": result.student.attention,
        "headers": result.student.headers,
        "iterations": result.iterations,
        "decayed_at_iteration": schedule.decayed_at,
        "seconds_per_iteration": round(result.train_seconds / max(1, result.iterations), 3),
        "train_seconds": round(result.train_seconds, 1),
        "student_parameters": result.student_parameters,
        "teachers": result.teachers.teachers,
        "teacher_ensemble": result.teachers.ensemble,
    }


def federation(
    name: str,
    jobs: list[TeacherJob],
    methods: list[Method],
    out: Path,
    plan: Plan,
) -> dict[str, Any]:
    packages = ensure_teachers(out / "teachers", jobs)
    runs = {m.value: run_method(m, packages, out / name, plan) for m in methods}
    any_run = next(iter(runs.values()))
    summary: dict[str, Any] = {
        "teachers": any_run["teachers"],
        "teacher_names": [read_metadata(p).name for p in packages],
        "teacher_ensemble": any_run["teacher_ensemble"],
        "budget_s": plan.budget_s,
        "methods": {},
        "runs": runs,
    }
    for method, run in runs.items():
        if method == Method.CDFKD_MFS.value:
            summary["methods"]["cdfkd_mfs_mean"] = run["mean"]
            summary["methods"]["cdfkd_mfs_attention"] = run["attention"]
        else:
            summary["methods"][method] = run["mean"]
    return summary


def _row(label: str, value: float | None, run: dict[str, Any] | None) -> str:
    accuracy = "n/a" if value is None else f"{100 * value:.2f}"
    if run is None:
        return f"| {label} | {accuracy} | | | |"
    return (
        f"| {label} | {accuracy} | {run['iterations']} | {run['seconds_per_iteration']:.2f} "
        f"| {run['student_parameters']:,} |"
    )


def markdown(title: str, summary: dict[str, Any]) -> str:
    runs = summary["runs"]
    teachers = ", ".join(
        f"{n} {100 * a:.2f}"
        for n, a in zip(summary["teacher_names"], summary["teachers"], strict=True)
    )
    lines = [
        f"#### {title}",
        "",
        f"Teachers (test accuracy %): {teachers}; mean-logit ensemble "
        f"{100 * summary['teacher_ensemble']:.2f}. "
        f"Budget {summary['budget_s'] / 60:.1f} min per method.",
        "",
        "| method | test accuracy % | iterations | s / iteration | student parameters |",
        "|---|---|---|---|---|",
    ]
    methods = summary["methods"]
    for key, label in (
        ("kd_real", "KD on real data (upper bound)"),
        ("dfad", "DFAD (mean teacher, single head)"),
        ("cdfkd", "CDFKD (ICME'21, simple multi-header)"),
    ):
        if key in methods:
            lines.append(_row(label, methods[key], runs[key]))
    if "cdfkd_mfs_mean" in methods:
        lines.append(
            _row("CDFKD-MFS, mean of headers", methods["cdfkd_mfs_mean"], runs["cdfkd_mfs"])
        )
        lines.append(_row("CDFKD-MFS, attention (k = 60)", methods["cdfkd_mfs_attention"], None))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--budget-min", type=float, default=15.0)
    parser.add_argument("--quick", action="store_true", help="1 min per method, no hetero table")
    parser.add_argument("--no-hetero", action="store_true")
    parser.add_argument("--hetero-budget-min", type=float, help="default: --budget-min")
    parser.add_argument("--methods", nargs="+", default=[m.value for m in Method])
    parser.add_argument("--teacher-epochs", type=int, default=6)
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="keep runs under --out that ran their whole budget (resume a bench)",
    )
    parser.add_argument(
        "--train",
        type=json.loads,
        default={},
        metavar="JSON",
        help="TrainConfig values merged over the bench defaults, e.g. '{\"batch_size\": 64}'",
    )
    parser.add_argument(
        "--decay-at",
        type=float,
        nargs="+",
        default=list(MILESTONE_FRACTIONS),
        metavar="FRACTION",
        help="fractions of the budget where both learning rates drop x0.1",
    )
    parser.add_argument(
        "--schedule",
        choices=["step", "cosine"],
        default="step",
        help="step: x0.1 at --decay-at; cosine: cosine decay over each budget",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(2)
    budget = 60.0 if args.quick else args.budget_min * 60
    methods = [Method(m) for m in args.methods]
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    plan = Plan(budget, args.reuse, args.train, tuple(args.decay_at), args.schedule)
    result = federation(
        "homogeneous", homogeneous_jobs(args.teacher_epochs), methods, args.out, plan
    )
    report = {**{k: v for k, v in result.items() if k != "teacher_names"}}
    tables = [markdown("Three LeNet-5-BN teachers on disjoint thirds of Fashion-MNIST", result)]
    if not (args.quick or args.no_hetero):
        hetero_budget = (args.hetero_budget_min or args.budget_min) * 60
        hetero = federation(
            "heterogeneous",
            heterogeneous_jobs(args.teacher_epochs),
            methods,
            args.out,
            dataclasses.replace(plan, budget_s=hetero_budget),
        )
        report["heterogeneous"] = hetero
        tables.append(
            markdown("Heterogeneous: LeNet-5-BN + ResNet-8 (w8) + ResNet-14 (w6)", hetero)
        )
    report["machine"] = {
        "processor": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    report["settings"] = plan.settings()
    report["schedule"] = {"kind": plan.schedule, "decay_at": list(plan.fractions)}
    report["total_seconds"] = round(time.monotonic() - started, 1)
    (args.out / "quality.json").write_text(json.dumps(report, indent=2) + "\n")
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    header = (
        f"\n### Quality, {stamp}\n\nCommand: `python bench/quality.py {shlex.join(sys.argv[1:])}`; "
        f"{torch.get_num_threads()} CPU threads, device cpu. Learning rates "
        f"{plan.learning_rates()}; settings: `{json.dumps(plan.settings())}`.\n\n"
    )
    with RESULTS.open("a") as handle:
        handle.write(header + "\n".join(tables))
    print(json.dumps(report["methods"], indent=2))


if __name__ == "__main__":
    main()
