"""Regenerate the ``*_pb2.py`` / ``*_pb2.pyi`` modules beside this file with grpcio-tools' protoc.

The committed modules were made with ``grpcio-tools==1.66.2`` (protoc 27.2): gencode that old runs on
protobuf runtimes from 5.27.2 up, where newer gencode would demand a newer runtime. Regenerate with
that version (in a throwaway venv) to keep the runtime floor; any protoc gives the same descriptors.
"""

from __future__ import annotations

from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
REPO_ROOT = PROTO_DIR.parents[2]
PROTO_FILES = ("dataset.proto", "end_to_end_driving_data.proto")
HEADER = "# ruff: noqa\n# mypy: ignore-errors\n"


def protoc_args(*outputs: str) -> list[str]:
    """protoc arguments that compile every proto here relative to the repository root."""
    return ["protoc", f"-I{REPO_ROOT}", *outputs, *(str(PROTO_DIR / name) for name in PROTO_FILES)]


def main() -> int:
    from grpc_tools import protoc  # a dev/build-time tool only

    if protoc.main(protoc_args(f"--python_out={REPO_ROOT}", f"--pyi_out={REPO_ROOT}")) != 0:
        return 1
    for path in sorted(PROTO_DIR.glob("*_pb2.py*")):
        text = path.read_text()
        if not text.startswith(HEADER):
            path.write_text(HEADER + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
