"""Generate the Python protobuf/gRPC code for protos/ into cluster/_generated/ (never committed).

`ensure_generated()` runs grpc_tools.protoc when an output is missing or older than a .proto, then puts
cluster/_generated on sys.path, so `import pdserve.v1.worker_pb2` works. protoc writes imports in the
generated gRPC module as `from pdserve.v1 import worker_pb2`, rooted at the proto include path; that is
why the generated tree is its own import root instead of a subpackage of `cluster`.

Called by `make setup` (`python -m cluster.protogen`) and, so that a fresh checkout works without it,
by every module that imports generated code. Several processes may start at once (spawned test
workers): generation takes a file lock and each output file is replaced atomically, so a reader sees
either the old or the new complete file.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
import tempfile
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PROTO_ROOT = PACKAGE_DIR.parent / "protos"
GENERATED_DIR = PACKAGE_DIR / "_generated"


def proto_files(root: Path = PROTO_ROOT) -> list[Path]:
    return sorted(root.rglob("*.proto")) if root.is_dir() else []


def expected_outputs(protos: list[Path], root: Path = PROTO_ROOT, out: Path = GENERATED_DIR) -> list[Path]:
    outputs = []
    for proto in protos:
        stem = out / proto.relative_to(root).with_suffix("")
        outputs += [stem.with_name(stem.name + suffix) for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")]
    return outputs


def is_stale(root: Path = PROTO_ROOT, out: Path = GENERATED_DIR) -> bool:
    protos = proto_files(root)
    if not protos:
        return False  # an installed package without protos/: use whatever was generated at build time
    outputs = expected_outputs(protos, root, out)
    if not all(p.exists() for p in outputs):
        return True
    return max(p.stat().st_mtime for p in protos) > min(p.stat().st_mtime for p in outputs)


def generate(root: Path = PROTO_ROOT, out: Path = GENERATED_DIR) -> list[Path]:
    """Run protoc over every .proto under root; return the files written."""
    from grpc_tools import protoc  # build-time dependency; imported here so importers don't pay for it

    protos = proto_files(root)
    include = Path(protoc.__file__).parent / "_proto"  # well-known types (google/protobuf/*.proto)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        args = ["grpc_tools.protoc", f"-I{root}", f"-I{include}", f"--python_out={tmp}", f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}", *(str(p) for p in protos)]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {[str(p) for p in protos]}")
        written = []
        for src in Path(tmp).rglob("*"):
            if src.is_file():
                dst = out / src.relative_to(tmp)
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst.with_name(dst.name + ".tmp"))
                os.replace(dst.with_name(dst.name + ".tmp"), dst)
                os.utime(dst)  # newer than the protos even if copy2 kept an older mtime
                written.append(dst)
    return written


def ensure_generated(root: Path = PROTO_ROOT, out: Path = GENERATED_DIR) -> Path:
    """Generate if needed and make the generated tree importable; return its directory."""
    if is_stale(root, out):
        out.mkdir(parents=True, exist_ok=True)
        with open(out / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if is_stale(root, out):  # another process may have generated it while we waited
                generate(root, out)
    if str(out) not in sys.path:
        sys.path.insert(0, str(out))
    return out


def main() -> None:
    stale = is_stale()
    ensure_generated()
    print(f"protogen: {'generated' if stale else 'up to date'}: {GENERATED_DIR}")


if __name__ == "__main__":
    main()
