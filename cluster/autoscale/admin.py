"""The Admin gRPC service (protos/pdserve/v1/admin.proto): manual overrides and the decision log.

A call here: the request is checked (INVALID_ARGUMENT whose details start with the field) → the
override is written to, or the events read from, the cluster's Redis in a thread (redis-py blocks)
→ the answer. Nothing here talks to the leader: it reads the overrides from Redis at its next tick,
so this service can run in any process that reaches Redis (the controller's, or the router's gRPC
server via `add_admin_service`).
"""

from __future__ import annotations

import asyncio

import grpc
import redis

from cluster.autoscale.events import MAX_EVENTS, read_desired, read_events
from cluster.autoscale.overrides import read_overrides, release_override, set_override
from cluster.protogen import ensure_generated
from cluster.state.store import StateStore

ensure_generated()
from pdserve.v1 import admin_pb2 as pb  # noqa: E402
from pdserve.v1 import admin_pb2_grpc as pb_grpc  # noqa: E402

DEFAULT_LIMIT = 20


class AdminService(pb_grpc.AdminServicer):
    def __init__(self, store: StateStore) -> None:
        self.store = store

    async def SetOverride(self, request: pb.SetOverrideRequest, context) -> pb.SetOverrideResponse:  # noqa: N802
        await self._call(context, set_override, self.store, request.model, request.pool, request.replicas)
        return pb.SetOverrideResponse()

    async def ReleaseOverride(self, request: pb.ReleaseOverrideRequest, context) -> pb.ReleaseOverrideResponse:  # noqa: N802
        released = await self._call(context, release_override, self.store, request.model, request.pool)
        return pb.ReleaseOverrideResponse(released=released)

    async def GetDecisions(self, request: pb.GetDecisionsRequest, context) -> pb.GetDecisionsResponse:  # noqa: N802
        if request.limit > MAX_EVENTS:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"limit: must be at most {MAX_EVENTS}, "
                                                                  f"got {request.limit}")
        limit = request.limit or DEFAULT_LIMIT

        def read():
            return (read_events(self.store, limit, request.model or None, request.pool or None),
                    read_desired(self.store), read_overrides(self.store))

        events, desired, overrides = await self._call(context, read)
        response = pb.GetDecisionsResponse(decisions=[
            pb.DecisionEvent(at=e.at, model=e.model, pool=e.pool, current=e.current, desired=e.desired,
                             direction=e.direction, reason=e.reason, message=e.message, controller=e.controller)
            for e in events])
        for (model, pool) in sorted(set(desired) | set(overrides)):
            if (request.model and model != request.model) or (request.pool and pool != request.pool):
                continue
            record = desired.get((model, pool), {})
            target = pb.PoolTarget(model=model, pool=pool, desired=record.get("desired", 0),
                                   replicas=record.get("replicas", 0), at=record.get("at", 0.0))
            if (model, pool) in overrides:
                target.override_replicas = overrides[(model, pool)]
            response.pools.append(target)
        return response

    async def _call(self, context, fn, *args):
        try:
            return await asyncio.to_thread(fn, *args)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except (redis.RedisError, OSError) as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"cannot reach the cluster's Redis: {exc}")


def add_admin_service(server: grpc.aio.Server, store: StateStore) -> AdminService:
    service = AdminService(store)
    pb_grpc.add_AdminServicer_to_server(service, server)
    return service


async def serve_admin(store: StateStore, host: str = "127.0.0.1", port: int = 0) -> tuple[grpc.aio.Server, int]:
    """Start a server with only the Admin service on the running loop; returns (server, bound port)."""
    server = grpc.aio.server()
    bound = server.add_insecure_port(f"{host}:{port}")
    add_admin_service(server, store)
    await server.start()
    return server, bound
