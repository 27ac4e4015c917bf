"""What a point of accuracy costs across a federation: teacher images, wire bytes, wall-clock.

    python bench/federation_cost.py --out DIR [--quick] [--seeds N] [--minutes [M ...]]
                                    [--teacher-images N [N ...]] [--modes NAME [NAME ...]]
                                    [--wan-iterations N]

Three LeNet-5-BN owners on disjoint IID thirds of Fashion-MNIST (training split less a
5,000-image validation split, held out first, as in bench/quality.py), each a teacher node
process (mTLS, loopback, one torch thread). The student (CDFKD-MFS, the demo's settings: batch
128, K = 5, generator width 8) runs in this process with two threads. Modes, side by side:

- ``paper``: the paper-exact loop (every student step on a fresh batch asked of every teacher);
- ``replay``: a replay memory with the answers cached (``[train.replay]``);
- ``replay_pipelined``: replay, and the teachers' answers fetched ahead (``train.prefetch``);
- ``replay_pipelined_float16``: the same with the float16 wire;
- ``replay_generator_batch_pipelined_float16``: the same, and the generator step's batch joins
  the memory (``replay.keep_generator_batch``);
- ``replay_generator_batch_k10_pipelined_float16``: the same with K = 10 student steps per
  generator step (twice the student steps per teacher image);
- ``generator_batch_only_pipelined_float16``: that batch alone feeds the memory
  (``new_batches`` 0);
- ``generator_batch_only_k10_pipelined_float16``: the same with K = 10 (two batches a teacher
  per iteration and twice the student steps per teacher image).

**Accuracy at a wall-clock budget.** For each mode and budget (5 and 15 minutes by default) and
each seed, one run is bounded by that many seconds (``run.max_seconds``). Its learning-rate
schedule is planned for the iterations the mode reaches in that time, measured by a short
calibration of that mode just before (decay by 0.1 at 2/3 of them; planned for 90 % of the
predicted iterations, :data:`PLANNING_MARGIN`), so that no mode is cut off
before its decay. The test split is read once, at the end of each run; nothing is chosen here
on it (the modes' settings are fixed in :data:`MODES`, not tuned).

**Accuracy at a teacher-image budget** (``--teacher-images N``). The same, but each run is
planned for the most iterations whose training teacher images (all teachers together, as
``summary.json``'s ``teacher_images``) stay within N, measured by the same calibration, with one
iteration to spare for answers asked ahead (:func:`iterations_within`), and no wall-clock bound:
what a mode reaches with a share of another's images, however long it takes.

**The emulated link.** For each mode, a fixed number of iterations with the nodes reached
directly on loopback and through the userspace proxy emulating a 50 ms round trip and
100 Mbit/s each way (bench/tcp_proxy.py), interleaved round by round.

Writes DIR/federation_cost.json (``{"modes": {name: M}, "wan": {...}}``, M holding
``accuracy``, ``accuracy_std``, ``teacher_images``, ``wire_bytes``, ``iterations``, ``seconds``
at the largest wall-clock budget, else the largest image budget, and ``budgets`` with the same
for every budget, keyed ``"5 min"`` or ``"569,632 images"``) and appends a table to
bench/RESULTS.md. A bare ``--minutes`` with no ``--teacher-images`` runs no accuracy runs: the
emulated link only (``modes`` is then empty).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import select
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.quality import ensure_teachers, homogeneous_jobs, prepare_data  # noqa: E402
from bench.results import append_section  # noqa: E402
from bench.tcp_proxy import Link, RecordingProxy  # noqa: E402
from cdfkd.coordinator.config import DataConfig, RunConfig, RunSettings  # noqa: E402
from cdfkd.coordinator.nodes import TeacherNodeProcess  # noqa: E402
from cdfkd.coordinator.training_run import run_training  # noqa: E402
from cdfkd.student_node.config import TrainConfig  # noqa: E402
from cdfkd.student_node.teachers.protocol import Teacher  # noqa: E402
from cdfkd.student_node.teachers.remote import RemoteTeacher, RemoteTeacherConfig  # noqa: E402
from cdfkd.student_node.trainer import init_state, run_iteration  # noqa: E402
from cdfkd.teacher_node.pki import create_dev_pki  # noqa: E402

logger = logging.getLogger("bench.federation_cost")
#: gRPC honours these for non-loopback addresses; teacher traffic must stay on this machine.
PROXY_VARIABLES = ("grpc_proxy", "https_proxy", "http_proxy", "HTTPS_PROXY", "HTTP_PROXY")
VALIDATION_SAMPLES = 5000
WAN_ROUND_TRIP_MS = 50.0
WAN_MBIT = 100.0
#: Fixed, not tuned: a memory of 32 batches, one fresh batch per iteration, uniform draws.
REPLAY = {"size": 4096, "new_batches": 1, "sampling": "uniform"}
PREFETCH = 2
#: The schedule is planned for this share of the iterations the calibration predicts: a run that
#: the clock stops before its planned end misses its decay (the first 5-minute runs did).
PLANNING_MARGIN = 0.9
#: The memory with the generator step's batch kept, answers fetched ahead.
KEPT_BATCH_PIPELINED = {"replay": {**REPLAY, "keep_generator_batch": True}, "prefetch": PREFETCH}
#: That batch alone feeds the memory: no fresh batch is asked for (``new_batches`` 0).
GENERATOR_BATCH_ONLY_PIPELINED = {
    "replay": {**REPLAY, "new_batches": 0, "keep_generator_batch": True},
    "prefetch": PREFETCH,
}
MODES: dict[str, dict[str, Any]] = {
    "paper": {"train": {}, "wire_dtype": "float32"},
    "replay": {"train": {"replay": REPLAY}, "wire_dtype": "float32"},
    "replay_pipelined": {
        "train": {"replay": REPLAY, "prefetch": PREFETCH},
        "wire_dtype": "float32",
    },
    "replay_pipelined_float16": {
        "train": {"replay": REPLAY, "prefetch": PREFETCH},
        "wire_dtype": "float16",
    },
    # The generator step's batch joins the memory too (bench/replay_sources.py): with the
    # fresh batch, and alone (two batches a teacher per iteration, one round trip fewer).
    "replay_generator_batch_pipelined_float16": {
        "train": KEPT_BATCH_PIPELINED,
        "wire_dtype": "float16",
    },
    # The same with K = 10 student steps per generator step: twice the student steps per
    # teacher image (the memory answers them); declared before its first run, not tuned.
    "replay_generator_batch_k10_pipelined_float16": {
        "train": {**KEPT_BATCH_PIPELINED, "student_steps_per_generator_step": 10},
        "wire_dtype": "float16",
    },
    "generator_batch_only_pipelined_float16": {
        "train": GENERATOR_BATCH_ONLY_PIPELINED,
        "wire_dtype": "float16",
    },
    # The same with K = 10: declared before its first run, not tuned; the memory modes' cheapest
    # in teacher images per iteration, aimed at the quarter of the paper loop's images.
    "generator_batch_only_k10_pipelined_float16": {
        "train": {**GENERATOR_BATCH_ONLY_PIPELINED, "student_steps_per_generator_step": 10},
        "wire_dtype": "float16",
    },
}


def train_config(mode: str, iterations: int, seed: int) -> TrainConfig:
    """The demo's settings for exactly ``iterations`` iterations, decay by 0.1 at 2/3 of them."""
    per_epoch = 10 if iterations >= 30 else 1
    epochs = max(1, iterations // per_epoch)
    return TrainConfig.model_validate(
        {
            "batch_size": 128,
            "iterations_per_epoch": per_epoch,
            "epochs": epochs,
            "seed": seed,
            "optimizer": {"milestones": [max(1, epochs * 2 // 3)]},
            "generator": {"latent_dim": 256, "width": 8},
            "attention": {"samples": 60},
            **MODES[mode]["train"],
        }
    )


def remote_configs(addresses: list[str], pki: Any, mode: str) -> tuple[RemoteTeacherConfig, ...]:
    return tuple(
        RemoteTeacherConfig(
            address=address,
            ca=pki.ca.cert,
            cert=pki.client.cert,
            key=pki.client.key,
            wire_dtype=MODES[mode]["wire_dtype"],
        )
        for address in addresses
    )


@dataclass(frozen=True)
class Calibration:
    """A mode's measured cost with these teachers, from a fresh state.

    ``seconds``: per iteration after the warm-up; ``first_images``: the teachers' images of the
    first iteration (with a memory it fills it); ``images``: per iteration after the warm-up
    (all teachers together, as ``summary.json``'s ``teacher_images``).
    """

    seconds: float
    first_images: int
    images: float


def _images(teachers: Sequence[Teacher]) -> int:
    return sum(getattr(t, "images_answered", 0) for t in teachers)


def timed_iterations(
    teachers: Sequence[Teacher],
    train: TrainConfig,
    count: int,
    warmup: int = 2,
    executor: Executor | None = None,
) -> Calibration:
    """``count`` iterations after ``warmup`` (at least 1) from a fresh state, timed and counted."""
    if warmup < 1:
        raise ValueError("the calibration needs a warm-up iteration to count the first one")
    torch.manual_seed(train.seed)
    state = init_state(train, [t.info() for t in teachers], torch.device("cpu"))
    before = _images(teachers)
    run_iteration(state, teachers, train, executor=executor)
    first = _images(teachers) - before
    for _ in range(warmup - 1):
        run_iteration(state, teachers, train, executor=executor)
    warm = _images(teachers)
    started = time.perf_counter()
    for _ in range(count):
        run_iteration(state, teachers, train, executor=executor)
    seconds = (time.perf_counter() - started) / count
    return Calibration(seconds, first, (_images(teachers) - warm) / count)


def iterations_within(images: int, calibration: Calibration) -> int:
    """The most iterations whose teacher images stay within ``images``, one iteration to spare.

    The spare iteration covers answers asked ahead and not used when the run ends.
    """
    if calibration.images <= 0:
        raise ValueError("this mode asks the teachers nothing per iteration: no image budget")
    planned = math.floor((images - calibration.first_images) / calibration.images)
    if planned < 3:
        raise ValueError(f"{images:,} teacher images buy fewer than 3 iterations of this mode")
    return planned


def calibrate(
    configs: tuple[RemoteTeacherConfig, ...], train: TrainConfig, count: int, warmup: int = 2
) -> Calibration:
    """:func:`timed_iterations` with these remote teachers.

    The per-teacher calls fan out on a thread per teacher, as a run's (``run_training``) do:
    without it the three input-gradient calls of a generator step would wait for each other,
    and the link's round trip would count three times.
    """
    with ExitStack() as stack:
        teachers = [stack.enter_context(RemoteTeacher(c)) for c in configs]
        fan_out = stack.enter_context(ThreadPoolExecutor(len(teachers), "teacher-fan-out"))
        return timed_iterations(teachers, train, count, warmup, fan_out)


def accuracy_run(
    mode: str,
    budget: float | int,
    seed: int,
    addresses: list[str],
    pki: Any,
    data: Path,
    out: Path,
    calibration: int,
    by_images: bool = False,
) -> dict[str, Any]:
    """One run of ``mode`` within ``budget``, its schedule planned from a calibration.

    ``budget``: wall-clock seconds (``run.max_seconds``); with ``by_images``, the teachers'
    training images instead (all teachers together), the schedule planned for the most
    iterations within them (:func:`iterations_within`) and no wall-clock bound.
    """
    configs = remote_configs(addresses, pki, mode)
    measured = calibrate(configs, train_config(mode, 10**4, seed), calibration)
    if by_images:
        planned = iterations_within(int(budget), measured)
    else:
        planned = max(3, int(PLANNING_MARGIN * budget / measured.seconds))
    config = RunConfig(
        data=DataConfig(files=data, eval_samples=10),
        teachers=configs,
        train=train_config(mode, planned, seed),
        run=RunSettings(
            device="cpu",
            threads=2,
            max_seconds=None if by_images else budget,
            checkpoint_every=10**6,
            eval_every=10**6,
            log_every=10**6,
        ),
    )
    result = run_training(config, out, show_progress=False)
    summary = result.summary()
    return {
        "seed": seed,
        "accuracy": summary["student_accuracy_mean"],
        "teacher_images": summary["teacher_images"],
        "wire_bytes": summary["training_wire_bytes"],
        "iterations": summary["iterations"],
        "planned_iterations": planned,
        "calibrated_seconds_per_iteration": round(measured.seconds, 4),
        "calibrated_images_per_iteration": measured.images,
        "image_budget": int(budget) if by_images else None,
        "seconds": summary["train_seconds"],
        "ended_by": summary["ended_by"]["reason"],
        "teacher_ensemble": summary["teacher_ensemble_accuracy"],
    }


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over seeds (population std of the accuracy, 0 for one seed)."""

    def mean(key: str) -> float:
        return statistics.fmean(r[key] for r in runs)

    return {
        "accuracy": mean("accuracy"),
        "accuracy_std": statistics.pstdev(r["accuracy"] for r in runs) if len(runs) > 1 else 0.0,
        "teacher_images": mean("teacher_images"),
        "wire_bytes": mean("wire_bytes"),
        "iterations": mean("iterations"),
        "seconds": mean("seconds"),
        "seeds": len(runs),
        "runs": runs,
    }


class ProxyProcess:
    """``bench/tcp_proxy.py`` emulating the WAN link in its own process, in front of ``upstream``.

    Out of the student's process, the proxy's threads do not compete with the student's for
    its interpreter (a real link costs the student nothing of the kind). ``total`` is its byte
    count, known once it has stopped.
    """

    def __init__(self, upstream: str) -> None:
        self.total = 0
        self._process = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "bench" / "tcp_proxy.py"),
                "--upstream",
                upstream,
                "--delay-ms",
                str(WAN_ROUND_TRIP_MS / 2),
                "--rate-mbit",
                str(WAN_MBIT),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._process.stdout is not None
        ready, _, _ = select.select([self._process.stdout], [], [], 30.0)
        self.address = self._process.stdout.readline().strip() if ready else ""
        if not self.address:
            self._process.kill()
            raise RuntimeError(f"the proxy in front of {upstream} did not start")

    def __enter__(self) -> ProxyProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._process.terminate()
        out, _ = self._process.communicate(timeout=30)
        last = out.strip().splitlines()[-1] if out.strip() else "{}"
        self.total = int(json.loads(last).get("total_bytes", 0))


def wan_comparison(
    mode: str,
    addresses: list[str],
    pki: Any,
    iterations: int,
    rounds: int,
    proxy_process: bool = False,
) -> dict[str, Any]:
    """Iterations per second of ``mode`` on loopback and through the emulated link.

    ``proxy_process``: each node's proxy runs in a process of its own, not as threads here.
    """
    link = Link.wan(WAN_ROUND_TRIP_MS, WAN_MBIT)
    train = train_config(mode, 10**4, 0)
    loopback, emulated, wan_bytes = [], [], 0
    for _ in range(rounds):
        direct = remote_configs(addresses, pki, mode)
        loopback.append(1.0 / calibrate(direct, train, iterations, warmup=1).seconds)
        with ExitStack() as stack:
            proxies: list[RecordingProxy | ProxyProcess] = []
            for address in addresses:
                if proxy_process:
                    proxies.append(stack.enter_context(ProxyProcess(address)))
                else:
                    host, port = address.rsplit(":", 1)
                    proxy = RecordingProxy((host, int(port)), keep=False, link=link)
                    proxies.append(stack.enter_context(proxy))
            behind = remote_configs([p.address for p in proxies], pki, mode)
            emulated.append(1.0 / calibrate(behind, train, iterations, warmup=1).seconds)
        wan_bytes += sum(p.total for p in proxies)
    loopback_rate, emulated_rate = statistics.fmean(loopback), statistics.fmean(emulated)
    return {
        "loopback_it_per_s": loopback_rate,
        "emulated_it_per_s": emulated_rate,
        "ratio": emulated_rate / loopback_rate,
        "loopback_rounds": loopback,
        "emulated_rounds": emulated,
        "emulated_bytes_per_iteration": wan_bytes / (rounds * (iterations + 1)),
    }


def markdown(args: argparse.Namespace, report: dict[str, Any]) -> str:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = " ".join(["python bench/federation_cost.py", *sys.argv[1:]])
    kind = "smoke run (--quick: too short to judge the targets)" if args.quick else "full run"
    if not report["modes"]:
        kind = "the emulated link only (a bare --minutes)"
    lines = [
        f"\n### Federation cost, {stamp}: {kind}\n",
        f"Command: `{command}`; {report['total_seconds'] / 60:.0f} min in all. Three LeNet-5-BN "
        "teacher nodes (mTLS, loopback, one thread each) on IID thirds; CDFKD-MFS at the demo's "
        + (
            f"settings; {report['seeds']} seed(s) per cell, mean (population std); accuracy is "
            "the mean of headers on the test split, read once per run. "
            if report["modes"]
            else "settings. "
        )
        + "Replay: "
        f"{json.dumps(REPLAY)} (`replay_generator_batch_*` adds keep_generator_batch; "
        "`generator_batch_only_*` also sets new_batches 0); "
        f"prefetch {PREFETCH}.\n",
    ]
    if report.get("teacher_images"):
        lines.append(
            "\nA budget in images: each run planned for the most iterations whose training "
            "teacher images (all teachers) stay within it, no wall-clock bound.\n"
        )
    if report["modes"]:
        lines += [
            "| mode | budget | accuracy % | per seed % | iterations | schedule completed "
            "| teacher images | wire MB | s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
    else:
        lines.append("No accuracy runs (`--minutes` with no budget): the emulated link only.")
    for name, mode in report["modes"].items():
        for budget, cell in mode["budgets"].items():
            runs = cell["runs"]
            per_seed = ", ".join(f"{100 * r['accuracy']:.2f}" for r in runs)
            completed = sum(r["ended_by"] == "completed" for r in runs)
            lines.append(
                f"| {name} | {budget} | {100 * cell['accuracy']:.2f} "
                f"({100 * cell['accuracy_std']:.2f}) | {per_seed} | {cell['iterations']:.0f} | "
                f"{completed} of {len(runs)} | "
                f"{cell['teacher_images']:,.0f} | {cell['wire_bytes'] / 1e6:,.0f} | "
                f"{cell['seconds']:.0f} |"
            )
    wan = report["wan"]
    where = (
        "each in a process of its own"
        if wan.get("proxy") == "process"
        else "as threads of the student's process"
    )
    lines += [
        "",
        f"Emulated link ({WAN_ROUND_TRIP_MS:g} ms round trip, {WAN_MBIT:g} Mbit/s each way, per "
        f"node; the proxies {where}), "
        f"{report['wan_iterations']} iterations x {report['wan_rounds']} rounds per mode:\n",
        "| mode | loopback it/s | emulated it/s | ratio | bytes per iteration |",
        "|---|---|---|---|---|",
    ]
    for name, row in wan["per_mode"].items():
        lines.append(
            f"| {name} | {row['loopback_it_per_s']:.2f} | {row['emulated_it_per_s']:.2f} | "
            f"{row['ratio']:.2f} | {row['emulated_bytes_per_iteration'] / 1e6:.1f} MB |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--quick", action="store_true", help="everything in a few minutes")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--minutes",
        type=float,
        nargs="*",
        default=[5.0, 15.0],
        help="wall-clock budgets of the accuracy runs; none (a bare --minutes): the link only",
    )
    parser.add_argument(
        "--teacher-images",
        type=int,
        nargs="+",
        default=[],
        help="image budgets of further accuracy runs: each planned for the most iterations whose "
        "training teacher images (all teachers together) stay within the budget, with no "
        "wall-clock bound",
    )
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--teacher-epochs", type=int, default=6)
    parser.add_argument("--calibration-iterations", type=int, default=6)
    parser.add_argument("--wan-iterations", type=int, default=10)
    parser.add_argument("--wan-rounds", type=int, default=2)
    parser.add_argument(
        "--wan-headline",
        choices=list(MODES),
        help="the mode whose emulated-link figures head the JSON's wan "
        "(default: replay_pipelined if run, else the first mode)",
    )
    parser.add_argument(
        "--proxy-process",
        action="store_true",
        help="run each emulated link's proxy in its own process (default: threads here)",
    )
    args = parser.parse_args()
    if args.wan_headline and args.wan_headline not in args.modes:
        parser.error(f"--wan-headline {args.wan_headline} is not among --modes")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(2)
    # A terminated benchmark unwinds (SystemExit), so the node processes it started stop too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    for variable in PROXY_VARIABLES:
        os.environ.pop(variable, None)
    if args.quick:
        args.seeds, args.minutes, args.teacher_epochs = 1, [0.25, 0.5], 1
        args.calibration_iterations, args.wan_iterations, args.wan_rounds = 2, 2, 1
    started = time.monotonic()
    args.out = args.out.resolve()  # the node processes resolve paths against their folders
    args.out.mkdir(parents=True, exist_ok=True)
    paths = prepare_data(args.out / "data", VALIDATION_SAMPLES, None)
    packages = ensure_teachers(
        args.out / f"teachers-e{args.teacher_epochs}",
        homogeneous_jobs(args.teacher_epochs, paths.owners),
    )
    pki = create_dev_pki(args.out / "pki", force=True)  # this run's own, fresh each time
    report: dict[str, Any] = {
        "seeds": args.seeds,
        "minutes": args.minutes,
        "teacher_images": args.teacher_images,
        "quick": args.quick,
    }
    with ExitStack() as stack:
        nodes = [
            stack.enter_context(
                TeacherNodeProcess(package, args.out / "nodes" / f"{i}", pki, threads=1)
            )
            for i, package in enumerate(packages)
        ]
        addresses = [node.address for node in nodes]
        modes: dict[str, Any] = {}
        budgets_asked = [(minutes * 60, f"{minutes:g} min", False) for minutes in args.minutes]
        budgets_asked += [(images, f"{images:,} images", True) for images in args.teacher_images]
        for name in args.modes:
            budgets = {}
            for budget, label, by_images in budgets_asked:
                runs = [
                    accuracy_run(
                        name,
                        budget,
                        seed,
                        addresses,
                        pki,
                        paths.final,
                        args.out / "runs" / f"{name}-{label.replace(',', '').replace(' ', '')}"
                        f"-seed{seed}",
                        args.calibration_iterations,
                        by_images,
                    )
                    for seed in range(args.seeds)
                ]
                budgets[label] = aggregate(runs)
                logger.info("%s %s: %s", name, label, budgets[label]["accuracy"])
            if budgets:
                # The headline: the largest wall-clock budget, else the largest image budget.
                headline = (
                    f"{max(args.minutes):g} min"
                    if args.minutes
                    else f"{max(args.teacher_images):,} images"
                )
                modes[name] = {
                    **{k: v for k, v in budgets[headline].items() if k != "runs"},
                    "budgets": budgets,
                }
        per_mode = {
            name: wan_comparison(
                name, addresses, pki, args.wan_iterations, args.wan_rounds, args.proxy_process
            )
            for name in args.modes
        }
    headline = args.wan_headline or (
        "replay_pipelined" if "replay_pipelined" in per_mode else args.modes[0]
    )
    report["modes"] = modes
    report["wan"] = {
        **{k: per_mode[headline][k] for k in ("loopback_it_per_s", "emulated_it_per_s", "ratio")},
        "mode": headline,
        "round_trip_ms": WAN_ROUND_TRIP_MS,
        "mbit_per_s": WAN_MBIT,
        "proxy": "process" if args.proxy_process else "threads",
        "per_mode": per_mode,
    }
    report["wan_iterations"], report["wan_rounds"] = args.wan_iterations, args.wan_rounds
    report["total_seconds"] = round(time.monotonic() - started, 1)
    if not math.isfinite(report["wan"]["ratio"]):
        raise RuntimeError("the emulated-link ratio is not finite")
    (args.out / "federation_cost.json").write_text(json.dumps(report, indent=2) + "\n")
    append_section(markdown(args, report))
    print(json.dumps({k: v for k, v in report.items() if k != "modes"}, indent=2))


if __name__ == "__main__":
    main()
