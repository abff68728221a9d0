"""Autoscaling under a load step: how long until a new replica serves, the queue depth over time, requests lost.

    python -m loadtest.autoscale_bench [--low-rate 4 --high-rate 24 --low-s 10 --high-s 30]
                                       [--plot out/autoscale_queue_depth.png] [--json out/a.json] [--write BENCHMARKS.md]

The cluster: an embedded Redis, local Ray, the autoscaler's controller with the Ray actuator, simulated
workers as Ray actors (cluster/autoscale/sim_worker.py: no model, a capacity, a queue) — one prefill
replica (fixed) and a decode pool of 1..4 replicas of 8 streams each — and the router in this process.
Open-loop arrivals at a constant rate: `--low-rate` for `--low-s` seconds, then the step to
`--high-rate` for `--high-s`, then none; each request is a short prompt and `--max-tokens` tokens at
`--itl-ms` (a 1 s stream by default), so the decode pool is the bottleneck. The policy's delays are
seconds (upscale 1 s, downscale 5 s), not Ray Serve's default minutes, to keep the run short.

Measured: load step → the leader's first upscale decision → the first request routed to a new decode
replica (what a client feels); queue depth (router admission queues + requests waiting inside the
decode workers) and replica counts every 0.1 s (the plot); TTFT percentiles before the step, during
the scale-up, and once the pool has grown; requests sent / completed / failed (lost must be 0); and
the time until the pool is back to one replica after the load stops.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from loadtest.report import write_section

MODEL = "benchsim"
VOCAB = 2048
POLICY = {
    "leader_lock_ttl_s": 5.0,
    "pools": [
        {"model": MODEL, "pool": "prefill", "min_replicas": 1, "max_replicas": 1},
        {"model": MODEL, "pool": "decode", "min_replicas": 1, "max_replicas": 4, "target_queue_depth": 2,
         "upscale_delay_s": 1.0, "downscale_delay_s": 5.0, "decision_interval_s": 0.25},
    ],
}


@dataclass
class Request:
    sent_at: float
    ttft: float | None = None
    is_ok: bool = False
    error: str | None = None


@dataclass
class Run:
    requests: list[Request] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    t0_wall: float = 0.0  # time.time() at the run's start: events carry wall-clock times
    step_at: float = 0.0  # seconds from the start
    stop_at: float = 0.0


async def _request(router, run: Run, index: int, t0: float, args) -> None:
    from cluster.request import SamplingParams
    from cluster.router.textgen import text_events

    r = Request(time.monotonic() - t0)
    run.requests.append(r)
    prompt = [(index * 13 + i) % (VOCAB - 1) + 1 for i in range(args.prompt_len)]
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    n = 0
    try:
        route = router.resolve(MODEL, prompt=prompt, max_tokens=args.max_tokens)
        async for _, ids, _, _ in text_events(route, f"b{index}", route.prompt_ids, params):
            if ids and r.ttft is None:
                r.ttft = time.monotonic() - t0 - r.sent_at
            n += len(ids)
        r.is_ok = n == args.max_tokens
        r.error = None if r.is_ok else f"{n} tokens"
    except Exception as exc:  # noqa: BLE001 - a lost request is the figure this bench exists for
        r.error = repr(exc)


async def _sample(store, run: Run, t0: float, stop: asyncio.Event) -> None:
    from cluster.autoscale.events import read_desired
    from cluster.metrics import REGISTRY

    def one() -> dict:
        workers = store.list_workers(MODEL, "decode")
        loads = store.get_loads([w.worker_id for w in workers])
        routed = {w.worker_id: REGISTRY.get_sample_value("pdserve:requests_routed_total",
                                                          {"model": MODEL, "pool": "decode", "worker": w.worker_id}) or 0
                  for w in workers}
        return {"t": time.monotonic() - t0, "router_queue": store.queue_depth(MODEL, "decode"),
                "worker_waiting": sum(lo.num_waiting for lo in loads.values()),
                "running": sum(lo.num_running for lo in loads.values()), "replicas": len(workers),
                "desired": read_desired(store).get((MODEL, "decode"), {}).get("desired"), "routed": routed}

    while not stop.is_set():
        run.samples.append(await asyncio.to_thread(one))
        await asyncio.sleep(0.1)


async def _drive(router, store, args) -> Run:
    run, t0 = Run(t0_wall=time.time()), time.monotonic()
    stop = asyncio.Event()
    sampler = asyncio.create_task(_sample(store, run, t0, stop))
    tasks: list[asyncio.Task] = []
    for phase, (rate, seconds) in enumerate(((args.low_rate, args.low_s), (args.high_rate, args.high_s))):
        begin = time.monotonic()
        if phase == 1:
            run.step_at = begin - t0
        for k in range(int(rate * seconds)):  # constant spacing: the step is a step, not noise
            await asyncio.sleep(max(0.0, begin + k / rate - time.monotonic()))
            tasks.append(asyncio.create_task(_request(router, run, len(tasks), t0, args)))
    run.stop_at = time.monotonic() - t0
    await asyncio.gather(*tasks)
    deadline = time.monotonic() + args.tail_s
    while time.monotonic() < deadline and (not run.samples or run.samples[-1]["replicas"] != 1):
        await asyncio.sleep(0.2)
    await asyncio.sleep(0.5)
    stop.set()
    await sampler
    return run


def figures(run: Run, store) -> dict:
    from cluster.autoscale.events import read_events

    samples, step = run.samples, run.step_at
    first = set(samples[0]["routed"]) if samples else set()
    serving_at = next((s["t"] for s in samples if s["t"] >= step
                       and any(n > 0 for w, n in s["routed"].items() if w not in first)), None)
    grown_at = next((s["t"] for s in samples if s["t"] >= step and s["replicas"] > 1), None)
    ups = sorted(e.at - run.t0_wall for e in read_events(store, 1000, MODEL, "decode")
                 if e.direction == "up" and e.at - run.t0_wall >= step)
    shrunk_at = next((s["t"] for s in samples if s["t"] >= run.stop_at and s["replicas"] == 1), None)
    ok = [r for r in run.requests if r.is_ok]

    def pct(values: list[float], q: float) -> float | None:
        values = sorted(values)
        return values[min(len(values) - 1, int(q * len(values)))] if values else None

    def ttfts(lo: float, hi: float) -> list[float]:
        return [r.ttft for r in ok if r.ttft is not None and lo <= r.sent_at < hi]

    settled = serving_at if serving_at is not None else run.stop_at
    windows = {"before the step": (0, step), "step → new replica serving": (step, settled),
               "after it serves": (settled, run.stop_at)}
    return {
        "load_average_1m": round(os.getloadavg()[0], 1),
        "requests_sent": len(run.requests), "requests_completed": len(ok),
        "requests_failed": len(run.requests) - len(ok),
        "errors": sorted({r.error for r in run.requests if r.error})[:5],
        "step_to_decision_s": ups[0] - step if ups else None,
        "step_to_new_replica_registered_s": grown_at - step if grown_at is not None else None,
        "step_to_new_replica_serving_s": serving_at - step if serving_at is not None else None,
        "peak_queue_depth": max((s["router_queue"] + s["worker_waiting"] for s in samples), default=0),
        "peak_replicas": max((s["replicas"] for s in samples), default=0),
        "load_end_to_one_replica_s": shrunk_at - run.stop_at if shrunk_at is not None else None,
        "ttft_ms": {name: {"p50": _ms(pct(ttfts(*w), 0.5)), "p95": _ms(pct(ttfts(*w), 0.95)), "n": len(ttfts(*w))}
                    for name, w in windows.items()},
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 1)


def plot(run: Run, path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t"] for s in run.samples]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(8, 5.5), height_ratios=(3, 2))
    top.plot(t, [s["router_queue"] + s["worker_waiting"] for s in run.samples], label="queue depth (router + workers)")
    top.plot(t, [s["running"] for s in run.samples], label="running", alpha=0.6)
    top.set_ylabel("requests")
    top.legend(loc="upper right")
    bottom.step(t, [s["replicas"] for s in run.samples], where="post", label="decode replicas serving")
    bottom.step(t, [s["desired"] if s["desired"] is not None else float("nan") for s in run.samples], where="post",
                linestyle="--", label="desired")
    bottom.set_ylabel("replicas")
    bottom.set_xlabel("seconds")
    bottom.legend(loc="upper right")
    for ax in (top, bottom):
        ax.axvline(run.step_at, color="grey", linewidth=0.8)
        ax.axvline(run.stop_at, color="grey", linewidth=0.8, linestyle=":")
    top.set_title(f"Load step {args.low_rate:g} → {args.high_rate:g} req/s at t={run.step_at:.0f} s, "
                  f"stopped at t={run.stop_at:.0f} s")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def render(f: dict, args, plot_path: Path) -> str:
    def s(v) -> str:
        return "—" if v is None else f"{v:.1f} s"

    rows = "\n".join(f"| {name} | {v['n']} | {v['p50']} | {v['p95']} |" for name, v in f["ttft_ms"].items())
    return f"""`python -m loadtest.autoscale_bench --low-rate {args.low_rate:g} --high-rate {args.high_rate:g} \
--low-s {args.low_s:g} --high-s {args.high_s:g}` on {os.cpu_count()} cores (1-minute load average
{f['load_average_1m']} at the end: the machine is shared): simulated workers as Ray actors (one
prefill replica; decode pool 1–4 replicas × 8 streams), the controller with the Ray actuator, upscale delay 1 s,
downscale delay 5 s, decisions every 0.25 s; each request {args.prompt_len} prompt tokens → {args.max_tokens} tokens at
{args.itl_ms:g} ms.

