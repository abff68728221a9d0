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

Framing: a transfer is exactly num_layers + 1 messages ("slots") on its tag. Slots 0..L-1 are
HEADER_BYTES + layer_nbytes (a header, then one packed layer), slot L is HEADER_BYTES (FINAL). Because
every slot's size is known in advance, the receiver keeps the next two slots' recvs posted and the
sender never waits for it; header and pages travel in one message, one handshake per layer. ABORT may
take any slot (sized for it); the sender then fills the one slot the receiver still has posted with a
PAD, so no recv is ever left dangling.

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

from cluster.transfer.base import TransferError

SENDER_RANK, RECEIVER_RANK = 0, 1

MAGIC = 0x4B5650  # "KVP"
KIND_DATA, KIND_FINAL, KIND_ABORT, KIND_PAD = 1, 2, 3, 4
HEADER_FIELDS = 8  # magic, kind, layer, nbytes, checksum, spec fingerprint, first token, header crc
HEADER_BYTES = 8 * HEADER_FIELDS


def slot_nbytes(slot: int, num_layers: int, layer_nbytes: int) -> int:
    return HEADER_BYTES + (layer_nbytes if slot < num_layers else 0)


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

    def encode(self) -> torch.Tensor:
        fields = [MAGIC, self.kind, self.layer_idx, self.nbytes, _signed(self.checksum), self.fingerprint,
                  self.first_token_id]
        return torch.tensor([*fields, _crc(fields)], dtype=torch.int64)

    def write_into(self, message: torch.Tensor) -> None:
        """Into the first HEADER_BYTES of a uint8 message buffer."""
        message[:HEADER_BYTES].view(torch.int64).copy_(self.encode())

    @staticmethod
    def read_from(message: torch.Tensor) -> Header:
        return Header.decode(message[:HEADER_BYTES].view(torch.int64))

    @staticmethod
    def decode(t: torch.Tensor) -> Header:
        fields = t.tolist()
        if fields[0] != MAGIC or fields[-1] != _crc(fields[:-1]):
            raise TransferError(f"corrupt message header {fields}")
        _, kind, layer, nbytes, value, fp, token, _ = fields
        if kind not in (KIND_DATA, KIND_FINAL, KIND_ABORT, KIND_PAD) or nbytes < 0:
            raise TransferError(f"bad message header {fields}")
        return Header(kind, layer, nbytes, value & ((1 << 64) - 1), fp, token)


def _signed(value: int) -> int:
    """A 64-bit unsigned value as the int64 a tensor can hold (two's complement)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _crc(fields: list[int]) -> int:
    return zlib.crc32(struct.pack(f"<{len(fields)}q", *fields))

