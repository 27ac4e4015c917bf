"""Accuracy per teacher image: where the replay memory's batches come from (issue 19).

    python bench/replay_sources.py --out DIR [--images N] [--seeds S] [--variants NAME ...]
        [--probe-every P] [--workers W] [--quick]

CDFKD-MFS at the demo's settings (batch 128, K = 5, generator latent 256 and width 8, decay by
0.1 at 2/3 of the run) on the homogeneous federation of ``bench/quality.py``: three LeNet-5-BN
teachers on IID thirds of the owners' data, after 5,000 validation images were held out of
Fashion-MNIST's training split (the same split, seed and teacher jobs as the quality protocol,
so its cached teachers are reused when ``--out`` is the protocol's folder). Teachers run in
process: the budget here is teacher images, not seconds. Variants:

- ``paper``: every student step on a fresh batch asked of every teacher, (K + 2) batches a
  teacher per iteration;
- ``replay``: a memory of 4,096 samples, one fresh batch per iteration, 3 batches a teacher;
- ``replay_generator_batch``: the same, and the generator step's batch (asked anyway) joins
  the memory (``replay.keep_generator_batch``): twice the inflow at the same 3 batches;
- ``generator_batch_only``: no fresh batch, the generator step's batch alone feeds the memory,
  2 batches a teacher per iteration.

Every run gets the same teacher-image budget (``--images`` per teacher): its iteration count is
the budget over its images per iteration, and its schedule is planned for that count. Probes
every ``--probe-every`` iterations record the images each teacher has answered and the
student's accuracy (mean of headers) on the validation images. The test split is not read:
a choice of defaults made on these numbers is made on validation. Runs go ``--workers`` at a
time, one thread each. Writes DIR/replay_sources.json, DIR/replay_sources.png (validation
accuracy against teacher images) and appends a table to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.results import append_section  # noqa: E402
from bench.variant_runs import (  # noqa: E402
    InProcessFederation,
    accuracy_cells,
    accuracy_over_seeds,
    homogeneous_federation,
    plot_probe_curves,
    run_all,
    variant_runs,
)
from cdfkd.student_node.config import TrainConfig  # noqa: E402
from cdfkd.student_node.evaluate import evaluate_student  # noqa: E402
from cdfkd.student_node.trainer import init_state, run_iteration  # noqa: E402

K = 5
MEMORY = 4096
#: name -> [train.replay] (None: the paper's loop)
VARIANTS: dict[str, dict[str, Any] | None] = {
    "paper": None,
    "replay": {"size": MEMORY, "new_batches": 1},
    "replay_generator_batch": {"size": MEMORY, "new_batches": 1, "keep_generator_batch": True},
    "generator_batch_only": {"size": MEMORY, "new_batches": 0, "keep_generator_batch": True},
}


def batches_per_iteration(variant: str) -> int:
    """Batches a teacher answers per iteration (the generator step's Query and VJP count)."""
    replay = VARIANTS[variant]
    return (K if replay is None else replay["new_batches"]) + 2


def variant_config(variant: str, seed: int, iterations: int, batch_size: int) -> TrainConfig:
    """The demo's settings for ``iterations`` iterations, decay by 0.1 at 2/3 of them."""
    per_epoch = 10 if iterations >= 30 else 1
    epochs = max(1, iterations // per_epoch)
    replay = VARIANTS[variant]
    return TrainConfig.model_validate(
        {
            "batch_size": batch_size,
            "student_steps_per_generator_step": K,
            "iterations_per_epoch": per_epoch,
            "epochs": epochs,
            "seed": seed,
            "optimizer": {"milestones": [max(1, epochs * 2 // 3)]},
            "generator": {"latent_dim": 256, "width": 8},
            **({} if replay is None else {"replay": replay}),
        }
    )


def run_variant(spec: dict[str, Any]) -> dict[str, Any]:
    """One run of ``spec["variant"]`` with ``spec["seed"]`` to its image budget; probes."""
    torch.set_num_threads(1)
    federation = InProcessFederation.load(spec["teachers"], spec["validation"])
    inner, space = federation.inner, federation.space
    batch = spec["batch_size"]
    planned = spec["images"] // (batches_per_iteration(spec["variant"]) * batch)
    config = variant_config(spec["variant"], spec["seed"], planned, batch)
    iterations = config.total_iterations  # whole epochs: up to 9 fewer than planned
    state = init_state(
        config, federation.infos, torch.device("cpu"), space.image_shape, space.normalization
    )
    probes: list[dict[str, float]] = []
    started = time.monotonic()
    while state.iteration < iterations:
        run_iteration(state, federation.teachers, config)
        if state.iteration % spec["probe_every"] == 0 or state.iteration == iterations:
            probes.append(
                {
                    "iteration": state.iteration,
                    "teacher_images": inner[0].images_answered,
                    "validation_accuracy": evaluate_student(
                        state.student, *federation.validation
                    ).mean,
                }
            )
    answered = [t.images_answered for t in inner]
    assert len(set(answered)) == 1, answered  # every teacher answers every batch
    return {
        "variant": spec["variant"],
        "seed": spec["seed"],
        "iterations": iterations,
        "teacher_images": answered[0],
        "memory_samples": 0 if state.replay is None else len(state.replay),
        "seconds": round(time.monotonic() - started, 1),
        "accuracy": probes[-1]["validation_accuracy"],
        "probes": probes,
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per variant: final validation accuracy (mean, sample std, per seed) and costs."""
    variants: dict[str, Any] = {}
    for name in VARIANTS:
        mine = variant_runs(runs, name)
        if not mine:
            continue
        variants[name] = {
            "replay": VARIANTS[name],
            "batches_per_iteration": batches_per_iteration(name),
            **accuracy_over_seeds(mine),
            "iterations": mine[0]["iterations"],
            "teacher_images": statistics.fmean(r["teacher_images"] for r in mine),
            "seconds": statistics.fmean(r["seconds"] for r in mine),
            "runs": mine,
        }
    return variants


def plot(variants: dict[str, Any], path: Path) -> None:
    """Validation accuracy against the images a teacher answered, a line per run."""
    plot_probe_curves(
        variants, path, "teacher_images", "images answered per teacher (thousands)", 1 / 1000
    )


def markdown(report: dict[str, Any], command: str) -> str:
    """The RESULTS.md section of ``report``."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"\n### Replay sources at an equal teacher-image budget, {stamp}\n",
        f"Command: `{command}`; CDFKD-MFS at the demo's settings (batch {report['batch_size']}, "
        f"K = {K}, decay at 2/3), a budget of {report['images']:,} images per teacher, seeds "
        f"{report['seeds']}, in-process teachers (homogeneous federation of bench/quality.py), "
        f"one thread per run, {report['workers']} runs at a time; accuracy is the mean of "
        f"headers on the {report['validation_samples']} validation images held out of the "
        f"training split (the test split is not read). Total "
        f"{report['total_seconds'] / 60:.1f} min.\n",
        "| variant | batches a teacher answers per iteration | iterations | images per teacher "
        "| validation accuracy % (mean ± std) | per seed | s per run |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, v in report["variants"].items():
        lines.append(
            f"| {name} | {v['batches_per_iteration']} | {v['iterations']} | "
            f"{v['teacher_images']:,.0f} | {accuracy_cells(v)} | {v['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--images", type=int, default=200_000, help="per teacher")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--probe-every", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--validation-samples", type=int, default=5000)
    parser.add_argument("--teacher-epochs", type=int, default=6)
    parser.add_argument("--quick", action="store_true", help="tiny budgets: the script runs")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    validation_samples = 500 if args.quick else args.validation_samples
    data, packages = homogeneous_federation(
        out, validation_samples, args.teacher_epochs, args.quick, args.workers
    )
    batch_size = 32 if args.quick else 128
    specs = [
        {
            "variant": variant,
            "seed": seed,
            "images": 40 * batch_size if args.quick else args.images,
            "probe_every": 2 if args.quick else args.probe_every,
            "batch_size": batch_size,
            "teachers": [str(p) for p in packages],
            "validation": str(data.validation / "test.npz"),
        }
        for seed in range(2 if args.quick else args.seeds)
        for variant in args.variants
    ]
    runs = run_all(run_variant, specs, args.workers)
    report = {
        "images": specs[0]["images"],
        "batch_size": batch_size,
        "seeds": sorted({s["seed"] for s in specs}),
        "workers": args.workers,
        "validation_samples": validation_samples,
        "quick": args.quick,
        "variants": summarize(runs),
        "total_seconds": round(time.monotonic() - started, 1),
    }
    (out / "replay_sources.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report["variants"], out / "replay_sources.png")
    command = "python bench/replay_sources.py " + shlex.join(sys.argv[1:])
    text = markdown(report, command)
    print(text)
    if not args.quick:
        append_section(text)


if __name__ == "__main__":
    main()
