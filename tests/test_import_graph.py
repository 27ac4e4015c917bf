"""The import DAG protos <- teacher_node <- student_node <- coordinator, and a pure core."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["protos", "teacher_node", "student_node", "coordinator"]


def _modules_of(package: str) -> list[str]:
    folder = ROOT / package
    names = []
    for path in sorted(folder.rglob("*.py")):
        relative = path.relative_to(folder).with_suffix("")
        parts = [p for p in relative.parts if p != "__init__"]
        names.append(".".join(["cdfkd", package, *parts]))
    return names


def _loaded_after_importing(modules: list[str]) -> list[str]:
    """sys.modules of a fresh interpreter that imported ``modules``."""
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout)


@pytest.mark.parametrize("index", range(len(PACKAGES)))
def test_packages_import_only_downward(index: int) -> None:
    package = PACKAGES[index]
    forbidden = [f"cdfkd.{p}" for p in PACKAGES[index + 1 :]]
    loaded = _loaded_after_importing(_modules_of(package))
    leaked = [m for m in loaded if any(m == f or m.startswith(f + ".") for f in forbidden)]
    assert not leaked, f"{package} imports {leaked}"


def test_the_pure_core_imports_no_grpc_ray_or_flower() -> None:
    core = [
        "cdfkd.student_node.losses",
        "cdfkd.student_node.objectives",
        "cdfkd.student_node.trainer",
        "cdfkd.student_node.generator",
        "cdfkd.student_node.models.multi_header",
        "cdfkd.student_node.models.backbones",
        "cdfkd.student_node.models.aggregator",
        "cdfkd.teacher_node.engine",
    ]
    loaded = _loaded_after_importing(core)
    for banned in ("grpc", "ray", "flwr"):
        assert not [m for m in loaded if m == banned or m.startswith(banned + ".")], banned


def test_no_cuda_calls_and_no_unpickling_in_the_code() -> None:
    offenders = []
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            text = path.read_text()
            for needle in (".cuda()", "pickle.load", "weights_only=False"):
                if needle in text:
                    offenders.append(f"{path}: {needle}")
    assert not offenders