| load step → … | seconds |
|---|---|
| the leader decides to scale up | {s(f['step_to_decision_s'])} |
| the new replica is registered | {s(f['step_to_new_replica_registered_s'])} |
| the new replica serves its first request | {s(f['step_to_new_replica_serving_s'])} |
| (after the load stops) back to one replica | {s(f['load_end_to_one_replica_s'])} |

Requests sent {f['requests_sent']}, completed {f['requests_completed']}, **lost {f['requests_failed']}**. Peak queue
depth {f['peak_queue_depth']}, peak decode replicas {f['peak_replicas']}.

| TTFT window | requests | P50 ms | P95 ms |
|---|---|---|---|
{rows}

![queue depth and replicas over time]({plot_path.as_posix()})"""


async def _main(args, tokenizer_dir: Path) -> tuple[Run, dict]:
    import ray

    from cluster.autoscale.controller import Controller
    from cluster.autoscale.policy import AutoscalePolicy
    from cluster.autoscale.ray_actuator import RayActuator
    from cluster.autoscale.replicas import simulated_factory
    from cluster.local_ray import start_local_ray
    from cluster.model.tokenizer import Tokenizer
    from cluster.router.core import Router
    from cluster.router.dispatch import ModelPool
    from cluster.state import StateStore, start_embedded_redis

    with tempfile.TemporaryDirectory() as tmp:
        server = start_embedded_redis(Path(tmp) / "redis")
        start_local_ray(configure_logging=False)
        store = StateStore.from_url(server.url)
        decode_sim = {"ttft_s": 0.02, "itl_s": args.itl_ms / 1e3, "vocab_size": VOCAB}
        prefill_sim = {"ttft_s": 0.01, "prefill_s_per_token": 0.0001, "vocab_size": VOCAB}
        actuator = RayActuator({
            (MODEL, "prefill"): simulated_factory(MODEL, "prefill", prefill_sim, 4, redis_url=server.url),
            (MODEL, "decode"): simulated_factory(MODEL, "decode", decode_sim, 8, redis_url=server.url),
        }, store=store, poll_s=0.1)
        controller = Controller(store, actuator, AutoscalePolicy.from_dict(POLICY)).start()
        router = None
        try:
            while len(store.list_workers(MODEL)) < 2:
                await asyncio.sleep(0.1)
            pool = ModelPool(MODEL, Tokenizer.from_dir(tokenizer_dir), 4096)
            router = Router.from_config({MODEL: pool}, {"poll_interval_s": 0.1}, redis_url=server.url)
            await router.start()
            run = await _drive(router, store, args)
            return run, figures(run, store)
        finally:
            if router is not None:
                await router.close()
            controller.stop()
            actuator.close()
            store.close()
            ray.shutdown()
            server.close()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--low-rate", type=float, default=4.0, help="requests/s before the step")
    parser.add_argument("--high-rate", type=float, default=24.0, help="requests/s after it")
    parser.add_argument("--low-s", type=float, default=10.0)
    parser.add_argument("--high-s", type=float, default=30.0)
    parser.add_argument("--tail-s", type=float, default=40.0, help="at most this long for the pool to shrink after")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=50)
    parser.add_argument("--itl-ms", type=float, default=20.0)
    parser.add_argument("--model", type=Path, help="checkpoint dir for the tokenizer (default: tiny, made in a temp dir)")
    parser.add_argument("--plot", type=Path, default=Path("out/autoscale_queue_depth.png"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--write", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            from cluster.model.presets import make_model

            model_dir = make_model("tiny", Path(tmp) / "tiny")
        run, f = asyncio.run(_main(args, model_dir))
    plot(run, args.plot, args)
    body = render(f, args, args.plot)
    print(body)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"figures": f, "samples": run.samples}, indent=2))
    if args.write:
        write_section(args.write, "autoscaling", "Autoscaling (simulated workers, load step)", body)
    return f


if __name__ == "__main__":
    main()
