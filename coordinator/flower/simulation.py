"""Federated attention and evaluation as a Flower simulation (one virtual SuperNode per owner).

Flower's simulation starts its own Ray and shuts it down when it ends: run it after any Ray
work of this process (``cdfkd demo`` does), never inside a Ray job.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flwr.simulation import run_simulation

from cdfkd.coordinator.errors import FlowerRunFailed
from cdfkd.coordinator.flower.client_app import make_client_app
from cdfkd.coordinator.flower.server_app import SUMMARY_FILE, make_server_app
from cdfkd.coordinator.flower.settings import FederatedAttentionSettings, owner_node_configs


def simulate(
    settings: FederatedAttentionSettings, num_cpus: int = 2, owner_data: Sequence[Path] = ()
) -> dict[str, Any]:
    """Run the rounds in a Flower simulation on a local Ray bound to 127.0.0.1.

    Args:
        settings: The run's settings.
        num_cpus: CPUs of the simulation's Ray.
        owner_data: With ``settings.owner_files``, each organization's own ``data-path`` in
            owner order (what each SuperNode's ``--node-config`` says in a deployment).
    """
    node_configs = owner_node_configs(settings, owner_data)
    # Ray starts its workers at niceness 15; on a busy machine the owners' ClientApps would
    # then wait behind every other process. They are the job in the foreground here.
    os.environ.setdefault("RAY_worker_niceness", "0")
    flat = settings.to_flat()
    summary_path = Path(settings.out_dir) / SUMMARY_FILE
    summary_path.unlink(missing_ok=True)
    run_simulation(
        server_app=make_server_app(flat),
        client_app=make_client_app(flat, node_configs),
        num_supernodes=settings.num_owners,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {
                "num_cpus": num_cpus,
                "include_dashboard": False,
                "_node_ip_address": "127.0.0.1",
            },
        },
    )
    if not summary_path.is_file():
        raise FlowerRunFailed(
            f"the Flower simulation ended without writing {summary_path}: see its log above"
        )
    return json.loads(summary_path.read_text())
