"""Regenerate the committed gRPC code: ``python -m cdfkd.protos.generate [--out DIR]``.

protoc runs on a copy of the ``.proto`` placed at ``cdfkd/protos/`` inside a temporary root,
so the generated ``*_pb2_grpc.py`` imports its messages as ``cdfkd.protos.teacher_pb2``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTOS = ("teacher.proto",)
OUTPUT_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out: Path = PROTO_DIR) -> list[Path]:
    """Run protoc for every proto of the package; return the written files."""
    from grpc_tools import protoc

    written = []
    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        package = root / "cdfkd" / "protos"
        package.mkdir(parents=True)
        for name in PROTOS:
            shutil.copy(PROTO_DIR / name, package / name)
            code = protoc.main(
                [
                    "grpc_tools.protoc",
                    f"-I{root}",
                    f"--python_out={root}",
                    f"--pyi_out={root}",
                    f"--grpc_python_out={root}",
                    f"cdfkd/protos/{name}",
                ]
            )
            if code != 0:
                raise RuntimeError(f"protoc failed on {name} with exit code {code}")
            stem = name.removesuffix(".proto")
            for suffix in OUTPUT_SUFFIXES:
                target = Path(out) / f"{stem}{suffix}"
                shutil.copy(package / f"{stem}{suffix}", target)
                written.append(target)
    return written


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTO_DIR)
    args = parser.parse_args()
    for path in generate(args.out):
        print(path)


if __name__ == "__main__":
    main()
