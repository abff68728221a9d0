"""`pdserve worker --tp 2` for both roles, over gRPC, and shutdown that leaves no process behind.

The test plays the router: Decode(expect_kv, prefill_tp_size=2) on the decode worker answers with one
KVTarget per decode rank (its heads and the address of that rank's own KV server), Prefill on the
prefill worker sends each rank's heads from each prefill rank. Tokens equal a unified engine's.
Then the prefill worker is stopped (SIGTERM: it stops its rank 1) and the decode worker is killed
(SIGKILL: its rank 1 must die with it); neither may leave a child process behind.
"""

from __future__ import annotations

import random
import signal
import subprocess
import time
from pathlib import Path

import grpc

from cluster.config import EngineConfig
from cluster.engine.engine import LLMEngine
from cluster.protogen import ensure_generated
from cluster.request import SamplingParams
from cluster.worker.convert import params_to_pb
from loadtest.workers import start_cli_worker

ensure_generated()
from pdserve.v1 import worker_pb2 as pb  # noqa: E402
from pdserve.v1 import worker_pb2_grpc as pb_grpc  # noqa: E402

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def start_worker(model_dir, role: str, *extra: str) -> tuple[subprocess.Popen, str]:
    w = start_cli_worker(["--role", role, "--model", str(model_dir), "--num-kv-blocks", "96", "--threads", "1",
                          "--kv-transport", "grpc", "--dtype", "float32", *extra], timeout=90)
    return w.proc, w.address


def children(pid: int) -> list[int]:
    """Live child processes of `pid` (the TP ranks, and multiprocessing's resource tracker)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def is_running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # zombies are gone
    except OSError:
        return False


def wait_gone(pids: list[int], timeout_s: float = 15.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(map(is_running, pids)):
        time.sleep(0.1)
    return [p for p in pids if is_running(p)]


def route(prefill, decode, rid: str, prompt: list[int]) -> tuple[list[int], pb.KVDestination]:
    stream = decode.Decode(pb.DecodeRequest(request_id=rid, prompt_token_ids=prompt, transfer_id=rid,
                                            sampling_params=params_to_pb(GREEDY), expect_kv=True,
                                            kv_lease_seconds=30.0, prefill_tp_size=2), timeout=60)
    destination = next(stream).kv_destination
    response = prefill.Prefill(pb.PrefillRequest(request_id=rid, prompt_token_ids=prompt, transfer_id=rid,
                                                 sampling_params=params_to_pb(GREEDY), kv_destination=destination),
                               timeout=60)
    tokens = [response.first_token_id]
    for chunk in stream:
        assert not chunk.kv_fallback
        tokens.extend(chunk.token_ids)
    return tokens, destination


def test_tp2_workers_over_grpc_then_no_process_left(tiny_model_dir):
    procs = []
    try:
        prefill_proc, prefill_addr = start_worker(tiny_model_dir, "prefill", "--tp", "2")
        procs.append(prefill_proc)
        decode_proc, decode_addr = start_worker(tiny_model_dir, "decode", "--tp", "2")
        procs.append(decode_proc)
        prefill_children, decode_children = children(prefill_proc.pid), children(decode_proc.pid)
        assert prefill_children and decode_children
        rng = random.Random(8)
        shared = [rng.randrange(8, 2000) for _ in range(40)]
        prompts = [[rng.randrange(8, 2000) for _ in range(n)] for n in (5, 70)]
        prompts += [shared + [rng.randrange(8, 2000) for _ in range(n)] for n in (3, 9)]
        with grpc.insecure_channel(prefill_addr) as p_ch, grpc.insecure_channel(decode_addr) as d_ch:
            prefill, decode = pb_grpc.WorkerStub(p_ch), pb_grpc.WorkerStub(d_ch)
            results = [route(prefill, decode, f"t{i}", p) for i, p in enumerate(prompts)]
            targets = results[0][1].targets
            assert [(t.decode_rank, t.kv_head_start, t.kv_head_end) for t in targets] == [(0, 0, 1), (1, 1, 2)]
            assert targets[0].address == decode_addr and targets[1].address not in ("", decode_addr)
            assert results[-1][1].first_block_index == 2  # the decode worker held the shared prefix
            stats = decode.Stats(pb.StatsRequest())
            assert stats.num_free_blocks == stats.num_total_blocks and stats.kv_transfer_fallbacks == 0

        engine = LLMEngine(str(tiny_model_dir), EngineConfig(dtype="float32", num_kv_blocks=96))
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, GREEDY)
        want: dict[str, list[int]] = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                want.setdefault(out.request_id, []).extend(out.new_token_ids)
        assert [tokens for tokens, _ in results] == [want[str(i)] for i in range(len(prompts))]

        prefill_proc.send_signal(signal.SIGTERM)  # graceful: STOP to rank 1, join it
        assert prefill_proc.wait(timeout=20) == 0
        decode_proc.kill()  # abrupt: rank 1 must notice and go too
        decode_proc.wait(timeout=10)
        assert wait_gone(prefill_children + decode_children) == []
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
