"""The quality benchmark's protocol, its pure parts (``bench/quality.py`` trains and runs it).

* **Cells** separate the objective from the student: ``{cdfkd_mfs, cdfkd} x {mfs,
  simple_multi_header}``, DFAD on the single-head student and on a single head whose widths are
  scaled so that its inference parameters match the MFS student's, and ``kd_real`` (ordinary KD
  on the owners' real data) for each multi-header family as its ceiling.
* **Budget in iterations** (K student steps + one generator step each, so every method sends the
  teachers the same number of query batches); the learning rates drop x0.1 at fixed fractions
  of it through the config's milestones.
* **Grid**: the same student and generator learning rates and BN-prior weights for every method
  (``kd_real`` has no generator, so only its student rate varies), DFAD also with its authors'
  recipes. Tuning runs are scored on a validation split held out of the owners' training data.
* ``quality.json``: ``methods`` (means over seeds, each method on its own paper student),
  ``protocol`` and ``cells``; :func:`check_report` checks the keys.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import statistics
from collections.abc import Sequence
from typing import Any

from cdfkd.student_node.config import LossWeights, Method, StudentConfig, StudentKind, TrainConfig
from cdfkd.student_node.models.multi_header import inference_parameters
from cdfkd.student_node.teachers.protocol import TeacherInfo
from cdfkd.student_node.trainer import build_student

#: Training settings every run shares (chosen on 2 CPU cores, bench/RESULTS.md).
BASE_TRAIN: dict[str, Any] = {
    "batch_size": 128,
    "iterations_per_epoch": 25,
    "generator": {"latent_dim": 256, "width": 8},
    "attention": {"samples": 60},
}
#: Learning rates drop x0.1 at these fractions of the budget (METHOD.md: epochs 100, 200 of 300).
DECAY_AT = (2 / 3,)
#: The keys of ``quality.json``'s ``methods``: each method on its own paper student.
METHOD_KEYS = ("kd_real", "dfad", "cdfkd", "cdfkd_mfs_mean", "cdfkd_mfs_attention")
#: The keys every entry of ``quality.json``'s ``cells`` has.
CELL_KEYS = (
    "federation",
    "objective",
    "student",
    "parameters_inference",
    "accuracy_mean",
    "accuracy_std",
    "per_seed",
)
PROTOCOL_KEYS = ("validation_samples", "seeds", "grid", "chosen")


@dataclasses.dataclass(frozen=True)
class Cell:
    """One objective trained into one student family.

    Attributes:
        objective: The distillation objective (the method).
        student: The student family.
        widths: The student's stage widths; None keeps ``StudentConfig``'s default.
        label: The student's name in tables (``single_head_matched`` for the scaled head).
    """

    objective: Method
    student: StudentKind
    widths: tuple[int, ...] | None = None
    label: str = ""

    @property
    def student_label(self) -> str:
        """The student's name: ``label``, else the family."""
        return self.label or self.student.value

    @property
    def name(self) -> str:
        """``objective/student``, unique within a federation."""
        return f"{self.objective.value}/{self.student_label}"

    @property
    def is_paper_cell(self) -> bool:
        """Whether this is the method on its own paper student (``quality.json`` ``methods``)."""
        own = TrainConfig(method=self.objective).student_kind()
        return self.student is own and self.widths is None


def student_parameters(
    kind: StudentKind,
    widths: Sequence[int] | None,
    teacher_feature_dims: Sequence[int],
    input_shape: tuple[int, int, int] = (1, 32, 32),
    num_classes: int = 10,
) -> int:
    """Inference parameters of the student of ``kind`` (one header per teacher feature width)."""
    student = StudentConfig(kind=kind)
    if widths is not None:
        student = student.model_copy(update={"widths": tuple(widths)})
    infos = [
        TeacherInfo(f"t{i}", input_shape, num_classes, dim, (0.0,), (1.0,))
        for i, dim in enumerate(teacher_feature_dims)
    ]
    return inference_parameters(build_student(TrainConfig(student=student), infos))


