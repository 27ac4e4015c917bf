"""One distillation run in this process: teachers, data, loop, checkpoints, attention, report.

This is the body the CLI (and later the Ray worker) calls. It owns the output folder::

    config.json        the resolved run config
    metrics.jsonl      iteration and evaluation records
    checkpoints/       atomic TrainState checkpoints (the last few)
    student/           the distilled student (+ attention aggregator) in safetensors
    accuracy.png, losses.png, samples.png, report.md, result.json
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cdfkd.coordinator.accounting import USAGE_KEY, TeacherMeter, totals
from cdfkd.coordinator.config import (
    PackageTeacher,
    RunConfig,
    check_data_for_method,
    dump_run_config,
    resolve_device,
)
from cdfkd.coordinator.errors import ConfigError
from cdfkd.coordinator.progress import MetricsWriter, ProgressReporter, read_metrics
from cdfkd.coordinator.report import (
    generator_samples,
    plot_accuracy,
    plot_losses,
    save_image_grid,
    write_report,
)
from cdfkd.student_node.artifact import save_student
from cdfkd.student_node.checkpoint import (
    config_fingerprint,
    latest_checkpoint,
    load_checkpoint,
    restore_payload,
    state_payload,
    write_checkpoint,
)
from cdfkd.student_node.config import Method
from cdfkd.student_node.errors import (
    NonFiniteLossError,
    RemoteTeacherError,
    TeacherBudgetExhausted,
)
from cdfkd.student_node.evaluate import (
    StudentEvaluation,
    TeacherEvaluation,
    evaluate_student,
    evaluate_teachers,
    header_logits,
)
from cdfkd.student_node.models.aggregator import (
    AttentionAggregator,
    new_aggregator,
    train_attention,
)
from cdfkd.student_node.models.multi_header import inference_parameters
from cdfkd.student_node.teachers.local import InProcessTeacher
from cdfkd.student_node.teachers.protocol import Teacher
from cdfkd.student_node.teachers.remote import RemoteTeacher
from cdfkd.student_node.teachers.run_space import (
    RunImageSpace,
    RunSpaceTeacher,
    resolve_image_space,
)
from cdfkd.student_node.trainer import (
    IterationMetrics,
    TrainCallback,
    TrainState,
    check_teachers,
    init_state,
    train,
)
from cdfkd.teacher_node.data_sources import describe_source, load_train_and_test
from cdfkd.teacher_node.datasets import ImageDataset, stratified_sample
from cdfkd.teacher_node.package import read_metadata

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
STUDENT_DIR = "student"


@dataclass(frozen=True)
class RunResult:
    """What a finished (or stopped) run produced."""

    out: Path
    method: str
    iterations: int
    train_seconds: float
    stopped_early: bool
    device: str
    teachers: TeacherEvaluation | None
    teacher_parameters: list[int | None]
    student: StudentEvaluation | None
    student_parameters: int
    attention_samples: int
    teacher_traffic: list[dict[str, Any]]
    data: str | None = None
    #: Per teacher, its DP guarantee as its owner states it (None: none).
    teacher_privacy: list[dict[str, Any] | None] = field(default_factory=list)
    #: Parameters at inference: ``student_parameters`` less the training-only projections.
    student_parameters_inference: int = 0
    ended_by: dict[str, Any] | None = None

    def summary(self) -> dict[str, Any]:
        """The flat summary written to ``result.json`` (and extended by the demo).

        ``data`` names the real data the coordinator used; in a data-free run it is None, and
        so are every accuracy (none is computed) and ``attention_samples`` is 0.
        ``ended_by`` says why training stopped: ``{"reason": "completed"}``, ``"max_seconds"``,
        ``"interrupted"``, or ``"teacher_budget"`` with the teacher and the budget that ended it
        (see :func:`budget_end`).
        """
        teachers, student = self.teachers, self.student
        return {
            "method": self.method,
            "device": self.device,
            "data": self.data,
            "iterations": self.iterations,
            "train_seconds": round(self.train_seconds, 2),
            "stopped_early": self.stopped_early,
            "ended_by": self.ended_by,
            "teacher_accuracies": None if teachers is None else teachers.teachers,
            "teacher_ensemble_accuracy": None if teachers is None else teachers.ensemble,
            "teacher_parameters": self.teacher_parameters,
            "teacher_privacy": self.teacher_privacy,
            "student_header_accuracies": None if student is None else student.headers,
            "student_accuracy_mean": None if student is None else student.mean,
            "student_accuracy_attention": None if student is None else student.attention,
            "student_parameters": self.student_parameters,
            "student_parameters_inference": self.student_parameters_inference,
            "attention_samples": self.attention_samples,
            **totals(self.teacher_traffic, None if student is None else student.mean),
            "teacher_traffic": self.teacher_traffic,
        }


def budget_end(
    error: TeacherBudgetExhausted, teachers: Sequence[Teacher], iteration: int
) -> dict[str, Any]:
    """The ``ended_by`` record of a run that a teacher's budget ended after ``iteration``.

    ``teacher`` is the header index of the node that refused (matched by address), ``name``
    its name; ``budget``, ``limit``, ``used`` and ``requested`` are the node's account of the
    budget (``budget_images`` or ``budget_images_per_day``, in images).
    """
    index = next(
        (
            i
            for i, t in enumerate(teachers)
            if isinstance(t, RemoteTeacher) and t.config.address == error.address
        ),
        None,
    )
    return {
        "reason": "teacher_budget",
        "teacher": index,
        "name": None if index is None else teachers[index].info().name,
        "address": error.address,
        "budget": error.budget or None,
        "limit": error.limit,
        "used": error.used,
        "requested": error.requested,
        "iteration": iteration,
        "message": str(error),
    }


def load_teachers(config: RunConfig, device: torch.device) -> list[Teacher]:
    """The run's teachers in header order: in-process from packages, or remote by address."""
    teachers: list[Teacher] = []
    for entry in config.teachers:
        if isinstance(entry, PackageTeacher):
            teachers.append(InProcessTeacher.from_package(entry.package, device))
        else:
            teachers.append(RemoteTeacher(entry))
    return teachers


