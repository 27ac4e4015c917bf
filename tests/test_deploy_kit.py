"""The deploy kit cannot drift: example config, requirements, container, unit and probe agree."""

from __future__ import annotations

import configparser
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Any, get_args, get_origin

import pytest
import torch
from packaging.requirements import Requirement
from pydantic import BaseModel

from cdfkd.teacher_node.config import TeacherNodeConfig, load_teacher_config, parse_teacher_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
EXAMPLE = DEPLOY / "teacher.example.toml"
KIT = DEPLOY / "teacher"
CONFIG_IN_IMAGE = "/etc/cdfkd/teacher.toml"
#: `key = value`, possibly commented out as `# key = value`.
OPTION = re.compile(r"^(?P<commented>#\s*)?(?P<key>[A-Za-z_]\w*)\s*=\s*(?P<rest>.*)$")


def _option_paths(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Dotted paths of every option of ``model``; ``*`` stands for a key of a dict table."""
    paths = set()
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        annotation = field.annotation
        if get_origin(annotation) is dict:
            value = get_args(annotation)[1]
            if isinstance(value, type) and issubclass(value, BaseModel):
                paths |= _option_paths(value, f"{path}.*.")
                continue
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            paths |= _option_paths(annotation, f"{path}.")
            continue
        paths.add(path)
    return paths


def _data_paths(data: dict[str, Any], model: type[BaseModel], prefix: str = "") -> set[str]:
    """Dotted paths set in ``data`` (a parsed teacher.toml), with dict-table keys as ``*``."""
    paths = set()
    for key, value in data.items():
        field = model.model_fields[key]
        annotation = field.annotation
        if get_origin(annotation) is dict:
            inner = get_args(annotation)[1]
            for entry in value.values():
                paths |= _data_paths(entry, inner, f"{prefix}{key}.*.")
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            paths |= _data_paths(value, annotation, f"{prefix}{key}.")
        else:
            paths.add(f"{prefix}{key}")
    return paths


def _uncommented(text: str) -> str:
    """The example with every commented-out option (``# key = value``) switched on."""
    lines = []
    for line in text.splitlines():
        match = OPTION.match(line)
        lines.append(line.lstrip("#").lstrip() if match and match["commented"] else line)
    return "\n".join(lines)


def test_the_teacher_example_is_valid_and_names_every_option() -> None:
    load_teacher_config(EXAMPLE)
    data = tomllib.loads(_uncommented(EXAMPLE.read_text()))
    parse_teacher_config(data, base=EXAMPLE.parent)  # the commented-out values are valid too
    missing = _option_paths(TeacherNodeConfig) - _data_paths(data, TeacherNodeConfig)
    assert not missing, f"deploy/teacher.example.toml lacks {sorted(missing)}"


def test_every_option_of_the_teacher_example_has_a_comment() -> None:
    previous = ""
    undocumented = []
    for line in EXAMPLE.read_text().splitlines():
        match = OPTION.match(line)
        if match and "#" not in match["rest"] and not previous.startswith("#"):
            undocumented.append(line)
        if line.strip():
            previous = line
    assert not undocumented


def _requirements() -> list[Requirement]:
    lines = (KIT / "requirements.txt").read_text().splitlines()
    return [Requirement(line) for line in lines if line.strip() and line[0] not in "#-"]


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_node_requirements_are_the_project_dependencies() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = {
        _normalized(r.name): r for r in map(Requirement, pyproject["project"]["dependencies"])
    }
    for requirement in _requirements():
        assert _normalized(requirement.name) in project, requirement
        assert str(requirement) == str(project[_normalized(requirement.name)])


def _installed_closure(requirements: list[Requirement]) -> set[str]:
    """The requirements and, transitively, what they depend on (no extras)."""
    seen: set[str] = set()
    pending = [r.name for r in requirements]
    while pending:
        name = _normalized(pending.pop())
        if name in seen:
            continue
        seen.add(name)
        for line in importlib.metadata.requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(requirement.name)
    return seen


def _random_package(directory: Path) -> Path:
    from tests.helpers import untrained_lenet_package

    return untrained_lenet_package(
        directory, name="random", input_shape=(1, 32, 32), mean=0.5, std=0.25
    )


@pytest.fixture(scope="module")
def kit_node(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A random teacher package, a dev PKI with a health-check client, and a node config."""
    from cdfkd.teacher_node.pki import create_dev_pki

    root = tmp_path_factory.mktemp("deploy_kit")
    package = _random_package(root / "package")
    pki = create_dev_pki(root / "pki", client_names=("student", "healthcheck"))
    foreign = create_dev_pki(root / "foreign", client_names=("healthcheck",))
    config = root / "teacher.toml"
    config.write_text(
        f'[node]\npackage = "{package}"\naddress = "127.0.0.1:0"\n'
        f'address_file = "{root / "address"}"\ndrain_seconds = 0\n'
        f'[tls]\ncert = "{pki.server.cert}"\nkey = "{pki.server.key}"\n'
        f'client_ca = "{pki.ca.cert}"\n'
        f'[policy]\nbudget_file = "{root / "budget.json"}"\n'
        '[policy.callers.student]\nmode = "full"\n'
    )
    return {"root": root, "config": config, "pki": pki, "foreign": foreign}


#: Serve with every module of a distribution that the image does not install made unimportable.
_SERVE_WITHOUT = """
import json, sys
blocked = frozenset(json.loads(sys.argv[2]))

class NotInTheImage:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in blocked:
            raise ModuleNotFoundError(f"{name} is not installed in the image", name=name)
        return None

sys.meta_path.insert(0, NotInTheImage())
from cdfkd.coordinator.cli import main
sys.exit(main(["teacher", "serve", "--config", sys.argv[1]]))
"""


@pytest.mark.integration
@pytest.mark.slow
def test_a_node_serves_with_only_what_the_image_installs(kit_node) -> None:
    from cdfkd.student_node.teachers.remote import RemoteTeacher, RemoteTeacherConfig

    installed = _installed_closure(_requirements())
    blocked = sorted(
        top
        for top, owners in importlib.metadata.packages_distributions().items()
        if not {_normalized(owner) for owner in owners} & (installed | {"cdfkd"})
    )
    assert {"ray", "flwr", "sklearn", "matplotlib", "tqdm", "grpc_tools"} <= set(blocked)
    address_file = kit_node["root"] / "address"
    address_file.unlink(missing_ok=True)
    node = subprocess.Popen(
        [sys.executable, "-c", _SERVE_WITHOUT, str(kit_node["config"]), json.dumps(blocked)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "CI": "true"},
    )
    try:
        deadline = time.monotonic() + 60
        while not address_file.exists() and node.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert address_file.exists(), node.communicate(timeout=10)
        pki = kit_node["pki"]
        config = RemoteTeacherConfig(
            address=address_file.read_text().strip(),
            ca=pki.ca.cert,
            cert=pki.client.cert,
            key=pki.client.key,
            retries=0,
        )
        with RemoteTeacher(config) as teacher:
            images = torch.zeros(4, 1, 32, 32)
            outputs = teacher.query(images)
            grad = teacher.input_grad(images, torch.ones(4, 10), 0.1)
        assert outputs.logits.shape == (4, 10)
        assert grad.shape == images.shape
    finally:
        node.terminate()
        out, err = node.communicate(timeout=30)
    assert node.returncode == 0, err


def _healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("healthcheck", KIT / "healthcheck.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def health_node(kit_node):
    from cdfkd.teacher_node.server import build_server

    server, port, health = build_server(load_teacher_config(kit_node["config"]))
    server.start()
    yield f"127.0.0.1:{port}", health
    server.stop(grace=None).wait()


def _probe_arguments(address: str, pki, *more: str) -> list[str]:
    folder = pki.client.cert.parent
    return [
        "--address",
        address,
        "--ca",
        str(pki.ca.cert),
        "--cert",
        str(folder / "client-healthcheck.pem"),
        "--key",
        str(folder / "client-healthcheck.key"),
        *more,
    ]


@pytest.mark.slow
def test_the_health_probe_answers_like_grpc_health_probe(kit_node, health_node, capsys) -> None:

    address, health = health_node
    probe = _healthcheck().main
    pki = kit_node["pki"]
    # The health identity is trusted by the CA but not in the policy: health still answers.
    assert probe(_probe_arguments(address, pki)) == 0
    assert f"{address}: SERVING" in capsys.readouterr().out
    assert (
        probe(_probe_arguments(address, pki, "--service", "cdfkd.teacher.v1.TeacherService")) == 0
    )
    assert probe(_probe_arguments(address, pki, "--service", "no.such.Service")) == 1
    foreign = kit_node["foreign"]  # a certificate from another CA
    untrusted = ["--cert", str(foreign.client.cert), "--key", str(foreign.client.key)]
    assert probe([*_probe_arguments(address, pki), *untrusted, "--timeout", "3"]) == 2
    assert probe(["--address", address]) == 3  # no TLS files
    assert probe(["--no-such-flag"]) == 3
    health.enter_graceful_shutdown()
    assert probe(_probe_arguments(address, pki)) == 1
    assert "NOT_SERVING" in capsys.readouterr().out


@pytest.mark.slow
def test_the_container_health_check_needs_no_arguments(kit_node, health_node) -> None:
    address, _ = health_node
    folder = kit_node["pki"].client.cert.parent
    image_env = _containerfile_env()
    environment = {
        **os.environ,
        **{key: value for key, value in image_env.items() if key.startswith("CDFKD_HEALTH_")},
        "CDFKD_HEALTH_ADDRESS": address,
        "CDFKD_HEALTH_CA": str(kit_node["pki"].ca.cert),
        # The same file names as in the image: what `cdfkd pki dev --client healthcheck` writes.
        "CDFKD_HEALTH_CERT": str(folder / Path(image_env["CDFKD_HEALTH_CERT"]).name),
        "CDFKD_HEALTH_KEY": str(folder / Path(image_env["CDFKD_HEALTH_KEY"]).name),
    }
    result = subprocess.run(
        [sys.executable, str(KIT / "healthcheck.py")],
        capture_output=True,
        text=True,
        timeout=60,
        env=environment,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _containerfile() -> str:
    return (KIT / "Containerfile").read_text().replace("\\\n", " ")


def _containerfile_env() -> dict[str, str]:
    env = {}
    for line in _containerfile().splitlines():
        if line.startswith("ENV "):
            for key, value in re.findall(r"(\w+)=(\S*)", line):
                env[key] = value
    return env


def _json_instruction(containerfile: str, name: str) -> list[str]:
    """The JSON (exec form) argument of the Containerfile's last ``name`` instruction."""
    found = re.findall(rf"^{name} (\[.*\])$", containerfile, flags=re.MULTILINE)
    assert found, f"no {name} [...] in the Containerfile"
    return list(json.loads(found[-1]))


def _layout() -> dict[str, Any]:
    """The ``toml`` block of deploy/teacher/README.md: the paths the image and unit expect."""
    text = (KIT / "README.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", text, flags=re.DOTALL)
    assert len(blocks) == 1
    return tomllib.loads(blocks[0])


def test_the_documented_layout_fits_the_container_and_the_unit() -> None:
    layout = _layout()
    config = parse_teacher_config(layout, base=Path(CONFIG_IN_IMAGE).parent)
    assert config.policy.budget_file is not None
    assert config.audit.path is not None
    writable = {config.policy.budget_file.parent, config.audit.path.parent}
    port = config.node.address.rpartition(":")[2]

    containerfile = _containerfile()
    assert re.search(r"^FROM \S*python:3\.11-slim$", containerfile, flags=re.MULTILINE)
    users = re.findall(r"^USER (\S+)$", containerfile, flags=re.MULTILINE)
    assert users
    assert users[-1] not in ("root", "0")
    assert re.search(rf"^EXPOSE {port}$", containerfile, flags=re.MULTILINE)
    assert writable <= {Path(v) for v in _json_instruction(containerfile, "VOLUME")}
    entrypoint = _json_instruction(containerfile, "ENTRYPOINT")
    command = _json_instruction(containerfile, "CMD")
    assert entrypoint + command == ["cdfkd", "teacher", "serve", "--config", CONFIG_IN_IMAGE]
    assert re.search(r"^HEALTHCHECK .*healthcheck\.py", containerfile, flags=re.MULTILINE)
    assert _containerfile_env()["CDFKD_HEALTH_ADDRESS"] == f"127.0.0.1:{port}"
    for source in re.findall(r"^COPY (.+) \S+$", containerfile, flags=re.MULTILINE):
        for path in source.split():
            assert (ROOT / path).exists(), path

    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(KIT / "cdfkd-teacher.service")
    service = unit["Service"]
    assert service["User"]
    assert service["User"] != "root"
    assert service["ExecStart"].endswith(f"cdfkd teacher serve --config {CONFIG_IN_IMAGE}")
    assert service["Restart"] == "on-failure"
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert writable <= {Path(p) for p in service["ReadWritePaths"].split()}
    assert unit["Install"]["WantedBy"] == "multi-user.target"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not found")
def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    cdfkd = shutil.which("cdfkd")
    if cdfkd is None:
        pytest.skip("the cdfkd command is not on PATH")
    text = (KIT / "cdfkd-teacher.service").read_text()
    unit = tmp_path / "cdfkd-teacher.service"
    unit.write_text(text.replace("/opt/cdfkd/venv/bin/cdfkd", cdfkd))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "cdfkd-teacher.service" not in result.stderr, result.stderr


def test_the_submitted_working_dir_holds_no_private_key(tmp_path: Path, dev_pki) -> None:
    """What Ray's own packager would upload for submit.sh's runtime environment."""
    from ray._private.runtime_env.packaging import create_package

    job_dir = tmp_path / "job"
    (job_dir / "pki").mkdir(parents=True)
    (job_dir / "run.toml").write_text("# a run config\n")
    shutil.copy(dev_pki["trusted"].client.key, job_dir / "pki" / "client.key")
    shutil.copy(dev_pki["trusted"].client.cert, job_dir / "pki" / "client.pem")
    # A key under a name that does not say so, and one with characters gitignore treats specially.
    shutil.copy(dev_pki["trusted"].client.key, job_dir / "pki" / "student identity [1].pem")
    shutil.copy(dev_pki["trusted"].ca.key, job_dir / "ca-bundle.txt")
    result = subprocess.run(
        [
            "bash",
            str(DEPLOY / "ray" / "submit.sh"),
            "http://127.0.0.1:1",
            str(job_dir / "run.toml"),
            str(tmp_path / "out"),
        ],
        env={**os.environ, "CDFKD_SUBMIT_DRY_RUN": "1"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    runtime_env = json.loads(result.stdout)
    assert runtime_env["working_dir"] == str(job_dir)
    for name in ("pki/client.key", "pki/student identity [1].pem", "ca-bundle.txt"):
        assert f"not uploading {name}" in result.stderr
    package = tmp_path / "package.zip"
    create_package(runtime_env["working_dir"], package, True, excludes=runtime_env["excludes"])
    with zipfile.ZipFile(package) as archive:
        uploaded = {
            name: archive.read(name) for name in archive.namelist() if not name.endswith("/")
        }
    assert set(uploaded) == {"run.toml", "pki/client.pem"}
    assert not any(b"PRIVATE KEY" in content for content in uploaded.values())
