"""A two-process torch.distributed group formed on demand, and the framing the dist transport sends on it.

Why not `dist.new_group`: that needs every rank of one fixed world to call it. Prefill and decode
workers come and go independently, so each (prefill process, decode process) pair builds its own
standalone gloo group over a `PrefixStore(f"pair/{pair_id}", store)` on the decode side's TCPStore:
rank 0 = the prefill (sending) side, rank 1 = the decode side. Building it is collective (both
constructors block until the other connects), which is why the sender first announces the pair id
through the store (see dist.py). A fresh pair id per link means a broken group is never reused.

Gloo semantics that shape the transport (measured on torch 2.13):
- a peer process that dies makes pending send/recv raise at once ("Connection closed by peer");
- a wait() that times out breaks the *whole* group (gloo signals the timeout to every pair), so any
  error evicts the group and the next transfer builds a new one;
- abort()/shutdown() do not interrupt a blocked recv, so nothing relies on them.
- data moves only once the matching recv is posted, so a receiver that posts late stalls the sender.
Messages of concurrent transfers on one group are kept apart by gloo tags (one per transfer).

Framing (`SlotPlan`): a transfer is a fixed sequence of messages ("slots") on its tag, known to both
sides from the spec alone. Each layer's packed pages (K then V, codec.py) are cut into chunks of whole
blocks, at most CHUNK_BYTES each (a chunk may hold the last K blocks and the first V blocks); chunk j
of layer l is slot l * chunks_per_layer + j, and the last slot is FINAL. A chunk message is
HEADER_BYTES (kind, layer, offset in the packed layer, size, checksum, spec fingerprint) then its
pages, so every message carries its own checksum and the receiver can check and scatter it into its
blocks on its own, as soon as it lands. Because every slot's size is known in advance, the receiver
keeps the next `depth` slots' recvs posted (about POSTED_BYTES: gloo moves data only into a posted
recv, and measured here raw gloo moved 32 MiB ~30% slower with two 4 MiB recvs in flight than with
all of them posted), so the sender never waits for it — IDLE_DEPTH only until the first chunk lands,
since the sender announces itself before the prefill has computed anything. ABORT may take any slot
(sized for it); the sender then fills the slots the receiver still has posted (`posted_after_abort`)
with PADs, so no recv is ever left dangling.

NCCL: not used yet. NCCL ignores tags, so concurrent transfers on one pair would need an ordering
protocol; CUDA pages are staged through host memory and sent over gloo instead.
"""

from __future__ import annotations

import datetime
import socket
import struct
import zlib
from dataclasses import dataclass

import torch
from torch.distributed import PrefixStore, ProcessGroupGloo, Store

from cluster.transfer.base import TransferError, TransferSpec

SENDER_RANK, RECEIVER_RANK = 0, 1

MAGIC = 0x4B5650  # "KVP"
KIND_DATA, KIND_FINAL, KIND_ABORT, KIND_PAD = 1, 2, 3, 4
HEADER_FIELDS = 8  # magic+kind, layer, offset, nbytes, checksum, spec fingerprint, first token, header crc
HEADER_BYTES = 8 * HEADER_FIELDS
_HEADER = struct.Struct(f"<{HEADER_FIELDS}q")
# Measured here (32 MiB transfers, both processes' CPU time): 1 MiB chunks cost ~20% more CPU than 2 MiB
# ones (per-message costs on both sides), 4 MiB ones saved little more; on 2 busy cores CPU is the limit.
CHUNK_BYTES = 2 << 20
POSTED_BYTES = 32 << 20  # recv buffers a receiver keeps posted once data flows (depth = this / slot size)
IDLE_DEPTH = 2  # slots posted while waiting for the first chunk (a prefill may take seconds to start)
_ALIGN = 64  # chunk messages start on cache lines in the sender's layer buffer


@dataclass(frozen=True)
class Chunk:
    """One message's share of a layer: a run of whole blocks of the packed layer (K blocks, then V blocks)."""

    offset: int  # of its pages in the packed layer (codec.pack_layer's layout)
    nbytes: int
    start: int  # of its message (header, then pages) in the sender's layer buffer
    pieces: tuple[tuple[int, int, int], ...]  # (half: 0 = K / 1 = V, first block, number of blocks)


