"""Small run configs on digits shared by the tests, as dicts or as TOML files."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

#: A distillation small enough for tests: 3 iterations per epoch of batch 32 on 16x16 digits.
SMALL_TRAIN: dict[str, Any] = {
    "batch_size": 32,
    "epochs": 2,
    "iterations_per_epoch": 3,
    "student_steps_per_generator_step": 2,
    "student": {"widths": [8, 16, 16]},
    "generator": {"latent_dim": 32, "width": 8},
    "attention": {"samples": 30, "epochs": 10},
}


def small_run(
    teachers: list[dict[str, Any]], train: dict[str, Any] | None = None, **run: Any
) -> dict[str, Any]:
    """A run config mapping on digits with ``SMALL_TRAIN`` (updated by ``train``) and ``run``."""
    return {
        "data": {"dataset": "digits", "eval_samples": 200},
        "teachers": teachers,
        "train": {**SMALL_TRAIN, **(train or {})},
        "run": {"device": "cpu", "threads": 2, **run},
    }


def untrained_lenet_package(
    directory: Path,
    *,
    name: str,
    input_shape: tuple[int, int, int] = (1, 16, 16),
    num_classes: int = 10,
    mean: float = 0.3,
    std: float = 0.4,
) -> Path:
    """A built-in (format 1) LeNet-5-BN package with untrained weights (torch seed 0)."""
    from cdfkd.teacher_node.datasets import Normalization
    from cdfkd.teacher_node.package import save_package
    from cdfkd.teacher_node.zoo import ArchitectureSpec, build_classifier

    spec = ArchitectureSpec(
        architecture="lenet5_bn", input_shape=input_shape, num_classes=num_classes
    )
    torch.manual_seed(0)
    save_package(
        directory,
        build_classifier(spec),
        name=name,
        spec=spec,
        normalization=Normalization(mean=(mean,), std=(std,)),
        feature_dim=84,
        test_accuracy=None,
        train_samples=None,
    )
    return directory


def packages(paths: list[Path]) -> list[dict[str, Any]]:
    """Teacher entries for local packages."""
    return [{"package": str(p)} for p in paths]


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    """TOML text of a mapping of scalars, lists of scalars, tables and lists of tables."""
    scalars, tables, arrays = [], [], []
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            tables.append((name, value))
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            arrays.append((name, value))
        else:
            scalars.append(
                f"{key} = {json.dumps(str(value) if isinstance(value, Path) else value)}"
            )
    text = "\n".join(scalars) + ("\n" if scalars else "")
    for name, table in tables:
        text += f"[{name}]\n" + to_toml(table, name)
    for name, items in arrays:
        for item in items:
            text += f"[[{name}]]\n" + to_toml(item, name)
    return text


def write_toml(path: Path, data: dict[str, Any]) -> Path:
    """Write ``data`` as TOML to ``path``."""
    path.write_text(to_toml(data))
    return path


def run_when(
    condition: Callable[[], bool],
    action: Callable[[], None],
    timeout_s: float,
    poll_s: float = 0.05,
) -> threading.Thread:
    """Run ``action`` in a daemon thread once ``condition()`` holds; give up after ``timeout_s``."""

    def watch() -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if condition():
                action()
                return
            time.sleep(poll_s)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def session_members(session: int) -> list[int]:
    """Running processes in the session ``session`` (Linux ``/proc``), this process excluded.

    Zombies (exited, not yet reaped by whoever inherited them) do not count: they run nothing.
    """
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp session ...; comm may hold spaces and parentheses.
        fields = stat.rpartition(")")[2].split()
        if len(fields) > 3 and fields[0] not in ("Z", "X") and int(fields[3]) == session:
            members.append(int(entry.name))
    return members


def wait_until(condition: Callable[[], bool], timeout_s: float, poll_s: float = 0.05) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout_s`` passes (False)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll_s)
    return True


@contextlib.contextmanager
def owned_process(command: list[str], **popen: Any) -> Iterator[subprocess.Popen]:
    """Start ``command`` in a session of its own; on exit kill whatever of it still runs.

    Everything the process starts stays in its session (Ray's raylet and workers change only
    their process group), so a test that fails half-way leaves no process behind, and it
    kills nothing it did not start (no ``ray stop``, no kill by name).
    """
    process = subprocess.Popen(command, start_new_session=True, **popen)
    try:
        yield process
    finally:
        for pid in [process.pid, *session_members(process.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired, ValueError):
            process.communicate(timeout=30)


def expired_client_credentials(identities: Any, common_name: str) -> Any:
    """gRPC channel credentials with a client certificate from ``identities``' CA that expired.

    Args:
        identities: A ``DevPki`` (its ``ca`` signs the certificate and is trusted).
        common_name: The caller identity the certificate names.
    """
    import datetime

    import grpc
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from cdfkd.teacher_node.pki import issue

    ca_key = serialization.load_pem_private_key(identities.ca.key.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(identities.ca.cert.read_bytes())
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)
    key, cert = issue(ca_key, ca_cert, common_name, client=True, valid_from=past, valid_days=1)
    return grpc.ssl_channel_credentials(
        root_certificates=identities.ca.cert.read_bytes(),
        private_key=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        certificate_chain=cert.public_bytes(serialization.Encoding.PEM),
    )


def running_stats(layer: nn.Module) -> tuple[Tensor, Tensor]:
    """A BatchNorm layer's running mean and variance, checked to be tracked."""
    mean, var = layer.running_mean, layer.running_var
    assert isinstance(mean, Tensor), f"{layer} tracks no running mean"
    assert isinstance(var, Tensor), f"{layer} tracks no running variance"
    return mean, var


