"""The cost of distance: the same CDFKD-MFS iterations with in-process and remote teachers.

    python bench/remote.py --out DIR [--quick] [--multihost-only]

Teacher nodes run as separate processes (``cdfkd teacher serve``) on loopback, one thread each.
The multi-host row puts each of three mTLS nodes in its own network namespace with its own
address, reached over a veth link (bench/netns.py; needs root, skipped with the reason
otherwise), with certificates for those addresses. Modes are interleaved round by round so that
the ratios are measured side by side. Wire bytes are counted by a TCP proxy in a separate pass
(the proxy itself costs time). ``--multihost-only`` measures just in-process, loopback mTLS and
multi-host mTLS. Writes DIR/remote.json and appends a table to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.netns import NamespaceError, VirtualHosts, unavailable_reason  # noqa: E402
from bench.results import append_section  # noqa: E402
from bench.tcp_proxy import RecordingProxy  # noqa: E402
from cdfkd.coordinator.nodes import TeacherNodeProcess  # noqa: E402
from cdfkd.student_node.config import TrainConfig  # noqa: E402
from cdfkd.student_node.teachers.local import InProcessTeacher  # noqa: E402
from cdfkd.student_node.teachers.protocol import Teacher  # noqa: E402
from cdfkd.student_node.teachers.remote import RemoteTeacher, RemoteTeacherConfig  # noqa: E402
from cdfkd.student_node.trainer import init_state, run_iteration  # noqa: E402
from cdfkd.teacher_node.datasets import Normalization  # noqa: E402
from cdfkd.teacher_node.package import save_package  # noqa: E402
from cdfkd.teacher_node.pki import create_dev_pki  # noqa: E402
from cdfkd.teacher_node.zoo import ArchitectureSpec, build_classifier  # noqa: E402

logger = logging.getLogger("bench.remote")
MULTIHOST = "remote_tls_multihost"
#: gRPC honours these for non-loopback addresses; teacher traffic must stay on this machine.
PROXY_VARIABLES = ("grpc_proxy", "https_proxy", "http_proxy", "HTTPS_PROXY", "HTTP_PROXY")
SHAPE = (1, 32, 32)
#: The demo's training settings (bs 128, K = 5, generator width 8, MFS student).
TRAIN = TrainConfig.model_validate(
    {"batch_size": 128, "generator": {"latent_dim": 256, "width": 8}, "epochs": 1000}
)


def make_packages(root: Path, count: int) -> list[Path]:
    """LeNet-5-BN packages with random weights: throughput does not depend on accuracy."""
    packages = []
    for index in range(count):
        directory = root / f"teacher-{index}"
        if not (directory / "teacher.json").exists():
            torch.manual_seed(index)
            spec = ArchitectureSpec(architecture="lenet5_bn", input_shape=SHAPE, num_classes=10)
            model = build_classifier(spec)
            save_package(
                directory,
                model,
                name=f"teacher-{index}",
                spec=spec,
                normalization=Normalization(mean=(0.219,), std=(0.3318,)),
                feature_dim=84,
                test_accuracy=None,
                train_samples=None,
            )
        packages.append(directory)
    return packages


def start_node(
    package: Path,
    directory: Path,
    pki,
    insecure: bool,
    address: str = "127.0.0.1:0",
    command_prefix: tuple[str, ...] | list[str] = (),
) -> TeacherNodeProcess:
    """A teacher node process with one torch thread."""
    node = TeacherNodeProcess(
        package,
        directory,
        None if insecure else pki,
        threads=1,
        address=address,
        command_prefix=command_prefix,
    )
    node.start()
    return node


def start_multihost_nodes(
    stack: ExitStack, packages: list[Path], out: Path
) -> tuple[list[TeacherNodeProcess], Any] | str:
    """Three mTLS nodes, each in its own network namespace; or why that cannot be done here.

    The server certificate's SANs are the three namespace addresses (and loopback). Nodes are
    stopped, then namespaces removed, when ``stack`` closes.
    """
    reason = unavailable_reason()
    if reason is not None:
        return reason
    network = VirtualHosts(len(packages))
    try:
        hosts = network.create()
    except NamespaceError as error:
        return str(error)
    stack.callback(network.close)
    pki = create_dev_pki(  # this run's own, fresh each time
        out / "pki-multihost", server_names=tuple(h.address for h in hosts), force=True
    )
    nodes = []
    for index, (package, host) in enumerate(zip(packages, hosts, strict=True)):
        node = start_node(
            package,
            out / f"multihost-{index}",
            pki,
            False,
            address=f"{host.address}:0",
            command_prefix=host.exec_prefix(),
        )
        stack.callback(node.stop)
        nodes.append(node)
    logger.info("multi-host nodes: %s", [n.address for n in nodes])
    return nodes, pki


def remote_config(
    address: str, pki, insecure: bool, wire_dtype: str = "float32"
) -> RemoteTeacherConfig:
    if insecure:
        return RemoteTeacherConfig(address=address, insecure=True, wire_dtype=wire_dtype)
    return RemoteTeacherConfig(
        address=address,
        ca=pki.ca.cert,
        cert=pki.client.cert,
        key=pki.client.key,
        wire_dtype=wire_dtype,
    )


def raw_payload_bytes(
    teachers: int, batch: int, steps: int, num_classes: int = 10, feature_dim: int = 84
) -> dict[str, int]:
    """float32 bytes each iteration's RPCs must carry, by this protocol and with the batch twice.

    Per teacher: K student Queries (images up; logits and features down), one generator Query
    (images up; logits, R(x), a double, and a 16-byte batch handle down), one InputGrad (the
    handle, the cotangent and bn_weight up; the input gradient down). ``twice`` is the protocol
    with ``send_batch_once = false`` (the InputGrad carries the images again, no handle).
    """
    image = batch * SHAPE[0] * SHAPE[1] * SHAPE[2] * 4
    logits = batch * num_classes * 4
    features = batch * feature_dim * 4
    student_steps = steps * (image + logits + features)
    generator_query = image + logits + 8 + 16
    input_grad = 16 + logits + 8 + image
    per_teacher = student_steps + generator_query + input_grad
    return {"protocol": teachers * per_teacher, "twice": teachers * (per_teacher + image - 32)}


def timed_iterations(state, teachers: list[Teacher], executor, count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        run_iteration(state, teachers, TRAIN, None, executor)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=3, help="per mode per round")
    parser.add_argument(
        "--multihost-only",
        action="store_true",
        help="only in-process, loopback mTLS and multi-host mTLS (no wire bytes, no growth)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(2)
    rounds, per_round = (2, 2) if args.quick else (args.rounds, args.iterations)
    args.out.mkdir(parents=True, exist_ok=True)
    for variable in PROXY_VARIABLES:
        os.environ.pop(variable, None)
    pki = create_dev_pki(args.out / "pki", force=True)  # this run's own, fresh each time
    packages = make_packages(args.out / "teachers", 8)
    results: dict[str, Any] = {
        "batch_size": TRAIN.batch_size,
        "teachers": 3,
        "rounds": rounds,
        "iterations_per_round": per_round,
    }

    with ExitStack() as stack:
        executor = stack.enter_context(ThreadPoolExecutor(8))
        multihost = start_multihost_nodes(stack, packages[:3], args.out)
        if isinstance(multihost, str):
            logger.warning("multi-host row skipped: %s", multihost)
            results["multihost_skipped"] = multihost
        plain_nodes = (
            []
            if args.multihost_only
            else [
                start_node(p, args.out / f"plain-{i}", pki, True)
                for i, p in enumerate(packages[:3])
            ]
        )
        tls_nodes = [
            start_node(p, args.out / f"tls-{i}", pki, False) for i, p in enumerate(packages[:3])
        ]
        for node in plain_nodes + tls_nodes:
            stack.callback(node.stop)
        modes: dict[str, tuple[list[Teacher], Any]] = {
            "inprocess": ([InProcessTeacher.from_package(p) for p in packages[:3]], None),
        }
        if not args.multihost_only:
            modes["remote"] = (
                [RemoteTeacher(remote_config(n.address, pki, True)) for n in plain_nodes],
                executor,
            )
        modes["remote_tls"] = (
            [RemoteTeacher(remote_config(n.address, pki, False)) for n in tls_nodes],
            executor,
        )
        if not args.multihost_only:
            for dtype in ("float16", "bfloat16"):
                modes[f"remote_tls_{dtype}"] = (
                    [RemoteTeacher(remote_config(n.address, pki, False, dtype)) for n in tls_nodes],
                    executor,
                )
        if not isinstance(multihost, str):
            hosts, host_pki = multihost
            modes[MULTIHOST] = (
                [RemoteTeacher(remote_config(n.address, host_pki, False)) for n in hosts],
                executor,
            )
        infos = [t.info() for t in modes["inprocess"][0]]
        states = {name: init_state(TRAIN, infos, torch.device("cpu")) for name in modes}
        seconds = dict.fromkeys(modes, 0.0)
        for name, (teachers, pool) in modes.items():  # warm-up
            timed_iterations(states[name], teachers, pool, 1)
        for round_index in range(rounds):
            for name, (teachers, pool) in modes.items():
                seconds[name] += timed_iterations(states[name], teachers, pool, per_round)
            logger.info(
                "round %d: %s", round_index + 1, {k: round(v, 1) for k, v in seconds.items()}
            )
        measured = rounds * per_round
        for name in modes:  # in-process first
            results[f"{name}_it_per_s"] = round(measured / seconds[name], 4)
            results[f"{name}_ratio"] = round(
                results[f"{name}_it_per_s"] / results["inprocess_it_per_s"], 4
            )
        if MULTIHOST in modes:
            results["multihost_to_loopback"] = round(
                results[f"{MULTIHOST}_it_per_s"] / results["remote_tls_it_per_s"], 4
            )
        if args.multihost_only:
            close_teachers(modes)
            finish(results, args)
            return
        results["ratio_plain"] = results["remote_ratio"]
        results["ratio_tls"] = results["remote_tls_ratio"]

        # Wire bytes through a counting proxy, in a separate pass.
        payload = raw_payload_bytes(3, TRAIN.batch_size, TRAIN.student_steps_per_generator_step)
        results["raw_payload_bytes_per_it"] = payload["protocol"]
        results["raw_payload_batch_twice_bytes_per_it"] = payload["twice"]
        for label, insecure, dtype, nodes in (
            ("", True, "float32", plain_nodes),
            ("_tls", False, "float32", tls_nodes),
            ("_tls_float16", False, "float16", tls_nodes),
        ):
            proxies = [
                RecordingProxy(("127.0.0.1", int(n.address.rpartition(":")[2])), keep=False)
                for n in nodes
            ]
            teachers = [
                RemoteTeacher(remote_config(p.address, pki, insecure, dtype)) for p in proxies
            ]
            state = init_state(TRAIN, infos, torch.device("cpu"))
            run_iteration(state, teachers, TRAIN, None, executor)
            before = sum(p.total for p in proxies)
            for _ in range(2):
                run_iteration(state, teachers, TRAIN, None, executor)
            results[f"wire_bytes_per_it{label}"] = (sum(p.total for p in proxies) - before) // 2
            for teacher in teachers:
                teacher.close()
            for proxy in proxies:
                proxy.close()
        results["wire_ratio"] = round(results["wire_bytes_per_it"] / payload["protocol"], 4)
        results["wire_ratio_tls"] = round(results["wire_bytes_per_it_tls"] / payload["protocol"], 4)
        results["raw_payload_bytes_per_it_float16"] = payload["protocol"] // 2

        # Growth with the number of teachers (mTLS nodes, one thread each).
        growth = {}
        for count in (2, 4, 8):
            nodes = [
                start_node(p, args.out / f"grow-{count}-{i}", pki, False)
                for i, p in enumerate(packages[:count])
            ]
            teachers = [RemoteTeacher(remote_config(n.address, pki, False)) for n in nodes]
            try:
                state = init_state(TRAIN, [t.info() for t in teachers], torch.device("cpu"))
                timed_iterations(state, teachers, executor, 1)
                iteration = timed_iterations(state, teachers, executor, per_round) / per_round
                images = torch.randn(TRAIN.batch_size, *SHAPE)
                started = time.perf_counter()
                for _ in range(5):
                    list(executor.map(lambda t, x=images: t.query(x), teachers))
                fan_out = (time.perf_counter() - started) / 5
                growth[str(count)] = {
                    "seconds_per_it": round(iteration, 3),
                    "fan_out_query_s": round(fan_out, 4),
                }
            finally:
                for teacher in teachers:
                    teacher.close()
                for node in nodes:
                    node.stop()
        results["teacher_growth"] = growth
        results["growth_2_to_8"] = round(
            growth["8"]["seconds_per_it"] / growth["2"]["seconds_per_it"], 3
        )
        results["fan_out_growth_2_to_8"] = round(
            growth["8"]["fan_out_query_s"] / growth["2"]["fan_out_query_s"], 3
        )
        close_teachers(modes)
    finish(results, args)


def close_teachers(modes: dict[str, tuple[list[Teacher], Any]]) -> None:
    for name, (teachers, _) in modes.items():
        if name != "inprocess":
            for teacher in teachers:
                teacher.close()  # type: ignore[attr-defined]


def finish(results: dict[str, Any], args: argparse.Namespace) -> None:
    (args.out / "remote.json").write_text(json.dumps(results, indent=2) + "\n")
    if args.multihost_only:
        write_multihost_table(results, args)
    else:
        write_table(results, args)
    print(json.dumps(results, indent=2))


def write_table(results: dict[str, Any], args: argparse.Namespace) -> None:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    mb = 1024 * 1024
    lines = [
        f"\n### Remote teachers, {stamp}\n",
        f"Command: `python bench/remote.py --out {args.out}{' --quick' if args.quick else ''}`; "
        f"3 LeNet-5-BN teachers, batch {results['batch_size']}, K = 5, MFS student; teacher nodes "
        "are separate processes on loopback (1 thread each; the 3-host row: each node in its "
        "own network namespace and address, over a veth link), 2 CPU cores in all; "
        f"{results['rounds']} interleaved rounds of {results['iterations_per_round']} "
        "iterations.\n",
        "| mode | it/s | ratio to in-process | wire MiB / it |",
        "|---|---|---|---|",
        f"| in-process | {results['inprocess_it_per_s']:.3f} | 1.000 | 0 |",
        f"| remote, plaintext | {results['remote_it_per_s']:.3f} | {results['ratio_plain']:.3f} | "
        f"{results['wire_bytes_per_it'] / mb:.2f} |",
        f"| remote, mTLS | {results['remote_tls_it_per_s']:.3f} | {results['ratio_tls']:.3f} | "
        f"{results['wire_bytes_per_it_tls'] / mb:.2f} |",
        f"| remote, mTLS, float16 wire | {results['remote_tls_float16_it_per_s']:.3f} | "
        f"{results['remote_tls_float16_it_per_s'] / results['inprocess_it_per_s']:.3f} | "
        f"{results['wire_bytes_per_it_tls_float16'] / mb:.2f} |",
        f"| remote, mTLS, bfloat16 wire | {results['remote_tls_bfloat16_it_per_s']:.3f} | "
        f"{results['remote_tls_bfloat16_it_per_s'] / results['inprocess_it_per_s']:.3f} | |",
        multihost_row(results),
        "",
        "Raw float32 payload by this protocol: "
        f"{results['raw_payload_bytes_per_it'] / mb:.2f} MiB / it (wire / payload: plaintext "
        f"{results['wire_ratio']:.4f}, mTLS {results['wire_ratio_tls']:.4f}); "
        f"with the generator batch sent twice (send_batch_once = false): "
        f"{results['raw_payload_batch_twice_bytes_per_it'] / mb:.2f} MiB.",
        "",
        "| teachers (mTLS nodes) | s / iteration | concurrent Query of all teachers, s |",
        "|---|---|---|",
    ]
    for count, row in results["teacher_growth"].items():
        lines.append(f"| {count} | {row['seconds_per_it']:.3f} | {row['fan_out_query_s']:.4f} |")
    lines.append(
        f"\nGrowth 2 -> 8 teachers: iteration x{results['growth_2_to_8']:.2f}, concurrent teacher "
        f"round x{results['fan_out_growth_2_to_8']:.2f}.\n"
    )
    append_section("\n".join(lines))


def multihost_row(results: dict[str, Any]) -> str:
    """The table row of the three-host mode, or a line saying why it was skipped."""
    if f"{MULTIHOST}_it_per_s" not in results:
        return (
            f"| remote, mTLS, 3 hosts (netns) | skipped: {results.get('multihost_skipped')} | | |"
        )
    return (
        f"| remote, mTLS, 3 hosts (netns + veth) | {results[f'{MULTIHOST}_it_per_s']:.3f} | "
        f"{results[f'{MULTIHOST}_ratio']:.3f} | |"
    )


def write_multihost_table(results: dict[str, Any], args: argparse.Namespace) -> None:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = f"python bench/remote.py --out {args.out} --multihost-only"
    if args.quick:
        command += " --quick"
    else:
        command += f" --rounds {args.rounds} --iterations {args.iterations}"
    lines = [
        f"\n### Remote teachers on three hosts, {stamp}\n",
        f"Command: `{command}`; 3 LeNet-5-BN teachers, batch {results['batch_size']}, K = 5, MFS "
        "student; mTLS nodes (1 thread each) on loopback, and on three network namespaces, each "
        "with its own address on a veth link to the student's host, certificates for those "
        "addresses; 2 CPU cores in all; "
        f"{results['rounds']} interleaved rounds of {results['iterations_per_round']} "
        "iterations.\n",
        "| mode | it/s | ratio to in-process |",
        "|---|---|---|",
        f"| in-process | {results['inprocess_it_per_s']:.3f} | 1.000 |",
        f"| remote, mTLS, loopback | {results['remote_tls_it_per_s']:.3f} | "
        f"{results['remote_tls_ratio']:.3f} |",
        multihost_row(results).removesuffix(" |"),
    ]
    if "multihost_to_loopback" in results:
        lines.append(f"\nThree hosts / loopback: {results['multihost_to_loopback']:.3f}.\n")
    else:
        lines.append("")
    append_section("\n".join(lines))


if __name__ == "__main__":
    main()
