"""Load on one node (8 callers x 500 queries) and budgets that survive a kill -9."""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path

import pytest
import torch

from cdfkd.coordinator.nodes import TeacherNodeProcess
from cdfkd.protos import teacher_pb2, teacher_pb2_grpc
from cdfkd.protos.codec import encode
from cdfkd.student_node.teachers.remote import RemoteTeacher, open_channel
from tests.conftest import client_config

SHAPE = (1, 16, 16)
CALLERS = [f"caller-{i}" for i in range(8)]
QUERIES = 500
BATCH = 2


@pytest.mark.slow
def test_eight_callers_five_hundred_queries_each(inprocess_node, dev_pki, tmp_path: Path) -> None:
    budget = 10_000
    policy = {
        "callers": {name: {"budget_images": budget} for name in CALLERS},
        "budget_file": str(tmp_path / "budget.json"),
    }
    address = inprocess_node(policy=policy, node={"workers": 8})
    latencies: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    request = teacher_pb2.QueryRequest(images=encode(torch.randn(BATCH, *SHAPE)))
    deadline = time.monotonic() + 240

    def caller(name: str) -> None:
        channel = open_channel(client_config(address, dev_pki, name=name))
        stub = teacher_pb2_grpc.TeacherServiceStub(channel)
        mine = []
        try:
            for _ in range(QUERIES):
                if time.monotonic() > deadline:
                    raise TimeoutError("the load test ran out of time")
                started = time.perf_counter()
                stub.Query(request, timeout=30)
                mine.append(time.perf_counter() - started)
        except BaseException as error:  # noqa: BLE001 - collected and asserted below
            with lock:
                errors.append(error)
        finally:
            channel.close()
            with lock:
                latencies.extend(mine)

    threads = [threading.Thread(target=caller, args=(name,)) for name in CALLERS]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    elapsed = time.perf_counter() - started
    assert not errors, errors[:3]
    assert len(latencies) == len(CALLERS) * QUERIES
    ordered = sorted(latencies)
    p50 = statistics.median(ordered)
    p99 = ordered[int(0.99 * len(ordered)) - 1]
    print(
        f"\nload: {len(ordered)} queries in {elapsed:.1f} s, "
        f"p50 {p50 * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms"
    )
    for name in CALLERS:  # budgets exact to the image
        with RemoteTeacher(client_config(address, dev_pki, name=name)) as remote:
            assert remote.metadata.remaining_budget == budget - QUERIES * BATCH


@pytest.mark.slow
def test_budget_survives_kill_minus_9(digits_teachers, dev_pki, tmp_path: Path) -> None:
    pki = dev_pki["trusted"]
    policy = (
        f'[policy]\nbudget_file = "{tmp_path / "budget.json"}"\n'
        "[policy.callers.student]\nbudget_images = 1000\n"
    )
    node = TeacherNodeProcess(digits_teachers.packages[0], tmp_path / "node", pki, policy=policy)
    node.start()
    answered = 0
    try:
        with RemoteTeacher(client_config(node.address, dev_pki)) as remote:
            for _ in range(20):
                remote.query(torch.randn(16, *SHAPE), bn_loss=False)
                answered += 16
    finally:
        node.kill()  # SIGKILL: no chance to flush anything
    restarted = TeacherNodeProcess(
        digits_teachers.packages[0], tmp_path / "node", pki, policy=policy
    )
    restarted.start()
    try:
        with RemoteTeacher(client_config(restarted.address, dev_pki)) as remote:
            used = 1000 - remote.metadata.remaining_budget
    finally:
        restarted.stop()
    assert used >= answered
