"""KVEndpoint: how prefill ranks reach one decode rank, and the object its receivers register with.

A decode worker's rank 0 serves PushKV on its own Worker gRPC server; each rank > 0 of a TP replica
starts its own endpoint (`start_kv_endpoint`): a small sync gRPC server with a KVTransferServicer, a
DistKVEndpoint (TCPStore) for "dist", or the process-wide LocalChannel for "local" (same process only).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

TRANSPORTS = ("grpc", "dist", "local")
_GRPC_THREADS = 16  # one per concurrent PushKV stream into this rank


@dataclass
class KVEndpoint:
    transport: str
    address: str  # "host:port"; "" for local
    registry: object | None = None  # KVTransferServicer, DistKVEndpoint or LocalChannel (None: the default)
    peer_addresses: tuple[str, ...] = ()  # of TP ranks 1.. of the same replica (rank 0 holds this one)
    _close: Callable[[], None] | None = field(default=None, repr=False)

    @property
    def rank_addresses(self) -> list[str]:
        """Every decode rank's KV address, rank 0 first."""
        return [self.address, *self.peer_addresses]

    def receiver_kwargs(self) -> dict[str, Any]:
        if self.transport == "grpc":
            return {"servicer": self.registry}
        if self.transport == "dist":
            return {"endpoint": self.registry}
        return {"channel": self.registry} if self.registry is not None else {}

    def num_registered(self) -> int:
        """Transfers waiting in the registry (0 where the transport cannot say)."""
        try:
            return len(self.registry)  # type: ignore[arg-type]
        except TypeError:
            return 0

    def close(self) -> None:
        if self._close is not None:
            self._close()
            self._close = None


def start_kv_endpoint(transport: str, host: str = "127.0.0.1") -> KVEndpoint:
    """Start a standalone endpoint on `host` (any free port) for one decode rank."""
    if transport == "grpc":
        import grpc

        from cluster.transfer.grpc import KVTransferServicer

        servicer = KVTransferServicer()
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=_GRPC_THREADS),
                             options=[("grpc.max_receive_message_length", 16 << 20)])
        servicer.add_to_server(server)
        port = server.add_insecure_port(f"{host}:0")
        server.start()
        return KVEndpoint("grpc", f"{host}:{port}", servicer, _close=lambda: server.stop(grace=0.5).wait())
    if transport == "dist":
        from cluster.transfer.dist import DistKVEndpoint

        endpoint = DistKVEndpoint(host, 0)
        return KVEndpoint("dist", endpoint.address, endpoint, _close=endpoint.close)
    if transport == "local":
        from cluster.transfer.local import DEFAULT_CHANNEL

        return KVEndpoint("local", "", DEFAULT_CHANNEL)
    raise ValueError(f"kv transport must be one of {TRANSPORTS}, got {transport!r}")
