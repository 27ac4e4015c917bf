"""Why DFAD sat at chance in the quality tables, and what brings it off (issue 18).

    python bench/dfad_diagnosis.py --out DIR [--iterations N] [--seeds S] [--variants NAME ...]
        [--probe-every P] [--workers W] [--quick]

The library's DFAD (single-head student, the teachers' mean logits as its target, K = 5
student steps per generator step, its authors' SGD 0.1 / Adam 1e-3, batch 128, generator
width 8) on the homogeneous federation of ``bench/quality.py``: three LeNet-5-BN teachers on
IID thirds of the owners' data, after 5,000 validation images were held out of Fashion-MNIST's
training split (the same split, seed and teacher jobs as the quality protocol, so its cached
teachers are reused when ``--out`` is the protocol's folder). Variants:

- ``authors``: DFAD as published: the generator ends in a BN without affine, no BN prior;
- ``pixel_range``: the generator's pixels kept in [0, 1] (``generator.output``);
- ``bn_prior``: the authors' generator with the teachers' BN prior (w_bn 0.1, as CDFKD-MFS);
- ``pixel_range_bn_prior``: both.

Every ``--probe-every`` iterations a probe records, on 256 generated images of a fixed latent
(made as training makes them: batch-statistics BN): their pixels as [0, 1] values (minimum,
maximum, the share outside [0, 1]), the largest |logit| of the teachers' mean on them, the
student's agreement with that mean, and the student's accuracy on the validation images. The
test split is not read: this is a diagnosis, and nothing here chooses a setting for the
quality tables. Runs go ``--workers`` at a time, one thread each. Writes
DIR/dfad_diagnosis.json, DIR/curves.png (the validation accuracy of every run),
DIR/samples/VARIANT_seedS.png (32 of the probe's images at the end, each min-max scaled) and
appends a table to bench/RESULTS.md.
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
from cdfkd.coordinator.report import generator_samples, save_image_grid  # noqa: E402
from cdfkd.student_node.config import LossWeights, Method, TrainConfig  # noqa: E402
from cdfkd.student_node.evaluate import evaluate_student, header_logits  # noqa: E402
from cdfkd.student_node.teachers.run_space import (  # noqa: E402
    RunImageSpace,
    RunSpaceTeacher,
)
from cdfkd.student_node.trainer import TrainState, init_state, run_iteration  # noqa: E402

#: name -> (generator output, BN-prior weight)
VARIANTS: dict[str, tuple[str, float]] = {
    "authors": ("batchnorm", 0.0),
    "pixel_range": ("pixel_range", 0.0),
    "bn_prior": ("batchnorm", 0.1),
    "pixel_range_bn_prior": ("pixel_range", 0.1),
}
PROBE_SAMPLES = 256
PROBE_SEED = 7


def variant_config(
    variant: str, seed: int, iterations: int, batch_size: int = 128, width: int = 8
) -> TrainConfig:
    """DFAD with its authors' settings and ``variant``'s generator output and BN prior."""
    output, bn = VARIANTS[variant]
    return TrainConfig(
        method=Method.DFAD,
        seed=seed,
        batch_size=batch_size,
        epochs=iterations,
        iterations_per_epoch=1,
        weights=LossWeights.default_for(Method.DFAD).model_copy(update={"bn": bn}),
        optimizer={"milestones": (iterations + 1,)},  # no decay: the curve, not a schedule
        generator={"latent_dim": 256, "width": width, "output": output},
    )


def probe_images(state: TrainState) -> torch.Tensor:
    """The probe's generated images (standardized), made as training makes them."""
    return generator_samples(
        state.generator, state.generator.latent_dim, PROBE_SAMPLES, seed=PROBE_SEED
    )


def probe(
    state: TrainState,
    teachers: list[RunSpaceTeacher],
    space: RunImageSpace,
    validation: tuple[torch.Tensor, torch.Tensor],
) -> dict[str, float]:
    """What the generator makes now, what the teachers say of it, how the student does."""
    images = probe_images(state)
    pixels = space.normalization.invert(images)
    with torch.no_grad():
        target = torch.stack(
            [t.query(images, features=False, bn_loss=False).logits for t in teachers]
        ).mean(0)
    student = header_logits(state.student, images)[0]  # eval mode, the mode then restored
    return {
        "pixel_min": float(pixels.min()),
        "pixel_max": float(pixels.max()),
        "outside_unit_range": float(((pixels < 0) | (pixels > 1)).float().mean()),
        "teacher_max_abs_logit": float(target.abs().max()),
        "agreement": float((student.argmax(1) == target.argmax(1)).float().mean()),
        "validation_accuracy": evaluate_student(state.student, *validation).mean,
    }


