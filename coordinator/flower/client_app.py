"""The organization's Flower ClientApp: trains the attention module and evaluates the student.

``torch`` is imported here because Flower's ArrayRecord <-> state-dict conversion looks it up
in ``sys.modules``. Settings come from the run config, with the organization's own paths
(``student-dir``, ``data-path``) from its SuperNode's ``--node-config``; the owner index is the
node config's ``partition-id``.
"""

from __future__ import annotations

from typing import Any

import torch  # noqa: F401 - needed by ArrayRecord.to_torch_state_dict
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from cdfkd.coordinator.flower.owner import evaluate_locally, train_locally
from cdfkd.coordinator.flower.settings import FederatedAttentionSettings, merge_node_config


def _settings(
    defaults: dict[str, Any], node_configs: dict[int, dict[str, Any]], context: Context
) -> tuple[FederatedAttentionSettings, int]:
    owner = int(context.node_config["partition-id"])
    node = {**dict(context.node_config), **node_configs.get(owner, {})}
    flat = merge_node_config({**defaults, **context.run_config}, node)
    return FederatedAttentionSettings.from_flat(flat), owner


def make_client_app(
    defaults: dict[str, Any] | None = None,
    node_configs: dict[int, dict[str, Any]] | None = None,
) -> ClientApp:
    """A ClientApp whose settings default to ``defaults`` (the flat form; simulation passes it).

    ``node_configs`` maps an owner index to its own keys (``data-path``, ``student-dir``): what
    each SuperNode's ``--node-config`` says in the deployment runtime, for the simulation's
    virtual SuperNodes.
    """
    app = ClientApp()
    base = dict(defaults or {})
    nodes = dict(node_configs or {})

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        settings, owner = _settings(base, nodes, context)
        config = msg.content.config_records.get("config")
        server_round = int(str(config.get("server-round", 0))) if config is not None else 0
        state, count, loss = train_locally(
            settings, owner, msg.content.array_records["arrays"].to_torch_state_dict(), server_round
        )
        content = RecordDict(
            {
                "arrays": ArrayRecord(state),
                "metrics": MetricRecord({"num-examples": count, "train-loss": loss}),
            }
        )
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        settings, owner = _settings(base, nodes, context)
        metrics = evaluate_locally(
            settings, owner, msg.content.array_records["arrays"].to_torch_state_dict()
        )
        content = RecordDict({"metrics": MetricRecord({**metrics, "owner": owner})})
        return Message(content=content, reply_to=msg)

    return app


#: The deployment runtime's entry point (``[tool.flwr.app.components] clientapp``).
app = make_client_app()