def matched_widths(
    target: int,
    teacher_feature_dims: Sequence[int],
    ratios: Sequence[int] = (1, 2, 4),
    input_shape: tuple[int, int, int] = (1, 32, 32),
) -> tuple[int, ...]:
    """Single-head widths ``(w, 2w, 4w)`` whose inference parameters come nearest ``target``."""
    best: tuple[int, tuple[int, ...]] | None = None
    for base in range(1, 257):
        widths = tuple(base * r for r in ratios)
        count = student_parameters(
            StudentKind.SINGLE_HEAD, widths, teacher_feature_dims, input_shape
        )
        if best is None or abs(count - target) < abs(best[0] - target):
            best = (count, widths)
        if count > target:
            break
    assert best is not None
    return best[1]


def build_cells(matched: tuple[int, ...]) -> list[Cell]:
    """The protocol's cells for one federation; ``matched``: the scaled single head's widths."""
    return [
        Cell(Method.CDFKD_MFS, StudentKind.MFS),
        Cell(Method.CDFKD_MFS, StudentKind.SIMPLE_MULTI_HEADER),
        Cell(Method.CDFKD, StudentKind.MFS),
        Cell(Method.CDFKD, StudentKind.SIMPLE_MULTI_HEADER),
        Cell(Method.DFAD, StudentKind.SINGLE_HEAD),
        Cell(Method.DFAD, StudentKind.SINGLE_HEAD, matched, "single_head_matched"),
        Cell(Method.KD_REAL, StudentKind.MFS),
        Cell(Method.KD_REAL, StudentKind.SIMPLE_MULTI_HEADER),
    ]