def run_variant(spec: dict[str, Any]) -> dict[str, Any]:
    """One run of ``spec["variant"]`` with ``spec["seed"]``; probes along the way."""
    torch.set_num_threads(spec.get("threads", 1))
    federation = InProcessFederation.load(spec["teachers"], spec["validation"])
    infos, space, teachers = federation.infos, federation.space, federation.teachers
    validation = federation.validation
    config = variant_config(
        spec["variant"],
        spec["seed"],
        spec["iterations"],
        spec.get("batch_size", 128),
        spec.get("width", 8),
    )
    state = init_state(config, infos, torch.device("cpu"), space.image_shape, space.normalization)
    probes = [{"iteration": 0, **probe(state, teachers, space, validation)}]
    started = time.monotonic()
    for iteration in range(1, spec["iterations"] + 1):
        run_iteration(state, teachers, config)
        if iteration % spec["probe_every"] == 0 or iteration == spec["iterations"]:
            probes.append({"iteration": iteration, **probe(state, teachers, space, validation)})
    if "samples" in spec:  # what the generator ends up making (each image min-max scaled)
        path = Path(spec["samples"])
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = space.normalization.invert(probe_images(state)[:32])
        save_image_grid(pixels, path)
    return {
        "variant": spec["variant"],
        "seed": spec["seed"],
        "iterations": spec["iterations"],
        "seconds": round(time.monotonic() - started, 1),
        "accuracy": probes[-1]["validation_accuracy"],
        "probes": probes,
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per variant: final validation accuracy (mean, sample std, per seed) and last probes."""
    variants: dict[str, Any] = {}
    for name in VARIANTS:
        mine = variant_runs(runs, name)
        if not mine:
            continue
        last = [r["probes"][-1] for r in mine]
        variants[name] = {
            "generator_output": VARIANTS[name][0],
            "bn": VARIANTS[name][1],
            **accuracy_over_seeds(mine),
            "last_probe_mean": {
                key: statistics.fmean(p[key] for p in last) for key in last[0] if key != "iteration"
            },
            "runs": mine,
        }
    return variants


def plot_curves(variants: dict[str, Any], path: Path) -> None:
    """Validation accuracy against the iteration, a line per run, a colour per variant."""
    plot_probe_curves(variants, path, "iteration", "iteration")


def markdown(report: dict[str, Any], command: str) -> str:
    """The RESULTS.md section of ``report``."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"\n### DFAD at chance: cause and fixes, {stamp}\n",
        f"Command: `{command}`; {report['iterations']} iterations per run (K = 5, batch "
        f"{report['batch_size']}), seeds {report['seeds']}, one thread per run, "
        f"{report['workers']} runs at a time. Homogeneous federation of bench/quality.py "
        f"(teachers {', '.join(f'{a:.2%}' for a in report['teacher_accuracies'])} on the "
        f"test split, from their packages); accuracy on the {report['validation_samples']} "
        "validation images held out of the training split; last probe: 256 generated images "
        "of a fixed latent, pixels as [0, 1] values. Total "
        f"{report['total_seconds'] / 60:.1f} min.\n",
        "| variant | generator output | w_bn | validation accuracy % (mean ± std) | per seed "
        "| pixel min | pixel max | share of pixels outside [0, 1] | teachers' largest "
        "abs logit | student agrees with teachers |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in report["variants"].items():
        p = v["last_probe_mean"]
        lines.append(
            f"| {name} | {v['generator_output']} | {v['bn']:g} | {accuracy_cells(v)} | "
            f"{p['pixel_min']:.2f} | "
            f"{p['pixel_max']:.2f} | {100 * p['outside_unit_range']:.1f} % | "
            f"{p['teacher_max_abs_logit']:.1f} | {100 * p['agreement']:.0f} % |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--iterations", type=int, default=400)
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
    iterations = 6 if args.quick else args.iterations
    specs = [
        {
            "variant": variant,
            "seed": seed,
            "iterations": iterations,
            "probe_every": 3 if args.quick else args.probe_every,
            "batch_size": 32 if args.quick else 128,
            "teachers": [str(p) for p in packages],
            "validation": str(data.validation / "test.npz"),
            "samples": str(out / "samples" / f"{variant}_seed{seed}.png"),
        }
        for seed in range(2 if args.quick else args.seeds)
        for variant in args.variants
    ]
    runs = run_all(run_variant, specs, args.workers)
    from cdfkd.teacher_node.package import read_metadata

    report = {
        "iterations": iterations,
        "batch_size": specs[0]["batch_size"],
        "seeds": sorted({s["seed"] for s in specs}),
        "workers": args.workers,
        "validation_samples": validation_samples,
        "teacher_accuracies": [read_metadata(p).test_accuracy for p in packages],
        "quick": args.quick,
        "variants": summarize(runs),
        "total_seconds": round(time.monotonic() - started, 1),
    }
    (out / "dfad_diagnosis.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_curves(report["variants"], out / "curves.png")
    command = "python bench/dfad_diagnosis.py " + shlex.join(sys.argv[1:])
    text = markdown(report, command)
    print(text)
    if not args.quick:
        append_section(text)


if __name__ == "__main__":
    main()
