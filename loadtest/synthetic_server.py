"""A synthetic OpenAI-compatible server with known timings: the benchmark's own yardstick.

    python -m loadtest.synthetic_server --ttft-ms 50 --itl-ms 10 [--port 8100]   # prints READY host:port

It answers /v1/completions and /v1/chat/completions (streamed as SSE, or whole) and /v1/models. A
request's token i is written at `ttft + i·itl` after the request was read — a fixed schedule from its
arrival, so sleeps that overshoot do not add up — `tokens_per_chunk` tokens to a chunk (a chunk goes
out when its last token is due). Chat streams start with a role chunk at once, before any token, as
some servers send it: a client that counts it as the first token gets TTFT wrong. The usage chunk
(when asked and `include_usage`) counts the prompt as the number of token ids, else of words; every
`fail_every`-th request gets 429 with Retry-After. Each request's path, body and authorization header
are kept in `requests` (and served at GET /synthetic/requests), so a test can see what the client sent.
Run it as its own process when timings matter: in a thread beside the client, the two share the GIL
and each waits up to its 5 ms switch interval for the other, bunching chunks.

Raw asyncio HTTP/1.1 with keep-alive: no framework between the schedule and the socket.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any


@dataclass
class SyntheticConfig:
    ttft_s: float = 0.05
    itl_s: float = 0.01
    tokens_per_chunk: int = 1
    include_usage: bool = True  # send the usage chunk when the client asks for it
    fail_every: int = 0  # every n-th completion request gets 429 (0: never)
    accepts_token_ids: bool = True  # completions: a prompt of token ids (else 400, as text-only servers)
    model: str = "synthetic"

    def __post_init__(self) -> None:
        for name in ("ttft_s", "itl_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.tokens_per_chunk < 1:
            raise ValueError(f"tokens_per_chunk must be >= 1, got {self.tokens_per_chunk}")
        if self.fail_every < 0:
            raise ValueError(f"fail_every must be >= 0, got {self.fail_every}")


def token_text(i: int) -> str:
    return f"w{i} "


class SyntheticServer:
    def __init__(self, config: SyntheticConfig) -> None:
        self.config = config
        self.requests: list[dict[str, Any]] = []  # what clients sent, in arrival order
        self.num_completions = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task] = set()  # one per open connection, ended by stop()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._server = await asyncio.start_server(self._connection, host, port)
        return self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._handlers):  # idle keep-alive connections would outlive the server
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await self._server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._handlers.add(task)
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                method, path = line.decode("latin-1").split(" ")[:2]
                headers = {}
                while (header := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = header.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                await self._respond(method, path, headers, body, writer, time.perf_counter())
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the client went away, or the server stops
        finally:
            writer.close()
            self._handlers.discard(task)

    async def _respond(self, method: str, path: str, headers: dict[str, str], raw: bytes,
                       writer: asyncio.StreamWriter, received: float) -> None:
        c = self.config
        if method == "GET" and path.rstrip("/") == "/v1/models":
            return await _json(writer, 200, {"object": "list", "data": [{"id": c.model, "object": "model"}]})
        if method == "GET" and path == "/synthetic/requests":  # what clients sent, for a test in another process
            return await _json(writer, 200, {"requests": self.requests})
        if method != "POST" or path not in ("/v1/completions", "/v1/chat/completions"):
            return await _json(writer, 404, {"error": {"message": f"no route {path}", "type": "not_found_error"}})
        body = json.loads(raw or b"{}")
        self.requests.append({"path": path, "body": body, "authorization": headers.get("authorization")})
        self.num_completions += 1
        if c.fail_every and self.num_completions % c.fail_every == 0:
            return await _json(writer, 429, {"error": {"message": "synthetic overload", "type": "rate_limit_error"}},
                               {"retry-after": "1"})
        is_chat = path.endswith("chat/completions")
        prompt = body.get("prompt")
        if isinstance(prompt, list) and not c.accepts_token_ids:
            return await _json(writer, 400, {"error": {"message": "prompt must be a string", "type": "invalid_request_error"}})
        if is_chat:
            num_prompt = sum(len(m["content"].split()) for m in body.get("messages", []))
        else:
            num_prompt = len(prompt) if isinstance(prompt, list) else len(str(prompt).split())
        n = int(body.get("max_tokens") or 16)
        usage = {"prompt_tokens": num_prompt, "completion_tokens": n, "total_tokens": num_prompt + n}
        kind = "chat.completion" if is_chat else "text_completion"
        if not body.get("stream"):
            await asyncio.sleep(max(0.0, received + c.ttft_s + (n - 1) * c.itl_s - time.perf_counter()))
            text = "".join(token_text(i) for i in range(n))
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
                      if is_chat else {"index": 0, "text": text, "finish_reason": "length"})
            return await _json(writer, 200, {"id": "syn", "object": kind, "model": c.model, "choices": [choice],
                                             "usage": usage})
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        head = {"id": f"syn-{self.num_completions}", "object": kind + (".chunk" if is_chat else ""), "model": c.model}

        async def event(data: dict | str) -> None:
            payload = f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()
            writer.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")
            await writer.drain()

        def choice(text: str, finish: str | None) -> dict:
            if is_chat:
                return {**head, "choices": [{"index": 0, "delta": {"content": text} if text else {},
                                             "finish_reason": finish}]}
            return {**head, "choices": [{"index": 0, "text": text, "finish_reason": finish}]}

        if is_chat:
            await event({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                              "finish_reason": None}]})
        for first in range(0, n, c.tokens_per_chunk):
            last = min(first + c.tokens_per_chunk, n) - 1
            await asyncio.sleep(max(0.0, received + c.ttft_s + last * c.itl_s - time.perf_counter()))
            await event(choice("".join(token_text(i) for i in range(first, last + 1)), None))
        await event(choice("", "length"))
        if c.include_usage and (body.get("stream_options") or {}).get("include_usage"):
            await event({**head, "choices": [], "usage": usage})
        await event("[DONE]")
        writer.write(b"0\r\n\r\n")
        await writer.drain()


async def _json(writer: asyncio.StreamWriter, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    data = json.dumps(body).encode()
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 429: "Too Many Requests"}[status]
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    writer.write(f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(data)}\r\n"
                 f"{extra}\r\n".encode() + data)
    await writer.drain()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.synthetic_server", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--ttft-ms", type=float, default=50.0)
    p.add_argument("--itl-ms", type=float, default=10.0)
    p.add_argument("--tokens-per-chunk", type=int, default=1)
    p.add_argument("--fail-every", type=int, default=0, help="every n-th request gets 429")
    p.add_argument("--no-usage", dest="include_usage", action="store_false", help="never send a usage chunk")
    p.add_argument("--text-only", dest="accepts_token_ids", action="store_false",
                   help="refuse token-id prompts with 400, as text-only servers do")
    p.add_argument("--model", default="synthetic")
    args = p.parse_args(argv)
    server = SyntheticServer(SyntheticConfig(ttft_s=args.ttft_ms / 1e3, itl_s=args.itl_ms / 1e3,
                                             tokens_per_chunk=args.tokens_per_chunk, fail_every=args.fail_every,
                                             include_usage=args.include_usage,
                                             accepts_token_ids=args.accepts_token_ids, model=args.model))

    async def serve() -> None:
        port = await server.start(args.host, args.port)
        print(f"READY {args.host}:{port}", flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
