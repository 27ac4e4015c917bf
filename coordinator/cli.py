"""The ``cdfkd`` command: ``main(argv) -> int`` with subcommands (STYLE.md 7)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from cdfkd.coordinator.errors import ConfigError, ExitCode, FederationCheckFailed
from cdfkd.coordinator.log_format import LOG_FORMATS, formatter_for

logger = logging.getLogger("cdfkd")


_HANDLER_NAME = "cdfkd-cli"


def _configure_logging(verbosity: int, log_format: str = "text") -> None:
    """Log cdfkd's records to stderr; the only place logging is configured."""
    level = logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO
    package_logger = logging.getLogger("cdfkd")
    for handler in [h for h in package_logger.handlers if h.get_name() == _HANDLER_NAME]:
        package_logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter_for(log_format))
    package_logger.addHandler(handler)
    package_logger.setLevel(level)
    os.environ.setdefault("GRPC_VERBOSITY", "error")


@contextmanager
def _stop_on_sigint() -> Iterator[threading.Event]:
    """First Ctrl-C sets the event (finish the iteration, checkpoint); a second one aborts."""
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield event
        return

    def handler(signum: int, frame: object) -> None:
        if event.is_set():
            raise KeyboardInterrupt
        logger.warning("interrupt: stopping after this iteration (Ctrl-C again to abort)")
        event.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield event
    finally:
        signal.signal(signal.SIGINT, previous)


def _privacy_settings(args: argparse.Namespace) -> dict[str, float] | None:
    """The ``--dp-*`` flags, checked one by one so that an error names its flag."""
    dp_flags = {
        "--dp-delta": args.dp_delta,
        "--dp-max-grad-norm": args.dp_max_grad_norm,
        "--dp-stats-clip": args.dp_stats_clip,
    }
    if args.dp_epsilon is None:
        given = [flag for flag, value in dp_flags.items() if value is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} only with --dp-epsilon (a DP teacher)")
        return None
    if not math.isfinite(args.dp_epsilon) or args.dp_epsilon <= 0:
        raise ConfigError(
            f"--dp-epsilon {args.dp_epsilon:g} must be a finite number > 0 (smaller is more "
            "private; 1 to 8 are common)"
        )
    if args.dp_delta is None:
        raise ConfigError("--dp-delta is required with --dp-epsilon (e.g. 1e-5, below 1/records)")
    if not 0 < args.dp_delta < 1:
        raise ConfigError(f"--dp-delta {args.dp_delta:g} must be in (0, 1), e.g. 1e-5")
    settings = {"epsilon": args.dp_epsilon, "delta": args.dp_delta}
    named = (("--dp-max-grad-norm", "max_grad_norm"), ("--dp-stats-clip", "statistics_clip"))
    for flag, key in named:
        value = dp_flags[flag]
        if value is None:
            continue
        if not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{flag} {value:g} must be a finite number > 0")
        settings[key] = value
    return settings


def _cmd_teacher_train(args: argparse.Namespace) -> int:
    from cdfkd.teacher_node.config_files import validate
    from cdfkd.teacher_node.training import TeacherJob, train_teacher_package

    privacy = _privacy_settings(args)

    fields = dict(
        name=args.name or Path(args.out).name,
        dataset=args.dataset,
        data_path=args.data_path,
        data=args.data,
        architecture=args.architecture,
        depth=args.depth,
        width=args.width,
        shard=args.shard,
        num_shards=args.num_shards,
        partition=args.partition,
        alpha=args.alpha,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        seed=args.seed,
        privacy=privacy,
    )
    # An unset flag takes the job's default (which differs for a DP teacher: DP_RECIPE).
    fields = {key: value for key, value in fields.items() if value is not None}
    job = validate(TeacherJob, fields, "teacher job", ConfigError)
    metadata = train_teacher_package(job, Path(args.out))
    result: dict[str, object] = {"package": str(args.out), "test_accuracy": metadata.test_accuracy}
    if metadata.privacy is not None:
        result["privacy"] = metadata.privacy.model_dump(mode="json")
    print(json.dumps(result))
    return ExitCode.OK


