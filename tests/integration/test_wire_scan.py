"""No teacher parameter or BN buffer ever crosses the wire.

The scan records every byte a teacher node sends during a short training run, through a TCP
proxy on loopback. The node runs in plaintext here on purpose: under TLS the bytes are
encrypted and a scan of them would pass trivially; plaintext shows the HTTP/2 frames and
protobuf payloads as they are before encryption.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from bench.tcp_proxy import RecordingProxy
from cdfkd.student_node.config import GeneratorConfig, StudentConfig, TrainConfig
from cdfkd.student_node.teachers.remote import RemoteTeacher
from cdfkd.student_node.trainer import init_state, train
from cdfkd.teacher_node.package import load_package
from tests.conftest import client_config

WINDOW = 4  # a run of 4 consecutive values (16 bytes of float32, 8 of float16)


def _needles(tensor: torch.Tensor) -> set[bytes]:
    values = tensor.detach().flatten()
    needles = set()
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        raw = values.to(dtype)
        data = (raw.view(torch.uint16) if dtype is torch.bfloat16 else raw).numpy().tobytes()
        size = raw.element_size() * WINDOW
        if len(data) < size:
            continue
        step = raw.element_size()
        for start in range(0, len(data) - size + 1, step):
            window = data[start : start + size]
            if len(set(window)) > 2:  # skip runs of zeros/constant bytes that match anything
                needles.add(window)
    return needles


@pytest.mark.integration
@pytest.mark.slow
def test_no_parameter_or_bn_statistic_in_what_the_node_sends(
    node_processes, digits_teachers, dev_pki
) -> None:
    nodes = [node_processes(index, insecure=True) for index in range(3)]
    proxies = [RecordingProxy(("127.0.0.1", int(n.address.rpartition(":")[2]))) for n in nodes]
    teachers = [RemoteTeacher(client_config(p.address, dev_pki, insecure=True)) for p in proxies]
    try:
        config = TrainConfig(
            batch_size=16,
            epochs=1,
            iterations_per_epoch=2,
            student_steps_per_generator_step=2,
            student=StudentConfig(widths=(8, 16, 16)),
            generator=GeneratorConfig(latent_dim=16, width=4),
        )
        state = init_state(config, [t.info() for t in teachers], torch.device("cpu"))
        with ThreadPoolExecutor(3) as executor:
            train(state, teachers, config, executor=executor)
    finally:
        for teacher in teachers:
            teacher.close()
        for proxy in proxies:
            proxy.close()

    for proxy, package in zip(proxies, digits_teachers.packages, strict=True):
        sent = bytes(proxy.from_server)
        assert len(sent) > 50_000  # the run really went through the proxy
        _, model = load_package(package)
        checked = 0
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point() or tensor.numel() < WINDOW:
                continue
            for needle in _needles(tensor):
                checked += 1
                assert needle not in sent, f"{name} of {package.name} appears on the wire"
        assert checked > 10_000
