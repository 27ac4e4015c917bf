"""PNG plots and the Markdown report of a run."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

logger = logging.getLogger(__name__)

_LOSS_KEYS = (
    "student_loss",
    "header_loss",
    "feature_loss",
    "ensemble_loss",
    "generator_loss",
    "adversarial_loss",
    "bn_loss",
)


def plot_accuracy(records: Sequence[dict[str, Any]], path: Path) -> None:
    """Student accuracy (mean of headers, and each header) against wall-clock time."""
    evals = [r for r in records if r["type"] == "eval"]
    figure, axis = plt.subplots(figsize=(6, 4))
    if evals:
        minutes = [r["elapsed"] / 60 for r in evals]
        axis.plot(minutes, [r["accuracy_mean"] for r in evals], label="mean of headers", lw=2)
        for index in range(len(evals[0]["accuracy_headers"])):
            axis.plot(
                minutes,
                [r["accuracy_headers"][index] for r in evals],
                label=f"header {index}",
                lw=0.8,
                alpha=0.7,
            )
    axis.set_xlabel("training time (min)")
    axis.set_ylabel("test accuracy (subset)")
    axis.grid(alpha=0.3)
    if evals:
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_losses(records: Sequence[dict[str, Any]], path: Path) -> None:
    """Every loss term against the iteration."""
    iterations = [r for r in records if r["type"] == "iteration"]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    if iterations:
        steps = [r["iteration"] for r in iterations]
        for key in _LOSS_KEYS[:4]:
            axes[0].plot(steps, [r[key] for r in iterations], label=key, lw=1)
        for key in _LOSS_KEYS[4:]:
            axes[1].plot(steps, [r[key] for r in iterations], label=key, lw=1)
    axes[0].set_title("student (weighted terms)")
    axes[1].set_title("generator (weighted terms)")
    for axis in axes:
        axis.set_xlabel("iteration")
        axis.grid(alpha=0.3)
        if iterations:
            axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def save_image_grid(images: Tensor, path: Path, columns: int = 8) -> None:
    """Save pixel-space images ``(B, C, H, W)`` as a grid PNG (min-max scaled per image)."""
    images = images.detach().float().cpu()
    low = images.amin(dim=(1, 2, 3), keepdim=True)
    high = images.amax(dim=(1, 2, 3), keepdim=True)
    images = (images - low) / (high - low).clamp_min(1e-8)
    rows = (images.shape[0] + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(columns, rows))
    for index, axis in enumerate(axes.flat if hasattr(axes, "flat") else [axes]):
        axis.axis("off")
        if index < images.shape[0]:
            picture = images[index].permute(1, 2, 0)
            if picture.shape[2] == 1:
                axis.imshow(picture[:, :, 0], cmap="gray", vmin=0, vmax=1)
            else:
                axis.imshow(picture.clamp(0, 1))
    figure.tight_layout(pad=0.1)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _count(value: int | None) -> str:
    return "not disclosed" if value is None else f"{value:,}"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f} %"


def write_report(path: Path, summary: dict[str, Any], plots: Sequence[str]) -> None:
    """The Markdown report: results table, settings, plots."""
    lines = [
        "# cdfkd run report",
        "",
        f"Method: `{summary['method']}`; {summary['iterations']} iterations in "
        f"{summary['train_seconds']:.0f} s on {summary['device']}.",
        "",
    ]
    ended = _ended_by(summary.get("ended_by"), summary["iterations"])
    if ended:
        lines += [ended, ""]
    if summary.get("data") is None:
        lines += [
            "Data-free run: the student side read no real image, so no accuracy was computed "
            "here and no attention module was trained. Each organization trains the attention "
            "and evaluates the student on its own data with `cdfkd flower run`.",
            "",
        ]
    else:
        lines += _accuracy_table(summary)
    lines += _cost_table(summary)
    lines += [
        f"Student parameters: {summary['student_parameters']:,} "
        f"({summary.get('student_parameters_inference', summary['student_parameters']):,} at "
        "inference, without the training-only feature projections); "
        f"teacher parameters (each, stays with its owner): "
        f"{', '.join(_count(n) for n in summary['teacher_parameters'])}.",
        "",
    ]
    lines += _privacy_lines(summary)
    lines += [f"![{name}]({name})" for name in plots]
    Path(path).write_text("\n".join(lines) + "\n")


def describe_guarantee(privacy: dict[str, Any] | None) -> str:
    """One teacher's DP guarantee in words; ``none`` for a teacher trained without one."""
    if privacy is None:
        return "none"
    return (
        f"({privacy['epsilon']:.3g}, {privacy['delta']:.3g})-DP on its owner's training "
        f"records ({privacy['mechanism']}, {privacy['accountant']} accountant; noise multiplier "
        f"{privacy['noise_multiplier']:.3g}, clipping {privacy['max_grad_norm']:g})"
    )


