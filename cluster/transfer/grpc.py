"""The `grpc` transport: KV pages over the Worker.PushKV client stream. Works anywhere gRPC does.

Life of one transfer:
1. The decode worker mounts a `KVTransferServicer` (sync server) or `AsyncKVTransferServicer`
   (grpc.aio) — or delegates its own Worker.PushKV to `servicer.PushKV` / `push_kv_async` — and makes a
   `GrpcKVReceiver` per transfer, which registers its ReceiverCore under the transfer_id.
2. The prefill worker's `GrpcKVSender` opens one PushKV stream (deadline = its lease) on a channel
   cached per target, on its background thread, when the first layer is queued.
3. Each packed layer goes out as DATA chunks of at most `chunk_bytes` (gRPC's default message limit
   is 4 MiB), each with its checksum and the spec fingerprint; the servicer routes the stream by the
   first chunk's transfer_id and the core checks and writes every chunk.
4. `finish(token)` sends FINAL (token + transfer checksum); the servicer answers PushKVAck(ok) and the
   sender is DONE once that ack is back. A refused chunk (checksum, unknown or failed transfer) ends the
   stream at once with ok=false: the sender FAILS too.
5. Sender killed or stream cancelled → the servicer's request iterator raises or ends early → the
   receiver FAILS at once; a sender that never connects is caught by the receiver's lease.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator

import grpc
import torch

from cluster.protogen import ensure_generated
from cluster.transfer.base import KVPoll, TransferError, TransferSpec
from cluster.transfer.codec import as_bytes
from cluster.transfer.receiver_core import ReceiverCore
from cluster.transfer.registered import ReceiverRegistry, RegisteredReceiver
from cluster.transfer.sender_core import AbortMsg, FinalMsg, LayerMsg, Message, QueuedSender

ensure_generated()
from pdserve.v1 import worker_pb2 as pb  # noqa: E402  (generated on the line above)
from pdserve.v1 import worker_pb2_grpc as pb_grpc  # noqa: E402

DEFAULT_CHUNK_BYTES = 1 << 20  # under gRPC's 4 MiB default message limit; 0.5-1 MiB streamed fastest here


class _PushStream:
    """One PushKV call: feed() each chunk; a returned ack ends the call early."""

    def __init__(self, registry: ReceiverRegistry) -> None:
        self.registry = registry
        self.core: ReceiverCore | None = None

    def feed(self, chunk: pb.KVChunk) -> pb.PushKVAck | None:
        if self.core is None:
            self.core = self.registry.lookup(chunk.transfer_id)
            if self.core is None:
                return pb.PushKVAck(ok=False, error=f"no receiver for transfer {chunk.transfer_id!r}")
        core = self.core
        if chunk.transfer_id != core.spec.transfer_id:
            core.fail(f"stream switched to transfer {chunk.transfer_id!r}")
        elif chunk.kind == pb.KV_CHUNK_KIND_DATA:
            if core.on_data(chunk.layer_idx, chunk.offset, chunk.data, chunk.checksum, chunk.spec_fingerprint):
                return None
        elif chunk.kind == pb.KV_CHUNK_KIND_FINAL:
            core.on_final(chunk.first_token_id, chunk.num_layers, chunk.checksum, chunk.spec_fingerprint)
        elif chunk.kind == pb.KV_CHUNK_KIND_ABORT:
            core.on_abort(chunk.error)
        else:
            core.fail(f"unknown chunk kind {chunk.kind}")
        done = core.poll() == KVPoll.DONE
        return pb.PushKVAck(ok=done, error="" if done else (core.error or ""), bytes_received=core.bytes_received)

    def end(self) -> pb.PushKVAck:
        if self.core is None:
            return pb.PushKVAck(ok=False, error="empty stream")
        self.core.fail("sender gone: the stream ended before the final message")
        return pb.PushKVAck(ok=False, error=self.core.error or "", bytes_received=self.core.bytes_received)

    def broken(self, exc: BaseException) -> None:
        if self.core is not None:
            self.core.fail(f"sender gone: {type(exc).__name__}: {exc}")


class KVTransferServicer(pb_grpc.WorkerServicer, ReceiverRegistry):
    """Worker.PushKV for a sync grpc.server; the other Worker methods stay UNIMPLEMENTED here."""

    def __init__(self) -> None:
        ReceiverRegistry.__init__(self)

    def PushKV(self, request_iterator: Iterator[pb.KVChunk], context: grpc.ServicerContext) -> pb.PushKVAck:  # noqa: N802
        stream = _PushStream(self)
        try:
            for chunk in request_iterator:
                ack = stream.feed(chunk)
                if ack is not None:
                    return ack
        except Exception as exc:  # client cancelled or died mid-stream
            stream.broken(exc)
            raise
        if not context.is_active():
            stream.broken(RuntimeError("call cancelled"))
        return stream.end()

    async def push_kv_async(self, request_iterator: AsyncIterator[pb.KVChunk],
                            context: grpc.aio.ServicerContext) -> pb.PushKVAck:
        """The same for a grpc.aio server. Checks and writes run on the event loop: ~0.2 ms per 1 MiB
        chunk, plus ~1 ms per 4 MiB layer scattered into the cache, measured here."""
        stream = _PushStream(self)
        try:
            async for chunk in request_iterator:
                ack = stream.feed(chunk)
                if ack is not None:
                    return ack
        except BaseException as exc:  # CancelledError included: the sender is gone
            stream.broken(exc)
            raise
        return stream.end()

    def add_to_server(self, server: grpc.Server) -> None:
        pb_grpc.add_WorkerServicer_to_server(self, server)


class AsyncKVTransferServicer(KVTransferServicer):
    """Mountable on a grpc.aio server."""

    async def PushKV(self, request_iterator, context):  # noqa: N802  (type: ignore[override])
        return await self.push_kv_async(request_iterator, context)


class GrpcKVReceiver(RegisteredReceiver):
    def __init__(self, spec: TransferSpec, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor],
                 dest_block_ids: list[int], servicer: ReceiverRegistry) -> None:
        super().__init__(spec, k_caches, v_caches, dest_block_ids, servicer)
        self.servicer = servicer


_channels: dict[str, grpc.Channel] = {}
_channels_lock = threading.Lock()


def get_channel(target: str) -> grpc.Channel:
    """One channel per decode worker, shared by every transfer to it (HTTP/2 multiplexes the streams)."""
    with _channels_lock:
        channel = _channels.get(target)
        if channel is None:
            channel = _channels[target] = grpc.insecure_channel(target)
        return channel


def close_all() -> None:
    """Close every cached channel (worker shutdown, tests)."""
    with _channels_lock:
        channels = list(_channels.values())
        _channels.clear()
    for channel in channels:
        channel.close()


class GrpcKVSender(QueuedSender):
    def __init__(self, spec: TransferSpec, target: str, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        super().__init__(spec)
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
        self.target = target
        self.chunk_bytes = chunk_bytes
        self.ack: pb.PushKVAck | None = None

    def _run(self, messages: Iterator[Message]) -> None:
        stub = pb_grpc.WorkerStub(get_channel(self.target))
        try:
            self.ack = stub.PushKV(self._chunks(messages), timeout=max(self.remaining(), 1e-3))
        except grpc.RpcError as exc:
            raise TransferError(f"PushKV to {self.target}: {exc.code().name}: {exc.details()}") from None
        if not self.ack.ok:
            raise TransferError(f"receiver refused the transfer: {self.ack.error}")
        self._set_done()

    def _chunks(self, messages: Iterator[Message]) -> Iterator[pb.KVChunk]:
        tid, fp = self.spec.transfer_id, self.fingerprint
        for msg in messages:
            if isinstance(msg, LayerMsg):
                payload = msg.payload.cpu()
                view, total = as_bytes(payload), payload.numel()
                for offset in range(0, total, self.chunk_bytes):
                    data = view[offset:offset + self.chunk_bytes]
                    digest = self._record(msg.layer_idx, offset, data)
                    yield pb.KVChunk(transfer_id=tid, kind=pb.KV_CHUNK_KIND_DATA, layer_idx=msg.layer_idx,
                                     offset=offset, layer_nbytes=total, data=data.tobytes(), checksum=digest,
                                     spec_fingerprint=fp)
                    self._set_transferring()
                if payload is msg.payload:  # every chunk was copied by tobytes()
                    self._recycle(msg)
            elif isinstance(msg, FinalMsg):
                yield pb.KVChunk(transfer_id=tid, kind=pb.KV_CHUNK_KIND_FINAL, checksum=self.digest.value(),
                                 spec_fingerprint=fp, first_token_id=msg.first_token_id,
                                 num_layers=self.spec.num_layers)
            elif isinstance(msg, AbortMsg):
                yield pb.KVChunk(transfer_id=tid, kind=pb.KV_CHUNK_KIND_ABORT, spec_fingerprint=fp, error=msg.reason)
