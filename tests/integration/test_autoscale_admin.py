"""Manual overrides and the decision log from outside the controller: the Admin gRPC service
(admin.proto) on a real grpc.aio server, `pdserve scale`, and `pdserve status` showing the events,
all against a real embedded Redis that a controller (fake actuator) decides from."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import grpc
import pytest

from cluster.autoscale.actuator import FakeActuator
from cluster.autoscale.admin import serve_admin
from cluster.autoscale.controller import Controller
from cluster.autoscale.overrides import read_overrides
from cluster.autoscale.policy import AutoscalePolicy, PoolPolicy
from cluster.cli import main
from cluster.protogen import ensure_generated
from cluster.state import StateStore, start_embedded_redis
from cluster.status import collect_status, render_status, status_to_dict

ensure_generated()
from pdserve.v1 import admin_pb2 as pb  # noqa: E402
from pdserve.v1 import admin_pb2_grpc as pb_grpc  # noqa: E402

MODEL = "adm"


@pytest.fixture
def redis_url(tmp_path) -> Iterator[str]:
    server = start_embedded_redis(tmp_path / "redis")
    yield server.url
    server.close()


@pytest.fixture
def store(redis_url) -> Iterator[StateStore]:
    s = StateStore.from_url(redis_url)
    yield s
    s.close()


def controller(store: StateStore) -> tuple[Controller, FakeActuator]:
    policy = AutoscalePolicy(pools=(PoolPolicy(MODEL, "decode", max_replicas=3, decision_interval_s=0.01),))
    actuator = FakeActuator(store)
    return Controller(store, actuator, policy, controller_id="lead"), actuator


def test_the_admin_api_sets_and_releases_overrides_and_reads_decisions(store):
    c, actuator = controller(store)
    c.step()  # up to min_replicas: the first event

    async def body() -> None:
        server, port = await serve_admin(store)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                admin = pb_grpc.AdminStub(channel)
                await admin.SetOverride(pb.SetOverrideRequest(model=MODEL, pool="decode", replicas=5))
                await asyncio.to_thread(c.step)
                assert actuator.num_replicas(MODEL, "decode") == 5
                got = await admin.GetDecisions(pb.GetDecisionsRequest(model=MODEL, limit=5))
                assert [(d.reason, d.current, d.desired) for d in got.decisions] == [
                    ("override", 1, 5), ("min_replicas", 0, 1)]
                (target,) = got.pools
                assert (target.desired, target.override_replicas, target.replicas) == (5, 5, 1)

                for request, field in ((pb.SetOverrideRequest(model=MODEL, pool="decode", replicas=-2), "replicas"),
                                       (pb.SetOverrideRequest(model="", pool="decode", replicas=1), "model"),
                                       (pb.SetOverrideRequest(model=MODEL, pool="gpu", replicas=1), "pool")):
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await admin.SetOverride(request)
                    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                    assert info.value.details().startswith(f"{field}:")
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await admin.GetDecisions(pb.GetDecisionsRequest(limit=5000))
                assert info.value.details().startswith("limit:")

                released = await admin.ReleaseOverride(pb.ReleaseOverrideRequest(model=MODEL, pool="decode"))
                again = await admin.ReleaseOverride(pb.ReleaseOverrideRequest(model=MODEL, pool="decode"))
                assert released.released and not again.released
                await asyncio.to_thread(c.step)  # the policy again: back within max_replicas at once
                assert actuator.num_replicas(MODEL, "decode") == 3
                got = await admin.GetDecisions(pb.GetDecisionsRequest(model=MODEL, pool="decode"))
                assert not got.pools[0].HasField("override_replicas")
        finally:
            await server.stop(None)

    asyncio.run(body())


def test_pdserve_scale_sets_and_releases_an_override(store, redis_url, capsys):
    assert main(["scale", MODEL, "prefill", "4", "--redis-url", redis_url]) == 0
    assert read_overrides(store) == {(MODEL, "prefill"): 4}
    assert "held at 4 replicas" in capsys.readouterr().out
    assert main(["scale", MODEL, "prefill", "--release", "--redis-url", redis_url]) == 0
    assert read_overrides(store) == {} and "released" in capsys.readouterr().out
    assert main(["scale", MODEL, "gpu", "2", "--redis-url", redis_url]) == 2
    assert "pool: must be one of prefill, decode, unified" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # neither a count nor --release
        main(["scale", MODEL, "prefill", "--redis-url", redis_url])


def test_pdserve_status_shows_the_autoscaler_events(store):
    c, _ = controller(store)
    c.step()
    status = collect_status(store, "unix:///x")
    text = render_status(status)
    assert "autoscaler events (newest first)" in text
    (line,) = [ln for ln in text.splitlines() if f"{MODEL}/decode" in ln]
    assert "up 0 -> 1  min_replicas: 0 replicas is below min_replicas 1" in line
    data = json.loads(json.dumps(status_to_dict(status)))
    assert [(e["pool"], e["reason"], e["controller"]) for e in data["autoscaler_events"]] == [
        ("decode", "min_replicas", "lead")]