def _privacy_lines(summary: dict[str, Any]) -> list[str]:
    """Each teacher's differential-privacy guarantee, as its owner states it."""
    guarantees = summary.get("teacher_privacy") or [None] * len(summary["teacher_parameters"])
    lines = ["Teachers' privacy guarantees (as each owner's node or package states them):", ""]
    for index, privacy in enumerate(guarantees):
        lines.append(f"- teacher {index}: {describe_guarantee(privacy)}")
    return [*lines, ""]


def _ended_by(ended_by: dict[str, Any] | None, iterations: int) -> str:
    """A sentence on why training stopped ("" when it ran all its iterations)."""
    if ended_by is None or ended_by["reason"] == "completed":
        return ""
    if ended_by["reason"] == "teacher_budget":
        name = ended_by["name"] or "?"
        budget = ended_by["budget"] or "budget"
        return (
            f"**Ended by a teacher's budget:** teacher {ended_by['teacher']} `{name}` "
            f"({ended_by['address']}) had answered {ended_by['used']:,} of its "
            f"`{budget}` of {ended_by['limit']:,} images and refused a request of "
            f"{ended_by['requested']:,} more during iteration {iterations + 1}. The student "
            f"reported here is the one after iteration {iterations}, the last completed; "
            "`--resume` continues from it once the owner grants more."
        )
    if ended_by["reason"] == "max_seconds":
        return (
            f"Stopped at the time limit (`max_seconds` = {ended_by['max_seconds']}) after "
            f"iteration {iterations}."
        )
    return f"Interrupted after iteration {iterations}; `--resume` continues."


def _images(value: int | None) -> str:
    return "not metered" if value is None else f"{value:,}"


def _megabytes(value: int | None) -> str:
    return "not metered" if value is None else f"{value / 1e6:,.2f}"


def _cost_table(summary: dict[str, Any]) -> list[str]:
    """What the run cost each teacher's owner (``coordinator/accounting.py``)."""
    traffic = summary.get("teacher_traffic") or []
    if not traffic:
        return []
    lines = [
        "What the teachers answered (training: the whole run, across resumes; evaluation: the "
        "final accuracy of the teachers). Wire bytes are serialized gRPC messages sent and "
        "received; an in-process teacher sends none.",
        "",
        "| teacher | transport | training images | training wire MB | evaluation images |",
        "|---|---|---|---|---|",
    ]
    for index, entry in enumerate(traffic):
        lines.append(
            f"| {index} `{entry['teacher']}`"
            + (f" ({entry['address']})" if entry["address"] else "")
            + f" | {entry['transport'] or 'not metered'} | {_images(entry['training_images'])} | "
            f"{_megabytes(entry['training_wire_bytes'])} | "
            f"{_images(entry['evaluation_images'])} |"
        )
    lines.append(
        f"| **all** | | **{_images(summary['teacher_images'])}** | "
        f"**{_megabytes(summary['training_wire_bytes'])}** | "
        f"{_images(summary['evaluation_teacher_images'])} |"
    )
    per_million = summary.get("accuracy_per_million_teacher_images")
    if per_million is not None:
        lines += [
            "",
            f"Accuracy per million teacher images (student, mean of headers, over the training "
            f"images of all teachers): {100 * per_million:.3f} points.",
        ]
    return [*lines, ""]


def _accuracy_table(summary: dict[str, Any]) -> list[str]:
    lines = [
        f"Test data: `{summary['data']}`.",
        "",
        "| model | test accuracy |",
        "|---|---|",
    ]
    for index, value in enumerate(summary["teacher_accuracies"]):
        lines.append(f"| teacher {index} | {_percent(value)} |")
    lines.append(
        f"| teacher ensemble (mean logits) | {_percent(summary['teacher_ensemble_accuracy'])} |"
    )
    for index, value in enumerate(summary["student_header_accuracies"]):
        lines.append(f"| student header {index} | {_percent(value)} |")
    lines.append(
        f"| **student, mean of headers** | **{_percent(summary['student_accuracy_mean'])}** |"
    )
    lines.append(
        f"| student, attention (k = {summary['attention_samples']}) | "
        f"{_percent(summary['student_accuracy_attention'])} |"
    )
    return [*lines, ""]


def generator_samples(
    generator: torch.nn.Module, latent_dim: int, count: int, seed: int = 1234
) -> Tensor:
    """``count`` samples as training sees them (batch-statistics BN), latents from ``seed``.

    A copy of ``generator`` makes them, so its running statistics stay untouched.
    """
    sampler = copy.deepcopy(generator).train()
    device = next(sampler.parameters()).device
    latent = torch.randn(count, latent_dim, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return sampler(latent.to(device))
