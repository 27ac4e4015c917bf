"""In-process and remote teachers (separate node processes over mTLS) give identical results."""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from cdfkd.student_node.config import GeneratorConfig, StudentConfig, TrainConfig
from cdfkd.student_node.teachers.remote import RemoteTeacher
from cdfkd.student_node.trainer import init_state, train
from tests.conftest import client_config


@pytest.mark.integration
@pytest.mark.slow
def test_outputs_and_training_are_identical(node_processes, digits_teachers, dev_pki) -> None:
    nodes = [node_processes(index) for index in range(3)]
    local = digits_teachers.load()
    remote = [RemoteTeacher(client_config(node.address, dev_pki)) for node in nodes]
    try:
        images = torch.randn(32, 1, 16, 16, generator=torch.Generator().manual_seed(3))
        cotangent = torch.randn(32, 10, generator=torch.Generator().manual_seed(4))
        for near, far in zip(local, remote, strict=True):
            assert near.info() == far.info()
            a, b = near.query(images), far.query(images)
            assert torch.equal(a.logits, b.logits)
            assert torch.equal(a.features, b.features)
            assert torch.equal(a.bn_loss, b.bn_loss)
            assert torch.equal(
                near.input_grad(images, cotangent, 0.1), far.input_grad(images, cotangent, 0.1)
            )

        config = TrainConfig(
            batch_size=32,
            epochs=1,
            iterations_per_epoch=3,
            student_steps_per_generator_step=2,
            student=StudentConfig(widths=(8, 16, 16)),
            generator=GeneratorConfig(latent_dim=32, width=8),
        )
        infos = [t.info() for t in local]
        in_process = init_state(config, infos, torch.device("cpu"))
        train(in_process, local, config)
        over_the_wire = init_state(config, infos, torch.device("cpu"))
        with ThreadPoolExecutor(3) as executor:
            train(over_the_wire, remote, config, executor=executor)
        for name, module in (("student", "student"), ("generator", "generator")):
            near_state = getattr(in_process, module).state_dict()
            far_state = getattr(over_the_wire, module).state_dict()
            assert all(torch.equal(near_state[k], far_state[k]) for k in near_state), name
        # per teacher: GetMetadata, the 2 checks above, then per iteration 2 student + 2 generator
        assert sum(t.calls for t in remote) == 3 * (1 + 2 + 3 * (2 + 2))
    finally:
        for teacher in remote:
            teacher.close()


@pytest.mark.integration
@pytest.mark.slow
def test_sigterm_drains_and_exits_0(node_processes, dev_pki) -> None:
    node = node_processes(0)
    with RemoteTeacher(client_config(node.address, dev_pki)) as remote:
        remote.query(torch.randn(4, 1, 16, 16))
    node.process.send_signal(signal.SIGTERM)
    assert node.process.wait(timeout=30) == 0
    log = node.log_path.read_text()
    assert log.splitlines()[0] == f"listening on {node.address}"
    assert "teacher node stopped" in log


@pytest.mark.integration
@pytest.mark.slow
def test_bad_teacher_config_exits_2(tmp_path, digits_teachers) -> None:
    from cdfkd.coordinator.cli import main

    bad = tmp_path / "teacher.toml"
    bad.write_text(
        f'[node]\npackage = "{digits_teachers.packages[0]}"\nport = 5\n[tls]\ninsecure = true\n'
    )
    assert main(["teacher", "serve", "--config", str(bad)]) == 2
    no_tls = tmp_path / "no_tls.toml"
    no_tls.write_text(f'[node]\npackage = "{digits_teachers.packages[0]}"\n')
    assert main(["teacher", "serve", "--config", str(no_tls)]) == 2
    missing = tmp_path / "missing.toml"
    missing.write_text(f'[node]\npackage = "{tmp_path / "nope"}"\n[tls]\ninsecure = true\n')
    assert main(["teacher", "serve", "--config", str(missing)]) == 2