def close_teachers(teachers: list[Teacher]) -> None:
    """Close the channels of remote teachers."""
    for teacher in teachers:
        if isinstance(teacher, RemoteTeacher):
            teacher.close()


@dataclass(frozen=True)
class _RealData:
    """The run's real data: pixel-space splits and the test images as the student sees them."""

    source: str
    train: ImageDataset
    test: ImageDataset
    test_images: Tensor


def _real_data(
    config: RunConfig, space: RunImageSpace, num_classes: int, device: torch.device
) -> _RealData | None:
    """The ``[data]`` splits (None in a data-free run), checked against the student."""
    if config.data is None:
        return None
    source = describe_source(config.data.source)
    train_set, test_set = load_train_and_test(
        config.data.source, root=config.data.path, num_classes=num_classes
    )
    return _RealData(source, train_set, test_set, space.prepare(test_set.images, source).to(device))


class _Interval:
    """Calls ``action`` every ``every`` iterations."""

    def __init__(self, every: int, action: Callable[[TrainState, IterationMetrics], None]) -> None:
        self.every = every
        self.action = action

    def __call__(self, state: TrainState, metrics: IterationMetrics) -> None:
        if metrics.iteration % self.every == 0:
            self.action(state, metrics)


def prepare_output(out: Path, resume: bool) -> Path | None:
    """Create ``out``; return its latest checkpoint when resuming.

    Raises:
        ConfigError: ``out`` holds checkpoints but ``resume`` is False (nothing is overwritten).
    """
    checkpoints = Path(out) / CHECKPOINT_DIR
    found = latest_checkpoint(checkpoints)
    if found is not None and not resume:
        raise ConfigError(
            f"{out} already holds checkpoints: pass --resume, or choose another --out"
        )
    if resume and found is None:
        logger.warning("--resume given but %s holds no checkpoint: starting fresh", checkpoints)
    Path(out).mkdir(parents=True, exist_ok=True)
    return found if resume else None


