"""How much a per-sample choice between headers could add to the mean, and what attention gets.

    python bench/attention_headroom.py --student DIR --out DIR [--samples 60 600] [--draws 5]

For a frozen multi-header student (a ``student/`` folder written by ``cdfkd train`` or
``bench/quality.py``) on the whole test split: the accuracy of each header and of the mean of
headers; the share of images on which the headers disagree; and the oracle bound of any
per-sample weighting of headers (an image counts as right when at least one header is). Then
attention modules of METHOD.md section 3 (a scorer shared by the headers, softmax over
headers, the prediction sum_i alpha_i s_i), trained as ``cdfkd train`` trains its own
(``train_attention``: cross-entropy, Adam lr 0.01, 200 epochs, student frozen) on k
class-balanced training samples, for several draws of the k samples. The scorers differ only
in what they read of a header's logits:

- ``logits``: the logits themselves (the authors' code, and ``cdfkd``'s module);
- ``log_softmax``: the header's log-probabilities (no scale to exploit);
- ``confidence``: top probability, top-1 minus top-2 margin and entropy;
- ``log_softmax_mlp``: log-probabilities through a 16-unit hidden layer.

Writes DIR/attention_headroom.json and appends a table to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results import append_section  # noqa: E402
from cdfkd.student_node.artifact import load_student  # noqa: E402
from cdfkd.student_node.evaluate import header_logits  # noqa: E402
from cdfkd.student_node.models.aggregator import (  # noqa: E402
    AttentionAggregator,
    AttentionConfig,
    train_attention,
)
from cdfkd.teacher_node.datasets import (  # noqa: E402
    DatasetName,
    Normalization,
    Split,
    load_dataset,
    stratified_sample,
)
from cdfkd.teacher_node.metrics import accuracy  # noqa: E402

logger = logging.getLogger("bench.attention_headroom")
#: What the shared scorer reads of each header's logits (the module docstring lists them).
READINGS = ("logits", "log_softmax", "confidence", "log_softmax_mlp")


def confidence(logits: Tensor) -> Tensor:
    """(top probability, top-1 minus top-2 margin, entropy) of each header's logits."""
    probabilities = F.softmax(logits, dim=-1)
    top = probabilities.topk(2, dim=-1).values
    entropy = -(probabilities * F.log_softmax(logits, dim=-1)).sum(dim=-1)
    return torch.stack((top[..., 0], top[..., 0] - top[..., 1], entropy), dim=-1)


class ReadingAttention(AttentionAggregator):
    """The aggregator of METHOD.md 3 whose shared scorer reads ``reading(s_i)``, not s_i."""

    def __init__(self, num_classes: int, reading: str) -> None:
        super().__init__(num_classes)
        self.reading = reading
        width = 3 if reading == "confidence" else num_classes
        self.score: nn.Module = (
            nn.Sequential(nn.Linear(width, 16), nn.ReLU(), nn.Linear(16, 1))
            if reading == "log_softmax_mlp"
            else nn.Linear(width, 1)
        )

    def weights(self, header_logits: Tensor) -> Tensor:
        """Alpha ``(B, N)`` from the scorer applied to the chosen reading of each header."""
        if self.reading == "confidence":
            read = confidence(header_logits)
        else:
            read = F.log_softmax(header_logits, dim=-1)
        return F.softmax(self.score(read).squeeze(-1).transpose(0, 1), dim=1)


def new_module(reading: str, num_classes: int, seed: int) -> AttentionAggregator:
    torch.manual_seed(seed)
    if reading == "logits":
        return AttentionAggregator(num_classes)
    return ReadingAttention(num_classes, reading)


def headroom(logits: Tensor, labels: Tensor) -> dict[str, Any]:
    """Header, mean and oracle accuracies of header logits ``(N, B, K)``."""
    mean_right = logits.mean(dim=0).argmax(dim=1) == labels
    votes = logits.argmax(dim=2)
    any_right = (votes == labels).any(dim=0)
    return {
        "headers": [accuracy(h, labels) for h in logits],
        "mean": float(mean_right.double().mean()),
        "headers_disagree": float((votes != votes[0]).any(dim=0).float().mean()),
        "oracle_any_header_right": float(any_right.float().mean()),
        "some_header_right_mean_wrong": float((any_right & ~mean_right).float().mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument(
        "--dataset", default="fashion_mnist", choices=[d.value for d in DatasetName]
    )
    parser.add_argument("--data-path", type=Path)
    parser.add_argument("--samples", type=int, nargs="+", default=[60, 600])
    parser.add_argument("--draws", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(2)
    student, _, _, infos = load_student(args.student)
    normalization = Normalization(mean=infos[0].normalization_mean, std=infos[0].normalization_std)
    dataset = DatasetName(args.dataset)
    train_set = load_dataset(dataset, Split.TRAIN, args.data_path)
    test_set = load_dataset(dataset, Split.TEST, args.data_path)
    test_logits = header_logits(student, normalization.apply(test_set.images))
    report: dict[str, Any] = {**headroom(test_logits, test_set.labels), "attention": {}}
    logger.info("headroom: %s", report)
    config = AttentionConfig()
    for count in args.samples:
        accuracies: dict[str, list[float]] = {reading: [] for reading in READINGS}
        for draw in range(args.draws):
            chosen = stratified_sample(train_set.labels, count, seed=draw)
            sample_logits = header_logits(student, normalization.apply(train_set.images[chosen]))
            for reading in READINGS:
                module = new_module(reading, train_set.num_classes, draw)
                train_attention(
                    module,
                    sample_logits,
                    train_set.labels[chosen],
                    config,
                    torch.Generator().manual_seed(draw),
                )
                module.eval()
                with torch.no_grad():
                    accuracies[reading].append(accuracy(module(test_logits), test_set.labels))
        for reading in READINGS:
            report["attention"][f"{reading}@{count}"] = accuracies[reading]
            logger.info("%s, k = %d: %s", reading, count, accuracies[reading])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "attention_headroom.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report, args)
    append_section(table)
    print(table)


def pct(value: float) -> str:
    return f"{100 * value:.2f}"


def markdown(report: dict[str, Any], args: argparse.Namespace) -> str:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"\n### Attention headroom, {stamp}\n",
        f"Command: `python bench/attention_headroom.py {shlex.join(sys.argv[1:])}`. Whole test "
        f"split. Headers {' / '.join(pct(h) for h in report['headers'])} %, mean of headers "
        f"{pct(report['mean'])} %; the headers disagree on "
        f"{pct(report['headers_disagree'])} % of the images; at least one header is right on "
        f"{pct(report['oracle_any_header_right'])} % (the bound of any per-sample choice of "
        f"header), and on {pct(report['some_header_right_mean_wrong'])} % some header is "
        "right where the mean is wrong. Attention (METHOD.md 3) trained as `cdfkd train` "
        f"does, on k class-balanced training samples, {args.draws} draws of them:\n",
        "| scorer reads | k | mean % | min % | max % | vs mean of headers |",
        "|---|---|---|---|---|---|",
    ]
    for key, accuracies in report["attention"].items():
        reading, count = key.split("@")
        average = statistics.mean(accuracies)
        lines.append(
            f"| {reading} | {count} | {pct(average)} | {pct(min(accuracies))} "
            f"| {pct(max(accuracies))} | {100 * (average - report['mean']):+.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
