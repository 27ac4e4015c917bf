"""Privacy against utility: the same distillation under each owner choice, at equal query budgets.

    python bench/privacy.py --out DIR [--quick] [--budget-iterations N] [--rows NAME ...]

Three LeNet-5-BN teachers on disjoint thirds of Fashion-MNIST, each served by its own node
process with mutual TLS. Every row gives every node the same image budget for training: the
budget of ``N`` iterations of the full protocol, so that black-box rows (whose zeroth-order
gradient estimate costs queries) run fewer iterations; a teacher is black-box when its node
gives this caller no input gradients (``logits_only``, and any rule with logit noise, which
refuses exact gradients). Rows: full; no_features; Gaussian logit noise at three sigmas; one
teacher logits_only; all logits_only. A row whose budget runs out anyway ends on its last
completed iteration (``ended_by`` in the row). Writes DIR/privacy.json and appends a table to
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.quality import ensure_teachers, homogeneous_jobs  # noqa: E402
from cdfkd.coordinator.config import DataConfig, RunConfig, RunSettings  # noqa: E402
from cdfkd.coordinator.nodes import TeacherNodeProcess  # noqa: E402
from cdfkd.coordinator.training_run import run_training  # noqa: E402
from cdfkd.student_node.config import TrainConfig  # noqa: E402
from cdfkd.student_node.teachers.remote import RemoteTeacher, RemoteTeacherConfig  # noqa: E402
from cdfkd.teacher_node.datasets import DatasetName  # noqa: E402
from cdfkd.teacher_node.pki import create_dev_pki  # noqa: E402

logger = logging.getLogger("bench.privacy")
RESULTS = ROOT / "bench" / "RESULTS.md"
TEST_IMAGES = 10_000  # the final evaluation queries every teacher once per test image
DIRECTIONS = 8  # zeroth-order directions for logits-only teachers


def train_config(iterations: int) -> TrainConfig:
    """Exactly ``iterations`` iterations (epochs of 25 where they divide it), decay at 4/5."""
    per_epoch = math.gcd(max(1, iterations), 25)
    epochs = max(1, iterations // per_epoch)
    return TrainConfig.model_validate(
        {
            "batch_size": 128,
            "iterations_per_epoch": per_epoch,
            "epochs": epochs,
            "optimizer": {"milestones": [max(1, epochs * 4 // 5)]},
            "generator": {"latent_dim": 256, "width": 8},
            "attention": {"samples": 60},
        }
    )


def images_per_iteration(train: TrainConfig, black_box: bool) -> int:
    """Images one iteration asks of one teacher: K student queries, then the generator step."""
    steps = train.student_steps_per_generator_step
    generator = (1 + DIRECTIONS + 1) if black_box else 2  # query + (estimate probes | InputGrad)
    return (steps + generator) * train.batch_size


ROWS: list[tuple[str, list[dict[str, Any]]]] = [
    ("full", [{}, {}, {}]),
    ("no_features", [{"mode": "no_features"}] * 3),
    ("logits noise sigma 0.5", [{"perturbation": {"logits_sigma": 0.5}}] * 3),
    ("logits noise sigma 1", [{"perturbation": {"logits_sigma": 1.0}}] * 3),
    ("logits noise sigma 2", [{"perturbation": {"logits_sigma": 2.0}}] * 3),
    ("one teacher logits_only", [{"mode": "logits_only"}, {}, {}]),
    ("all logits_only", [{"mode": "logits_only"}] * 3),
]


def _policy_toml(rule: dict[str, Any], budget: int, budget_file: Path) -> str:
    lines = [f'[policy]\nbudget_file = "{budget_file}"\n', "[policy.callers.student]\n"]
    lines.append(f"budget_images = {budget}\n")
    if "mode" in rule:
        lines.append(f'mode = "{rule["mode"]}"\n')
    if "perturbation" in rule:
        lines.append("[policy.callers.student.perturbation]\n")
        lines += [f"{k} = {v}\n" for k, v in rule["perturbation"].items()]
    return "".join(lines)


def run_row(name: str, rules: list[dict[str, Any]], packages, pki, budget: int, out: Path) -> dict:
    node_budget = budget + TEST_IMAGES + 1024  # training budget + the evaluation's queries
    with ExitStack() as stack:
        nodes = []
        for index, (package, rule) in enumerate(zip(packages, rules, strict=True)):
            directory = out / "nodes" / f"{index}"
            policy = _policy_toml(rule, node_budget, directory / "budget.json")
            (directory / "budget.json").unlink(missing_ok=True)
            nodes.append(
                stack.enter_context(
                    TeacherNodeProcess(package, directory, pki, threads=1, policy=policy)
                )
            )
        remotes = tuple(
            RemoteTeacherConfig(
                address=n.address,
                ca=pki.ca.cert,
                cert=pki.client.cert,
                key=pki.client.key,
                zeroth_order_directions=DIRECTIONS,
            )
            for n in nodes
        )
        black_box = []
        for remote in remotes:  # what each node gives this caller (GetMetadata, no budget)
            with RemoteTeacher(remote) as teacher:
                black_box.append("input_grad" not in teacher.info().allowed_outputs)
        base = train_config(1)
        iterations = budget // max(images_per_iteration(base, b) for b in black_box)
        config = RunConfig(
            data=DataConfig(dataset=DatasetName.FASHION_MNIST),
            teachers=remotes,
            train=train_config(iterations),
            run=RunSettings(
                device="cpu", threads=2, checkpoint_every=10**6, eval_every=10**6, log_every=50
            ),
        )
        started = time.monotonic()
        result = run_training(config, out / "run")
        seconds = time.monotonic() - started
        used = [
            json.loads((out / "nodes" / f"{i}" / "budget.json").read_text())["student"]["total"]
            for i in range(len(nodes))
        ]
    return {
        "row": name,
        "black_box": black_box,
        "ended_by": result.ended_by,
        "iterations": result.iterations,
        "mean": result.student.mean,
        "attention": result.student.attention,
        # The run's own accounting (coordinator/accounting.py); the nodes' ledgers also hold
        # the evaluation's queries.
        "training_images_per_teacher": result.summary()["teacher_images_per_teacher"],
        "node_ledger_images": used,
        "training_wire_bytes_per_teacher": result.summary()["training_wire_bytes_per_teacher"],
        "budget_per_teacher": budget,
        "wall_seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--quick", action="store_true", help="a budget of 30 full iterations")
    parser.add_argument("--budget-iterations", type=int, default=200)
    parser.add_argument("--teacher-epochs", type=int, default=6)
    parser.add_argument(
        "--rows", nargs="+", choices=[name for name, _ in ROWS], help="run only these rows"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(2)
    iterations = 30 if args.quick else args.budget_iterations
    budget = iterations * images_per_iteration(train_config(1), black_box=False)
    args.out.mkdir(parents=True, exist_ok=True)
    packages = ensure_teachers(args.out / "teachers", homogeneous_jobs(args.teacher_epochs))
    pki = create_dev_pki(args.out / "pki")
    rows = [
        run_row(name, rules, packages, pki, budget, args.out / f"row-{index}")
        for index, (name, rules) in enumerate(ROWS)
        if args.rows is None or name in args.rows
    ]
    report = {"budget_images_per_teacher": budget, "directions": DIRECTIONS, "rows": rows}
    (args.out / "privacy.json").write_text(json.dumps(report, indent=2) + "\n")
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = f"python bench/privacy.py --out {args.out}" + (
        " --quick" if args.quick else f" --budget-iterations {args.budget_iterations}"
    )
    if args.rows:
        command += " --rows " + " ".join(f"'{row}'" for row in args.rows)
    lines = [
        f"\n### Privacy against utility, {stamp}\n",
        f"Command: `{command}`; three LeNet-5-BN teacher nodes (mTLS, loopback), an equal training "
        f"budget of {budget:,} images per teacher ({iterations} full-protocol iterations of batch "
        f"128), zeroth-order estimates with {DIRECTIONS} directions for logits-only teachers.\n",
        "| owner choice | iterations | ended by | student, mean % | student, attention % | "
        "training images per teacher | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        attention = "n/a" if row["attention"] is None else f"{100 * row['attention']:.2f}"
        images = " / ".join(f"{u:,}" for u in row["training_images_per_teacher"])
        lines.append(
            f"| {row['row']} | {row['iterations']} | {row['ended_by']['reason']} | "
            f"{100 * row['mean']:.2f} | {attention} | "
            f"{images} | {row['wall_seconds']:.0f} |"
        )
    with RESULTS.open("a") as handle:
        handle.write("\n".join(lines) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