def run_training(
    config: RunConfig,
    out: Path,
    *,
    resume: bool = False,
    stop_event: threading.Event | None = None,
    teachers: list[Teacher] | None = None,
    callbacks: Sequence[TrainCallback] = (),
    show_progress: bool = True,
    clock: Callable[[], float] = time.monotonic,
) -> RunResult:
    """Distill the run's teachers into a student; write every output into ``out``.

    Args:
        config: The validated run config.
        out: Output folder (created).
        resume: Continue from the latest checkpoint in ``out/checkpoints``.
        stop_event: Set it to stop after the current iteration (Ctrl-C); a checkpoint is written.
        teachers: Teachers to use instead of loading the packages of ``config`` (tests).
        callbacks: Extra per-iteration callbacks (benchmarks, the Ray driver's queue).
        show_progress: Log a line per interval and show a bar on a terminal.
        clock: Monotonic seconds; ``run.max_seconds`` and the elapsed times in
            ``metrics.jsonl`` and ``result.json`` are measured on it (tests inject one).

    Raises:
        ConfigError: a folder with checkpoints but no ``resume``, or data that do not fit.
        NonFiniteLossError: training diverged; the last good checkpoint is on disk.
    """
    out = Path(out)
    device = resolve_device(config.run.device)
    if config.run.threads is not None:
        torch.set_num_threads(config.run.threads)
    check_data_for_method(config)
    found = prepare_output(out, resume)
    (out / "config.json").write_text(dump_run_config(config) + "\n")

    owned = teachers is None
    teachers = load_teachers(config, device) if teachers is None else teachers
    remote = any(isinstance(t, RemoteTeacher) for t in teachers)
    # Remote teachers answer concurrently: an iteration waits for the slowest, not the sum.
    executor = ThreadPoolExecutor(len(teachers), "teacher-fan-out") if remote else None
    try:
        return _distill(
            config,
            out,
            device,
            teachers,
            executor,
            found,
            stop_event,
            callbacks,
            show_progress,
            clock,
        )
    finally:
        if executor is not None:
            executor.shutdown(wait=True)
        if owned:
            close_teachers(teachers)