def randomize_running_stats(
    model: nn.Module, mean_bound: float, var_range: tuple[float, float]
) -> None:
    """Non-trivial running statistics in every BatchNorm layer, as a trained teacher has."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            mean, var = running_stats(module)
            mean.uniform_(-mean_bound, mean_bound)
            var.uniform_(*var_range)


def reference_logits_and_bn_prior(model: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """A teacher's logits and its BN prior R(x) of METHOD.md 2, by plain autograd.

    Written apart from the engine (forward hooks on the BatchNorm inputs, biased batch
    variance, c_1 = 5 for the first layer, 1 otherwise) so that tests can check the engine.
    """
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    inputs: dict[int, Tensor] = {}
    handles = [
        layer.register_forward_hook(lambda m, i, o, k=k: inputs.__setitem__(k, i[0]))
        for k, layer in enumerate(layers)
    ]
    try:
        logits = model(images).logits
    finally:
        for handle in handles:
            handle.remove()
    prior = images.new_zeros(())
    for k, layer in enumerate(layers):
        x = inputs[k]
        dims = [d for d in range(x.dim()) if d != 1]
        running_mean, running_var = running_stats(layer)
        prior = prior + (5.0 if k == 0 else 1.0) * (
            torch.linalg.vector_norm(x.mean(dims) - running_mean)
            + torch.linalg.vector_norm(x.var(dims, unbiased=False) - running_var)
        )
    return logits, prior


def client_certificate(
    ca_key: Any,
    ca_cert: Any,
    *,
    common_names: tuple[str, ...] = (),
    san_uris: tuple[str, ...] = (),
    san_dns: tuple[str, ...] = (),
    key: Any = None,
) -> tuple[Any, Any]:
    """A client certificate signed by ``ca_key``, with any number of CNs and SANs (tests only).

    ``cdfkd.teacher_node.pki.issue`` makes one CN and a DNS SAN; identity tests also need
    certificates with two CNs, none, or only a SPIFFE-style URI.

    Returns:
        (private key, certificate); ``key`` reuses a key (for pinning tests).
    """
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = key or ec.generate_private_key(ec.SECP256R1())
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name) for name in common_names])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in san_uris]
    names += [x509.DNSName(d) for d in san_dns]
    if names:
        # RFC 5280: with an empty subject the SAN extension is critical.
        builder = builder.add_extension(
            x509.SubjectAlternativeName(names), critical=not common_names
        )
    return key, builder.sign(ca_key, hashes.SHA256())


def pem(key: Any, cert: Any) -> tuple[bytes, bytes]:
    """(private key PEM, certificate PEM)."""
    from cryptography.hazmat.primitives import serialization

    return (
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        cert.public_bytes(serialization.Encoding.PEM),
    )


def random_validation_file(path: Path, count: int) -> Path:
    """``count`` random 1x16x16 images with random labels of 10 classes, as a bench's
    validation ``.npz`` (seed 0)."""
    from bench.quality import _write_npz

    generator = torch.Generator().manual_seed(0)
    _write_npz(
        path,
        torch.rand(count, 1, 16, 16, generator=generator),
        torch.randint(0, 10, (count,), generator=generator),
    )
    return path