class SlotPlan:
    """Every slot of one transfer: what it carries and its size. Sender and receiver build the same
    plan from the same spec (and the module's chunk/posting constants, which must agree on both sides:
    a mismatch fails the transfer — gloo refuses a message of the wrong size, the receiver checks each
    header's size and offset — and never mis-writes pages)."""

    def __init__(self, spec: TransferSpec, chunk_bytes: int = CHUNK_BYTES, posted_bytes: int = POSTED_BYTES) -> None:
        nb = spec.num_blocks
        block_bytes = spec.layer_nbytes // 2 // nb
        per_chunk = max(1, chunk_bytes // block_bytes)
        num_chunks = -(-2 * nb // per_chunk)
        per_chunk = -(-2 * nb // num_chunks)  # as even as whole blocks allow
        self.block_bytes = block_bytes
        self.chunks: list[Chunk] = []
        start = 0
        for a in range(0, 2 * nb, per_chunk):  # a, b: blocks of the packed layer, V's numbered nb..2nb-1
            b = min(a + per_chunk, 2 * nb)
            pieces = tuple((half, max(a, lo) - lo, min(b, lo + nb) - max(a, lo))
                           for half, lo in ((0, 0), (1, nb)) if max(a, lo) < min(b, lo + nb))
            self.chunks.append(Chunk(a * block_bytes, (b - a) * block_bytes, start, pieces))
            start += -(-(HEADER_BYTES + (b - a) * block_bytes) // _ALIGN) * _ALIGN
        self.layer_buffer_nbytes = start  # one layer's messages, back to back
        self.final_slot = spec.num_layers * len(self.chunks)
        largest = HEADER_BYTES + max(c.nbytes for c in self.chunks)
        self.depth = max(2, min(self.final_slot + 1, posted_bytes // largest))

    def chunk(self, slot: int) -> tuple[int, Chunk]:
        """(layer, chunk) that data slot `slot` carries."""
        layer, j = divmod(slot, len(self.chunks))
        return layer, self.chunks[j]

    def slot_nbytes(self, slot: int) -> int:
        return HEADER_BYTES + (self.chunk(slot)[1].nbytes if slot < self.final_slot else 0)

    def posted_after_abort(self, slot: int) -> range:
        """The slots a receiver still has posted when an ABORT arrives in `slot`: the sender PADs them.
        (A receiver posts IDLE_DEPTH slots until the first chunk lands, then keeps `depth` posted.)"""
        ahead = IDLE_DEPTH if slot == 0 else self.depth
        return range(slot + 1, min(slot + ahead - 1, self.final_slot) + 1)


def make_pair_group(store: Store, pair_id: str, rank: int, local_host: str, timeout_s: float) -> ProcessGroupGloo:
    """Blocks until the peer constructs its side (or raises after timeout_s)."""
    opts = ProcessGroupGloo._Options()
    opts._devices = [ProcessGroupGloo.create_device(hostname=local_host)]
    opts._timeout = datetime.timedelta(seconds=timeout_s)
    opts._threads = 2  # gloo's worker threads for async ops; p2p needs few
    return ProcessGroupGloo(PrefixStore(f"pair/{pair_id}", store), rank, 2, opts)


def local_host_for(peer_host: str) -> str:
    """The local address that routes to peer_host (a UDP connect sends nothing): gloo binds to it."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((peer_host, 9))
        return s.getsockname()[0]


def wait_work(work, timeout_s: float) -> None:
    """wait() with a timeout >= 1 ms (0 would mean "the group's default")."""
    work.wait(datetime.timedelta(seconds=max(timeout_s, 1e-3)))


@dataclass(frozen=True)
class Header:
    kind: int
    layer_idx: int = 0
    nbytes: int = 0
    checksum: int = 0  # of the payload (DATA) or the transfer digest (FINAL), 64-bit unsigned
    fingerprint: int = 0
    first_token_id: int = 0
    offset: int = 0  # of a DATA message's pages within the packed layer

    def _fields(self) -> list[int]:
        return [MAGIC << 8 | self.kind, self.layer_idx, self.offset, self.nbytes, _signed(self.checksum),
                self.fingerprint, self.first_token_id]

    def encode(self) -> torch.Tensor:
        fields = self._fields()
        return torch.tensor([*fields, _crc(fields)], dtype=torch.int64)

    def write_into(self, message: torch.Tensor) -> None:
        """Into the first HEADER_BYTES of a CPU uint8 message buffer (struct, not a tensor: ~1 us)."""
        fields = self._fields()
        _HEADER.pack_into(message.numpy(), 0, *fields, _crc(fields))

    @staticmethod
    def read_from(message: torch.Tensor) -> Header:
        return Header._from_fields(list(_HEADER.unpack_from(message.numpy(), 0)))

    @staticmethod
    def decode(t: torch.Tensor) -> Header:
        return Header._from_fields(t.tolist())

    @staticmethod
    def _from_fields(fields: list[int]) -> Header:
        if fields[0] >> 8 != MAGIC or fields[-1] != _crc(fields[:-1]):
            raise TransferError(f"corrupt message header {fields}")
        magic_kind, layer, offset, nbytes, value, fp, token, _ = fields
        kind = magic_kind & 0xFF
        if kind not in (KIND_DATA, KIND_FINAL, KIND_ABORT, KIND_PAD) or nbytes < 0 or offset < 0:
            raise TransferError(f"bad message header {fields}")
        return Header(kind, layer, nbytes, value & ((1 << 64) - 1), fp, token, offset)


def _signed(value: int) -> int:
    """A 64-bit unsigned value as the int64 a tensor can hold (two's complement)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _crc(fields: list[int]) -> int:
    return zlib.crc32(struct.pack(f"<{len(fields)}q", *fields))