def _distill(
    config: RunConfig,
    out: Path,
    device: torch.device,
    teachers: list[Teacher],
    executor: Executor | None,
    found: Path | None,
    stop_event: threading.Event | None,
    extra_callbacks: Sequence[TrainCallback],
    show_progress: bool,
    clock: Callable[[], float],
) -> RunResult:
    checkpoints = out / CHECKPOINT_DIR
    infos = [teacher.info() for teacher in teachers]
    first = check_teachers(infos)
    space = resolve_image_space(infos, config.train.image_shape, config.train.normalization)
    normalization = space.normalization
    # The trainer works on standardized run-space images; each teacher gets them as pixels.
    run_teachers: list[Teacher] = [RunSpaceTeacher(teacher, space) for teacher in teachers]
    logger.info(
        "run image space: %s, normalization mean %s std %s",
        "x".join(map(str, space.image_shape)),
        normalization.mean,
        normalization.std,
    )
    real = _real_data(config, space, first.num_classes, device)
    train_config = config.train
    real_images = (
        space.prepare(real.train.images, real.source).to(device)
        if real is not None and train_config.method is Method.KD_REAL
        else None
    )
    if real is None:
        logger.info(
            "no [data] table: a data-free run, no real image is read and no accuracy is "
            "computed here; the owners train the attention and evaluate with 'cdfkd flower run'"
        )

    state = init_state(train_config, infos, device, space.image_shape, space.normalization)
    fingerprint = config_fingerprint(train_config)
    loaded = load_checkpoint(found, state, fingerprint) if found is not None else {}
    meter = TeacherMeter(teachers, loaded.get(USAGE_KEY))

    def snapshot() -> dict[str, Any]:
        """The state and the teachers' training usage so far (what a checkpoint holds)."""
        return {**state_payload(state, fingerprint), USAGE_KEY: meter.training()}

    if found is None:
        write_checkpoint(checkpoints, snapshot(), config.run.keep_checkpoints)
    start_iteration = state.iteration
    # The state after the last completed iteration: what a failure mid-iteration falls back to.
    last_good = snapshot()

    writer = MetricsWriter(out / "metrics.jsonl")
    started = clock()

    def elapsed() -> float:
        return clock() - started

    def log_iteration(state: TrainState, metrics: IterationMetrics) -> None:
        writer.iteration(metrics, elapsed())

    def evaluate_now(state: TrainState, metrics: IterationMetrics) -> None:
        if real is None or config.data is None:
            return
        count = config.data.eval_samples
        result = evaluate_student(
            state.student, real.test_images[:count], real.test.labels[:count].to(device)
        )
        writer.write(
            "eval",
            iteration=metrics.iteration,
            elapsed=round(elapsed(), 3),
            accuracy_mean=result.mean,
            accuracy_headers=result.headers,
        )
        logger.info("eval it %d: mean of headers %.2f %%", metrics.iteration, 100 * result.mean)

    def remember(state: TrainState, metrics: IterationMetrics) -> None:
        nonlocal last_good
        last_good = snapshot()

    def checkpoint_now(state: TrainState, metrics: IterationMetrics) -> None:
        write_checkpoint(checkpoints, last_good, config.run.keep_checkpoints)

    reporter = (
        ProgressReporter(train_config.total_iterations, state.iteration, config.run.log_every)
        if show_progress
        else None
    )

    def should_stop() -> bool:
        if stop_event is not None and stop_event.is_set():
            return True
        return config.run.max_seconds is not None and elapsed() >= config.run.max_seconds

    ended_by: dict[str, Any] | None = None
    try:
        train(
            state,
            run_teachers,
            train_config,
            real_images=real_images,
            callbacks=[
                remember,
                log_iteration,
                _Interval(config.run.eval_every, evaluate_now),
                _Interval(config.run.checkpoint_every, checkpoint_now),
                *([reporter] if reporter is not None else []),
                *extra_callbacks,
            ],
            should_stop=should_stop,
            executor=executor,
        )
    except TeacherBudgetExhausted as error:
        # An owner's budget is spent: keep and evaluate the last completed iteration, unless
        # this invocation completed none (then there is nothing new to keep: exit 4).
        saved = write_checkpoint(checkpoints, last_good, config.run.keep_checkpoints)
        if int(last_good["iteration"]) == start_iteration:
            logger.error(
                "a teacher's budget ended the run before its first iteration completed; the "
                "checkpoint is %s (resume with --resume once the owner grants more)",
                saved,
            )
            raise
        restore_payload(state, last_good)
        ended_by = budget_end(error, teachers, state.iteration)
        logger.warning(
            "teacher %s (%s) has no budget left: training ends after iteration %d (checkpoint "
            "%s), which is evaluated; %s",
            ended_by["name"],
            error.address,
            state.iteration,
            saved,
            error,
        )
    except (NonFiniteLossError, RemoteTeacherError) as error:
        saved = write_checkpoint(checkpoints, last_good, config.run.keep_checkpoints)
        what = "training diverged" if isinstance(error, NonFiniteLossError) else "a teacher failed"
        logger.error("%s; the last good checkpoint is %s (resume with --resume)", what, saved)
        raise
    finally:
        if reporter is not None:
            reporter.close()
    train_seconds = elapsed()
    meter.end_training()
    write_checkpoint(checkpoints, snapshot(), config.run.keep_checkpoints)
    stopped_early = state.iteration < train_config.total_iterations
    if ended_by is None:
        ended_by = _why_stopped(stopped_early, stop_event, config.run.max_seconds)

    teacher_result: TeacherEvaluation | None = None
    student_result: StudentEvaluation | None = None
    aggregator: AttentionAggregator | None = None
    if real is not None:
        test_labels = real.test.labels.to(device)
        teacher_result = evaluate_teachers(
            run_teachers, real.test_images, test_labels, skip_exhausted=True
        )
        aggregator = _fit_attention(state, real, space, config, device)
        student_result = evaluate_student(state.student, real.test_images, test_labels, aggregator)
    writer.write(
        "final",
        iteration=state.iteration,
        elapsed=round(train_seconds, 3),
        accuracy_mean=None if student_result is None else student_result.mean,
        accuracy_attention=None if student_result is None else student_result.attention,
        accuracy_headers=None if student_result is None else student_result.headers,
        ended_by=ended_by["reason"],
    )
    writer.close()
    save_student(out / STUDENT_DIR, state.student, aggregator, train_config, infos, space)

    result = RunResult(
        out=out,
        method=train_config.method.value,
        iterations=state.iteration,
        train_seconds=train_seconds,
        stopped_early=stopped_early,
        device=str(device),
        teachers=teacher_result,
        teacher_parameters=[_teacher_parameters(config, i) for i in range(len(teachers))],
        teacher_privacy=[
            None if info.privacy is None else {"name": info.name, **asdict(info.privacy)}
            for info in infos
        ],
        student=student_result,
        student_parameters=sum(p.numel() for p in state.student.parameters()),
        student_parameters_inference=inference_parameters(state.student),
        attention_samples=0 if aggregator is None else train_config.attention.samples,
        teacher_traffic=meter.traffic(),
        data=None if real is None else real.source,
        ended_by=ended_by,
    )
    _write_outputs(out, state, space, result, train_config.generator.latent_dim)
    return result


