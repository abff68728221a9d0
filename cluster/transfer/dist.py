"""The `dist` transport: KV pages over torch.distributed point-to-point (gloo), one group per worker pair.

Life of one transfer:
1. Each decode rank process runs one `DistKVEndpoint`: a TCPStore server on (host, port 0) whose real
   address it advertises (`endpoint.address`, put in the Prefill request's KVTarget).
2. The decode side makes a `DistKVReceiver` (registered with the endpoint by transfer_id); its thread
   waits to be told that the sender has announced itself.
3. The prefill side's `DistKVSender` starts its thread when it is made — before the first layer is
   computed, so the handshake overlaps compute: it gets the cached link to that address (TCPStore
   client + a pair id), takes the pair's next gloo tag (a counter: only this process sends on the
   pair), writes "<pair_id>:<tag>" to `xfer/<transfer_id>` with compare_set, and rings the endpoint's
   doorbell (pushes transfer id and announcement onto the store queue `ann`); then it gets the pair
   group (building it the first time: rank 0; pair_group.py). The endpoint's watcher thread, blocked
   popping that queue, hands the announcement to the receiver, which gets its side of the same group
   (rank 1) and posts recvs on that tag: two at first, `depth` once data flows. (One blocking watcher
   instead of every waiting receiver polling the store.)
4. Each layer's pages are gathered, on the engine's thread, into chunk messages of up to 2 MiB — a
   header (kind, layer, offset, size, checksum, spec fingerprint) then whole blocks of K and/or V —
   each checksummed while still in cache; the sender's thread hands them to gloo. The receiving thread
   checks each chunk and scatters it into its blocks as it lands, with the next slots' recvs already
   posted (gloo moves data only into a posted recv, so checking one chunk never stalls the link).
5. FINAL carries the first token and the transfer checksum → receiver DONE. The sender is DONE when
   FINAL has been handed to gloo (there is no ack channel).

Failures: the sender process dies → gloo raises on the receiver at once → FAILED (and the group is
evicted on both sides). The receiver gives up (abort/close/checksum) → it sets `xfer/<id>/abort`,
which the sender checks before its layers and answers with an ABORT header, then PADs for the slots
the receiver still has posted; until that (or FINAL) arrives the receiver thread keeps draining without
writing, so the pair's stream stays in step. A receiver closed before any announcement claims the key
first (compare_set), so the sender then fails without sending anything. Every blocking call is bounded
by the lease.

The sides live in dist_sender.py and dist_receiver.py, the store keys in dist_keys.py, the group and
the framing (SlotPlan) in pair_group.py.
"""

from __future__ import annotations

from cluster.transfer.dist_receiver import DistKVEndpoint, DistKVReceiver
from cluster.transfer.dist_sender import DistKVSender, close_all, evict_link, get_link, num_links

__all__ = ["DistKVEndpoint", "DistKVReceiver", "DistKVSender", "close_all", "evict_link", "get_link", "num_links"]
