"""The router alone, against an external Redis (on Kubernetes: the chart's router Deployment):

    python -m cluster.router --config cluster.yaml --redis-url redis://redis:6379 --host 0.0.0.0

A request's life here is the one `pdserve up` gives it (core.py, http.py, grpc_api.py); what differs is
where the workers come from. This process starts none: it builds one pool per model of the cluster
config with no static addresses, and discovery (discovery.py) fills them from the Redis registry as
the autoscaler's Ray workers register. A request that arrives before any worker of its model has
registered gets 503; once one heartbeats it is routed. The OpenAI HTTP API and the gRPC API share one
event loop until SIGTERM or Ctrl-C (uvicorn catches both), then both stop and the Redis client closes.
Each model's checkpoint directory must be readable here too: the router tokenizes.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from dataclasses import replace
from pathlib import Path

from cluster.config import ClusterConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.router", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="the cluster YAML (models, router section)")
    parser.add_argument("--redis-url", default=None, help="default: the cluster config's redis_url")
    parser.add_argument("--host", default=None, help="where HTTP and gRPC listen; default: the config's host")
    parser.add_argument("--port", type=int, default=None, help="the OpenAI HTTP API; default: the config's port")
    parser.add_argument("--grpc-port", type=int, default=None, help="the gRPC API; default: the config's grpc_port")
    parser.add_argument("--api-keys-file", type=Path, default=None,
                        help="API keys, one a line, added to router.auth.api_keys (a mounted Secret: keys stay "
                             "out of the config)")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = ClusterConfig.from_yaml(args.config)
        listen = {k: v for k, v in (("host", args.host), ("port", args.port), ("grpc_port", args.grpc_port))
                  if v is not None}
        config = replace(config, **listen)
        if args.api_keys_file is not None:
            config = with_api_keys(config, read_api_keys(args.api_keys_file))
    except (OSError, ValueError) as exc:
        print(f"router: {exc}", file=sys.stderr)
        return 2
    redis_url = args.redis_url or config.redis_url
    if not redis_url:
        print("router: no Redis: give --redis-url or set redis_url in the cluster config", file=sys.stderr)
        return 2
    try:
        router = build_router(config, redis_url)
    except (OSError, ValueError) as exc:
        print(f"router: {exc}", file=sys.stderr)
        return 2
    return serve(router, config)


def read_api_keys(path: Path) -> list[str]:
    """One key a line; blank lines and lines starting with # are skipped."""
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def with_api_keys(config: ClusterConfig, keys: list[str]) -> ClusterConfig:
    auth = config.router.auth
    try:
        auth = replace(auth, api_keys=[*auth.api_keys, *keys])  # re-validated: a key given twice is refused
    except ValueError as exc:
        raise ValueError(f"router.auth.{exc}") from None
    return replace(config, router=replace(config.router, auth=auth))


def build_router(config: ClusterConfig, redis_url: str):
    """One pool per model, with no static workers: they come from the Redis registry."""
    from cluster.model.arch import ModelArchConfig
    from cluster.model.tokenizer import Tokenizer
    from cluster.router.core import Router
    from cluster.router.dispatch import ModelPool

    pools = {}
    for i, m in enumerate(config.models):
        if not (Path(m.path) / "config.json").is_file():
            raise ValueError(f"models[{i}].path: no HF checkpoint at {m.path!r} (config.json missing)")
        engine = m.engine_config(config.engine, m.decode_tp)
        arch = ModelArchConfig.from_dir(m.path)
        pools[m.served_name] = ModelPool(
            m.served_name, Tokenizer.from_dir(m.path), engine.max_model_len or arch.max_position_embeddings,
            min_prefill_tokens=m.min_prefill_tokens, kv_lease_seconds=m.kv_lease_seconds)
    return Router.from_config(pools, config.router, redis_url=redis_url)


def serve(router, config: ClusterConfig) -> int:
    import uvicorn

    from cluster.router import runtime
    from cluster.router.http import create_app

    server = uvicorn.Server(uvicorn.Config(create_app(router), host=config.host, port=config.port,
                                           log_level="warning", http=runtime.HTTP_PROTOCOL))
    return runtime.run(_serve(server, router, config))


async def _serve(server, router, config: ClusterConfig) -> int:
    from cluster.router import runtime
    from cluster.router.grpc_api import serve_grpc

    grpc_server, bound = await serve_grpc(router, config.host, config.grpc_port)
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal into the handler that was
    # there before it: a no-op one here, so a stop asked for (a pod's termination) exits 0, not -15.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    runtime.tune_gc()
    try:
        serving = asyncio.ensure_future(server.serve())
        while not server.started and not serving.done():
            await asyncio.sleep(0.05)
        if server.started:  # one line a supervisor (or a test) can wait for: both APIs accept connections
            print(f"READY http={config.host}:{config.port} grpc={config.host}:{bound} "
                  f"models={','.join(router.pools)}", file=sys.stderr, flush=True)
        await serving
    finally:
        await grpc_server.stop(1.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
