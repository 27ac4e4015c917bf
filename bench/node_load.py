"""Fair under load: a normal caller's latency while another caller floods the same node.

    python bench/node_load.py --out DIR [--quick] [--hostile]

One teacher node process (``cdfkd teacher serve``, mutual TLS on loopback, one torch thread,
LeNet-5-BN on 1x32x32, ``max_batch`` images per call at most) lists two callers, each with its
own client certificate: ``flood`` and ``student``. The student queries as a distillation does,
one call at a time, in cycles of five feature Queries, one Query with the BatchNorm term and
one InputGrad, all of ``--batch`` images. It does so first alone (unloaded), then while the
flood process keeps ``--flood-concurrency`` InputGrad calls of ``max_batch`` images in flight.
The flood honours the node's retry hints like the stock client; with ``--hostile`` it retries
refused calls at once instead. Each student call has a deadline of ``--deadline-s``; a call
that misses it counts as a timeout.

Target (issue 17): the student never times out and its p99 latency under the flood stays
within 3x of its unloaded p99. Writes DIR/node_load.json and appends a table to
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import multiprocessing
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.remote import make_packages  # noqa: E402
from bench.results import append_section  # noqa: E402
from cdfkd.coordinator.nodes import TeacherNodeProcess  # noqa: E402
from cdfkd.protos import teacher_pb2, teacher_pb2_grpc  # noqa: E402
from cdfkd.protos.codec import encode  # noqa: E402
from cdfkd.protos.contract import RETRY_AFTER_KEY  # noqa: E402
from cdfkd.student_node.teachers.remote import RemoteTeacherConfig, open_channel  # noqa: E402
from cdfkd.teacher_node.pki import create_dev_pki  # noqa: E402

logger = logging.getLogger("bench.node_load")
SHAPE = (1, 32, 32)
NUM_CLASSES = 10
#: One student cycle: five feature Queries (student steps), a Query with R(x), an InputGrad.
CYCLE = ("query_features",) * 5 + ("query_bn", "input_grad")
FLOOD_NAME = "flood"
STUDENT_NAME = "student"
#: p99 under load within this factor of the unloaded p99.
TARGET_RATIO = 3.0


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of ``values``."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(fraction * len(ordered) + 0.5)))
    return ordered[rank - 1]


def client(address: str, pki_dir: Path, name: str) -> teacher_pb2_grpc.TeacherServiceStub:
    """A stub with the client certificate of ``name`` (``student`` is ``client.pem``)."""
    stem = "client" if name == STUDENT_NAME else f"client-{name}"
    config = RemoteTeacherConfig(
        address=address,
        ca=pki_dir / "ca.pem",
        cert=pki_dir / f"{stem}.pem",
        key=pki_dir / f"{stem}.key",
    )
    return teacher_pb2_grpc.TeacherServiceStub(open_channel(config))


def student_requests(batch: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)
    images = encode(torch.randn(batch, *SHAPE, generator=generator))
    return {
        "query_features": teacher_pb2.QueryRequest(images=images, want_features=True),
        "query_bn": teacher_pb2.QueryRequest(images=images, want_bn_loss=True),
        "input_grad": teacher_pb2.InputGradRequest(
            images=images,
            grad_logits=encode(torch.randn(batch, NUM_CLASSES, generator=generator)),
            bn_weight=0.01,
        ),
    }


def run_student(
    stub: teacher_pb2_grpc.TeacherServiceStub, batch: int, cycles: int, deadline_s: float
) -> dict[str, Any]:
    """Run ``cycles`` student cycles one call at a time; latencies and failures."""
    requests = student_requests(batch)
    latencies: list[float] = []
    by_kind: dict[str, list[float]] = {kind: [] for kind in requests}
    timeouts = 0
    refusals: dict[str, int] = {}
    for _ in range(cycles):
        for kind in CYCLE:
            method = stub.InputGrad if kind == "input_grad" else stub.Query
            started = time.perf_counter()
            try:
                method(requests[kind], timeout=deadline_s)
            except grpc.RpcError as error:
                if error.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
                    timeouts += 1
                else:
                    refusals[error.code().name] = refusals.get(error.code().name, 0) + 1
                continue
            elapsed = time.perf_counter() - started
            latencies.append(elapsed)
            by_kind[kind].append(elapsed)
    return {
        "calls": cycles * len(CYCLE),
        "answered": len(latencies),
        "timeouts": timeouts,
        "refusals": refusals,
        "p50_s": percentile(latencies, 0.50) if latencies else None,
        "p99_s": percentile(latencies, 0.99) if latencies else None,
        "max_s": max(latencies) if latencies else None,
        "mean_s": statistics.fmean(latencies) if latencies else None,
        "p99_by_kind_s": {k: percentile(v, 0.99) for k, v in by_kind.items() if v},
    }


def flood(
    address: str,
    pki_dir: str,
    batch: int,
    concurrency: int,
    hostile: bool,
    stop: Any,
    ready: Any,
    report: Any,
) -> None:
    """The flooding caller, in its own process: ``concurrency`` threads of InputGrad calls."""
    torch.set_num_threads(1)
    stub = client(address, Path(pki_dir), FLOOD_NAME)
    generator = torch.Generator().manual_seed(1)
    request = teacher_pb2.InputGradRequest(
        images=encode(torch.randn(batch, *SHAPE, generator=generator)),
        grad_logits=encode(torch.randn(batch, NUM_CLASSES, generator=generator)),
        bn_weight=0.01,
    )
    counts = {"answered": 0, "refused_with_hint": 0, "other_errors": 0, "hint_total_s": 0.0}
    lock = threading.Lock()
    pause = threading.Event()

    def worker() -> None:
        while not stop.is_set():
            try:
                stub.InputGrad(request, timeout=60)
            except grpc.RpcError as error:
                hint = dict(error.trailing_metadata() or ()).get(RETRY_AFTER_KEY)
                with lock:
                    if hint is None:
                        counts["other_errors"] += 1
                    else:
                        counts["refused_with_hint"] += 1
                        counts["hint_total_s"] += int(hint) / 1000
                if hint is not None and not hostile:
                    pause.wait(int(hint) / 1000)
                continue
            with lock:
                counts["answered"] += 1

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    ready.set()
    stop.wait()
    for thread in threads:
        thread.join(120)
    report.put(counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--quick", action="store_true", help="fewer student cycles")
    parser.add_argument("--cycles", type=int, default=20, help="student cycles per phase")
    parser.add_argument("--batch", type=int, default=128, help="the student's batch")
    parser.add_argument("--max-batch", type=int, default=256, help="the node's max_batch")
    parser.add_argument("--flood-concurrency", type=int, default=64)
    parser.add_argument("--hostile", action="store_true", help="the flood ignores retry hints")
    parser.add_argument("--deadline-s", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=8, help="the node's node.workers")
    parser.add_argument("--per-caller", type=int, default=4, help="max_in_flight_per_caller")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    cycles = 6 if args.quick else args.cycles
    args.out = args.out.resolve()  # the node reads its config from another directory
    args.out.mkdir(parents=True, exist_ok=True)
    pki = create_dev_pki(  # this run's own, fresh each time
        args.out / "pki", client_names=(STUDENT_NAME, FLOOD_NAME), force=True
    )
    (package,) = make_packages(args.out / "teachers", 1)
    extra = "\n".join(
        [
            "[limits]",
            f"max_batch = {args.max_batch}",
            f"max_in_flight_per_caller = {args.per_caller}",
            "[audit]",
            f'path = "{args.out / "audit.jsonl"}"',
            "",
        ]
    )
    policy = "\n".join(
        [
            "[policy]",
            f'budget_file = "{args.out / "budget.json"}"',
            f"[policy.callers.{STUDENT_NAME}]",
            'mode = "full"',
            f"[policy.callers.{FLOOD_NAME}]",
            'mode = "full"',
            "",
        ]
    )
    node = TeacherNodeProcess(
        package, args.out / "node", pki, threads=1, extra=extra, policy=policy
    )
    # teacher_toml writes [node] without workers: add it there.
    config_text = node.config_path.read_text()
    node.config_path.write_text(config_text.replace("[node]", f"[node]\nworkers = {args.workers}"))
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/node_load.py", *sys.argv[1:]]),
        "student_batch": args.batch,
        "max_batch": args.max_batch,
        "flood_concurrency": args.flood_concurrency,
        "flood_honours_hints": not args.hostile,
        "workers": args.workers,
        "max_in_flight_per_caller": args.per_caller,
        "cycles": cycles,
        "deadline_s": args.deadline_s,
        "target_ratio": TARGET_RATIO,
    }
    with node:  # started by the context manager, stopped (drained) when it ends
        address = node.address
        student = client(address, pki.ca.cert.parent, STUDENT_NAME)
        run_student(student, args.batch, 2, args.deadline_s)  # warm-up
        logger.info("unloaded: %d cycles", cycles)
        results["unloaded"] = run_student(student, args.batch, cycles, args.deadline_s)
        context = multiprocessing.get_context("spawn")
        stop, ready, report = context.Event(), context.Event(), context.Queue()
        flooder = context.Process(
            target=flood,
            args=(
                address,
                str(pki.ca.cert.parent),
                args.max_batch,
                args.flood_concurrency,
                args.hostile,
                stop,
                ready,
                report,
            ),
        )
        flooder.start()
        try:
            if not ready.wait(120):
                raise RuntimeError("the flood process did not start")
            time.sleep(2.0)  # let the flood fill the node's queue before measuring
            logger.info("loaded: %d cycles under the flood", cycles)
            started = time.perf_counter()
            results["loaded"] = run_student(student, args.batch, cycles, args.deadline_s)
            results["loaded_seconds"] = time.perf_counter() - started
        finally:
            stop.set()
            flood_counts = report.get(timeout=180)
            flooder.join(60)
            if flooder.is_alive():
                flooder.kill()
    flood_counts["answered_per_s"] = flood_counts["answered"] / results["loaded_seconds"]
    results["flood"] = flood_counts
    ratio = results["loaded"]["p99_s"] / results["unloaded"]["p99_s"]
    results["p99_ratio"] = ratio
    results["target_met"] = bool(results["loaded"]["timeouts"] == 0 and ratio <= TARGET_RATIO)
    (args.out / "node_load.json").write_text(json.dumps(results, indent=2) + "\n")
    write_table(results)
    logger.info("p99 ratio %.2f, timeouts %d", ratio, results["loaded"]["timeouts"])


def write_table(results: dict[str, Any]) -> None:
    unloaded, loaded, flood_counts = results["unloaded"], results["loaded"], results["flood"]

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.1f}"

    lines = [
        "",
        f"### Node under load, {results['date'][:16].replace('T', ' ')} UTC",
        "",
        f"Command: `{results['command']}`; one node process (1 torch thread), 2 CPU cores "
        f"shared by the node, the flood process and the student. Student: cycles of 5 feature "
        f"Queries, 1 Query with R(x), 1 InputGrad, batch {results['student_batch']}, one call "
        f"at a time, deadline {results['deadline_s']:g} s, {results['cycles']} cycles per "
        f"phase. Flood: {results['flood_concurrency']} concurrent InputGrad of "
        f"{results['max_batch']} images (max_batch), "
        f"{'honouring' if results['flood_honours_hints'] else 'ignoring'} retry hints. Node: "
        f"workers {results['workers']}, max_in_flight_per_caller "
        f"{results['max_in_flight_per_caller']}, round-robin into the engine.",
        "",
        "| student | calls | timeouts | p50 ms | p99 ms | max ms |",
        "|---|---|---|---|---|---|",
        f"| alone | {unloaded['calls']} | {unloaded['timeouts']} | {ms(unloaded['p50_s'])} | "
        f"{ms(unloaded['p99_s'])} | {ms(unloaded['max_s'])} |",
        f"| under the flood | {loaded['calls']} | {loaded['timeouts']} | {ms(loaded['p50_s'])} | "
        f"{ms(loaded['p99_s'])} | {ms(loaded['max_s'])} |",
        "",
        f"p99 under load / p99 alone: **{results['p99_ratio']:.2f}** (target <= "
        f"{results['target_ratio']:g}, no timeouts: "
        f"**{'met' if results['target_met'] else 'not met'}**). Flood meanwhile: "
        f"{flood_counts['answered']} calls answered ({flood_counts['answered_per_s']:.1f}/s), "
        f"{flood_counts['refused_with_hint']} refused with a retry hint, "
        f"{flood_counts['other_errors']} other errors.",
        "",
    ]
    append_section("\n".join(lines))


if __name__ == "__main__":
    main()
