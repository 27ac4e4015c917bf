"""Quality benchmark: objective x student cells, tuned on a validation split, several seeds.

    python bench/quality.py --out DIR [--quick] [--reuse] [--seeds N] [--iterations I]
        [--tune-iterations I] [--validation-samples N] [--federations NAME ...] [--cells NAME ...]
        [--parallel N] [--threads N] [--ledger DIR] [--teachers DIR]

Protocol (``bench/quality_protocol.py`` holds its pure parts):

1. Data. ``--validation-samples`` images (seed 18) are held out of Fashion-MNIST's training split
   *first*; the owners' data are the rest (``DIR/data/owners``), cut into three shards for the
   teachers (disjoint thirds, or Dirichlet(0.3) label-skewed shards). Tuning runs are scored on
   the held-out images (``DIR/data/validation``); the test split (``DIR/data/final``) is read
   once per finished final run and never for a choice.
2. Federations: ``homogeneous`` (three LeNet-5-BN on IID thirds), ``heterogeneous``
   (LeNet-5-BN, ResNet-8 w8, ResNet-14 w6), ``label_skewed`` (three LeNet-5-BN on Dirichlet
   shards, alpha 0.3, seed 0). Teachers are cached in ``DIR/teachers`` by their job's hash.
3. Cells (per federation): ``{cdfkd_mfs, cdfkd} x {mfs, simple_multi_header}``, ``dfad`` on
   the single head and on a single head of the MFS student's inference size, ``kd_real`` on
   both multi-header families.
4. Tuning: every cell runs the same grid (student lr, generator lr, BN-prior weight, the
   generator's output layer; DFAD also its authors' recipes) for ``--tune-iterations``, one
   Ray Tune trial per point (local Ray, one trial at a time); the best validation accuracy
   wins.
5. Final: the winner runs ``--iterations`` for each of ``--seeds`` seeds; accuracy on the test
   split, mean and standard deviation over seeds.

Budgets are iterations (K = 5 student steps and one generator step each; kd_real's K steps
read real batches), so every method sends the teachers the same number of query batches, and
a loaded machine changes the seconds, not the result. ``--reuse`` keeps every finished run
(same settings, same budget) under ``--out``, and reads the committed ledger
(``bench/quality_ledger``, :mod:`bench.quality_ledger`): every finished run leaves a record
there, keyed by its settings, split and the sha256 of its teachers' weights, so the protocol
(about a day of 2 cores) adds up over sessions on different machines. The protocol's teachers
are committed too (``bench/quality_teachers``, a few hundred kB each), so every session
distills from the same weights. ``--parallel`` runs (default 2, ``--threads`` 1 each) go at
once: trials through Ray Tune, final seeds as Ray tasks. ``--quick`` keeps no ledger. Writes
``DIR/quality.json`` and appends the tables to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import logging
import multiprocessing
import os
import platform
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.quality_ledger import LEDGER, read_record, record_path, run_key, write_record  # noqa: E402
from bench.quality_protocol import (  # noqa: E402
    BASE_TRAIN,
    DECAY_AT,
    QUICK_GRID,
    Budget,
    Cell,
    Grid,
    Setting,
    build_cells,
    cell_record,
    check_report,
    digest,
    markdown_federation,
    matched_widths,
    methods_summary,
    settings_for,
    student_parameters,
    train_settings,
)
from bench.results import append_section  # noqa: E402
from cdfkd.coordinator.config import DataConfig, PackageTeacher, RunConfig, RunSettings  # noqa: E402
from cdfkd.coordinator.training_run import run_training  # noqa: E402
from cdfkd.student_node.config import StudentKind, TrainConfig  # noqa: E402
from cdfkd.teacher_node.datasets import Split, load_fashion_mnist  # noqa: E402
from cdfkd.teacher_node.package import read_metadata  # noqa: E402
from cdfkd.teacher_node.training import Partition, TeacherJob, train_teacher_package  # noqa: E402

logger = logging.getLogger("bench.quality")
VALIDATION_SEED = 18
DIRICHLET_ALPHA = 0.3
FEDERATIONS = ("homogeneous", "heterogeneous", "label_skewed")
#: The protocol's teachers, committed beside the ledger (bench/quality_ledger.py).
PROTOCOL_TEACHERS = ROOT / "bench" / "quality_teachers"
TITLES = {
    "homogeneous": "Homogeneous: three LeNet-5-BN teachers on disjoint IID thirds",
    "heterogeneous": "Heterogeneous: LeNet-5-BN + ResNet-8 (w8) + ResNet-14 (w6), IID thirds",
    "label_skewed": f"Label-skewed: three LeNet-5-BN on Dirichlet({DIRICHLET_ALPHA}) shards",
}


# Teachers ------------------------------------------------------------------------------------


def homogeneous_jobs(
    epochs: int, data: Path | None = None, partition: Partition = Partition.IID
) -> list[TeacherJob]:
    """Three LeNet-5-BN owners (``data``: their files; None: all of Fashion-MNIST's train)."""
    return [
        TeacherJob(
            name=f"lenet-{i + 1}",
            data=data,
            shard=i,
            num_shards=3,
            partition=partition,
            alpha=DIRICHLET_ALPHA,
            epochs=epochs,
            seed=i,
        )
        for i in range(3)
    ]


def heterogeneous_jobs(
    epochs: int, data: Path | None = None, partition: Partition = Partition.IID
) -> list[TeacherJob]:
    """LeNet-5-BN, ResNet-8 (w8), ResNet-14 (w6) on thirds (IID, or Dirichlet-skewed)."""
    common: dict[str, Any] = {"data": data, "num_shards": 3, "epochs": epochs}
    if partition is not Partition.IID:  # the IID jobs (and their cache keys) stay as they were
        common |= {"partition": partition, "alpha": DIRICHLET_ALPHA}
    return [
        TeacherJob(name="lenet-1", shard=0, seed=0, **common),
        TeacherJob(
            name="resnet8-w8", architecture="resnet", depth=1, width=8, shard=1, seed=1, **common
        ),
        TeacherJob(
            name="resnet14-w6", architecture="resnet", depth=2, width=6, shard=2, seed=2, **common
        ),
    ]


def federation_jobs(name: str, epochs: int, data: Path) -> list[TeacherJob]:
    """The teacher jobs of federation ``name`` on the owners' files ``data``."""
    match name:
        case "homogeneous":
            return homogeneous_jobs(epochs, data)
        case "heterogeneous":
            return heterogeneous_jobs(epochs, data)
        case "label_skewed":
            return homogeneous_jobs(epochs, data, Partition.DIRICHLET)
    raise ValueError(f"unknown federation {name!r}")


def keyed_directories(root: Path, jobs: list[TeacherJob]) -> list[Path]:
    """Where :func:`ensure_teachers` keeps ``jobs`` with ``keyed``: named by the job's hash."""
    return [root / f"{job.name}-{digest(job.model_dump(mode='json'))}" for job in jobs]


def _train_one(job: TeacherJob, directory: Path) -> None:
    """Worker process of :func:`ensure_teachers`: train one package with one thread."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    train_teacher_package(job, directory)


def protocol_teacher_directories(
    root: Path, jobs: list[TeacherJob], split: dict[str, Any]
) -> list[Path]:
    """Where the protocol keeps ``jobs``' teachers: committed, named by job and split, not path.

    The ledger's records name their teachers by the sha256 of their weights, so every session
    (on any machine) must distill from these very files rather than retrain its own.
    """
    dumps = [job.model_dump(mode="json", exclude={"data"}) for job in jobs]
    keys = [digest({**dump, "split": split}) for dump in dumps]
    return [root / f"{job.name}-{key}" for job, key in zip(jobs, keys, strict=True)]


def ensure_teachers(
    root: Path,
    jobs: list[TeacherJob],
    keyed: bool = False,
    workers: int = 1,
    directories: list[Path] | None = None,
) -> list[Path]:
    """Train the jobs' teachers unless cached; ``keyed``: folders named by the job's hash.

    ``workers`` > 1: the missing ones train in that many spawned processes, one thread each.
    ``directories``: these folders, one per job, instead of folders under ``root``.
    """
    if directories is None:
        directories = keyed_directories(root, jobs) if keyed else [root / job.name for job in jobs]
    missing = [
        (job, directory)
        for job, directory in zip(jobs, directories, strict=True)
        if not (directory / "teacher.json").exists()
    ]
    if workers > 1 and len(missing) > 1:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            for future in [pool.submit(_train_one, job, d) for job, d in missing]:
                future.result()
    else:
        for job, directory in missing:
            train_teacher_package(job, directory)
    return directories


# Data ----------------------------------------------------------------------------------------


def _write_npz(path: Path, images: torch.Tensor, labels: torch.Tensor) -> None:
    """[0, 1] float images (N, C, H, W) as the uint8 (N, H, W, C) ``.npz`` the readers take."""
    pixels = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, images=pixels, labels=labels.numpy())


def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(os.path.relpath(target, link.parent))


@dataclasses.dataclass(frozen=True)
class DataPaths:
    """The three data folders (each with ``train.npz`` and ``test.npz``)."""

    owners: Path  # train: owners' data (teachers, kd_real, attention); test: the test split
    validation: Path  # train: owners' data; test: the held-out validation images
    final: Path  # train: owners' data; test: the test split


def prepare_data(root: Path, validation_samples: int, test_samples: int | None) -> DataPaths:
    """Hold ``validation_samples`` out of the training split first, then write the folders."""
    paths = DataPaths(root / "owners", root / "validation", root / "final")
    stamp = root / "split.json"
    wanted = {
        "validation_samples": validation_samples,
        "validation_seed": VALIDATION_SEED,
        "test_samples": test_samples,
    }
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return paths
    train = load_fashion_mnist(Split.TRAIN)
    test = load_fashion_mnist(Split.TEST)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(VALIDATION_SEED))
    held, rest = order[:validation_samples].sort().values, order[validation_samples:].sort().values
    _write_npz(paths.owners / "train.npz", train.images[rest], train.labels[rest])
    count = len(test) if test_samples is None else min(test_samples, len(test))
    _write_npz(paths.owners / "test.npz", test.images[:count], test.labels[:count])
    _write_npz(paths.validation / "test.npz", train.images[held], train.labels[held])
    for folder in (paths.validation, paths.final):
        _link(paths.owners / "train.npz", folder / "train.npz")
    _link(paths.owners / "test.npz", paths.final / "test.npz")
    stamp.write_text(json.dumps(wanted) + "\n")
    return paths


# Runs ----------------------------------------------------------------------------------------


def _run_config(spec: dict[str, Any]) -> RunConfig:
    return RunConfig(
        data=DataConfig(files=Path(spec["data"]), eval_samples=10),
        teachers=tuple(PackageTeacher(package=Path(p)) for p in spec["teachers"]),
        train=TrainConfig.model_validate(spec["train"]),
        run=RunSettings(
            device="cpu",
            checkpoint_every=10**6,
            eval_every=10**6,  # no evaluation during training: the split is read once, at the end
            log_every=10**6,
            threads=spec.get("threads", 2),
        ),
    )


def _figures(summary: dict[str, Any], seed: int) -> dict[str, Any]:
    return {
        "seed": seed,
        "accuracy": summary["student_accuracy_mean"],
        "attention": summary["student_accuracy_attention"],
        "headers": summary["student_header_accuracies"],
        "iterations": summary["iterations"],
        "train_seconds": summary["train_seconds"],
        "parameters": summary["student_parameters"],
        "parameters_inference": summary["student_parameters_inference"],
        "teachers": summary["teacher_accuracies"],
        "teacher_ensemble": summary["teacher_ensemble_accuracy"],
    }


def finished_run(out: Path, config: RunConfig) -> dict[str, Any] | None:
    """The ``result.json`` of a run in ``out`` that did its whole budget with ``config``."""
    result, saved = out / "result.json", out / "config.json"
    if not (result.is_file() and saved.is_file()):
        return None
    summary = json.loads(result.read_text())
    same = json.loads(saved.read_text()) == json.loads(config.model_dump_json(exclude_none=True))
    whole = summary.get("iterations") == config.train.total_iterations
    if not (same and whole and "student_parameters_inference" in summary):
        return None
    return summary


def recorded(spec: dict[str, Any]) -> dict[str, Any] | None:
    """The ledger's figures for ``spec``'s run, if it holds them under the same key."""
    if not (spec.get("reuse") and spec.get("record")):
        return None
    return read_record(Path(spec["record"]), spec["key"])


def run_once(spec: dict[str, Any]) -> dict[str, Any]:
    """One training run described by ``spec`` (JSON-able, so a Ray Tune trial can carry it).

    With ``reuse``, a run the ledger (``spec["record"]``) or ``spec["out"]`` already holds is
    read, not trained; a run trained or read from ``out`` is then recorded in the ledger.
    """
    threads = spec.get("threads", 2)
    torch.set_num_threads(threads)
    config = _run_config(spec)
    out = Path(spec["out"])
    seed = config.train.seed
    if (figures := recorded(spec)) is not None:
        logger.info("reusing the ledger's %s", spec["record"])
        return {**figures, "reused": True}
    if spec.get("reuse") and (saved := finished_run(out, config)) is not None:
        logger.info("reusing %s", out)
        figures, reused = _figures(saved, seed), True
    else:
        if out.exists():
            shutil.rmtree(out)
        result = run_training(config, out, show_progress=False)
        figures, reused = _figures(result.summary(), seed), False
    if spec.get("record"):
        write_record(Path(spec["record"]), spec["key"], figures, threads)
    return {**figures, "reused": reused}


def tune_trial(config: dict[str, Any]) -> None:
    """A Ray Tune trial: one tuning run, reporting its validation accuracy."""
    from ray import tune

    figures = run_once(config["spec"])
    tune.report(
        {
            "accuracy": figures["accuracy"],
            "train_seconds": figures["train_seconds"],
            "iterations": figures["iterations"],
        }
    )


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything a protocol run needs besides the federation."""

    out: Path
    data: DataPaths
    grid: Grid
    tune_budget: Budget
    final_budget: Budget
    seeds: tuple[int, ...]
    reuse: bool
    base: dict[str, Any]
    threads: int = 2
    #: Runs at once (trials and final seeds), each with ``threads`` threads.
    parallel: int = 1
    #: The committed ledger of finished runs (bench/quality_ledger.py); None: keep none.
    ledger: Path | None = None
    #: How the data were cut (``split.json``), part of every run's ledger key.
    split: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: Where the teachers live, named by job and split (bench/quality_teachers); None: under
    #: ``out``, named by the job's hash.
    teachers: Path | None = None


@functools.lru_cache(maxsize=64)
def _weights_digests(packages: tuple[Path, ...]) -> tuple[str, ...]:
    """Each teacher's weights sha256 (``teacher.json``), read once per federation."""
    return tuple(read_metadata(p).weights_sha256 for p in packages)


def _spec(
    plan: Plan,
    federation: str,
    phase: str,
    cell: Cell,
    setting: Setting,
    seed: int,
    packages: list[Path],
) -> dict[str, Any]:
    budget = plan.tune_budget if phase == "tune" else plan.final_budget
    data = plan.data.validation if phase == "tune" else plan.data.final
    train = train_settings(cell, setting, budget, seed, plan.base)
    folder = plan.out / "runs" / federation / phase / cell.name.replace("/", "__")
    role = "validation" if phase == "tune" else "test"
    digests = list(_weights_digests(tuple(packages)))
    record = None
    if plan.ledger is not None:
        record = record_path(plan.ledger, federation, phase, cell.name, setting.key, seed)
    return {
        "record": None if record is None else str(record),
        "key": run_key(train, plan.split, role, digests),
        "out": str(folder / f"{setting.key}_seed{seed}"),
        "train": train,
        "teachers": [str(p) for p in packages],
        "data": str(data),
        "reuse": plan.reuse,
        "threads": plan.threads,
        "setting": setting.to_json(),
    }


def _trial(spec: dict[str, Any], figures: dict[str, Any]) -> dict[str, Any]:
    return {
        "setting": spec["setting"],
        "validation_accuracy": figures["accuracy"],
        "iterations": figures["iterations"],
        "seconds": figures["train_seconds"],
    }


def choose(settings: list[Setting], trials: list[dict[str, Any]]) -> tuple[Setting, dict[str, Any]]:
    """The grid point of the best validation accuracy (ties: the earlier in the grid's order)."""
    rank = {json.dumps(s.to_json(), sort_keys=True): i for i, s in enumerate(settings)}
    ordered = sorted(trials, key=lambda t: rank[json.dumps(t["setting"], sort_keys=True)])
    best = max(ordered, key=lambda t: t["validation_accuracy"])
    return Setting(**best["setting"]), best


def tune_cell(
    plan: Plan, federation: str, cell: Cell, packages: list[Path]
) -> tuple[Setting, list[dict[str, Any]]]:
    """Run the grid for ``cell`` as Ray Tune trials; the best validation accuracy wins."""
    from ray import tune

    settings = settings_for(cell.objective, plan.grid)
    specs = [_spec(plan, federation, "tune", cell, s, 0, packages) for s in settings]
    trials = []
    pending = []
    for spec in specs:
        done = recorded(spec) is not None
        if done or (plan.reuse and finished_run(Path(spec["out"]), _run_config(spec))):
            figures = run_once(spec)  # reads the ledger or result.json, trains nothing
            trials.append(_trial(spec, figures))
        else:
            pending.append(spec)
    if pending:
        tuner = tune.Tuner(
            tune.with_resources(tune_trial, {"cpu": plan.threads}),
            param_space={"spec": tune.grid_search(pending)},
            tune_config=tune.TuneConfig(
                metric="accuracy", mode="max", max_concurrent_trials=plan.parallel
            ),
            run_config=tune.RunConfig(
                name=f"{federation}-{cell.name.replace('/', '__')}",
                storage_path=str((plan.out / "tune").resolve()),
                verbose=0,
            ),
        )
        results = tuner.fit()
        for index in range(len(results)):
            result = results[index]
            if result.error is not None:
                raise RuntimeError(f"{federation} {cell.name}: a tuning trial failed") from (
                    result.error
                )
            trials.append(_trial((result.config or {})["spec"], result.metrics or {}))
    chosen, best = choose(settings, trials)
    logger.info(
        "%s %s: chose %s (validation %.2f %%)",
        federation,
        cell.name,
        chosen.key,
        100 * best["validation_accuracy"],
    )
    return chosen, sorted(trials, key=lambda t: -t["validation_accuracy"])


def start_final_runs(
    specs: list[dict[str, Any]], threads: int, parallel: int
) -> Callable[[], list[dict[str, Any]]]:
    """Start the final runs of one cell; the returned call waits for them, in ``specs``' order.

    With ``parallel`` > 1 they are Ray tasks of ``threads`` CPUs each, queued on the driver's
    Ray: the next cell's tuning trials take the CPUs they leave free (three seeds on two CPUs
    would otherwise leave one idle for a whole final run). Each run records itself in the
    ledger when it ends, so an interrupted protocol keeps what finished.
    """
    if parallel <= 1:
        runs = [run_once(spec) for spec in specs]
        return lambda: runs
    import ray

    task = ray.remote(num_cpus=threads, max_retries=0)(run_once)
    refs = [task.remote(spec) for spec in specs]
    return lambda: list(ray.get(refs))


def teacher_directories(plan: Plan, federation: str, teacher_epochs: int) -> list[Path] | None:
    """The committed teachers' folders of ``federation``; None: keyed folders under ``out``."""
    if plan.teachers is None:
        return None
    jobs = federation_jobs(federation, teacher_epochs, plan.data.owners)
    return protocol_teacher_directories(plan.teachers, jobs, plan.split)


def federation_cells(packages: list[Path], only: set[str] | None) -> list[Cell]:
    """The protocol's cells for these teachers (``only``: just those named)."""
    feature_dims = [read_metadata(p).feature_dim for p in packages]
    mfs_size = student_parameters(StudentKind.MFS, None, feature_dims)
    cells = build_cells(matched_widths(mfs_size, feature_dims))
    return [c for c in cells if not only or c.name in only]


def ledger_status(
    plan: Plan, federation: str, teacher_epochs: int, only: set[str] | None
) -> list[dict[str, Any]]:
    """Per cell, the tuning runs and final seeds the ledger holds under their current keys.

    The final seeds can be counted only once the whole grid is recorded (it picks the setting).
    """
    packages = teacher_directories(plan, federation, teacher_epochs)
    if packages is None or not all((p / "teacher.json").is_file() for p in packages):
        return [{"federation": federation, "cell": "(teachers not trained)"}]
    rows = []
    for cell in federation_cells(packages, only):
        settings = settings_for(cell.objective, plan.grid)
        specs = [_spec(plan, federation, "tune", cell, s, 0, packages) for s in settings]
        trials = [_trial(sp, f) for sp in specs if (f := recorded(sp)) is not None]
        finals = None
        if len(trials) == len(settings):
            chosen, _ = choose(settings, trials)
            finals = sum(
                recorded(_spec(plan, federation, "final", cell, chosen, seed, packages)) is not None
                for seed in plan.seeds
            )
        rows.append(
            {
                "federation": federation,
                "cell": cell.name,
                "tune_done": len(trials),
                "tune_total": len(settings),
                "final_done": finals,
                "final_total": len(plan.seeds),
            }
        )
    return rows


def run_federation(
    plan: Plan, federation: str, teacher_epochs: int, only: set[str] | None
) -> dict[str, Any]:
    """Teachers, cells, tuning and final runs of one federation."""
    packages = ensure_teachers(
        plan.out / "teachers",
        federation_jobs(federation, teacher_epochs, plan.data.owners),
        keyed=True,
        workers=plan.parallel,
        directories=teacher_directories(plan, federation, teacher_epochs),
    )
    cells = federation_cells(packages, only)
    records, tuning, chosen, started = [], {}, {}, []
    for cell in cells:
        setting, trials = tune_cell(plan, federation, cell, packages)
        tuning[cell.name], chosen[cell.name] = trials, setting.to_json()
        specs = [_spec(plan, federation, "final", cell, setting, s, packages) for s in plan.seeds]
        started.append((cell, setting, start_final_runs(specs, plan.threads, plan.parallel)))
    for cell, setting, wait in started:
        runs = wait()
        for run in runs:
            logger.info(
                "%s %s seed %d: test %.2f %%",
                federation,
                cell.name,
                run["seed"],
                100 * run["accuracy"],
            )
        records.append(cell_record(federation, cell, setting, runs))
        last = runs[-1]
    return {
        "teacher_names": [read_metadata(p).name for p in packages],
        "teacher_packages": [str(p) for p in packages],
        "teachers": last["teachers"],
        "teacher_ensemble": last["teacher_ensemble"],
        "methods": methods_summary(records),
        "chosen": chosen,
        "tuning": tuning,
        "cells": records,
    }


def _init_ray() -> None:
    import ray

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        logging_level=logging.WARNING,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="a persistent folder")
    parser.add_argument("--quick", action="store_true", help="the whole protocol, tiny budgets")
    parser.add_argument("--reuse", action="store_true", help="keep finished runs under --out")
    parser.add_argument("--seeds", type=int, default=None, help="default 3; --quick: 2")
    parser.add_argument("--iterations", type=int, default=1000, help="final budget per run")
    parser.add_argument("--tune-iterations", type=int, default=200, help="tuning budget per run")
    parser.add_argument("--validation-samples", type=int, default=5000)
    parser.add_argument("--teacher-epochs", type=int, default=6)
    parser.add_argument("--federations", nargs="+", choices=FEDERATIONS, default=list(FEDERATIONS))
    parser.add_argument("--cells", nargs="+", help="only these cells, e.g. cdfkd_mfs/mfs")
    parser.add_argument(
        "--status", action="store_true", help="print what the ledger holds per cell; run nothing"
    )
    parser.add_argument("--parallel", type=int, default=2, help="runs at once (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="threads per run (default 1)")
    parser.add_argument(
        "--ledger",
        type=Path,
        default=None,
        help=f"the ledger of finished runs (default {LEDGER.relative_to(ROOT)}; --quick: none)",
    )
    parser.add_argument(
        "--teachers",
        type=Path,
        default=None,
        help=f"the teachers' folder (default {PROTOCOL_TEACHERS.relative_to(ROOT)}; "
        "--quick: under --out)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("cdfkd", "ray", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(2)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    quick = args.quick
    seeds = tuple(range(args.seeds or (2 if quick else 3)))
    base = json.loads(json.dumps(BASE_TRAIN))
    if quick:
        base.update({"batch_size": 32, "generator": {"latent_dim": 64, "width": 4}})
        base["attention"] = {"samples": 20}
    data = prepare_data(
        out / "data",
        500 if quick else args.validation_samples,
        1000 if quick else None,
    )
    plan = Plan(
        out=out,
        data=data,
        grid=QUICK_GRID if quick else Grid(),
        tune_budget=Budget(2, 1) if quick else Budget(args.tune_iterations),
        final_budget=Budget(3, 1) if quick else Budget(args.iterations),
        seeds=seeds,
        reuse=args.reuse,
        base=base,
        threads=args.threads,
        parallel=args.parallel,
        ledger=args.ledger or (None if quick else LEDGER),
        split=json.loads((out / "data" / "split.json").read_text()),
        teachers=args.teachers or (None if quick else PROTOCOL_TEACHERS),
    )
    teacher_epochs = 1 if quick else args.teacher_epochs
    only = set(args.cells) if args.cells else None
    if args.status:
        status = [
            row
            for name in args.federations
            for row in ledger_status(
                dataclasses.replace(plan, reuse=True), name, teacher_epochs, only
            )
        ]
        print(json.dumps(status, indent=1))
        return
    started = time.monotonic()
    _init_ray()
    federations: dict[str, Any] = {}
    try:
        for name in args.federations:
            federations[name] = run_federation(plan, name, teacher_epochs, only)
    finally:
        import ray

        ray.shutdown()
    first = federations[args.federations[0]]
    report: dict[str, Any] = {
        "methods": first["methods"],
        "methods_federation": args.federations[0],
        "protocol": {
            "validation_samples": 500 if quick else args.validation_samples,
            "validation_seed": VALIDATION_SEED,
            "validation": "held out of Fashion-MNIST's training split before the owners' "
            "shards are cut; every choice is made on it",
            "test_samples": 1000 if quick else 10000,
            "seeds": list(seeds),
            "grid": plan.grid.to_json(),
            "tune_iterations": plan.tune_budget.total_iterations,
            "iterations": plan.final_budget.total_iterations,
            "iterations_per_epoch": plan.final_budget.iterations_per_epoch,
            "decay_at": list(DECAY_AT),
            "base_train": base,
            "teacher_epochs": teacher_epochs,
            "dirichlet_alpha": DIRICHLET_ALPHA,
            "chosen": {name: f["chosen"] for name, f in federations.items()},
            "chosen_per_method": {
                name: {c["objective"]: c["setting"] for c in f["cells"] if c["paper_student"]}
                for name, f in federations.items()
            },
            "quick": quick,
        },
        "cells": [c for f in federations.values() for c in f["cells"]],
        "federations": {
            name: {k: v for k, v in f.items() if k != "cells"} for name, f in federations.items()
        },
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "threads": args.threads,
            "parallel": args.parallel,
            "cuda": torch.cuda.is_available(),
        },
        "total_seconds": round(time.monotonic() - started, 1),
    }
    if not only:
        check_report(report)
    (out / "quality.json").write_text(json.dumps(report, indent=2) + "\n")
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    kind = "smoke run, --quick: tiny budgets, not a result" if quick else "protocol run"
    header = (
        f"\n### Quality, {kind}, {stamp}\n\nCommand: `python bench/quality.py "
        f"{shlex.join(sys.argv[1:])}`; {args.parallel} runs at a time, {args.threads} "
        f"thread(s) each, device cpu. "
        f"Validation: {report['protocol']['validation_samples']} images held out of the "
        f"training split (seed {VALIDATION_SEED}) before the owners' shards; test split read "
        f"once per final run ({report['protocol']['test_samples']} images). Tuning: "
        f"{plan.tune_budget.total_iterations} iterations per grid point (Ray Tune), grid "
        f"`{json.dumps(plan.grid.to_json())}`; final: {plan.final_budget.total_iterations} "
        f"iterations, learning rates x0.1 at {', '.join(f'{f:.3g}' for f in DECAY_AT)} of it, "
        f"seeds {list(seeds)}. Settings: `{json.dumps(base)}`. Total "
        f"{report['total_seconds'] / 60:.1f} min.\n\n"
    )
    tables = [markdown_federation(TITLES[name], f, f["cells"]) for name, f in federations.items()]
    append_section(header + "\n".join(tables))
    print(json.dumps({name: f["methods"] for name, f in federations.items()}, indent=2))


if __name__ == "__main__":
    main()
