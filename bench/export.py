"""Edge export: file size, parameters and CPU latency of PyTorch, TorchScript and onnxruntime.

    python bench/export.py --out DIR [--student DIR] [--aggregate mean|attention] [--runs N]
                           [--quick]

Without ``--student`` it builds the default run config's student (``TrainConfig()``: the MFS
student with widths 16, 32, 64 that the demo and ``deploy/run.example.toml`` train) for three
LeNet-5-BN teachers on Fashion-MNIST (1x32x32), with random weights and a random attention
module: size and latency do not depend on what the weights learned. Both files are written by
``cdfkd.student_node.export``; the three runtimes are timed round-robin (so machine noise hits
each alike), at batch 1 and 64, with one thread and with every core. Writes DIR/export.json
and appends a table to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results import append_section  # noqa: E402
from cdfkd.student_node.artifact import save_student  # noqa: E402
from cdfkd.student_node.config import TrainConfig  # noqa: E402
from cdfkd.student_node.export import (  # noqa: E402
    Aggregation,
    EdgeModel,
    export_onnx,
    export_torchscript,
    load_edge_model,
)
from cdfkd.student_node.models.aggregator import AttentionAggregator  # noqa: E402
from cdfkd.student_node.teachers.protocol import TeacherInfo  # noqa: E402
from cdfkd.student_node.trainer import build_student  # noqa: E402

logger = logging.getLogger("bench.export")
BATCH_SIZES = (1, 64)
WARMUP_RUNS = 5
#: Three LeNet-5-BN teachers on Fashion-MNIST padded to 32x32, as in the demo.
INFOS = [
    TeacherInfo(
        name=f"teacher-{index}",
        input_shape=(1, 32, 32),
        num_classes=10,
        feature_dim=84,
        normalization_mean=(0.219,),
        normalization_std=(0.3318,),
    )
    for index in range(3)
]

Runner = Callable[[np.ndarray], np.ndarray]


def random_student(directory: Path) -> Path:
    """The default run config's student with random weights, saved by the real save path."""
    torch.manual_seed(0)
    config = TrainConfig()
    student = build_student(config, INFOS).eval()
    save_student(directory, student, AttentionAggregator(INFOS[0].num_classes), config, INFOS)
    return directory


