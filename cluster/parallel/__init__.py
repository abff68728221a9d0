"""Tensor parallelism: the rank groups layers shard over, and the SPMD executor of a TP replica.

Rank 0 runs the whole engine and broadcasts a `StepPlan` each step (plan.py); ranks > 0 run
`follower_loop` (follower.py); `launch_tp_engine` (launch.py) starts a replica. Where each KV head lives,
and how a disaggregated transfer is split between prefill and decode ranks: heads.py, destination.py,
routed.py.
"""

from cluster.parallel.state import SINGLE_RANK, TPContext, TPGroup

__all__ = ["SINGLE_RANK", "TPContext", "TPGroup"]