def _float_list(flag: str, text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError as error:
        raise ConfigError(f"{flag} {text!r} must be comma-separated numbers") from error


def _cmd_teacher_package(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from cdfkd.teacher_node.config_files import describe_validation_error
    from cdfkd.teacher_node.datasets import Normalization
    from cdfkd.teacher_node.owner_model import FactoryRef
    from cdfkd.teacher_node.owner_package import (
        OwnerModelSpec,
        package_owner_model,
        read_eval_data,
    )

    try:
        kwargs = json.loads(args.factory_kwargs)
    except json.JSONDecodeError as error:
        raise ConfigError(f"--factory-kwargs is not valid JSON: {error}") from error
    if not isinstance(kwargs, dict):
        raise ConfigError("--factory-kwargs must be a JSON object, e.g. '{\"num_classes\": 10}'")
    try:
        factory = FactoryRef(reference=args.factory, kwargs=kwargs)
    except ValidationError as error:
        raise ConfigError(f"--factory: {describe_validation_error(error)}") from error
    shape = _float_list("--input-shape", args.input_shape)
    if len(shape) != 3 or any(v != int(v) for v in shape):
        raise ConfigError(f"--input-shape {args.input_shape!r} must be C,H,W (three integers)")
    spec = OwnerModelSpec(
        name=args.name or Path(args.out).name,
        factory=factory,
        weights=Path(args.weights),
        input_shape=(int(shape[0]), int(shape[1]), int(shape[2])),
        num_classes=args.num_classes,
        normalization=Normalization(
            mean=_float_list("--mean", args.mean), std=_float_list("--std", args.std)
        ),
        feature_layer=args.feature_layer,
    )
    eval_data, description = (
        read_eval_data(args.eval_data, args.num_classes) if args.eval_data else (None, None)
    )
    metadata = package_owner_model(spec, Path(args.out), eval_data, description)
    print(
        json.dumps(
            {
                "package": str(args.out),
                "feature_layer": metadata.feature_layer,
                "feature_dim": metadata.feature_dim,
                "has_batchnorm": metadata.has_batchnorm,
                "test_accuracy": metadata.test_accuracy,
            }
        )
    )
    return ExitCode.OK


def _cmd_teacher_serve(args: argparse.Namespace) -> int:
    from cdfkd.teacher_node.config import check_files_exist, load_teacher_config
    from cdfkd.teacher_node.server import serve

    config = load_teacher_config(Path(args.config))
    check_files_exist(config, Path(args.config))
    return serve(config)


def _cmd_teacher_audit_summary(args: argparse.Namespace) -> int:
    from cdfkd.teacher_node.audit import audit_files, format_summary, summarize

    if not audit_files(Path(args.file)):
        raise ConfigError(f"no audit log at {args.file}")
    print(format_summary(summarize(Path(args.file))))
    return ExitCode.OK


def _cmd_pki_dev(args: argparse.Namespace) -> int:
    from cdfkd.teacher_node.pki import create_dev_pki

    clients = tuple(args.client) or ("student",)
    pki = create_dev_pki(Path(args.out), tuple(args.server_name), clients, force=args.force)
    print(
        json.dumps(
            {"ca": str(pki.ca.cert), "server": str(pki.server.cert), "client": str(pki.client.cert)}
        )
    )
    return ExitCode.OK


def _cmd_pki_issue(args: argparse.Namespace) -> int:
    from cdfkd.teacher_node.pki import issue_from_files

    identity = issue_from_files(
        Path(args.ca_cert),
        Path(args.ca_key),
        Path(args.out),
        client=args.client,
        server_names=tuple(args.server_name),
        force=args.force,
    )
    print(json.dumps({"cert": str(identity.cert), "key": str(identity.key)}))
    return ExitCode.OK


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cdfkd")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _cmd_federation_check(args: argparse.Namespace) -> int:
    from cdfkd.coordinator.config import load_run_config
    from cdfkd.coordinator.federation import check_federation, format_table

    reports = check_federation(load_run_config(Path(args.config)), timeout_s=args.timeout)
    print(format_table(reports))
    failed = [r for r in reports if not r.ok]
    for report in failed:
        logger.error("teacher %s: %s", report.target, "; ".join(report.problems))
    return ExitCode.FEDERATION if failed else ExitCode.OK


def _cmd_train(args: argparse.Namespace) -> int:
    from cdfkd.coordinator.config import load_run_config
    from cdfkd.coordinator.training_run import CHECKPOINT_DIR, run_training
    from cdfkd.student_node.checkpoint import latest_checkpoint
    from cdfkd.student_node.errors import NonFiniteLossError, RemoteTeacherError

    config = load_run_config(Path(args.config))
    out = Path(args.out) if args.out else Path(args.config).resolve().parent / "run"
    with _stop_on_sigint() as stop:
        try:
            if args.in_process:
                summary = run_training(config, out, resume=args.resume, stop_event=stop).summary()
            else:
                from cdfkd.coordinator.ray_driver import train_on_ray

                summary = train_on_ray(
                    config, out, resume=args.resume, ray_address=args.ray_address, stop_event=stop
                )
        except (NonFiniteLossError, RemoteTeacherError):
            saved = latest_checkpoint(out / CHECKPOINT_DIR)
            logger.error("the last good checkpoint is %s: continue with --resume", saved)
            raise
    print(json.dumps(summary))
    if stop.is_set():
        logger.warning("interrupted at iteration %d; resume with --resume", summary["iterations"])
        return ExitCode.INTERRUPTED
    return ExitCode.OK


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from cdfkd.coordinator.evaluation import evaluate_run
    from cdfkd.teacher_node.datasets import DatasetName

    dataset = None if args.dataset is None else DatasetName(args.dataset)
    result = evaluate_run(Path(args.run), args.data_path, files=args.data, dataset=dataset)
    print(json.dumps(result, indent=2))
    return ExitCode.OK


def _cmd_export(args: argparse.Namespace) -> int:
    from cdfkd.student_node.export import Aggregation, ExportFormat, export_student

    # The ONNX exporter warns once per torchvision operator it skips; this project has none.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    result = export_student(
        Path(args.student), ExportFormat(args.format), Aggregation(args.aggregate), Path(args.out)
    )
    logger.info(
        "wrote %s (%s, %s): %.1f KiB, %s parameters",
        result.path,
        result.format,
        result.aggregation,
        result.size_bytes / 1024,
        f"{result.parameters:,}",
    )
    print(json.dumps(result.to_json()))
    return ExitCode.OK


def _owner_data(args: argparse.Namespace) -> tuple[list[str], list[Path]]:
    """The ``--owner-data NAME=PATH`` entries: names and paths in owner order."""
    names: list[str] = []
    paths: list[Path] = []
    for entry in args.owner_data:
        name, separator, path = entry.partition("=")
        name = name.strip()
        if not separator or not name or not path:
            raise ConfigError(f"--owner-data {entry!r}: expected NAME=PATH")
        if name in names:
            raise ConfigError(f"--owner-data: organization {name!r} is given twice")
        names.append(name)
        paths.append(Path(path).resolve())
    return names, paths


def _cmd_flower_run(args: argparse.Namespace) -> int:
    import shutil

    from cdfkd.coordinator.flower.server_app import AGGREGATOR_FILE, SUMMARY_FILE
    from cdfkd.coordinator.flower.settings import FederatedAttentionSettings

    out = Path(args.out).resolve()
    names, owner_paths = _owner_data(args)
    shards = {
        "dataset": args.dataset or "",
        "data-path": str(args.data_path or ""),
        "partition": args.partition or "",
        "alpha": "" if args.alpha is None else args.alpha,
        "shard-seed": "" if args.shard_seed is None else args.shard_seed,
    }
    if owner_paths:
        given = [f"--{key}" for key, value in shards.items() if value != ""]
        if given:
            raise ConfigError(
                f"{', '.join(given)}: shards of a named dataset, not combined with "
                "--owner-data (each organization reads its own files)"
            )
        if args.owners is not None and args.owners != len(owner_paths):
            raise ConfigError(
                f"--owners {args.owners} but {len(owner_paths)} --owner-data entries: "
                "leave out --owners"
            )
    settings = FederatedAttentionSettings.from_flat(
        {
            **shards,
            "student-dir": str(Path(args.student).resolve()),
            "out-dir": str(out),
            "owner-files": bool(owner_paths),
            "num-owners": len(owner_paths) or args.owners or 3,
            "samples-per-owner": args.samples_per_owner,
            "rounds": args.rounds,
            "local-epochs": args.local_epochs,
        }
    )
    from cdfkd.student_node.artifact import load_student

    # A missing or unreadable student, or owners' files that do not fit it: exit 2 before Flower.
    _, _, _, infos = load_student(settings.student_dir)
    if owner_paths:
        from cdfkd.student_node.artifact import student_image_space
        from cdfkd.teacher_node.data_sources import load_train_and_test

        space = student_image_space(settings.student_dir)
        for path in owner_paths:
            _, test = load_train_and_test(path, num_classes=infos[0].num_classes)
            space.prepare(test.images[:1], str(path))
    if args.runtime == "simulation":
        from cdfkd.coordinator.flower.simulation import simulate

        summary = simulate(settings, owner_data=owner_paths)
    else:
        from cdfkd.coordinator.flower.deployment import FlowerTls, run_local_deployment

        if args.pki is None:
            raise ConfigError("--runtime deployment needs --pki DIR (see 'cdfkd pki dev')")
        pki = Path(args.pki)
        tls = FlowerTls(ca=pki / "ca.pem", cert=pki / "server.pem", key=pki / "server.key")
        for path in (tls.ca, tls.cert, tls.key):
            if not path.is_file():
                raise ConfigError(
                    f"--pki {pki}: {path.name} is missing ('cdfkd pki dev' writes it)"
                )
        summary = run_local_deployment(settings, tls, out / "deployment", owner_data=owner_paths)
    if names:
        for owner in summary["owners"]:
            owner["name"] = names[owner["owner"]]
        (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    if args.install:
        shutil.copyfile(out / AGGREGATOR_FILE, settings.student_dir / AGGREGATOR_FILE)
        logger.info("federated attention installed into %s", settings.student_dir)
    print(json.dumps(summary, indent=2))
    return ExitCode.OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from cdfkd.coordinator.demo import run_demo
    from cdfkd.teacher_node.datasets import DatasetName

    with _stop_on_sigint() as stop:
        summary = run_demo(
            Path(args.out),
            quick=args.quick,
            stop_event=stop,
            data_path=args.data_path,
            dataset=DatasetName(args.dataset),
        )
    print(json.dumps(summary, indent=2))
    return ExitCode.INTERRUPTED if stop.is_set() else ExitCode.OK


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``cdfkd``."""
    parser = argparse.ArgumentParser(
        prog="cdfkd",
        description="Data-free distillation of several privately owned teachers (CDFKD-MFS).",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    parser.add_argument("--version", action="version", version=f"cdfkd {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    teacher = commands.add_parser("teacher", help="teacher-owner commands")
    teacher_commands = teacher.add_subparsers(dest="teacher_command", required=True)
    train_teacher = teacher_commands.add_parser(
        "train", help="train a teacher on one owner's shard and write a teacher package"
    )
    train_teacher.add_argument("--out", required=True, help="package folder to write")
    train_teacher.add_argument("--name", help="teacher name (default: the folder name)")
    train_teacher.add_argument(
        "--dataset",
        choices=["fashion_mnist", "digits"],
        help="a named dataset (default: fashion_mnist unless --data is given)",
    )
    train_teacher.add_argument(
        "--data-path", type=Path, help="folder of the Fashion-MNIST IDX files"
    )
    train_teacher.add_argument(
        "--data",
        type=Path,
        help="the owner's own images: a folder with train/ and test/ (class folders of "
        ".png/.jpg) or train.npz and test.npz",
    )
    train_teacher.add_argument(
        "--architecture",
        choices=["lenet5_bn", "lenet5_gn", "lenet5_gn_tanh", "resnet"],
        help="default: lenet5_bn; lenet5_gn (GroupNorm) with --dp-epsilon, or lenet5_gn_tanh "
        "(GroupNorm, tanh)",
    )
    train_teacher.add_argument("--depth", type=int, default=1, help="ResNet blocks per stage")
    train_teacher.add_argument("--width", type=int, default=16, help="ResNet first-stage channels")
    train_teacher.add_argument("--shard", type=int, default=0, help="which owner shard (0-based)")
    train_teacher.add_argument("--num-shards", type=int, default=1, help="number of owners")
    train_teacher.add_argument("--partition", default="iid", choices=["iid", "dirichlet"])
    train_teacher.add_argument(
        "--alpha", type=float, default=0.5, help="Dirichlet alpha (label skew)"
    )
    train_teacher.add_argument(
        "--epochs", type=int, help="default 6; 24 with --dp-epsilon (DP-SGD wants more)"
    )
    train_teacher.add_argument(
        "--batch-size", type=int, help="default 128; 1024 (expected) with --dp-epsilon"
    )
    train_teacher.add_argument("--lr", type=float, help="default 2e-3; 4e-3 with --dp-epsilon")
    train_teacher.add_argument("--seed", type=int, default=0)
    train_teacher.add_argument(
        "--dp-epsilon",
        type=float,
        help="train with differential privacy (DP-SGD): the epsilon of the whole package, "
        "training and the prior's released statistics (README, 'Differentially private teachers')",
    )
    train_teacher.add_argument(
        "--dp-delta", type=float, help="the delta of the DP guarantee (required with --dp-epsilon)"
    )
    train_teacher.add_argument(
        "--dp-max-grad-norm",
        type=float,
        help="DP-SGD's per-sample gradient clipping bound (default 1.0)",
    )
    train_teacher.add_argument(
        "--dp-stats-clip",
        type=float,
        help="norm bound of one record's released prior statistics, all layers (default 30)",
    )
    train_teacher.set_defaults(handler=_cmd_teacher_train)
    package = teacher_commands.add_parser(
        "package",
        help="make a teacher package from your own trained classifier (factory + safetensors)",
    )
    package.add_argument("--out", required=True, help="package folder to write")
    package.add_argument(
        "--factory",
        required=True,
        help="MODULE:CALLABLE returning the nn.Module (importable here and on the node)",
    )
    package.add_argument(
        "--factory-kwargs", default="{}", help="keyword arguments of the factory, a JSON object"
    )
    package.add_argument(
        "--weights", required=True, help="the model's state dict as a .safetensors file"
    )
    package.add_argument("--input-shape", required=True, help="C,H,W the model takes")
    package.add_argument("--num-classes", required=True, type=int, help="K, the logits' width")
    package.add_argument(
        "--mean", required=True, help="per-channel mean of [0, 1] pixels, m1,..,mC"
    )
    package.add_argument("--std", required=True, help="per-channel std, s1,..,sC")
    package.add_argument(
        "--feature-layer",
        help="module whose output (pooled, flattened) is the feature g (default: the input "
        "of the last nn.Linear)",
    )
    package.add_argument("--name", help="teacher name (default: the folder name)")
    package.add_argument(
        "--eval-data",
        help="labelled test images to record the accuracy: a dataset name "
        "(fashion_mnist, digits) or an .npz with 'images' and 'labels'",
    )
    package.set_defaults(handler=_cmd_teacher_package)
    serve_teacher = teacher_commands.add_parser(
        "serve", help="serve a teacher package over gRPC with mutual TLS (one per organization)"
    )
    serve_teacher.add_argument("--config", required=True, help="teacher TOML file")
    serve_teacher.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="text",
        help="log lines on stderr: text, or one JSON object per line (for log collectors)",
    )
    serve_teacher.set_defaults(handler=_cmd_teacher_serve)
    audit = teacher_commands.add_parser("audit", help="read a teacher node's audit log")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True)
    audit_summary = audit_commands.add_parser(
        "summary", help="per-caller totals of an audit log (and its rotated files)"
    )
    audit_summary.add_argument("file", help="the audit log, e.g. audit.jsonl")
    audit_summary.set_defaults(handler=_cmd_teacher_audit_summary)

    pki = commands.add_parser("pki", help="certificates for mutual TLS")
    pki_commands = pki.add_subparsers(dest="pki_command", required=True)
    pki_dev = pki_commands.add_parser(
        "dev", help="create a development CA with server and client certificates"
    )
    pki_dev.add_argument("--out", required=True, help="folder to write the PEM files into")
    pki_dev.add_argument(
        "--server-name",
        action="append",
        default=[],
        help="extra DNS name or IP for the server certificate (repeatable)",
    )
    pki_dev.add_argument(
        "--client",
        action="append",
        default=[],
        help="client certificate common name (repeatable; default: student)",
    )
    pki_dev.add_argument(
        "--force", action="store_true", help="replace a CA already in --out (invalidates it)"
    )
    pki_dev.set_defaults(handler=_cmd_pki_dev)
    pki_issue = pki_commands.add_parser(
        "issue", help="issue one more client or server certificate from an existing CA"
    )
    pki_issue.add_argument("--ca-cert", required=True, help="the CA certificate (PEM)")
    pki_issue.add_argument("--ca-key", required=True, help="the CA's private key (PEM)")
    who = pki_issue.add_mutually_exclusive_group(required=True)
    who.add_argument("--client", help="client common name (the identity a node's policy names)")
    who.add_argument(
        "--server-name",
        action="append",
        default=[],
        help="DNS name or IP of a server (repeatable: more names for the same certificate)",
    )
    pki_issue.add_argument("--out", required=True, help="folder to write the PEM files into")
    pki_issue.add_argument("--force", action="store_true", help="replace existing files")
    pki_issue.set_defaults(handler=_cmd_pki_issue)

    federation = commands.add_parser("federation", help="checks across the teacher nodes")
    federation_commands = federation.add_subparsers(dest="federation_command", required=True)
    check = federation_commands.add_parser(
        "check", help="reach, trust and compare every teacher of a run config (exit 3 on failure)"
    )
    check.add_argument("--config", required=True, help="run TOML file")
    check.add_argument("--timeout", type=float, default=5.0, help="seconds per call")
    check.set_defaults(handler=_cmd_federation_check)

    train = commands.add_parser("train", help="distill the teachers of a run config into a student")
    train.add_argument("--config", required=True, help="run TOML file")
    train.add_argument("--out", help="output folder (default: 'run' beside the config)")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    train.add_argument(
        "--ray-address",
        help="join this Ray cluster (default: $RAY_ADDRESS, else an embedded local Ray)",
    )
    train.add_argument(
        "--in-process", action="store_true", help="train in this process, without Ray (debugging)"
    )
    train.set_defaults(handler=_cmd_train)

    evaluate = commands.add_parser(
        "evaluate", help="evaluate a finished run's student on test data"
    )
    evaluate.add_argument(
        "--run", required=True, help="output folder of 'cdfkd train' or 'cdfkd demo'"
    )
    evaluate.add_argument(
        "--data",
        type=Path,
        help="labelled test images: an image folder or .npz (its test split if it has splits); "
        "default: the run's own [data]",
    )
    evaluate.add_argument(
        "--dataset", choices=["fashion_mnist", "digits"], help="a named dataset instead"
    )
    evaluate.add_argument("--data-path", type=Path, help="folder of the Fashion-MNIST IDX files")
    evaluate.set_defaults(handler=_cmd_evaluate)

    export = commands.add_parser(
        "export", help="write a trained student as one ONNX or TorchScript file for inference"
    )
    export.add_argument(
        "--student",
        required=True,
        help="the 'student' folder in the output of 'cdfkd train' or 'cdfkd demo'",
    )
    export.add_argument("--format", required=True, choices=["onnx", "torchscript"])
    export.add_argument(
        "--aggregate",
        default="mean",
        choices=["mean", "attention"],
        help="combine the headers by their mean or by the trained attention module",
    )
    export.add_argument("--out", required=True, help="file to write")
    export.set_defaults(handler=_cmd_export)

    flower = commands.add_parser(
        "flower", help="what must be federated: attention training and evaluation, with Flower"
    )
    flower_commands = flower.add_subparsers(dest="flower_command", required=True)
    flower_run = flower_commands.add_parser(
        "run",
        help="train the attention by FedAvg on each owner's k samples and evaluate on each "
        "owner's test split",
    )
    flower_run.add_argument("--student", required=True, help="the 'student' folder of a run")
    flower_run.add_argument("--out", required=True, help="folder for flower.json and the module")
    flower_run.add_argument(
        "--runtime",
        default="simulation",
        choices=["simulation", "deployment"],
        help="a Flower simulation, or a SuperLink and one SuperNode per owner as processes "
        "on loopback with TLS (needs --pki)",
    )
    flower_run.add_argument("--pki", type=Path, help="'cdfkd pki dev' folder (deployment)")
    flower_run.add_argument(
        "--owner-data",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="one organization and its own files (repeatable, one per organization): a folder "
        "with train/ and test/ (class folders) or train.npz and test.npz",
    )
    flower_run.add_argument(
        "--dataset",
        choices=["fashion_mnist", "digits"],
        help="owners as shards of a named dataset (default fashion_mnist, without --owner-data)",
    )
    flower_run.add_argument("--data-path", type=Path, help="folder of the Fashion-MNIST IDX files")
    flower_run.add_argument(
        "--owners", type=int, help="organizations (SuperNodes; default 3, or one per --owner-data)"
    )
    flower_run.add_argument(
        "--partition", choices=["iid", "dirichlet"], help="how shards are cut (default iid)"
    )
    flower_run.add_argument("--alpha", type=float, help="Dirichlet concentration (default 0.5)")
    flower_run.add_argument("--shard-seed", type=int, help="seed of the shards (default 0)")
    flower_run.add_argument("--samples-per-owner", type=int, default=20, help="k per owner")
    flower_run.add_argument("--rounds", type=int, default=10)
    flower_run.add_argument("--local-epochs", type=int, default=20)
    flower_run.add_argument(
        "--install",
        action="store_true",
        help="put the federated attention module into the student folder (used by evaluate "
        "and export --aggregate attention)",
    )
    flower_run.set_defaults(handler=_cmd_flower_run)

    demo = commands.add_parser(
        "demo", help="end to end: three owners' teachers on Fashion-MNIST distilled with CDFKD-MFS"
    )
    demo.add_argument("--out", required=True, help="output folder (teachers are cached there)")
    demo.add_argument("--quick", action="store_true", help="a shorter run (about 5 min on 2 cores)")
    demo.add_argument("--data-path", type=Path, help="folder of the Fashion-MNIST IDX files")
    demo.add_argument(
        "--dataset",
        default="fashion_mnist",
        choices=["fashion_mnist", "digits"],
        help="digits: scikit-learn's 8x8 digits, a fast smoke run",
    )
    demo.set_defaults(handler=_cmd_demo)
    return parser


def _exit_code_for(error: BaseException) -> ExitCode:
    from cdfkd.student_node.errors import CheckpointError, IncompatibleTeachers, TeacherRefused
    from cdfkd.teacher_node.errors import (
        DatasetError,
        InvalidInput,
        PackageError,
        PkiError,
        TeacherConfigError,
    )

    usage = (
        ConfigError,
        TeacherConfigError,
        DatasetError,
        PackageError,
        CheckpointError,
        InvalidInput,
        PkiError,
    )
    if isinstance(error, usage):
        return ExitCode.USAGE
    if isinstance(error, IncompatibleTeachers | FederationCheckFailed):
        return ExitCode.FEDERATION
    if isinstance(error, TeacherRefused):
        return ExitCode.REFUSED
    return ExitCode.FAILURE


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``cdfkd`` command; returns its exit code."""
    from cdfkd.protos.errors import CdfkdError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    _configure_logging(-1 if args.quiet else args.verbose, getattr(args, "log_format", "text"))
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return int(handler(args))
    except CdfkdError as error:
        logger.error("%s", error)
        return _exit_code_for(error)
    except KeyboardInterrupt:
        logger.error("aborted")
        return ExitCode.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