@dataclasses.dataclass(frozen=True)
class Setting:
    """One point of the tuning grid; None where the method has no such knob."""

    student_lr: float
    generator_lr: float | None
    bn: float | None
    student_weight_decay: float = 5e-4
    recipe: str = ""
    #: The generator's last layer (``GeneratorConfig.output``); None without a generator.
    generator_output: str | None = None

    @property
    def key(self) -> str:
        """A stable folder name."""
        parts = [f"slr{self.student_lr:g}", f"wd{self.student_weight_decay:g}"]
        if self.generator_lr is not None:
            parts.append(f"glr{self.generator_lr:g}")
        if self.bn is not None:
            parts.append(f"bn{self.bn:g}")
        if self.generator_output not in (None, "batchnorm"):
            parts.append(str(self.generator_output))  # the authors' output keeps its old name
        return "_".join(parts)

    def to_json(self) -> dict[str, Any]:
        """The setting as ``quality.json`` records it."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Grid:
    """The tuning grid every method shares."""

    student_lr: tuple[float, ...] = (0.1, 0.05)
    generator_lr: tuple[float, ...] = (1e-3, 2e-3)
    bn: tuple[float, ...] = (0.0, 0.1)
    #: The generator's last layer: the authors' affine-free BN, or pixels kept in [0, 1]
    #: (without either a BN prior or this, DFAD's generator leaves the image range and its
    #: student stays near chance: bench/RESULTS.md, "DFAD at chance").
    generator_output: tuple[str, ...] = ("batchnorm", "pixel_range")
    #: DFAD's authors' recipes, tried for DFAD besides the grid (no BN prior).
    dfad_recipes: tuple[Setting, ...] = (
        Setting(0.1, 1e-3, 0.0, 5e-4, "dfad_authors", "batchnorm"),
        Setting(0.01, 1e-3, 0.0, 1e-4, "dfad_authors_lr0.01_wd1e-4", "batchnorm"),
    )

    def to_json(self) -> dict[str, Any]:
        """The grid as ``quality.json`` records it."""
        return {
            "student_lr": list(self.student_lr),
            "generator_lr": list(self.generator_lr),
            "bn": list(self.bn),
            "generator_output": list(self.generator_output),
            "dfad_recipes": [s.to_json() for s in self.dfad_recipes],
        }


QUICK_GRID = Grid(student_lr=(0.1,), generator_lr=(1e-3,), bn=(0.1,))


def settings_for(objective: Method, grid: Grid) -> list[Setting]:
    """The grid points of ``objective``, without duplicates, in a fixed order."""
    points: list[Setting] = []
    for student_lr, generator_lr, bn, output in itertools.product(
        grid.student_lr, grid.generator_lr, grid.bn, grid.generator_output
    ):
        if objective is Method.KD_REAL:
            point = Setting(student_lr, None, None)
        else:
            point = Setting(student_lr, generator_lr, bn, generator_output=output)
        if point not in points:
            points.append(point)
    if objective is Method.DFAD:
        known = {dataclasses.replace(p, recipe="") for p in points}
        for recipe in grid.dfad_recipes:
            if dataclasses.replace(recipe, recipe="") in known:
                index = points.index(dataclasses.replace(recipe, recipe=""))
                points[index] = recipe  # the grid point is the recipe: say so
            else:
                points.append(recipe)
    return points


@dataclasses.dataclass(frozen=True)
class Budget:
    """An iteration budget and where the learning rates decay."""

    iterations: int
    iterations_per_epoch: int = 25
    decay_at: tuple[float, ...] = DECAY_AT

    @property
    def epochs(self) -> int:
        """Whole epochs (the scheduler steps once per epoch)."""
        return max(1, round(self.iterations / self.iterations_per_epoch))

    @property
    def total_iterations(self) -> int:
        """What the run will do: ``epochs * iterations_per_epoch``."""
        return self.epochs * self.iterations_per_epoch

    @property
    def milestones(self) -> tuple[int, ...]:
        """Epochs at which both rates drop x0.1 (only those inside the budget)."""
        found = {max(1, round(f * self.epochs)) for f in self.decay_at}
        return tuple(sorted(m for m in found if m < self.epochs))


def train_settings(
    cell: Cell,
    setting: Setting,
    budget: Budget,
    seed: int,
    base: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``TrainConfig`` (as a dict) of one run: base settings, the cell, the grid point."""
    weights = LossWeights.default_for(cell.objective)
    if setting.bn is not None:
        weights = weights.model_copy(update={"bn": setting.bn})
    optimizer: dict[str, Any] = {
        "student_lr": setting.student_lr,
        "student_weight_decay": setting.student_weight_decay,
        "milestones": list(budget.milestones),
    }
    if setting.generator_lr is not None:
        optimizer["generator_lr"] = setting.generator_lr
    student: dict[str, Any] = {"kind": cell.student.value}
    if cell.widths is not None:
        student["widths"] = list(cell.widths)
    settings = json.loads(json.dumps(base if base is not None else BASE_TRAIN))
    settings.update(
        {
            "method": cell.objective.value,
            "seed": seed,
            "epochs": budget.epochs,
            "iterations_per_epoch": budget.iterations_per_epoch,
            "weights": weights.model_dump(),
            "optimizer": optimizer,
            "student": student,
        }
    )
    if setting.generator_output is not None:
        settings["generator"] = {
            **settings.get("generator", {}),
            "output": setting.generator_output,
        }
    TrainConfig.model_validate(settings)  # fail here, not in a Ray worker
    return settings


