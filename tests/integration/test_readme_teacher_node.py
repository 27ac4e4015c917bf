"""The README's teacher-node sequence, pasted into bash in an empty folder, works.

Two edits keep the test on port 0 (never a fixed port): the copied example listens on
127.0.0.1:0, and the run config dials the port the node wrote to its ``address_file``
instead of 50051 (the wait for that file replaces the ``sleep``). Everything else runs as
written: the stand-in model, ``cdfkd teacher package``, ``cdfkd pki dev``, the example
config, ``cdfkd teacher serve`` and ``cdfkd federation check``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: (text in the README's block, what the test runs instead)
PORT_ZERO_EDITS = (
    (
        "cp deploy/teacher.example.toml teacher.toml\n",
        "cp deploy/teacher.example.toml teacher.toml\n"
        'sed -i \'s/^address = "0.0.0.0:50051"/address = "127.0.0.1:0"/\' teacher.toml\n',
    ),
    ("sleep 10\n", "for _ in $(seq 300); do [ -s node.address ] && break; sleep 0.1; done\n"),
    ("<<'TOML'", "<<TOML"),
    ('address = "localhost:50051"', 'address = "localhost:$(cut -d: -f2 node.address)"'),
)


def readme_block() -> str:
    """The first bash block of the README's teacher-node section."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Teacher nodes") :]
    start = section.index("```bash\n") + len("```bash\n")
    return section[start : section.index("```\n", start)]


@pytest.mark.slow
@pytest.mark.integration
def test_the_readme_teacher_node_sequence_works(tmp_path: Path) -> None:
    script = readme_block()
    for before, after in PORT_ZERO_EDITS:
        assert before in script, f"the README's sequence no longer contains {before!r}"
        script = script.replace(before, after)
    # The node is stopped even when a step fails (bash -e leaves its background jobs running).
    script = "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n" + script
    (tmp_path / "deploy").mkdir()
    shutil.copy(ROOT / "deploy" / "teacher.example.toml", tmp_path / "deploy")
    environment = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "CI": "true",
    }
    result = subprocess.run(
        ["bash", "-e", "-c", script],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("localhost:")]
    assert len(rows) == 1
    assert "owner-1" in rows[0]
    assert "3x32x32" in rows[0]
    assert rows[0].endswith("ok")
    assert "Traceback" not in result.stderr
    assert (tmp_path / "teachers" / "owner-1" / "teacher.json").is_file()
