"""Wire bytes of the generator batch sent once (``send_batch_once``) against twice.

    python bench/batch_once.py --out DIR [--iterations N]

One teacher node (served from this process, mutual TLS on loopback, an untrained LeNet-5-BN:
bytes do not depend on accuracy) behind a byte-counting TCP proxy. For each setting of the
student's ``send_batch_once``: the bytes of one generator step (Query with R(x), then
InputGrad), by the accounting's counters (serialized messages, ``RemoteTeacher.bytes_sent`` /
``bytes_received``) and on the TLS wire (the proxy), and a tiny ``cdfkd train`` run on digits
(batch 32, K = 2, ``--iterations`` iterations, in-process) with its ``training_wire_bytes``.
Writes DIR/batch_once.json and appends a table to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results import append_section  # noqa: E402
from bench.tcp_proxy import RecordingProxy  # noqa: E402
from cdfkd.coordinator.config import parse_run_config  # noqa: E402
from cdfkd.coordinator.training_run import run_training  # noqa: E402
from cdfkd.student_node.config import TrainConfig  # noqa: E402
from cdfkd.student_node.teachers.remote import RemoteTeacher, RemoteTeacherConfig  # noqa: E402
from cdfkd.student_node.trainer import generator_step, init_state  # noqa: E402
from cdfkd.teacher_node.config import parse_teacher_config  # noqa: E402
from cdfkd.teacher_node.datasets import Normalization  # noqa: E402
from cdfkd.teacher_node.package import save_package  # noqa: E402
from cdfkd.teacher_node.pki import create_dev_pki  # noqa: E402
from cdfkd.teacher_node.server import build_node  # noqa: E402
from cdfkd.teacher_node.zoo import ArchitectureSpec, build_classifier  # noqa: E402

SHAPE = (1, 16, 16)
BATCH = 32
TRAIN: dict[str, Any] = {
    "batch_size": BATCH,
    "epochs": 1,
    "student_steps_per_generator_step": 2,
    "student": {"widths": [8, 16, 16]},
    "generator": {"latent_dim": 32, "width": 8},
    "attention": {"samples": 30, "epochs": 2},
}


def make_package(directory: Path) -> Path:
    """An untrained LeNet-5-BN package on 1x16x16 digits (torch seed 0)."""
    torch.manual_seed(0)
    spec = ArchitectureSpec(architecture="lenet5_bn", input_shape=SHAPE, num_classes=10)
    save_package(
        directory,
        build_classifier(spec),
        name="owner",
        spec=spec,
        normalization=Normalization(mean=(0.3,), std=(0.4,)),
        feature_dim=84,
        test_accuracy=None,
        train_samples=None,
    )
    return directory


def client(address: str, pki: Any, once: bool, dtype: str = "float32") -> dict[str, Any]:
    """A teacher entry of a run config (also a RemoteTeacherConfig's fields)."""
    return {
        "address": address,
        "ca": pki.ca.cert,
        "cert": pki.client.cert,
        "key": pki.client.key,
        "send_batch_once": once,
        "wire_dtype": dtype,
    }


def generator_step_bytes(address: str, proxy: RecordingProxy, pki: Any, once: bool) -> dict:
    """The bytes of one generator step (after one untimed warm-up step)."""
    config = TrainConfig.model_validate(TRAIN)
    with RemoteTeacher(RemoteTeacherConfig(**client(address, pki, once))) as remote:
        state = init_state(config, [remote.info()], torch.device("cpu"))
        generator_step(state, [remote], config, config.loss_weights())
        counted = (remote.bytes_sent, remote.bytes_received)
        wire = (proxy.to_server, proxy.from_server_count)
        generator_step(state, [remote], config, config.loss_weights())
        return {
            "sent": remote.bytes_sent - counted[0],
            "received": remote.bytes_received - counted[1],
            "wire_to_node": proxy.to_server - wire[0],
            "wire_from_node": proxy.from_server_count - wire[1],
            "handle_hits": remote.handle_hits,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--iterations", type=int, default=6)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    pki = create_dev_pki(args.out / "pki", force=True)
    package = make_package(args.out / "teacher")
    node_config = parse_teacher_config(
        {
            "node": {"package": str(package), "address": "127.0.0.1:0"},
            "tls": {
                "cert": str(pki.server.cert),
                "key": str(pki.server.key),
                "client_ca": str(pki.ca.cert),
            },
            "policy": {"callers": {"student": {}}},
        },
        base=args.out,
    )
    node = build_node(node_config)
    node.start()
    results: dict[str, Any] = {"batch_size": BATCH, "image_shape": list(SHAPE), "modes": {}}
    try:
        with RecordingProxy(("127.0.0.1", node.port), keep=False) as proxy:
            for once in (False, True):
                step = generator_step_bytes(proxy.address, proxy, pki, once)
                run = parse_run_config(
                    {
                        "data": {"dataset": "digits", "eval_samples": 200},
                        "teachers": [client(proxy.address, pki, once)],
                        "train": {**TRAIN, "iterations_per_epoch": args.iterations},
                        "run": {"device": "cpu", "threads": 2},
                    }
                )
                summary = run_training(
                    run, args.out / f"run-once-{once}".lower(), show_progress=False
                ).summary()
                results["modes"]["once" if once else "twice"] = {
                    "generator_step": step,
                    "iterations": summary["iterations"],
                    "training_wire_bytes": summary["training_wire_bytes"],
                    "teacher_images": summary["teacher_images"],
                }
    finally:
        node.stop(grace=None)
    twice, once_ = results["modes"]["twice"], results["modes"]["once"]
    results["image_bytes"] = BATCH * SHAPE[0] * SHAPE[1] * SHAPE[2] * 4
    results["generator_step_saving"] = (
        twice["generator_step"]["sent"] - once_["generator_step"]["sent"]
    )
    results["training_wire_bytes_ratio"] = round(
        once_["training_wire_bytes"] / twice["training_wire_bytes"], 4
    )
    (args.out / "batch_once.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    append_results(results, args)


def append_results(results: dict[str, Any], args: argparse.Namespace) -> None:
    """Append the table to bench/RESULTS.md."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"\n### Generator batch sent once, {now}\n",
        f"Command: `python bench/batch_once.py --out {args.out} --iterations {args.iterations}`; "
        f"one mTLS teacher node on loopback (untrained LeNet-5-BN, 1x16x16), batch {BATCH}, "
        "K = 2, float32 wire; bytes by the accounting's counters (serialized messages + gRPC "
        "prefix) and on the TLS wire (TCP proxy).\n",
        "| send_batch_once | generator step: sent / received (counters) | generator step: to "
        "node / from node (TLS wire) | tiny run: training_wire_bytes | iterations |",
        "|---|---|---|---|---|",
    ]
    for name, value in (("false", "twice"), ("true", "once")):
        mode = results["modes"][value]
        step = mode["generator_step"]
        lines.append(
            f"| {name} | {step['sent']:,} / {step['received']:,} | "
            f"{step['wire_to_node']:,} / {step['wire_from_node']:,} | "
            f"{mode['training_wire_bytes']:,} | {mode['iterations']} |"
        )
    lines.append(
        f"\nThe generator step sends {results['generator_step_saving']:,} bytes less (the batch's "
        f"pixels: {results['image_bytes']:,}); the tiny run's training wire bytes are "
        f"{results['training_wire_bytes_ratio']:.3f} of sending the batch twice.\n"
    )
    append_section("\n".join(lines))


if __name__ == "__main__":
    main()
