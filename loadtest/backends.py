"""The APIs a run can drive, each filling a RequestRecord (loadtest/record.py) from one streamed request.

- `openai` / `openai-chat`: any OpenAI-compatible server's /v1/completions or /v1/chat/completions,
  streamed (SSE) with `stream_options.include_usage`, over one pooled httpx client (keep-alive
  connections, no cap on their number: the arrival process, not the pool, sets the concurrency).
  Each `data:` line is stamped as it is read. A chunk whose choice carries text (chat: delta content
  or reasoning content) is an output chunk; the completion ends at the last chunk with a choice; the
  usage chunk gives the server's token counts. vLLM's extras `ignore_eos` (on by default, so output
  lengths are what the workload asked) and anything in `extra_body` ride along in the body.
- `grpc` / `grpc-chat`: pdserve's Serving.Generate stream (protos/pdserve/v1/serving.proto), with
  token ids per message, so output tokens are counted exactly even without usage.

Failures are raised and named by `error_type`: http_<status>, stream_<type> (an error object inside a
stream that had started), grpc_<CODE>, timeout, connect_error, connection_closed, empty_response.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx

from cluster.protogen import ensure_generated
from loadtest.record import RequestRecord
from loadtest.sessions import Input
from loadtest.workload import RequestSpec

ensure_generated()
from pdserve.v1 import serving_pb2 as spb  # noqa: E402
from pdserve.v1 import serving_pb2_grpc as spb_grpc  # noqa: E402

KINDS = ("openai", "openai-chat", "grpc", "grpc-chat")


class RequestError(Exception):
    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind, self.detail = kind, detail


def error_type(exc: BaseException) -> str:
    if isinstance(exc, RequestError):
        return exc.kind
    if isinstance(exc, TimeoutError | httpx.TimeoutException):
        return "timeout"
    if isinstance(exc, httpx.ConnectError):
        return "connect_error"
    if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError):
        return "connection_closed"
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"grpc_{exc.code().name}"
    if isinstance(exc, json.JSONDecodeError):
        return "bad_chunk"
    return type(exc).__name__


def error_message(exc: BaseException) -> str:
    if isinstance(exc, RequestError):
        return exc.detail
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.details() or ""
    return str(exc)


@dataclass
class BackendConfig:
    kind: str = "openai"
    base_url: str = "http://127.0.0.1:8000"
    endpoint: str | None = None  # default: /v1/completions or /v1/chat/completions
    grpc_target: str = "127.0.0.1:50051"
    model: str | None = None
    api_key: str | None = field(default=None, repr=False)
    use_token_ids: bool = False  # completions / gRPC: send the tokenizer's ids rather than text
    ignore_eos: bool = True
    temperature: float = 0.0
    extra_body: dict[str, Any] = field(default_factory=dict)
    timeout_s: float = 600.0  # one request, first byte to last

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"backend must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout must be > 0, got {self.timeout_s}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")
        if self.endpoint is None:
            self.endpoint = "/v1/chat/completions" if self.kind == "openai-chat" else "/v1/completions"
        if not self.endpoint.startswith("/"):
            raise ValueError(f"endpoint must be a path starting with /, got {self.endpoint!r}")

    @property
    def is_chat(self) -> bool:
        return self.kind.endswith("chat")

    @property
    def url(self) -> str:
        base = self.base_url.rstrip("/")
        if base.endswith("/v1") and self.endpoint.startswith("/v1/"):
            base = base[:-3]  # --base-url http://host/v1 works as the openai client's base does
        return base + self.endpoint


def _finish(record: RequestRecord, pieces: list[str], usage: dict | None, num_ids: int | None) -> None:
    if not record.chunk_times:
        raise RequestError("empty_response", "the stream ended without any output")
    record.output_text = "".join(pieces)
    if usage and usage.get("completion_tokens") is not None:
        record.num_output_tokens, record.output_tokens_from = int(usage["completion_tokens"]), "usage"
    elif num_ids is not None:
        record.num_output_tokens, record.output_tokens_from = num_ids, "tokens"
    else:
        record.num_output_tokens, record.output_tokens_from = len(record.chunk_times), "chunks"
    if usage and usage.get("prompt_tokens") is not None:
        record.num_input_tokens = int(usage["prompt_tokens"])


class OpenAIBackend:
    def __init__(self, config: BackendConfig) -> None:
        self.config = config
        headers = {"authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        self.client = httpx.AsyncClient(
            headers=headers, timeout=httpx.Timeout(config.timeout_s, connect=30.0, pool=None),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))

    async def close(self) -> None:
        await self.client.aclose()

    def payload(self, inp: Input, spec: RequestSpec) -> dict[str, Any]:
        c = self.config
        body: dict[str, Any] = {"model": c.model, "max_tokens": spec.max_tokens, "temperature": c.temperature,
                                "stream": True, "stream_options": {"include_usage": True}}
        if c.ignore_eos:
            body["ignore_eos"] = True
        if c.is_chat:
            body["messages"] = inp.messages
        else:
            body["prompt"] = inp.ids if c.use_token_ids and inp.ids is not None else inp.text
        body.update(c.extra_body)
        return body

    async def send(self, inp: Input, spec: RequestSpec, record: RequestRecord, run_start: float) -> None:
        body = self.payload(inp, spec)
        pieces: list[str] = []
        usage = None
        sent = time.perf_counter()
        record.start = sent - run_start
        async with self.client.stream("POST", self.config.url, json=body) as response:
            if response.status_code != 200:
                raise RequestError(f"http_{response.status_code}", _error_message(await response.aread()))
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                now = time.perf_counter() - sent
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    error = event["error"] if isinstance(event["error"], dict) else {"message": str(event["error"])}
                    raise RequestError(f"stream_{error.get('type') or 'error'}", str(error.get("message", "")))
                if event.get("usage"):
                    usage = event["usage"]
                choices = event.get("choices")
                if not choices:
                    continue
                choice = choices[0]
                if self.config.is_chat:
                    delta = choice.get("delta") or {}
                    text = delta.get("content") or delta.get("reasoning_content")
                else:
                    text = choice.get("text")
                if text:
                    record.chunk_times.append(now)
                    pieces.append(text)
                record.end = now
                record.finish_reason = choice.get("finish_reason") or record.finish_reason
        _finish(record, pieces, usage, None)

    async def accepts_token_ids(self, ids: list[int]) -> bool:
        """Whether the completions endpoint takes a prompt of token ids (vLLM and pdserve do; many
        others want text). Anything but a clear yes or no (a server that cannot be reached) raises."""
        body = {"model": self.config.model, "prompt": ids, "max_tokens": 1, "temperature": 0}
        response = await self.client.post(self.config.url, json=body)
        if response.status_code == 200:
            return True
        if response.status_code in (400, 422):
            return False
        raise RequestError(f"http_{response.status_code}", _error_message(response.content))

    async def first_model(self) -> str:
        """The first model the server lists (GET /v1/models), for a run that names none."""
        base = self.config.base_url.rstrip("/")
        response = await self.client.get(base + ("/models" if base.endswith("/v1") else "/v1/models"))
        if response.status_code != 200:
            raise RequestError(f"http_{response.status_code}", _error_message(response.content))
        models = response.json().get("data") or []
        if not models:
            raise RequestError("no_model", "the server lists no models")
        return models[0]["id"]


class GrpcBackend:
    def __init__(self, config: BackendConfig) -> None:
        self.config = config
        self.channel = grpc.aio.insecure_channel(config.grpc_target)
        self.stub = spb_grpc.ServingStub(self.channel)
        self.metadata = (("authorization", f"Bearer {config.api_key}"),) if config.api_key else ()

    async def close(self) -> None:
        await self.channel.close()

    def request(self, inp: Input, spec: RequestSpec) -> spb.GenerateRequest:
        c = self.config
        sampling = spb.GenerateSampling(max_tokens=spec.max_tokens, temperature=c.temperature, ignore_eos=c.ignore_eos)
        if c.is_chat:
            messages = [spb.ChatMessage(role=m["role"], content=m["content"]) for m in inp.messages]
            return spb.GenerateRequest(model=c.model, messages=messages, sampling=sampling)
        if c.use_token_ids and inp.ids is not None:
            return spb.GenerateRequest(model=c.model, prompt_token_ids=inp.ids, sampling=sampling)
        return spb.GenerateRequest(model=c.model, prompt=inp.text, sampling=sampling)

    async def send(self, inp: Input, spec: RequestSpec, record: RequestRecord, run_start: float) -> None:
        request = self.request(inp, spec)
        pieces: list[str] = []
        usage = None
        sent = time.perf_counter()
        record.start = sent - run_start
        call = self.stub.Generate(request, metadata=self.metadata, timeout=self.config.timeout_s)
        try:
            async for message in call:
                now = time.perf_counter() - sent
                if message.token_ids:
                    record.chunk_times.append(now)
                    record.chunk_tokens.append(len(message.token_ids))
                    pieces.append(message.text)
                record.end = now
                record.finish_reason = message.finish_reason or record.finish_reason
                if message.HasField("usage"):
                    usage = {"prompt_tokens": message.usage.prompt_tokens,
                             "completion_tokens": message.usage.completion_tokens}
        finally:
            call.cancel()  # a cut or failed request frees its server-side stream at once
        _finish(record, pieces, usage, sum(record.chunk_tokens))

    async def first_model(self) -> str:
        response = await self.stub.Models(spb.ModelsRequest(), metadata=self.metadata, timeout=30)
        if not response.models:
            raise RequestError("no_model", "the server lists no models")
        return response.models[0].id


def make_backend(config: BackendConfig) -> OpenAIBackend | GrpcBackend:
    return GrpcBackend(config) if config.kind.startswith("grpc") else OpenAIBackend(config)


def _error_message(body: bytes) -> str:
    """The message of an OpenAI-shaped error body, else the body's start."""
    try:
        error = json.loads(body).get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[:300]
    except (ValueError, AttributeError):
        pass
    return body[:300].decode(errors="replace")
