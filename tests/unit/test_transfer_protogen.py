"""Code generation from protos/: built when missing or stale, importable, never committed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from cluster import protogen

REPO = Path(__file__).resolve().parents[2]


def test_generates_when_missing_or_stale(tmp_path):
    root, out = tmp_path / "protos", tmp_path / "gen"
    shutil.copytree(protogen.PROTO_ROOT, root)
    assert protogen.is_stale(root, out)
    written = protogen.generate(root, out)
    assert {p.name for p in written} >= {"worker_pb2.py", "worker_pb2.pyi", "worker_pb2_grpc.py"}
    assert not protogen.is_stale(root, out)
    proto = root / "pdserve" / "v1" / "worker.proto"
    now = time.time()
    for path in written:  # generated a while ago ...
        os.utime(path, (now - 100, now - 100))
    os.utime(proto, (now - 10, now - 10))  # ... and the proto edited since
    assert protogen.is_stale(root, out)
    protogen.generate(root, out)
    assert not protogen.is_stale(root, out)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from pdserve.v1 import worker_pb2 as pb, worker_pb2_grpc; "
            "c = pb.KVChunk(transfer_id='t', data=b'x', kind=pb.KV_CHUNK_KIND_DATA); "
            "assert pb.KVChunk.FromString(c.SerializeToString()) == c; "
            "assert hasattr(worker_pb2_grpc, 'WorkerStub')")
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, timeout=60)


def test_module_entry_point_and_gitignore():
    result = subprocess.run([sys.executable, "-m", "cluster.protogen"], cwd=REPO, capture_output=True, text=True,
                            check=True, timeout=60)
    assert "protogen:" in result.stdout
    assert not protogen.is_stale()
    ignored = subprocess.run(["git", "check-ignore", "-q", "cluster/_generated/pdserve/v1/worker_pb2.py"], cwd=REPO)
    assert ignored.returncode == 0, "generated code must be gitignored"