def digest(value: Any) -> str:
    """A short stable hash of a JSON-able value (cache keys)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:10]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def cell_record(
    federation: str,
    cell: Cell,
    setting: Setting,
    runs: Sequence[dict[str, Any]],
) -> dict[str, Any]:
    """One ``cells`` entry from the final runs of ``cell`` (one per seed)."""
    accuracies = [r["accuracy"] for r in runs]
    mean, std = mean_std(accuracies)
    attention = [r["attention"] for r in runs if r.get("attention") is not None]
    seconds = sum(r["train_seconds"] for r in runs)
    iterations = sum(r["iterations"] for r in runs)
    record: dict[str, Any] = {
        "federation": federation,
        "cell": cell.name,
        "objective": cell.objective.value,
        "student": cell.student_label,
        "student_kind": cell.student.value,
        "widths": list(cell.widths) if cell.widths is not None else None,
        "paper_student": cell.is_paper_cell,
        "parameters_inference": runs[0]["parameters_inference"],
        "accuracy_mean": mean,
        "accuracy_std": std,
        "per_seed": [
            {"seed": r["seed"], "accuracy": r["accuracy"], "attention": r.get("attention")}
            for r in runs
        ],
        "setting": setting.to_json(),
        "iterations": runs[0]["iterations"],
        "seconds_per_iteration": seconds / max(1, iterations),
    }
    if len(attention) == len(runs):
        record["attention_mean"], record["attention_std"] = mean_std(attention)
    return record


def methods_summary(cells: Sequence[dict[str, Any]]) -> dict[str, float]:
    """``methods`` of one federation: each method's paper-student cell, mean over seeds."""
    paper = {
        "kd_real": "kd_real/mfs",
        "dfad": "dfad/single_head",
        "cdfkd": "cdfkd/simple_multi_header",
        "cdfkd_mfs_mean": "cdfkd_mfs/mfs",
    }
    by_name = {c["cell"]: c for c in cells}
    methods: dict[str, float] = {}
    for key, name in paper.items():
        if name in by_name:
            methods[key] = by_name[name]["accuracy_mean"]
    mfs = by_name.get("cdfkd_mfs/mfs")
    if mfs is not None and "attention_mean" in mfs:
        methods["cdfkd_mfs_attention"] = mfs["attention_mean"]
    return methods


def check_report(report: dict[str, Any]) -> None:
    """Raise ValueError unless ``report`` has the keys issue 18 names for ``quality.json``."""
    missing = [k for k in ("methods", "protocol", "cells") if k not in report]
    if missing:
        raise ValueError(f"quality.json lacks {missing}")
    unknown = set(report["methods"]) - set(METHOD_KEYS)
    if unknown:
        raise ValueError(f"unknown methods keys {sorted(unknown)}")
    lacking = [k for k in PROTOCOL_KEYS if k not in report["protocol"]]
    if lacking:
        raise ValueError(f"protocol lacks {lacking}")
    for cell in report["cells"]:
        absent = [k for k in CELL_KEYS if k not in cell]
        if absent:
            raise ValueError(f"cell {cell.get('cell')} lacks {absent}")
        if len(cell["per_seed"]) != len(report["protocol"]["seeds"]):
            raise ValueError(f"cell {cell['cell']} has {len(cell['per_seed'])} seeds")
        for value in (cell["accuracy_mean"], cell["accuracy_std"]):
            if not math.isfinite(value):
                raise ValueError(f"cell {cell['cell']}: accuracy {value} is not finite")


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def markdown_federation(title: str, federation: dict[str, Any], cells: list[dict[str, Any]]) -> str:
    """One federation's table: cells with accuracy mean ± std over seeds, then the teachers."""
    teachers = ", ".join(
        f"{name} {_pct(acc)}"
        for name, acc in zip(federation["teacher_names"], federation["teachers"], strict=True)
    )
    lines = [
        f"#### {title}",
        "",
        f"Teachers (test accuracy %): {teachers}; mean-logit ensemble "
        f"{_pct(federation['teacher_ensemble'])}.",
        "",
        "| cell | objective | student | inference parameters | test accuracy % (mean ± std) "
        "| per seed | attention % | setting (validation) | iterations | s / iteration |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cell in cells:
        per_seed = " / ".join(_pct(r["accuracy"]) for r in cell["per_seed"])
        attention = (
            f"{_pct(cell['attention_mean'])} ± {_pct(cell['attention_std'])}"
            if "attention_mean" in cell
            else ""
        )
        setting = cell["setting"]
        described = setting["recipe"] or ", ".join(
            f"{k} {setting[k]:g}"
            for k in ("student_lr", "generator_lr", "bn")
            if setting[k] is not None
        )
        if setting.get("generator_output") not in (None, "batchnorm"):
            described += f", generator output {setting['generator_output']}"
        lines.append(
            f"| {cell['cell']} | {cell['objective']} | {cell['student']} "
            f"| {cell['parameters_inference']:,} "
            f"| {_pct(cell['accuracy_mean'])} ± {_pct(cell['accuracy_std'])} | {per_seed} "
            f"| {attention} | {described} | {cell['iterations']} "
            f"| {cell['seconds_per_iteration']:.2f} |"
        )
    return "\n".join(lines) + "\n"
