"""Does the float16 wire change the student's accuracy? The same runs with float32 and float16.

    python bench/wire_dtype_accuracy.py --out DIR [--seeds 3] [--iterations 60] [--quick]

Three LeNet-5-BN teachers on disjoint thirds of scikit-learn's digits (trained once, cached in
DIR/teachers), each served by a teacher node in this process (mutual TLS on loopback). For each
seed, the same ``cdfkd train`` run (CDFKD-MFS, batch 64, K = 2, in-process, one torch thread,
no Ray) is made with ``wire_dtype = "float32"`` and with ``"float16"`` (images, logits,
features and gradients cross the wire as float16; the nodes compute in float32). Same seed,
same teachers: any difference is the wire's rounding. Reports the student's mean-of-headers
accuracy on the digits test split per run, the mean paired difference (float16 - float32) and
the seed-to-seed standard deviation of the float32 runs, to compare it with. ``--quick``: one
seed, 20 iterations (a smoke run, no conclusion). Writes DIR/wire_dtype_accuracy.json and
appends a table to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results import append_section  # noqa: E402
from cdfkd.coordinator.config import parse_run_config  # noqa: E402
from cdfkd.coordinator.training_run import run_training  # noqa: E402
from cdfkd.teacher_node.config import parse_teacher_config  # noqa: E402
from cdfkd.teacher_node.datasets import DatasetName  # noqa: E402
from cdfkd.teacher_node.pki import create_dev_pki  # noqa: E402
from cdfkd.teacher_node.server import Node, build_node  # noqa: E402
from cdfkd.teacher_node.training import TeacherJob, train_teacher_package  # noqa: E402

DTYPES = ("float32", "float16")


def teachers(root: Path) -> list[Path]:
    """Three digits teachers (as the tests' ``digits_teachers``), trained once."""
    packages = []
    for index in range(3):
        directory = root / f"owner-{index + 1}"
        if not (directory / "teacher.json").exists():
            job = TeacherJob(
                name=f"owner-{index + 1}",
                dataset=DatasetName.DIGITS,
                shard=index,
                num_shards=3,
                epochs=15,
                batch_size=32,
                seed=index,
            )
            train_teacher_package(job, directory)
        packages.append(directory)
    return packages


def start_nodes(packages: list[Path], pki: Any, out: Path) -> list[Node]:
    nodes = []
    for package in packages:
        config = parse_teacher_config(
            {
                "node": {"package": str(package), "address": "127.0.0.1:0"},
                "tls": {
                    "cert": str(pki.server.cert),
                    "key": str(pki.server.key),
                    "client_ca": str(pki.ca.cert),
                },
                "policy": {"callers": {"student": {}}},
            },
            base=out,
        )
        node = build_node(config)
        node.start()
        nodes.append(node)
    return nodes


def run(nodes: list[Node], pki: Any, out: Path, seed: int, dtype: str, iterations: int) -> dict:
    entries = [
        {
            "address": f"127.0.0.1:{node.port}",
            "ca": pki.ca.cert,
            "cert": pki.client.cert,
            "key": pki.client.key,
            "wire_dtype": dtype,
        }
        for node in nodes
    ]
    config = parse_run_config(
        {
            "data": {"dataset": "digits"},
            "teachers": entries,
            "train": {
                "seed": seed,
                "batch_size": 64,
                "epochs": 1,
                "iterations_per_epoch": iterations,
                "student_steps_per_generator_step": 2,
                "student": {"widths": [8, 16, 16]},
                "generator": {"latent_dim": 32, "width": 8},
                "attention": {"samples": 30, "epochs": 2},
            },
            "run": {"device": "cpu", "threads": 1},
        }
    )
    started = time.perf_counter()
    summary = run_training(config, out / f"seed-{seed}-{dtype}", show_progress=False).summary()
    return {
        "seed": seed,
        "wire_dtype": dtype,
        "accuracy": summary["student_accuracy_mean"],
        "training_wire_bytes": summary["training_wire_bytes"],
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.iterations = 1, 20
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    args.out = args.out.resolve()  # the runs and nodes work in other folders
    args.out.mkdir(parents=True, exist_ok=True)
    pki = create_dev_pki(args.out / "pki", force=True)
    nodes = start_nodes(teachers(args.out / "teachers"), pki, args.out)
    runs = []
    try:
        for seed in range(args.seeds):
            for dtype in DTYPES:
                runs.append(run(nodes, pki, args.out, seed, dtype, args.iterations))
                print(json.dumps(runs[-1]), flush=True)
    finally:
        for node in nodes:
            node.stop(grace=None)
    accuracy = {d: [r["accuracy"] for r in runs if r["wire_dtype"] == d] for d in DTYPES}
    differences = [b - a for a, b in zip(accuracy["float32"], accuracy["float16"], strict=True)]
    results = {
        "iterations": args.iterations,
        "seeds": args.seeds,
        "runs": runs,
        "mean_accuracy": {d: statistics.fmean(v) for d, v in accuracy.items()},
        "mean_difference_float16_minus_float32": statistics.fmean(differences),
        "float32_seed_std": statistics.stdev(accuracy["float32"]) if args.seeds > 1 else None,
    }
    (args.out / "wire_dtype_accuracy.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    append_results(results, args)


def append_results(results: dict[str, Any], args: argparse.Namespace) -> None:
    """Append the table to bench/RESULTS.md."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    quick = " --quick" if args.quick else f" --seeds {args.seeds} --iterations {args.iterations}"
    lines = [
        f"\n### float16 wire and accuracy, {now}\n",
        f"Command: `python bench/wire_dtype_accuracy.py --out {args.out}{quick}`; 3 digits "
        f"LeNet-5-BN teacher nodes (mTLS, loopback), CDFKD-MFS, batch 64, K = 2, "
        f"{results['iterations']} iterations, one torch thread.\n",
        "| seed | float32 accuracy | float16 accuracy | float32 wire bytes | float16 wire bytes |",
        "|---|---|---|---|---|",
    ]
    by_key = {(r["seed"], r["wire_dtype"]): r for r in results["runs"]}
    for seed in range(results["seeds"]):
        a, b = by_key[seed, "float32"], by_key[seed, "float16"]
        lines.append(
            f"| {seed} | {a['accuracy']:.4f} | {b['accuracy']:.4f} | "
            f"{a['training_wire_bytes']:,} | {b['training_wire_bytes']:,} |"
        )
    spread = results["float32_seed_std"]
    lines.append(
        f"\nMean paired difference (float16 - float32): "
        f"{results['mean_difference_float16_minus_float32']:+.4f}; float32 seed-to-seed std: "
        f"{'n/a (one seed)' if spread is None else f'{spread:.4f}'}.\n"
    )
    append_section("\n".join(lines))


if __name__ == "__main__":
    main()
