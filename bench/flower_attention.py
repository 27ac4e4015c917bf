"""Attention by Flower's FedAvg vs attention trained centrally on the pooled samples vs the mean.

    python bench/flower_attention.py --student DIR --out DIR [--rounds 10 --local-epochs 20]

For each way of cutting the data over three organizations (IID, and label-skewed Dirichlet
alpha = 0.3, as their teachers' shards are cut), each organization holds k labelled samples
(default 20, so 60 in all as in METHOD.md) and a private test split mirroring its skew. Three
aggregations of the same frozen student are compared, on the whole test set and on each
organization's split:

- mean of headers (no real samples used);
- attention trained centrally on the pooled 3k samples (what the samples leaving their owners
  would allow), ``rounds x local_epochs`` epochs;
- attention trained by FedAvg in a real Flower simulation (samples never leave their owners),
  ``rounds`` rounds of ``local_epochs`` local epochs.

Writes DIR/flower_attention.json and appends a table to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results import append_section  # noqa: E402
from cdfkd.coordinator.flower.owner import owner_logits  # noqa: E402
from cdfkd.coordinator.flower.settings import FederatedAttentionSettings  # noqa: E402
from cdfkd.coordinator.flower.simulation import simulate  # noqa: E402
from cdfkd.student_node.artifact import load_student  # noqa: E402
from cdfkd.student_node.models.aggregator import (  # noqa: E402
    AttentionConfig,
    new_aggregator,
    train_attention,
)
from cdfkd.teacher_node.metrics import accuracy  # noqa: E402
from cdfkd.teacher_node.training import Partition  # noqa: E402

logger = logging.getLogger("bench.flower_attention")


def central(settings: FederatedAttentionSettings) -> dict[str, Any]:
    """Mean of headers and centrally trained attention, overall and per owner."""
    owners = [owner_logits(settings, o) for o in range(settings.num_owners)]
    num_classes = owners[0].num_classes
    aggregator = new_aggregator(num_classes, settings.seed)
    train_attention(
        aggregator,
        torch.cat([o.sample_logits for o in owners], dim=1),
        torch.cat([o.sample_labels for o in owners]),
        AttentionConfig(
            epochs=settings.rounds * settings.local_epochs,
            learning_rate=settings.learning_rate,
            batch_size=settings.batch_size,
        ),
        torch.Generator().manual_seed(settings.seed),
    )
    aggregator.eval()
    per_owner = []
    for index, owner in enumerate(owners):
        with torch.no_grad():
            attention = accuracy(aggregator(owner.test_logits), owner.test_labels)
        per_owner.append(
            {
                "owner": index,
                "samples": len(owner.sample_labels),
                "test_samples": len(owner.test_labels),
                "classes_in_samples": int(torch.unique(owner.sample_labels).numel()),
                "accuracy_mean": accuracy(owner.test_logits.mean(dim=0), owner.test_labels),
                "accuracy_central_attention": attention,
            }
        )
    total = sum(o["test_samples"] for o in per_owner)
    return {
        "accuracy_mean": sum(o["accuracy_mean"] * o["test_samples"] for o in per_owner) / total,
        "accuracy_central_attention": sum(
            o["accuracy_central_attention"] * o["test_samples"] for o in per_owner
        )
        / total,
        "owners": per_owner,
    }


def compare(settings: FederatedAttentionSettings) -> dict[str, Any]:
    started = time.monotonic()
    federated = simulate(settings)
    flower_seconds = time.monotonic() - started
    result = central(settings)
    for owner, fed in zip(result["owners"], federated["owners"], strict=True):
        owner["accuracy_federated_attention"] = fed["accuracy_attention"]
        assert abs(owner["accuracy_mean"] - fed["accuracy_mean"]) < 1e-9
    result["accuracy_federated_attention"] = federated["accuracy_attention"]
    result["flower_seconds"] = round(flower_seconds, 1)
    return result


def _pct(value: float) -> str:
    return f"{100 * value:.2f}"


def markdown(results: dict[str, dict[str, Any]], args: argparse.Namespace, student: str) -> str:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"\n### Federated attention (Flower), {stamp}",
        "",
        f"Command: `python bench/flower_attention.py --student {student} --out {args.out} "
        f"--rounds {args.rounds} --local-epochs {args.local_epochs} "
        f"--samples-per-owner {args.samples_per_owner}`; 3 organizations, "
        f"k = {args.samples_per_owner} each; central attention trains "
        f"{args.rounds * args.local_epochs} epochs on the pooled samples, FedAvg "
        f"{args.rounds} rounds x {args.local_epochs} local epochs (real Flower simulation). "
        "Test accuracy %, whole test set (= sample-weighted mean of the organizations' splits) "
        "and each organization's own split.",
        "",
        "| owners' data | where | mean of headers | attention, central on pooled samples "
        "| attention, federated (FedAvg) |",
        "|---|---|---|---|---|",
    ]
    for name, result in results.items():
        lines.append(
            f"| {name} | all | {_pct(result['accuracy_mean'])} "
            f"| {_pct(result['accuracy_central_attention'])} "
            f"| {_pct(result['accuracy_federated_attention'])} |"
        )
        for owner in result["owners"]:
            lines.append(
                f"| {name} | org {owner['owner']} ({owner['test_samples']} test, "
                f"{owner['classes_in_samples']} classes in its k) "
                f"| {_pct(owner['accuracy_mean'])} "
                f"| {_pct(owner['accuracy_central_attention'])} "
                f"| {_pct(owner['accuracy_federated_attention'])} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-epochs", type=int, default=20)
    parser.add_argument("--samples-per-owner", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=0.3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(2)
    _, _, _, infos = load_student(args.student)
    results = {}
    for name, partition in (
        ("IID", Partition.IID),
        (f"Dirichlet {args.alpha}", Partition.DIRICHLET),
    ):
        settings = FederatedAttentionSettings(
            student_dir=args.student.resolve(),
            out_dir=(args.out / partition.value).resolve(),
            dataset=args.dataset,
            partition=partition,
            alpha=args.alpha,
            samples_per_owner=args.samples_per_owner,
            rounds=args.rounds,
            local_epochs=args.local_epochs,
        )
        results[name] = compare(settings)
        logger.info(
            "%s: %s", name, json.dumps({k: v for k, v in results[name].items() if k != "owners"})
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "flower_attention.json").write_text(json.dumps(results, indent=2) + "\n")
    append_section(markdown(results, args, str(args.student)))
    print(markdown(results, args, str(args.student)))


if __name__ == "__main__":
    main()
