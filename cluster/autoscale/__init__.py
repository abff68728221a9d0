"""The autoscaler: a pure policy per pool (policy.py, decide.py) over signals from Redis (signals.py),
one leader at a time (controller.py) acting through Ray (ray_actuator.py, replicas.py).

Modules are imported where used: importing this package loads neither Ray nor gRPC.
"""