def _why_stopped(
    stopped_early: bool, stop_event: threading.Event | None, max_seconds: float | None
) -> dict[str, Any]:
    """``ended_by`` of a run that no budget ended."""
    if not stopped_early:
        return {"reason": "completed"}
    if stop_event is not None and stop_event.is_set():
        return {"reason": "interrupted"}
    return {"reason": "max_seconds", "max_seconds": max_seconds}


def _teacher_parameters(config: RunConfig, index: int) -> int | None:
    """A local package's parameter count; None for remote teachers (the owner does not say)."""
    if index >= len(config.teachers):
        return None
    entry = config.teachers[index]
    if not isinstance(entry, PackageTeacher):
        return None
    return read_metadata(entry.package).num_parameters


def _fit_attention(
    state: TrainState,
    real: _RealData,
    space: RunImageSpace,
    config: RunConfig,
    device: torch.device,
) -> AttentionAggregator | None:
    """Train the attention on k labelled real samples with the student frozen (METHOD.md 3)."""
    attention = config.train.attention
    if getattr(state.student, "num_headers", 1) < 2:
        return None
    train_set = real.train
    chosen = stratified_sample(train_set.labels, attention.samples, seed=config.train.seed)
    images: Tensor = space.prepare(train_set.images[chosen], real.source).to(device)
    labels = train_set.labels[chosen].to(device)
    aggregator = new_aggregator(train_set.num_classes, config.train.seed).to(device)
    history = train_attention(
        aggregator,
        header_logits(state.student, images),
        labels,
        attention,
        torch.Generator().manual_seed(config.train.seed),
    )
    logger.info(
        "attention trained on %d samples: loss %.4f -> %.4f", len(labels), history[0], history[-1]
    )
    return aggregator.eval()


def _write_outputs(
    out: Path, state: TrainState, space: RunImageSpace, result: RunResult, latent_dim: int
) -> None:
    records = read_metrics(out / "metrics.jsonl")
    plots = ["losses.png", "samples.png"]
    if result.student is not None:  # a data-free run measures no accuracy to plot
        plot_accuracy(records, out / "accuracy.png")
        plots.insert(0, "accuracy.png")
    plot_losses(records, out / "losses.png")
    samples = generator_samples(state.generator, latent_dim, 32)
    save_image_grid(space.normalization.invert(samples.cpu()), out / "samples.png")
    summary = result.summary()
    (out / "result.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_report(out / "report.md", summary, plots)
