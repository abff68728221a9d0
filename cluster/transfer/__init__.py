"""KV-page transfer between a prefill worker and a decode worker: the seams and three transports.

    sender = create_sender("grpc", spec, target="127.0.0.1:50051")          # prefill side
    receiver = create_receiver("grpc", spec, k_caches, v_caches, blocks,   # decode side, made first
                               servicer=kv_servicer)

Transports (`kind`) and their endpoint keywords:
- "local": same process. channel=LocalChannel (optional; a process-wide default).
- "grpc":  sender target="host:port" (the decode worker's gRPC server); receiver servicer=KVTransferServicer.
- "dist":  sender address="host:port" (the decode rank's TCPStore, DistKVEndpoint.address);
           receiver endpoint=DistKVEndpoint.
The transport modules are imported on first use, so a unified worker never loads gRPC or gloo.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from cluster.transfer.base import KVPoll, KVReceiver, KVSender, TransferError, TransferSpec, combine

TRANSPORTS = {
    "local": ("cluster.transfer.local", "LocalKVSender", "LocalKVReceiver"),
    "grpc": ("cluster.transfer.grpc", "GrpcKVSender", "GrpcKVReceiver"),
    "dist": ("cluster.transfer.dist", "DistKVSender", "DistKVReceiver"),
}


def _classes(kind: str) -> tuple[type, type]:
    try:
        module, sender, receiver = TRANSPORTS[kind]
    except KeyError:
        raise ValueError(f"transport must be one of {sorted(TRANSPORTS)}, got {kind!r}") from None
    mod = importlib.import_module(module)
    return getattr(mod, sender), getattr(mod, receiver)


def create_sender(kind: str, spec: TransferSpec, **endpoint: Any) -> KVSender:
    return _classes(kind)[0](spec, **endpoint)


def create_receiver(kind: str, spec: TransferSpec, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor],
                    dest_block_ids: list[int], **endpoint: Any) -> KVReceiver:
    return _classes(kind)[1](spec, k_caches, v_caches, dest_block_ids, **endpoint)


__all__ = ["KVPoll", "KVReceiver", "KVSender", "TRANSPORTS", "TransferError", "TransferSpec", "combine",
           "create_receiver", "create_sender"]
