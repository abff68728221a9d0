"""The TCPStore keys and values the two sides of the `dist` transport meet through (see dist.py)."""

from __future__ import annotations

CONNECT_TIMEOUT_S = 30.0  # store connection and group formation
ABORTED = "ABORTED"  # announcement value a receiver claims when it gives up before the sender came
DOORBELL = "ann"  # a TCPStore queue: the sender pushes, the endpoint's watcher blocks popping
CLOSING = "\0closing"  # the doorbell value that stops the watcher (never a transfer id)


def announce_key(transfer_id: str) -> str:
    """Holds "<pair_id>:<tag>" once the sender claimed it, or "ABORTED:<why>" if the receiver did first."""
    return f"xfer/{transfer_id}"


def abort_key(transfer_id: str) -> str:
    """Set by a receiver that gave up mid-transfer: the sender stops and sends ABORT."""
    return f"xfer/{transfer_id}/abort"


def broken_key(pair_id: str) -> str:
    """Set by the decode side when it dropped a pair group: the sender builds a new pair."""
    return f"pair/{pair_id}/broken"


def doorbell_value(transfer_id: str, announcement: str) -> str:
    """The doorbell carries the announcement, so the woken receiver needs no store round trip for it."""
    return f"{transfer_id}\n{announcement}"


def parse_doorbell(value: str) -> tuple[str, str]:
    """(transfer_id, announcement); the announcement never holds a newline, a transfer id might."""
    transfer_id, _, announcement = value.rpartition("\n")
    return transfer_id, announcement
