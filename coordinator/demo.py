"""``cdfkd demo``: the whole system end to end on one machine.

1. A development PKI (``DIR/pki``); three owners' LeNet-5-BN teachers trained on disjoint
   thirds of the data (cached under ``DIR/teachers``).
2. Three teacher nodes as separate processes with mutual TLS on loopback (``DIR/nodes``).
3. ``federation check`` over them; then CDFKD-MFS as a Ray job on an embedded local Ray,
   evaluation, ``DIR/summary.json`` and the report.
4. The attention module trained by FedAvg in a Flower simulation, each owner on its own 20
   real samples, and the student evaluated on each owner's own test split (``DIR/flower``).

Every process started here is stopped on the way out, also on error or Ctrl-C.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from cdfkd.coordinator.config import RunConfig, RunSettings
from cdfkd.coordinator.errors import FederationCheckFailed
from cdfkd.coordinator.federation import check_federation, format_table
from cdfkd.coordinator.nodes import TeacherNodeProcess
from cdfkd.coordinator.ray_driver import train_on_ray
from cdfkd.coordinator.training_run import CHECKPOINT_DIR, STUDENT_DIR
from cdfkd.student_node.checkpoint import latest_checkpoint
from cdfkd.student_node.config import GeneratorConfig, Method, OptimizerConfig, TrainConfig
from cdfkd.student_node.models.aggregator import AttentionConfig
from cdfkd.student_node.teachers.remote import RemoteTeacherConfig
from cdfkd.teacher_node.data_sources import load_labelled_images
from cdfkd.teacher_node.datasets import DatasetName, Split, load_dataset
from cdfkd.teacher_node.errors import PackageError
from cdfkd.teacher_node.package import read_metadata
from cdfkd.teacher_node.pki import DevPki, Identity, create_dev_pki
from cdfkd.teacher_node.training import TeacherJob, train_teacher_package

logger = logging.getLogger(__name__)

NUM_OWNERS = 3
ATTENTION_SAMPLES = 60


def demo_train_config(quick: bool) -> TrainConfig:
    """The tuned CDFKD-MFS settings of the demo (bench/RESULTS.md records why)."""
    # A short run learns most at the high learning rate: decay for its last fifth only; the
    # full run decays at two thirds, as METHOD.md (epochs 100, 200 of 300).
    epochs, milestone = (5, 4) if quick else (24, 16)
    return TrainConfig(
        method=Method.CDFKD_MFS,
        batch_size=128,
        epochs=epochs,
        iterations_per_epoch=25,
        optimizer=OptimizerConfig(milestones=(milestone,)),
        generator=GeneratorConfig(latent_dim=256, width=8),
        attention=AttentionConfig(samples=ATTENTION_SAMPLES),
    )


def _teacher_jobs(quick: bool, dataset: DatasetName, data_path: Path | None) -> list[TeacherJob]:
    return [
        TeacherJob(
            name=f"owner-{index + 1}",
            dataset=dataset,
            data_path=data_path,
            shard=index,
            num_shards=NUM_OWNERS,
            epochs=(3 if quick else 8) if dataset is DatasetName.FASHION_MNIST else 15,
            batch_size=128 if dataset is DatasetName.FASHION_MNIST else 32,
            seed=index,
        )
        for index in range(NUM_OWNERS)
    ]


def _ensure_teacher(job: TeacherJob, directory: Path) -> None:
    """Reuse a cached package made for the same owner and data; otherwise (re)train it."""
    try:
        metadata = read_metadata(directory)
        dataset = load_labelled_images(job.source, Split.TEST, root=job.data_path)
        if metadata.name == job.name and metadata.input_shape == dataset.input_shape:
            logger.info("reusing teacher package %s", directory)
            return
    except PackageError:
        pass
    train_teacher_package(job, directory)


def _dev_pki(directory: Path) -> DevPki:
    """The demo's development PKI, created once."""
    names = ("ca", "server", "client")
    if all((directory / f"{n}.pem").exists() and (directory / f"{n}.key").exists() for n in names):
        return DevPki(*(Identity(directory / f"{n}.pem", directory / f"{n}.key") for n in names))
    return create_dev_pki(directory)


