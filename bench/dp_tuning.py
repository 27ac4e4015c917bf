"""DP-SGD recipe search for the owners' teachers, on a validation split of one owner's data.

Usage:
    python bench/dp_tuning.py --out DIR [--epsilon 8] [--delta 1e-5] [--workers 2]
        [--configs NAME ...] [--non-private] [--quick]

Owner 1 of the utility-against-epsilon table (``bench/privacy.py --epsilon-table``: shard 0 of
three IID thirds of Fashion-MNIST's training split) keeps a random tenth of its records as a
validation split; each recipe (epochs, expected batch, Adam's learning rate, clipping bound C)
trains a LeNet-5-GN with DP-SGD on the other nine tenths at (epsilon, delta), statistics release
included, exactly as ``cdfkd teacher train --dp-epsilon`` does, and is scored on the validation
split. The test split is never read. Recipes run in parallel worker processes, one thread
each; finished recipes are kept in DIR/dp_tuning.json, so a rerun does only the missing ones.

``--non-private`` runs the same search for the non-private reference (LeNet-5-BN, no DP), so
that both sides of the utility-against-epsilon comparison get tuned on the same split.

Writes DIR/dp_tuning.json and appends a table to bench/RESULTS.md.

The search itself is not charged to the owner's budget (the usual practice of the DP-SGD
literature, e.g. Tramer and Boneh 2021; private selection, Papernot and Steinke 2022, would
charge it): the table says so.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from datetime import UTC, datetime
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results import append_section  # noqa: E402
from cdfkd.teacher_node.data_sources import load_train_and_test  # noqa: E402
from cdfkd.teacher_node.datasets import DatasetName, ImageDataset, Normalization  # noqa: E402
from cdfkd.teacher_node.dp_training import train_private_classifier  # noqa: E402
from cdfkd.teacher_node.privacy import PrivacySettings  # noqa: E402
from cdfkd.teacher_node.training import (  # noqa: E402
    PRIVATE_NORMALIZATION,
    TeacherJob,
    TeacherTrainConfig,
    classifier_accuracy,
    owner_shard,
    train_classifier,
)
from cdfkd.teacher_node.zoo import Architecture, ArchitectureSpec, build_classifier  # noqa: E402

VALIDATION_FRACTION = 0.1
VALIDATION_SEED = 0


class Recipe(BaseModel):
    """One DP-SGD recipe: what ``cdfkd teacher train`` takes besides epsilon and delta."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    architecture: Architecture = Architecture.LENET5_GN
    private: bool = True
    epochs: int
    batch_size: int
    learning_rate: float
    max_grad_norm: float


#: The grid: the table's recipe first, then the levers of the DP-SGD literature: larger
#: expected batches with more epochs at a scaled learning rate; a clipping bound below the
#: typical per-sample gradient norm, so that nearly every gradient is clipped; tanh for ReLU
#: (tempered sigmoids, Papernot et al. 2021).
GRID = (
    Recipe(name="table", epochs=8, batch_size=256, learning_rate=2e-3, max_grad_norm=1.0),
    Recipe(name="b512-e16", epochs=16, batch_size=512, learning_rate=3e-3, max_grad_norm=1.0),
    Recipe(name="b1024-e24", epochs=24, batch_size=1024, learning_rate=4e-3, max_grad_norm=1.0),
    Recipe(name="b2048-e40", epochs=40, batch_size=2048, learning_rate=6e-3, max_grad_norm=1.0),
    Recipe(
        name="b1024-e24-c0.1", epochs=24, batch_size=1024, learning_rate=4e-3, max_grad_norm=0.1
    ),
    *(
        Recipe(
            name=f"tanh-{name}",
            architecture=Architecture.LENET5_GN_TANH,
            epochs=epochs,
            batch_size=batch,
            learning_rate=lr,
            max_grad_norm=1.0,
        )
        for name, epochs, batch, lr in (
            ("table", 8, 256, 2e-3),
            ("b512-e16", 16, 512, 3e-3),
            ("b1024-e24", 24, 1024, 4e-3),
        )
    ),
    Recipe(name="b512-e16-c0.1", epochs=16, batch_size=512, learning_rate=3e-3, max_grad_norm=0.1),
)


#: The same search for the non-private reference (``--non-private``): LeNet-5-BN trained as
#: ``cdfkd teacher train`` does without DP (Adam, weight decay 1e-4, cosine decay), the
#: epsilon table's recipe first, so that both sides of the comparison get tuned.
GRID_NON_PRIVATE = tuple(
    Recipe(
        name=f"np-b{batch}-e{epochs}-lr{lr:g}",
        architecture=Architecture.LENET5_BN,
        private=False,
        epochs=epochs,
        batch_size=batch,
        learning_rate=lr,
        max_grad_norm=1.0,
    )
    for epochs, batch, lr in (
        (6, 128, 2e-3),
        (12, 128, 2e-3),
        (24, 128, 2e-3),
        (12, 256, 4e-3),
        (24, 256, 2e-3),
        (12, 64, 1e-3),
    )
)


def split_owner(validation_fraction: float) -> tuple[ImageDataset, ImageDataset]:
    """Owner 1's records, cut into (train, validation) with a fixed permutation."""
    train_full, _test = load_train_and_test(DatasetName.FASHION_MNIST)
    job = TeacherJob(name="owner-1", shard=0, num_shards=3, seed=0)
    shard = owner_shard(job, train_full)
    order = torch.randperm(len(shard), generator=torch.Generator().manual_seed(VALIDATION_SEED))
    cut = int(round(len(shard) * (1.0 - validation_fraction)))
    return shard.subset(order[:cut]), shard.subset(order[cut:])


