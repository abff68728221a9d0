"""Receivers whose core waits in a registry for the sender's messages (the local and gRPC transports).

The decode side registers a ReceiverCore under its transfer id before the prefill starts; whatever
delivers the sender's messages (the local sender's thread, the gRPC PushKV servicer) looks the core
up by that id. Once the transfer is DONE or FAILED the core leaves the registry, so a late or repeated
stream finds no one and is refused.
"""

from __future__ import annotations

import threading

import torch

from cluster.transfer.base import KVPoll, KVReceiver, TransferSpec
from cluster.transfer.receiver_core import ReceiverCore


class ReceiverRegistry:
    """transfer_id -> the receiver core waiting for it (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._receivers: dict[str, ReceiverCore] = {}

    def register(self, core: ReceiverCore) -> None:
        with self._lock:
            if core.spec.transfer_id in self._receivers:
                raise ValueError(f"transfer {core.spec.transfer_id!r} already has a receiver")
            self._receivers[core.spec.transfer_id] = core

    def unregister(self, core: ReceiverCore) -> None:
        with self._lock:
            if self._receivers.get(core.spec.transfer_id) is core:
                del self._receivers[core.spec.transfer_id]

    def lookup(self, transfer_id: str) -> ReceiverCore | None:
        with self._lock:
            return self._receivers.get(transfer_id)

    def __len__(self) -> int:
        with self._lock:
            return len(self._receivers)


class CoreReceiver(KVReceiver):
    """What every transport's receiver shares: state, first token and error come from its core."""

    core: ReceiverCore

    def poll(self) -> KVPoll:
        return self.core.poll()

    def wait(self, timeout_s: float) -> KVPoll:
        self.core.wait(timeout_s)
        return self.poll()  # through poll: a registered receiver leaves its registry once finished

    @property
    def first_token_id(self) -> int:
        return self.core.first_token_id

    @property
    def error(self) -> str | None:
        return self.core.error


class RegisteredReceiver(CoreReceiver):
    def __init__(self, spec: TransferSpec, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor],
                 dest_block_ids: list[int], registry: ReceiverRegistry) -> None:
        self.spec = spec
        self.core = ReceiverCore(spec, k_caches, v_caches, dest_block_ids)
        self.registry = registry
        registry.register(self.core)

    def poll(self) -> KVPoll:
        state = self.core.poll()
        if state in (KVPoll.FAILED, KVPoll.DONE):
            self.registry.unregister(self.core)
        return state

    def abort(self) -> None:
        self.core.fail("aborted by the decode side")
        self.registry.unregister(self.core)

    def close(self) -> None:
        self.core.fail("closed before the transfer finished")  # no-op once DONE
        self.registry.unregister(self.core)