def run_demo(
    out: Path,
    quick: bool = False,
    stop_event: threading.Event | None = None,
    data_path: Path | None = None,
    dataset: DatasetName = DatasetName.FASHION_MNIST,
) -> dict[str, Any]:
    """Run the demo into ``out``; returns the summary (also written to ``out/summary.json``).

    Running it again reuses the PKI, the teachers and, when the run finished, its checkpoint.

    Raises:
        DatasetError: the dataset is not installed (exit code 2).
        FederationCheckFailed: a teacher node is unreachable or incompatible (exit code 3).
    """
    out = Path(out).resolve()
    started = time.monotonic()
    load_dataset(dataset, Split.TEST, data_path)  # fail early, exit code 2
    pki = _dev_pki(out / "pki")
    packages = []
    for job in _teacher_jobs(quick, dataset, data_path):
        directory = out / "teachers" / job.name
        _ensure_teacher(job, directory)
        packages.append(directory)
    teacher_seconds = time.monotonic() - started

    with ExitStack() as nodes:
        addresses = [
            nodes.enter_context(
                TeacherNodeProcess(package, out / "nodes" / package.name, pki, threads=1)
            ).address
            for package in packages
        ]
        logger.info("teacher nodes listening on %s", ", ".join(addresses))
        config = RunConfig(
            data={"dataset": dataset, "path": data_path},
            teachers=tuple(
                RemoteTeacherConfig(
                    address=address, ca=pki.ca.cert, cert=pki.client.cert, key=pki.client.key
                )
                for address in addresses
            ),
            train=demo_train_config(quick),
            run=RunSettings(checkpoint_every=25, eval_every=25, log_every=10, cpus=2, threads=2),
        )
        reports = check_federation(config)
        logger.info("federation check:\n%s", format_table(reports))
        failed = [r for r in reports if not r.ok]
        if failed:
            raise FederationCheckFailed(
                "federation check failed: "
                + "; ".join(f"{r.target}: {', '.join(r.problems)}" for r in failed)
            )
        resume = latest_checkpoint(out / CHECKPOINT_DIR) is not None
        result = train_on_ray(config, out, resume=resume, stop_event=stop_event)
    if stop_event is not None and stop_event.is_set():
        flower = None  # interrupted: the checkpoint is written, the student is not final
    else:
        # After the Ray job: Flower's simulation starts (and stops) its own Ray.
        flower = _federated_attention(out, quick, dataset, data_path)
    summary = {
        **result,
        "quick": quick,
        "dataset": dataset.value,
        "teacher_nodes": addresses,
        "teacher_packages": [str(p) for p in packages],
        "federated": flower,
        "student_accuracy_attention_federated": None
        if flower is None
        else flower["accuracy_attention"],
        "teacher_seconds": round(teacher_seconds, 2),
        "total_seconds": round(time.monotonic() - started, 2),
        "report": str(out / "report.md"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.info(
        "demo done in %.0f s: student %.2f %% (mean of headers), attention %s "
        "(federated, Flower); teachers %s; report %s",
        summary["total_seconds"],
        100 * result["student_accuracy_mean"],
        "n/a" if flower is None else f"{100 * flower['accuracy_attention']:.2f} %",
        [None if a is None else round(100 * a, 2) for a in result["teacher_accuracies"]],
        out / "report.md",
    )
    return summary


def _federated_attention(
    out: Path, quick: bool, dataset: DatasetName, data_path: Path | None
) -> dict[str, Any]:
    """Federated attention (Flower simulation, FedAvg) installed into the student.

    Each owner trains on its own k samples and evaluates on its own test split.
    """
    from cdfkd.coordinator.flower.server_app import AGGREGATOR_FILE
    from cdfkd.coordinator.flower.settings import FederatedAttentionSettings
    from cdfkd.coordinator.flower.simulation import simulate

    settings = FederatedAttentionSettings(
        student_dir=out / STUDENT_DIR,
        out_dir=out / "flower",
        dataset=dataset,
        data_path=data_path,
        num_owners=NUM_OWNERS,  # the owners of the teachers, with the same IID shards
        samples_per_owner=ATTENTION_SAMPLES // NUM_OWNERS,
        rounds=5 if quick else 10,
        local_epochs=20,
    )
    summary = simulate(settings)
    shutil.copyfile(settings.out_dir / AGGREGATOR_FILE, settings.student_dir / AGGREGATOR_FILE)
    for owner in summary["owners"]:
        logger.info(
            "organization %d: %.2f %% mean of headers, %.2f %% federated attention on its %d "
            "test images",
            owner["owner"],
            100 * owner["accuracy_mean"],
            100 * owner["accuracy_attention"],
            owner["test_samples"],
        )
    return {k: summary[k] for k in ("accuracy_mean", "accuracy_attention", "owners")}