def run_recipe(recipe: Recipe, epsilon: float, delta: float, validation_fraction: float) -> dict:
    """Train one recipe on owner 1's training part; its validation accuracy (one thread).

    A private recipe trains as ``cdfkd teacher train --dp-epsilon`` does (fixed normalization,
    DP-SGD, statistics release); a non-private one as without it (the data's normalization).
    """
    torch.set_num_threads(1)
    train, validation = split_owner(validation_fraction)
    channels = train.input_shape[0]
    normalization = (
        Normalization(
            mean=(PRIVATE_NORMALIZATION[0],) * channels, std=(PRIVATE_NORMALIZATION[1],) * channels
        )
        if recipe.private
        else Normalization.of(train)
    )
    spec = ArchitectureSpec(
        architecture=recipe.architecture,
        input_shape=train.input_shape,
        num_classes=train.num_classes,
    )
    torch.manual_seed(0)
    model = build_classifier(spec)
    losses: list[float] = []

    def log_epoch(_epoch: int, loss: float) -> None:
        losses.append(round(loss, 4))

    started = time.monotonic()
    row: dict = {"epsilon": None, "noise_multiplier": None}
    if recipe.private:
        guarantee = train_private_classifier(
            model,
            train,
            normalization,
            epochs=recipe.epochs,
            batch_size=recipe.batch_size,
            learning_rate=recipe.learning_rate,
            seed=0,
            settings=PrivacySettings(
                epsilon=epsilon, delta=delta, max_grad_norm=recipe.max_grad_norm
            ),
            on_epoch=log_epoch,
        ).guarantee
        row = {"epsilon": guarantee.epsilon, "noise_multiplier": guarantee.noise_multiplier}
        steps = guarantee.steps
    else:
        config = TeacherTrainConfig(
            epochs=recipe.epochs, batch_size=recipe.batch_size, learning_rate=recipe.learning_rate
        )
        train_classifier(model, train, normalization, config, on_epoch=log_epoch)
        steps = recipe.epochs * (len(train) // recipe.batch_size)
    return {
        **recipe.model_dump(),
        "validation_accuracy": classifier_accuracy(model, validation, normalization),
        **row,
        "steps": steps,
        "train_records": len(train),
        "validation_records": len(validation),
        "epoch_losses": losses,
        "seconds": round(time.monotonic() - started, 1),
    }


def markdown(report: dict, command: str) -> str:
    """The RESULTS.md table of a search."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    rows = sorted(report["recipes"].values(), key=lambda r: -r["validation_accuracy"])
    lines = [
        f"\n### {'DP-SGD' if report['epsilon'] is not None else 'Non-private'} recipe search, "
        f"{stamp}\n",
        f"Command: `{command}`. Owner 1's third of Fashion-MNIST (the epsilon table's shard 0), "
        f"{rows[0]['train_records']:,} records for training and {rows[0]['validation_records']:,} "
        "held out for validation (the test split is not read); "
        + (
            f"DP-SGD (Adam, Poisson sampling) at epsilon {report['epsilon']:g}, delta "
            f"{report['delta']:g}, statistics release included; one thread per recipe. The "
            "search is not charged to the owner's budget.\n"
            if report["epsilon"] is not None
            else "no DP: the non-private reference's training (Adam, weight decay 1e-4, cosine "
            "decay, shuffled batches); one thread per recipe.\n"
        ),
        "| recipe | architecture | epochs | batch | lr | C | noise multiplier | steps | "
        "validation % | s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r.get('architecture', 'lenet5_gn')} | {r['epochs']} | "
            f"{r['batch_size']} | {r['learning_rate']:g} | "
            f"{format(r['max_grad_norm'], 'g') if r.get('private', True) else '-'} | "
            f"{'-' if r['noise_multiplier'] is None else format(r['noise_multiplier'], '.3f')} | "
            f"{r['steps']} | "
            f"{100 * r['validation_accuracy']:.2f} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--configs", nargs="+", metavar="NAME", help="recipes of GRID to run")
    parser.add_argument(
        "--non-private",
        action="store_true",
        help="search the non-private reference's recipe (GRID_NON_PRIVATE) instead",
    )
    parser.add_argument(
        "--quick", action="store_true", help="one epoch of the first two recipes (plumbing)"
    )
    args = parser.parse_args()
    epsilon = None if args.non_private else args.epsilon
    pool_of = GRID_NON_PRIVATE if args.non_private else GRID
    grid = [r for r in pool_of if args.configs is None or r.name in args.configs]
    if args.quick:
        grid = [r.model_copy(update={"epochs": 1}) for r in grid[:2]]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "dp_tuning.json"
    report = (
        json.loads(path.read_text())
        if path.exists()
        else {"epsilon": epsilon, "delta": args.delta, "recipes": {}}
    )
    if (report["epsilon"], report["delta"]) != (epsilon, args.delta):
        raise SystemExit(f"{path} holds another (epsilon, delta): use another --out")
    todo = [r for r in grid if r.name not in report["recipes"]]
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = {
            pool.submit(run_recipe, r, args.epsilon, args.delta, VALIDATION_FRACTION): r
            for r in todo
        }
        for future in as_completed(futures):
            row = future.result()
            report["recipes"][row["name"]] = row
            path.write_text(json.dumps(report, indent=2) + "\n")
            print(
                f"{row['name']}: validation {100 * row['validation_accuracy']:.2f} % "
                f"({row['seconds']:.0f} s)",
                flush=True,
            )
    command = f"python bench/dp_tuning.py --out {args.out} " + (
        "--non-private" if args.non_private else f"--epsilon {args.epsilon:g}"
    )
    append_section(markdown(report, command + (" --quick" if args.quick else "")))


if __name__ == "__main__":
    main()
