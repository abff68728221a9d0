"""`pdserve up`: the whole cluster on embedded defaults, in one command.

What happens, in order: each model directory without a checkpoint gets the tiny preset made in it →
the shared state starts (an embedded Redis on a unix socket under `run_dir`, unless `redis_url`
names one) → local Ray → every model's pools as worker actors (one prefill and one decode worker
each by default, or unified workers with `--unified`), each registering itself in Redis → the router
(OpenAI HTTP and the gRPC API of serving.proto on one event loop) finds them there →
with `autoscaling_policy` set, the autoscaler (cluster/autoscale/) adopts those workers and scales
each pool from then on → `run_dir/up.json` records the addresses and the Redis URL for `pdserve status` → it prints how to
call it and serves until Ctrl-C or SIGTERM (uvicorn catches both), then stops the router, Ray (and
with it every worker) and Redis, and removes up.json. `--once` instead makes one chat request
through the router, prints it, and exits.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

from cluster.config import ClusterConfig


def with_cli_overrides(config: ClusterConfig, *, model: Path | None, unified: bool, host: str | None,
                       port: int | None, grpc_port: int | None, engine: dict) -> ClusterConfig:
    """The config file's values, with what was given on the command line winning."""
    models = config.models
    if model is not None:
        models = [replace(models[0], path=str(model), name=None)]
    if unified:
        models = [replace(m, mode="unified") for m in models]
    listen = {k: v for k, v in (("host", host), ("port", port), ("grpc_port", grpc_port)) if v is not None}
    engine_overrides = {k: v for k, v in engine.items() if v is not None}
    return replace(config, models=models, engine=replace(config.engine, **engine_overrides), **listen)


def run_up(config: ClusterConfig, once: bool) -> int:
    _make_missing_models(config)
    import uvicorn

    from cluster.local_cluster import LocalCluster
    from cluster.router import runtime
    from cluster.router.http import create_app

    cluster = LocalCluster(config)
    run_file = Path(config.run_dir) / "up.json"
    autoscaler = None
    try:
        cluster.start(progress=lambda line: print(line, file=sys.stderr))
        if config.autoscaling_policy:
            from cluster.autoscale.policy import PolicyFile
            from cluster.autoscale.service import start_autoscaler

            autoscaler = start_autoscaler(PolicyFile(config.autoscaling_policy), config, cluster.redis_url,
                                          workers=cluster.workers)
        router = build_router(config, cluster)
        server = uvicorn.Server(uvicorn.Config(create_app(router), host=config.host, port=config.port,
                                               log_level="warning", http=runtime.HTTP_PROTOCOL))
        base = f"http://{config.host}:{config.port}"
        model = config.models[0].served_name
        if once:
            return _once(server, base, model)
        return runtime.run(_serve(server, router, config, cluster.redis_url, run_file))
    finally:
        run_file.unlink(missing_ok=True)
        if autoscaler is not None:
            autoscaler.stop()
        cluster.stop()


def build_router(config: ClusterConfig, cluster):
    """The router over every model's pools; workers are found through Redis as they register."""
    from cluster.model.arch import ModelArchConfig
    from cluster.model.tokenizer import Tokenizer
    from cluster.router.core import Router
    from cluster.router.dispatch import ModelPool

    pools = {}
    for m in config.models:
        engine = m.engine_config(config.engine, m.decode_tp)
        arch = ModelArchConfig.from_dir(m.path)
        pools[m.served_name] = ModelPool(
            m.served_name, Tokenizer.from_dir(m.path), engine.max_model_len or arch.max_position_embeddings,
            prefill=cluster.addresses(m.served_name, "prefill"), decode=cluster.addresses(m.served_name, "decode"),
            unified=cluster.addresses(m.served_name, "unified"), min_prefill_tokens=m.min_prefill_tokens,
            kv_lease_seconds=m.kv_lease_seconds)
    return Router.from_config(pools, config.router, redis_url=cluster.redis_url)


def _make_missing_models(config: ClusterConfig) -> None:
    for m in config.models:
        if not (Path(m.path) / "config.json").exists():
            from cluster.model.presets import make_model

            print(f"making the tiny model in {m.path} ...", file=sys.stderr)
            make_model("tiny", Path(m.path))


async def _serve(server, router, config: ClusterConfig, redis_url: str, run_file: Path) -> int:
    """HTTP and gRPC on one event loop until Ctrl-C / SIGTERM (uvicorn catches both and returns)."""
    from cluster.router import runtime
    from cluster.router.grpc_api import serve_grpc

    grpc_server, bound = await serve_grpc(router, config.host, config.grpc_port)
    base, grpc_address = f"http://{config.host}:{server.config.port}", f"{config.host}:{bound}"
    run_file.parent.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps({"http": base, "grpc": grpc_address, "redis_url": redis_url,
                                    "models": [m.served_name for m in config.models]}))
    print(_how_to_call(base, config.models[0].served_name, grpc_address), file=sys.stderr)
    runtime.tune_gc()
    try:
        await server.serve()
    finally:
        await grpc_server.stop(1.0)
    return 0


def _once(server, base: str, model: str) -> int:
    import httpx

    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        while time.monotonic() < deadline and httpx.get(f"{base}/ready", timeout=5).status_code != 200:
            time.sleep(0.2)  # the router finds the workers through Redis within a poll interval
        response = httpx.post(f"{base}/v1/chat/completions", timeout=60, json={
            "model": model, "max_tokens": 16, "temperature": 0,
            "messages": [{"role": "user", "content": "Why split prefill from decode?"}]})
        print(json.dumps(response.json(), ensure_ascii=False))
        return 0 if response.status_code == 200 else 1
    finally:
        server.should_exit = True
        thread.join(10)


def _how_to_call(base: str, model: str, grpc_address: str) -> str:
    return f"""pdserve is up at {base} serving {model!r}. Ctrl-C stops it. `pdserve status` shows the pools.
The gRPC API (protos/pdserve/v1/serving.proto, with health checking and reflection) is on {grpc_address}.

  curl {base}/v1/chat/completions -H 'content-type: application/json' \\
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello"}}], "max_tokens": 32}}'

  from openai import OpenAI
  client = OpenAI(base_url="{base}/v1", api_key="unused")
  print(client.chat.completions.create(model="{model}", messages=[{{"role": "user", "content": "Hello"}}]))
"""
