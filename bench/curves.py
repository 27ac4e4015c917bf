"""Probe curves of benchmark runs: a line per run, a colour per variant."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_probe_curves(
    variants: dict[str, Any], path: Path, x_key: str, x_label: str, x_scale: float = 1.0
) -> None:
    """Validation accuracy (%) of every run's probes against ``probe[x_key] * x_scale``.

    ``variants`` maps a name to a dict whose ``runs`` each hold ``probes`` with ``x_key`` and
    ``validation_accuracy``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for colour, (name, variant) in enumerate(variants.items()):
        for index, run in enumerate(variant["runs"]):
            axis.plot(
                [p[x_key] * x_scale for p in run["probes"]],
                [100 * p["validation_accuracy"] for p in run["probes"]],
                color=f"C{colour}",
                lw=1,
                label=name if index == 0 else None,
            )
    axis.set_xlabel(x_label)
    axis.set_ylabel("validation accuracy (%)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
