"""The simulated worker (cluster/worker/simulated.py): tokens on a timer, no model.

Real processes (`pdserve worker --role simulated`) for the stream shape, timing, scale and the
disaggregated client loop; an in-process grpc.aio server where a test changes the worker's state
(drain) or needs a small concurrency limit. Timing assertions are lower bounds only: a loaded machine
makes everything slower, never faster.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import grpc
import pytest

from cluster.protogen import ensure_generated
from cluster.request import SamplingParams
from cluster.worker.client import disaggregated_generate
from cluster.worker.convert import params_to_pb
from cluster.worker.simulated import SimConfig, simulated_tokens, start_simulated
from loadtest.workers import start_cli_worker

ensure_generated()
from pdserve.v1 import worker_pb2 as pb  # noqa: E402
from pdserve.v1 import worker_pb2_grpc as pb_grpc  # noqa: E402

VOCAB = 1000
TTFT_MS, ITL_MS, PER_TOKEN_MS, TRANSFER_MS = 60.0, 20.0, 1.0, 10.0


def start_simulated_process(*flags: str) -> tuple[subprocess.Popen, str]:
    w = start_cli_worker(["--role", "simulated", "--vocab-size", str(VOCAB), *flags], timeout=30)
    return w.proc, w.address


@pytest.fixture(scope="module")
def pair():
    """(prefill address, decode address): two simulated worker processes with the same timings."""
    flags = ("--ttft-ms", str(TTFT_MS), "--itl-ms", str(ITL_MS), "--prefill-ms-per-token", str(PER_TOKEN_MS),
             "--transfer-ms", str(TRANSFER_MS))
    procs = []
    try:
        for _ in range(2):
            procs.append(start_simulated_process(*flags))
        yield procs[0][1], procs[1][1]
    finally:
        for proc, _ in procs:
            proc.terminate()
            proc.wait(timeout=10)


def decode_request(rid: str, prompt: list[int], max_tokens: int, **kw) -> pb.DecodeRequest:
    params = params_to_pb(SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    return pb.DecodeRequest(request_id=rid, prompt_token_ids=prompt, sampling_params=params, **kw)


def in_process(config: SimConfig, body) -> None:
    """Run `body(stub, worker)` against an in-process server on a fresh event loop."""
    async def run() -> None:
        server, worker, port = await start_simulated(config)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await body(pb_grpc.WorkerStub(channel), worker)
        finally:
            await server.stop(grace=None)

    asyncio.run(run())


def test_the_simulated_path_imports_no_torch():
    code = "import sys, cluster.cli, cluster.worker.simulated; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_model_stays_required_for_the_real_roles():
    from cluster.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["worker", "--role", "decode"])
    assert exc.value.code == 2


def test_stream_length_tokens_and_timing(pair):
    _, address = pair
    prompt = list(range(40))
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.WorkerStub(channel)
        start = time.monotonic()
        arrivals, chunks = [], []
        for chunk in stub.Decode(decode_request("t0", prompt, 10), timeout=30):
            arrivals.append(time.monotonic())
            chunks.append(chunk)
        health = stub.Health(pb.HealthRequest())
    assert [t for c in chunks for t in c.token_ids] == simulated_tokens("t0", prompt, 10, VOCAB)
    assert [c.finish_reason for c in chunks] == [pb.FINISH_REASON_UNSPECIFIED] * 9 + [pb.FINISH_REASON_LENGTH]
    assert all(c.num_prompt_tokens == len(prompt) for c in chunks)
    ttft = (TTFT_MS + PER_TOKEN_MS * len(prompt)) / 1e3
    assert arrivals[0] - start >= ttft
    # ITL over the whole stream, from the request: per gap (or from the first arrival) a late-read
    # message could make the next gap look short, but the server's sleeps add up whatever the client does.
    assert arrivals[-1] - start >= ttft + 9 * ITL_MS / 1e3
    assert health.status == pb.HealthResponse.SERVING and health.role == "simulated"
    # Different requests, different tokens; the same request, the same tokens.
    assert simulated_tokens("t1", prompt, 10, VOCAB) != simulated_tokens("t0", prompt, 10, VOCAB)


def test_disaggregated_client_loop_equals_the_local_stream(pair):
    prefill_addr, decode_addr = pair
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    with grpc.insecure_channel(prefill_addr) as p_ch, grpc.insecure_channel(decode_addr) as d_ch:
        prefill, decode = pb_grpc.WorkerStub(p_ch), pb_grpc.WorkerStub(d_ch)
        for rid, prompt, max_tokens in [("d0", [5, 6, 7], 6), ("d1", list(range(100)), 1)]:
            got = disaggregated_generate(prefill, decode, rid, prompt, SamplingParams(max_tokens=max_tokens))
            assert got == simulated_tokens(rid, prompt, max_tokens, VOCAB)
        # A short prompt under min_prefill_tokens stays on the decode worker: no targets, same tokens.
        first = next(decode.Decode(decode_request("d2", [1, 2], 4, expect_kv=True, min_prefill_tokens=32)))
        assert first.kv_destination.transport == "none" and not first.kv_destination.targets
        got = disaggregated_generate(prefill, decode, "d2", [1, 2], params, min_prefill_tokens=32)
        assert got == simulated_tokens("d2", [1, 2], 6, VOCAB)
        # The decode side's first chunk names itself as the KV target.
        first = next(decode.Decode(decode_request("d3", [1, 2], 4, expect_kv=True)))
        assert [t.address for t in first.kv_destination.targets] == [decode_addr]


def test_500_concurrent_streams_from_one_asyncio_client(pair):
    _, address = pair
    n, max_tokens = 500, 8

    async def run() -> list[list[int]]:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.WorkerStub(channel)

            async def one(i: int) -> list[int]:
                call = stub.Decode(decode_request(f"c{i}", [i, i + 1], max_tokens), timeout=60)
                return [t async for chunk in call for t in chunk.token_ids]

            results = await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)
            stats = await stub.Stats(pb.StatsRequest())
            assert stats.num_requests_running == 0 and stats.num_requests_waiting_for_kv == 0
            return results

    results = asyncio.run(run())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    assert results == [simulated_tokens(f"c{i}", [i, i + 1], max_tokens, VOCAB) for i in range(n)]


def test_a_burst_of_2000_new_streams_is_not_cancelled_by_grpc_core():
    """Past 1000 calls waiting for the event loop to pick them up, gRPC core cancels new ones unless
    the server lifts its pending-request limits (SERVER_OPTIONS)."""
    n = 2000

    async def body(stub, worker) -> None:
        async def one(i: int) -> list[int]:
            return [t async for chunk in stub.Decode(decode_request(f"b{i}", [i], 2)) for t in chunk.token_ids]

        results = await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert not errors, (len(errors), errors[:1])
        assert results == [simulated_tokens(f"b{i}", [i], 2, VOCAB) for i in range(n)]

    in_process(SimConfig(ttft_s=0.05, itl_s=0.02, vocab_size=VOCAB), body)


def test_drain_refuses_new_requests_and_finishes_in_flight_ones():
    async def body(stub, worker) -> None:
        in_flight = stub.Decode(decode_request("keep", [1], 5))
        first = await in_flight.read()  # admitted and streaming
        drained = await stub.Drain(pb.DrainRequest())
        assert drained.accepted and drained.num_in_flight == 1
        assert (await stub.Health(pb.HealthRequest())).status == pb.HealthResponse.DRAINING
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Decode(decode_request("new", [1], 5)).read()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        rest = [t for chunk in await read_rest(in_flight) for t in chunk.token_ids]
        assert list(first.token_ids) + rest == simulated_tokens("keep", [1], 5, VOCAB)
        assert (await stub.Stats(pb.StatsRequest())).draining

    in_process(SimConfig(ttft_s=0.01, itl_s=0.01, vocab_size=VOCAB), body)


def test_drain_deadline_aborts_what_still_runs():
    async def body(stub, worker) -> None:
        call = stub.Decode(decode_request("long", [1], 10_000))
        await call.read()
        await stub.Drain(pb.DrainRequest(deadline_seconds=0.05))
        chunks = await read_rest(call)
        assert chunks[-1].finish_reason == pb.FINISH_REASON_ABORT and len(chunks) < 1000

    in_process(SimConfig(ttft_s=0.0, itl_s=0.005, vocab_size=VOCAB), body)


def test_over_concurrency_is_resource_exhausted_with_retry_after():
    async def body(stub, worker) -> None:
        held = [stub.Decode(decode_request(f"h{i}", [1], 100, expect_kv=True)) for i in range(2)]
        for call in held:
            await call.read()  # the KV destination: both are admitted now
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Decode(decode_request("over", [1], 5)).read()
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert ("retry-after", "1") in tuple(err.value.trailing_metadata())
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Prefill(pb.PrefillRequest(request_id="p", prompt_token_ids=[1]))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        stats = await stub.Stats(pb.StatsRequest())
        assert stats.kv_cache_usage == 1.0 and stats.num_free_blocks == 0
        for call in held:
            call.cancel()
        await wait_until_idle(worker)
        got = [t async for chunk in stub.Decode(decode_request("after", [1], 2)) for t in chunk.token_ids]
        assert got == simulated_tokens("after", [1], 2, VOCAB)

    in_process(SimConfig(ttft_s=0.0, itl_s=0.01, max_concurrency=2, vocab_size=VOCAB), body)


def test_invalid_params_are_invalid_argument_naming_the_field():
    async def body(stub, worker) -> None:
        bad = pb.SamplingParams(temperature=-1.0, max_tokens=4)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Decode(pb.DecodeRequest(request_id="bad", prompt_token_ids=[1], sampling_params=bad)).read()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in err.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Prefill(pb.PrefillRequest(request_id="bad", prompt_token_ids=[1], sampling_params=bad))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in err.value.details()
        assert worker.num_in_flight == 0

    in_process(SimConfig(ttft_s=0.0, itl_s=0.0, vocab_size=VOCAB), body)


def test_stop_token_ids_and_eos():
    expected = simulated_tokens("s", [3], 20, VOCAB)
    stop = expected[4]
    cut = expected.index(stop) + 1

    async def body(stub, worker) -> None:
        params = params_to_pb(SamplingParams(max_tokens=20, stop_token_ids=[stop]))
        chunks = [c async for c in stub.Decode(pb.DecodeRequest(request_id="s", prompt_token_ids=[3],
                                                                 sampling_params=params))]
        assert [t for c in chunks for t in c.token_ids] == expected[:cut]
        assert chunks[-1].finish_reason == pb.FINISH_REASON_STOP
        # The configured EOS stops the stream too, unless ignore_eos.
        for ignore_eos, length in [(False, cut), (True, 20)]:
            params = params_to_pb(SamplingParams(max_tokens=20, ignore_eos=ignore_eos))
            got = [t async for c in stub.Decode(pb.DecodeRequest(request_id="s", prompt_token_ids=[3],
                                                                  sampling_params=params)) for t in c.token_ids]
            assert got == expected[:length]

    in_process(SimConfig(ttft_s=0.0, itl_s=0.0, vocab_size=VOCAB, eos_token_id=stop), body)


async def read_rest(call) -> list[pb.TokenChunk]:
    """The rest of a stream already read from with read() (grpc.aio forbids mixing it with `async for`)."""
    chunks = []
    while (chunk := await call.read()) is not grpc.aio.EOF:
        chunks.append(chunk)
    return chunks


async def wait_until_idle(worker, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while worker.num_in_flight or worker.num_running or worker.num_waiting_for_kv:
        assert time.monotonic() < deadline, "streams still counted in flight"
        await asyncio.sleep(0.01)


def test_tokens_keep_their_schedule_after_the_worker_stalls():
    """Token i is due at a fixed time from the request, not an ITL after the previous send: once a stall
    (here the whole event loop blocked) has passed, the overdue tokens go out back to back. With each
    sleep counted from the previous send, no two tokens could come less than an ITL apart."""
    itl, stall = 0.05, 0.4

    async def body(stub, worker) -> None:
        call = stub.Decode(decode_request("late", [1], 20))
        first = await call.read()
        time.sleep(stall)  # noqa: ASYNC251 — the stall under test: nothing runs, the worker included
        arrivals, tokens = [], list(first.token_ids)
        while (chunk := await call.read()) is not grpc.aio.EOF:
            arrivals.append(time.monotonic())
            tokens += chunk.token_ids
        assert tokens == simulated_tokens("late", [1], 20, VOCAB)
        gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
        assert sum(gap < itl for gap in gaps) >= 3, gaps

    in_process(SimConfig(ttft_s=0.0, itl_s=itl, vocab_size=VOCAB), body)


def test_cancelled_streams_stop_their_timers():
    async def body(stub, worker) -> None:
        baseline = len(asyncio.all_tasks())
        calls = [stub.Decode(decode_request(f"x{i}", [i], 100_000)) for i in range(100)]
        for call in calls:
            await call.read()
        assert worker.num_running == 100
        for call in calls:
            call.cancel()
        await wait_until_idle(worker)
        deadline = time.monotonic() + 5
        while len(asyncio.all_tasks()) > baseline and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert len(asyncio.all_tasks()) <= baseline  # no handler task (and so no timer) left behind

    in_process(SimConfig(ttft_s=0.0, itl_s=0.05, vocab_size=VOCAB), body)
