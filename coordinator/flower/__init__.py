"""What must be federated, with Flower: attention on owners' samples, evaluation on their tests.

Flower's telemetry is switched off before ``flwr`` is imported (no traffic leaves the machine).
"""

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
