"""The SSE chunk encoder (cluster/router/sse.py) writes exactly what json.dumps of the chunk would."""

from __future__ import annotations

import json

import pytest

from cluster.router.sse import ChunkEncoder

DELTAS = ["", "hello", ' a "quoted" \\ back\\slash', "tab\tnew\nline\r\x00\x1f", "héllo wörld ✓ 漢字 🎉",
          "\ufffd", "\u2028\u2029", "</script>"]


def expected(request_id: str, model: str, created: int, is_chat: bool, index: int, delta: str) -> str:
    if is_chat:
        choice = {"index": index, "delta": {"content": delta}, "logprobs": None, "finish_reason": None}
    else:
        choice = {"index": index, "text": delta, "logprobs": None, "finish_reason": None}
    chunk = {"id": request_id, "object": "chat.completion.chunk" if is_chat else "text_completion",
             "created": created, "model": model, "choices": [choice]}
    return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"


@pytest.mark.parametrize("is_chat", [False, True])
@pytest.mark.parametrize("delta", DELTAS)
def test_lines_equal_json_dumps_of_the_chunk(is_chat, delta):
    model = 'odd "model" ñame'
    encoder = ChunkEncoder("cmpl-123", model, 1795454666, is_chat)
    for index in (0, 3):
        line = encoder.text(delta, index)
        assert line == expected("cmpl-123", model, 1795454666, is_chat, index, delta)
        assert json.loads(line[len("data: "):])["choices"][0]["delta" if is_chat else "text"] == (
            {"content": delta} if is_chat else delta)
