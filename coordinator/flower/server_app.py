"""The Flower ServerApp: FedAvg of the attention module, weighted evaluation, per-owner figures.

Writes ``aggregator.safetensors`` (the federated attention module, loadable next to the
student) and ``flower.json`` (every round's aggregated figures and each organization's own)
into the run's ``out-dir``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import torch  # noqa: F401 - needed by ArrayRecord.to_torch_state_dict
from flwr.app import ArrayRecord, Context, MetricRecord, MetricRecordValues, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from safetensors.torch import save_file

from cdfkd.coordinator.flower.settings import FederatedAttentionSettings
from cdfkd.student_node.artifact import load_student
from cdfkd.student_node.models.aggregator import new_aggregator

AGGREGATOR_FILE = "aggregator.safetensors"
SUMMARY_FILE = "flower.json"
WEIGHT_KEY = "num-examples"


class EvaluationLog:
    """Aggregates evaluation replies (weighted by test samples) and keeps each owner's own."""

    def __init__(self) -> None:
        self.rounds: list[dict[str, Any]] = []

    def __call__(self, records: list[RecordDict], weight_key: str) -> MetricRecord:
        """FedAvg's ``evaluate_metrics_aggr_fn``: weighted means; each owner's figures kept."""
        owners: list[dict[str, float]] = []
        for record in records:
            metrics = next(iter(record.metric_records.values()))
            owners.append({k: float(cast(float, metrics[k])) for k in sorted(metrics)})
        total = sum(o[weight_key] for o in owners)
        keys = [k for k in owners[0] if k not in (weight_key, "owner")]
        aggregated = {k: sum(o[k] * o[weight_key] for o in owners) / total for k in keys}
        self.rounds.append(
            {"aggregated": aggregated, "owners": sorted(owners, key=lambda o: int(o["owner"]))}
        )
        return MetricRecord(cast(dict[str, MetricRecordValues], aggregated))


def run_server(grid: Grid, settings: FederatedAttentionSettings) -> dict[str, Any]:
    """Run the rounds; write and return the summary."""
    _, _, _, infos = load_student(settings.student_dir)
    initial = new_aggregator(infos[0].num_classes, settings.seed)
    evaluations = EvaluationLog()
    strategy = FedAvg(
        min_train_nodes=settings.num_owners,
        min_evaluate_nodes=settings.num_owners,
        min_available_nodes=settings.num_owners,
        weighted_by_key=WEIGHT_KEY,
        evaluate_metrics_aggr_fn=evaluations,
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(initial.state_dict()),
        num_rounds=settings.rounds,
        timeout=settings.round_timeout_s,
    )
    if len(evaluations.rounds) != settings.rounds:
        raise RuntimeError(
            f"only {len(evaluations.rounds)} of {settings.rounds} rounds were evaluated: "
            "an organization did not answer (see the SuperNode logs)"
        )
    out = Path(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in result.arrays.to_torch_state_dict().items()}
    save_file(state, str(out / AGGREGATOR_FILE))
    train_losses = {
        r: float(cast(float, m["train-loss"])) for r, m in result.train_metrics_clientapp.items()
    }
    final = evaluations.rounds[-1]
    summary = {
        "settings": settings.model_dump(mode="json"),
        "accuracy_mean": final["aggregated"]["accuracy-mean"],
        "accuracy_attention": final["aggregated"]["accuracy-attention"],
        "owners": [
            {
                "owner": int(o["owner"]),
                "test_samples": int(o[WEIGHT_KEY]),
                "accuracy_mean": o["accuracy-mean"],
                "accuracy_attention": o["accuracy-attention"],
            }
            for o in final["owners"]
        ],
        "rounds": [
            {"round": index + 1, "train_loss": train_losses.get(index + 1), **entry}
            for index, entry in enumerate(evaluations.rounds)
        ],
        "aggregator": str(out / AGGREGATOR_FILE),
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def make_server_app(defaults: dict[str, Any] | None = None) -> ServerApp:
    """A ServerApp whose settings default to ``defaults`` (the flat form; simulation passes it)."""
    app = ServerApp()
    base = dict(defaults or {})

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, FederatedAttentionSettings.from_flat({**base, **context.run_config}))

    return app


#: The deployment runtime's entry point (``[tool.flwr.app.components] serverapp``).
app = make_server_app()
