"""The Ray driver: the student and generator train in a Ray actor; the only ``import ray``.

Without an address the driver starts an embedded local Ray bound to 127.0.0.1 (no dashboard)
and shuts it down at the end; with ``--ray-address`` (or ``RAY_ADDRESS``) it joins an existing
cluster. The actor builds its own gRPC channels from the run config (channels do not pickle),
streams every iteration's metrics back through a Ray queue, and is restarted by Ray if its
process dies: the retried run resumes from the latest checkpoint, so nothing is lost.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.util.queue import Empty, Queue

from cdfkd.coordinator.config import RunConfig
from cdfkd.coordinator.progress import ProgressReporter
from cdfkd.coordinator.training_run import CHECKPOINT_DIR, prepare_output, run_training
from cdfkd.protos.errors import CdfkdError
from cdfkd.student_node.checkpoint import latest_checkpoint
from cdfkd.student_node.trainer import IterationMetrics, TrainState

logger = logging.getLogger(__name__)

#: Ray's own logs stay quiet unless something is wrong.
RAY_LOGGING_LEVEL = logging.WARNING


def connect(address: str | None, num_cpus: float | None = None) -> bool:
    """Connect to Ray; returns True when this call started an embedded local Ray (to shut down).

    Args:
        address: A cluster address ("auto", "127.0.0.1:6379", "ray://..."); None uses
            ``RAY_ADDRESS`` if set, otherwise starts a local Ray on 127.0.0.1.
        num_cpus: CPUs of the embedded Ray (default: all).
    """
    # No usage statistics leave the machine; keep Ray's accelerator env-var behaviour explicit.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, logging_level=RAY_LOGGING_LEVEL, log_to_driver=True)
        logger.info("joined the Ray cluster at %s", address)
        return False
    started = time.monotonic()
    ray.init(
        num_cpus=None if num_cpus is None else int(max(1, num_cpus)),
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        logging_level=RAY_LOGGING_LEVEL,
        log_to_driver=True,
        configure_logging=True,
        namespace="cdfkd",
    )
    logger.info("started an embedded local Ray in %.1f s", time.monotonic() - started)
    return True


@dataclass(frozen=True)
class WorkerStarted:
    """Sent by the training worker when a ``run`` begins: the driver counts restarts."""

    pid: int
    restarted: bool


class _QueueReporter:
    """Worker-side callback: every iteration's metrics go to the driver's queue."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue

    def __call__(self, state: TrainState, metrics: IterationMetrics) -> None:
        self.queue.put(metrics)


@ray.remote
class TrainingWorker:
    """Runs :func:`run_training` in a Ray worker process."""

    def __init__(self) -> None:
        self._stop = threading.Event()

    def run(self, config_json: str, out: str, resume: bool, queue: Queue) -> dict[str, Any]:
        """Train; a retried call (after a restart) resumes from the latest checkpoint."""
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        restarted = ray.get_runtime_context().was_current_actor_reconstructed
        queue.put(WorkerStarted(pid=os.getpid(), restarted=restarted))
        config = RunConfig.model_validate_json(config_json)
        directory = Path(out)
        resume = resume or latest_checkpoint(directory / CHECKPOINT_DIR) is not None
        result = run_training(
            config,
            directory,
            resume=resume,
            stop_event=self._stop,
            callbacks=[_QueueReporter(queue)],
            show_progress=False,
        )
        return result.summary()

    def request_stop(self) -> None:
        """Finish the current iteration, checkpoint, and return."""
        self._stop.set()

    def pid(self) -> int:
        """The worker's process id (fault-injection tests)."""
        return os.getpid()


def train_on_ray(
    config: RunConfig,
    out: Path,
    *,
    resume: bool = False,
    ray_address: str | None = None,
    stop_event: threading.Event | None = None,
    on_worker: Any = None,
) -> dict[str, Any]:
    """Run the distillation in a Ray actor and stream its progress here.

    Args:
        config: The validated run config.
        out: Output folder; on a multi-node cluster it must be on storage the worker sees.
        resume: Continue from the latest checkpoint.
        ray_address: Existing cluster; None starts (and stops) an embedded local Ray.
        stop_event: Set it (Ctrl-C) to stop after the current iteration, with a checkpoint.
        on_worker: Called with the actor handle once it runs (tests inject faults this way).

    Returns:
        The run summary (as ``result.json``), plus ``worker_restarts``: how many times Ray
        restarted the worker after its process died, as the driver saw it.
    """
    out = Path(out).resolve()
    prepare_output(out, resume)
    owned = connect(ray_address, config.run.cpus)
    try:
        queue = Queue(actor_options={"num_cpus": 0})
        worker = TrainingWorker.options(  # type: ignore[attr-defined]
            num_cpus=config.run.cpus,
            num_gpus=config.run.gpus,
            max_restarts=config.run.max_restarts,
            max_task_retries=config.run.max_restarts,
            max_concurrency=2,
        ).remote()
        future = worker.run.remote(config.model_dump_json(), str(out), resume, queue)
        if on_worker is not None:
            on_worker(worker)
        reporter = ProgressReporter(config.train.total_iterations, 0, config.run.log_every)
        starts: list[WorkerStarted] = []
        stop_sent = False
        try:
            while True:
                done, _ = ray.wait([future], timeout=0.5)
                _drain(queue, reporter, starts)
                if stop_event is not None and stop_event.is_set() and not stop_sent:
                    worker.request_stop.remote()
                    stop_sent = True
                if done:
                    break
            summary = _result(future)
            _drain(queue, reporter, starts)
        finally:
            reporter.close()
        ray.kill(worker)
        restarts = sum(start.restarted for start in starts)
        if restarts:
            logger.warning("the training worker was restarted %d time(s) and resumed", restarts)
        summary = {**summary, "worker_restarts": restarts}
        result_file = out / "result.json"
        if result_file.exists():  # the worker wrote it; the restarts are the driver's to add
            result_file.write_text(json.dumps(summary, indent=2) + "\n")
        return summary
    finally:
        if owned:
            ray.shutdown()


def _result(future: Any) -> dict[str, Any]:
    """The worker's summary; a project error it raised is raised here as itself.

    Ray wraps an actor's exception with the worker's traceback; for the project's own errors
    (a refusing teacher, a diverged loss, a bad config) the message is what the user needs,
    and its class decides the exit code, so the traceback goes to the debug log only.
    """
    try:
        return ray.get(future)
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, CdfkdError):
            logger.debug("the training worker raised:\n%s", error)
            raise error.cause from None
        raise


def _drain(queue: Queue, reporter: ProgressReporter, starts: list[WorkerStarted]) -> None:
    while True:
        try:
            item = queue.get_nowait()
        except Empty:
            return
        if isinstance(item, WorkerStarted):
            starts.append(item)
        else:
            reporter(None, item)  # type: ignore[arg-type]
