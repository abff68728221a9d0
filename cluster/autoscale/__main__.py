"""The autoscaler as its own process (on Kubernetes: a Deployment of the chart, one or more replicas
of which one leads):

    python -m cluster.autoscale --policy autoscale.yaml --config cluster.yaml --redis-url redis://redis:6379 \\
        --ray-address auto --detached --admin-port 50060 --metrics-port 9400

It joins the running Ray cluster (KubeRay's autoscaler adds the pods its new actors need), starts the
controller (service.py), serves the Admin gRPC API and /metrics (pdserve:pool_desired_replicas,
which HPA or KEDA may follow instead of the Ray actuator), and runs until SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.autoscale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", type=Path, required=True, help="the autoscaling policy YAML (hot-reloaded)")
    parser.add_argument("--config", type=Path, required=True, help="the cluster YAML: how to start each model's workers")
    parser.add_argument("--redis-url", default=None, help="default: the cluster config's redis_url")
    parser.add_argument("--ray-address", default="auto", help="the Ray cluster to join")
    parser.add_argument("--namespace", default="pdserve", help="Ray namespace of the replicas (named actors)")
    parser.add_argument("--detached", action="store_true", help="replicas outlive this process (Kubernetes)")
    parser.add_argument("--worker-host", default="127.0.0.1", help="where workers listen (0.0.0.0 across nodes)")
    parser.add_argument("--admin-host", default="127.0.0.1")
    parser.add_argument("--admin-port", type=int, default=50060, help="the Admin gRPC API (admin.proto)")
    parser.add_argument("--metrics-port", type=int, default=9400, help="Prometheus /metrics; 0 = none")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from cluster.autoscale.policy import PolicyFile
    from cluster.config import ClusterConfig

    try:
        policy = PolicyFile(args.policy)
        config = ClusterConfig.from_yaml(args.config)
    except (OSError, ValueError) as exc:
        print(f"autoscaler: {exc}", file=sys.stderr)
        return 2
    redis_url = args.redis_url or config.redis_url
    if not redis_url:
        print("autoscaler: no Redis: give --redis-url or set redis_url in the cluster config", file=sys.stderr)
        return 2
    return asyncio.run(_serve(args, policy, config, redis_url))


async def _serve(args, policy, config, redis_url: str) -> int:
    import ray
    from prometheus_client import start_http_server

    from cluster.autoscale.admin import serve_admin
    from cluster.autoscale.service import start_autoscaler
    from cluster.metrics import REGISTRY

    ray.init(address=args.ray_address, namespace=args.namespace, include_dashboard=False)
    autoscaler = await asyncio.to_thread(start_autoscaler, policy, config, redis_url,
                                         lifetime="detached" if args.detached else None, host=args.worker_host)
    server, port = await serve_admin(autoscaler.store, args.admin_host, args.admin_port)
    if args.metrics_port:
        start_http_server(args.metrics_port, addr=args.admin_host, registry=REGISTRY)
    logging.getLogger(__name__).info("autoscaler %s: admin API on %s:%d", autoscaler.controller.controller_id,
                                     args.admin_host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await server.stop(1.0)
        await asyncio.to_thread(autoscaler.stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