def runners(model: EdgeModel, onnx_path: Path, torchscript_path: Path, threads: int) -> dict:
    """One callable per runtime, numpy images in, numpy logits out, on ``threads`` threads."""
    torch.set_num_threads(threads)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(
        str(onnx_path), options, providers=["CPUExecutionProvider"]
    )
    scripted = torch.jit.load(str(torchscript_path))

    def eager(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model.classifier(torch.from_numpy(images)).numpy()

    def torchscript(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return scripted(torch.from_numpy(images)).numpy()

    def onnx(images: np.ndarray) -> np.ndarray:
        return session.run(None, {"images": images})[0]

    return {"pytorch": eager, "torchscript": torchscript, "onnxruntime": onnx}


def time_round_robin(functions: dict[str, Runner], images: np.ndarray, runs: int) -> dict:
    """Median ms per image of each function, timed in turn ``runs`` times."""
    for function in functions.values():
        for _ in range(WARMUP_RUNS):
            function(images)
    seconds: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(runs):
        for name, function in functions.items():
            started = time.perf_counter()
            function(images)
            seconds[name].append(time.perf_counter() - started)
    return {name: 1e3 * statistics.median(s) / len(images) for name, s in seconds.items()}


def machine() -> str:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or platform.machine(),
    )
    return f"{model}, {os.cpu_count()} logical CPUs, {platform.system()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--student", type=Path, help="a trained student folder (default: random)")
    parser.add_argument("--aggregate", default="attention", choices=["mean", "attention"])
    parser.add_argument("--runs", type=int, default=100, help="timed runs per measurement")
    parser.add_argument("--quick", action="store_true", help="10 runs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    runs = 10 if args.quick else args.runs
    all_threads = os.cpu_count() or 1
    args.out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]

    student_dir = args.student or random_student(args.out / "student")
    model = load_edge_model(student_dir, Aggregation(args.aggregate))
    exports = {
        "onnxruntime": export_onnx(model, args.out / "student.onnx"),
        "torchscript": export_torchscript(model, args.out / "student.pt"),
    }
    weights = sum(p.stat().st_size for p in Path(student_dir).glob("*.safetensors"))
    images = {b: model.example_input(b, seed=b).numpy() for b in BATCH_SIZES}

    latency: dict[str, dict[str, float]] = {}
    max_difference: dict[str, float] = {}
    for threads in sorted({1, all_threads}):
        onnx_path, torchscript_path = exports["onnxruntime"].path, exports["torchscript"].path
        functions = runners(model, onnx_path, torchscript_path, threads)
        if threads == 1:
            reference = functions["pytorch"](images[64])
            max_difference = {
                name: float(np.abs(function(images[64]) - reference).max())
                for name, function in functions.items()
            }
        for batch_size in BATCH_SIZES:
            logger.info("timing batch %d on %d thread(s)", batch_size, threads)
            for name, ms in time_round_robin(functions, images[batch_size], runs).items():
                latency.setdefault(name, {})[f"batch{batch_size}_threads{threads}"] = ms

    results: dict[str, Any] = {
        "student": str(args.student) if args.student else "random weights (TrainConfig())",
        "aggregation": args.aggregate,
        "parameters": model.parameter_count(),
        "runs": runs,
        "all_threads": all_threads,
        "load_average_before": round(load_before, 2),
        "load_average_after": round(os.getloadavg()[0], 2),
        "machine": machine(),
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
        "size_bytes": {
            "pytorch": weights,
            **{name: result.size_bytes for name, result in exports.items()},
        },
        "max_abs_difference_to_pytorch": max_difference,
        "ms_per_image": latency,
    }
    (args.out / "export.json").write_text(json.dumps(results, indent=2) + "\n")
    write_table(results, args)
    print(json.dumps(results, indent=2))


def write_table(results: dict[str, Any], args: argparse.Namespace) -> None:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = " ".join(["python bench/export.py", *sys.argv[1:]])
    threads = results["all_threads"]
    files = {
        "pytorch": "safetensors weights (eager)",
        "torchscript": "student.pt (frozen)",
        "onnxruntime": "student.onnx",
    }
    header_cells = [
        f"batch {b}, {t} thread{'s' if t > 1 else ''}"
        for t in sorted({1, threads})
        for b in BATCH_SIZES
    ]
    keys = [f"batch{b}_threads{t}" for t in sorted({1, threads}) for b in BATCH_SIZES]
    lines = [
        f"\n### Edge export, {stamp}\n",
        f"Command: `{command}`; student: {results['student']}, aggregation "
        f"{results['aggregation']}, {results['parameters']:,} parameters used by the logits; "
        f"{results['machine']}; torch {results['versions']['torch']}, onnxruntime "
        f"{results['versions']['onnxruntime']}; median of {results['runs']} round-robin runs "
        f"after {WARMUP_RUNS} warm-up runs; load average {results['load_average_before']} "
        f"before, {results['load_average_after']} after (the machine is shared).\n",
        "| runtime | file | KiB | max abs diff to PyTorch | "
        + " | ".join(f"ms / image, {cell}" for cell in header_cells)
        + " |",
        "|---|---|---|---|" + "---|" * len(keys),
    ]
    for name, file in files.items():
        cells = " | ".join(f"{results['ms_per_image'][name][key]:.3f}" for key in keys)
        lines.append(
            f"| {name} | {file} | {results['size_bytes'][name] / 1024:.1f} | "
            f"{results['max_abs_difference_to_pytorch'][name]:.1e} | {cells} |"
        )
    if max(results["load_average_before"], results["load_average_after"]) >= threads:
        lines.append(
            f"\nThe load average reached the {threads} CPUs: other processes held the cores, so "
            "the multi-thread columns measure threads waiting for a core more than the model; "
            "the 1-thread columns compare the runtimes.\n"
        )
    lines.append("")
    append_section("\n".join(lines))


if __name__ == "__main__":
    main()
