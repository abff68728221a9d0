"""`pdserve up`: the whole cluster on embedded defaults, in one command.

Makes the tiny model if the model directory is empty, starts local Ray, one prefill and one decode
worker actor (KV over gRPC) and the OpenAI-compatible router on host:port, prints how to call it, and
serves the OpenAI HTTP API and the gRPC API (serving.proto) until Ctrl-C or SIGTERM (uvicorn handles
both), then shuts Ray — and with it every worker it started — down. `--once` instead makes one chat request through the router, prints it, and exits.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from pathlib import Path

from cluster.config import EngineConfig


def run_up(model_dir: Path, host: str, port: int, config: EngineConfig, once: bool, grpc_port: int = 50051) -> int:
    if not (model_dir / "config.json").exists():
        from cluster.model.presets import make_model

        print(f"making the tiny model in {model_dir} ...", file=sys.stderr)
        make_model("tiny", model_dir)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    import uvicorn

    from cluster.model.arch import ModelArchConfig
    from cluster.model.tokenizer import Tokenizer
    from cluster.router.dispatch import ModelPool
    from cluster.router.http import create_app
    from cluster.worker.actor import start_worker_actor

    ray.init(include_dashboard=False, object_store_memory=100 * 2**20, log_to_driver=False)
    try:
        # Keep the handles: Ray ends an unnamed actor once no handle to it is left.
        actors = [start_worker_actor(role, model_dir, config, num_cpus=0.5) for role in ("prefill", "decode")]
        name = model_dir.name
        arch = ModelArchConfig.from_dir(model_dir)
        pool = ModelPool(name, Tokenizer.from_dir(model_dir), config.max_model_len or arch.max_position_embeddings,
                         prefill=[actors[0][1]], decode=[actors[1][1]])
        server = uvicorn.Server(uvicorn.Config(create_app({name: pool}), host=host, port=port, log_level="warning"))
        base = f"http://{host}:{port}"
        if once:
            return _once(server, base, name)
        asyncio.run(_serve(server, {name: pool}, host, grpc_port))
        return 0
    finally:
        ray.shutdown()


async def _serve(server, pools: dict, host: str, grpc_port: int) -> None:
    """HTTP and gRPC on one event loop until Ctrl-C / SIGTERM (uvicorn catches both and returns)."""
    from cluster.router.grpc_api import serve_grpc

    grpc_server, bound = await serve_grpc(pools, host, grpc_port)
    model = next(iter(pools))
    print(_how_to_call(f"http://{host}:{server.config.port}", model, f"{host}:{bound}"), file=sys.stderr)
    try:
        await server.serve()
    finally:
        await grpc_server.stop(1.0)


def _once(server, base: str, model: str) -> int:
    import httpx

    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        response = httpx.post(f"{base}/v1/chat/completions", timeout=60, json={
            "model": model, "max_tokens": 16, "temperature": 0,
            "messages": [{"role": "user", "content": "Why split prefill from decode?"}]})
        print(json.dumps(response.json(), ensure_ascii=False))
        return 0 if response.status_code == 200 else 1
    finally:
        server.should_exit = True
        thread.join(10)


def _how_to_call(base: str, model: str, grpc_address: str) -> str:
    return f"""pdserve is up at {base} serving {model!r} (prefill -> decode over gRPC, on Ray). Ctrl-C stops it.
The gRPC API (protos/pdserve/v1/serving.proto, with health checking and reflection) is on {grpc_address}.

  curl {base}/v1/chat/completions -H 'content-type: application/json' \\
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello"}}], "max_tokens": 32}}'

  from openai import OpenAI
  client = OpenAI(base_url="{base}/v1", api_key="unused")
  print(client.chat.completions.create(model="{model}", messages=[{{"role": "user", "content": "Hello"}}]))
"""
