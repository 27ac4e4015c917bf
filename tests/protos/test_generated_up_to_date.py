"""The committed generated gRPC code is what protoc makes from teacher.proto today."""

from __future__ import annotations

from pathlib import Path

from cdfkd.protos.generate import PROTO_DIR, generate


def test_generated_code_matches_the_proto(tmp_path: Path) -> None:
    written = generate(tmp_path)
    assert len(written) == 3
    for path in written:
        committed = PROTO_DIR / path.name
        assert committed.read_text() == path.read_text(), (
            f"{committed.name} is stale: run 'python -m cdfkd.protos.generate' and commit"
        )


def test_generated_service_imports_messages_by_their_full_name() -> None:
    text = (PROTO_DIR / "teacher_pb2_grpc.py").read_text()
    assert "from cdfkd.protos import teacher_pb2" in text
