"""IncrementalDetokenizer on a tiny byte-level BPE trained here: UTF-8 safe streaming and stop strings."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from cluster.engine.detokenizer import IncrementalDetokenizer

REPLACEMENT = "\ufffd"
CORPUS = [
    "héllo wörld 日本語 🙂",
    "hello world, hello there",
    "the quick brown fox jumps over the lazy dog",
    "日本語 is Japanese 🙂🙂",
]
# includes characters the trainer never saw, so their UTF-8 bytes are split over several tokens
TEXTS = [
    "héllo wörld 日本語 🙂",
    "the quick brown fox said 中文 ok 🚀🚀 naïve café",
    "ünïcödé 🙂 everywhere 日本 end",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator(CORPUS * 5, trainer)
    return t


class CountingDecoder:
    """Wraps a tokenizer and records how many ids each decode call saw."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self.sizes: list[int] = []

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.sizes.append(len(ids))
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


def _stream(detok: IncrementalDetokenizer, ids: list[int], chunk: int = 1) -> list[str]:
    return [detok.update(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]


def test_tokenizer_really_splits_characters(tok: Tokenizer):
    ids = tok.encode(TEXTS[1]).ids
    assert any(REPLACEMENT in tok.decode([i]) for i in ids)  # otherwise the UTF-8 tests prove nothing


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunk", [1, 2, 3])
@pytest.mark.parametrize("stop", [[], ["never appears"]])
def test_stream_concatenates_to_full_decode(tok: Tokenizer, text: str, chunk: int, stop: list[str]):
    prompt = tok.encode("hello world, ").ids
    ids = tok.encode(text).ids
    detok = IncrementalDetokenizer(tok, prompt, stop)
    deltas = _stream(detok, ids, chunk)
    assert all(REPLACEMENT not in d for d in deltas)
    assert "".join(deltas) == detok.output_text
    tail = detok.finish()
    assert "".join(deltas) + tail == tok.decode(ids) == text
    assert detok.output_text == text
    assert detok.stop_string_hit is None
    if not stop:
        assert tail == ""  # valid text ends on a character boundary: nothing was held back


def test_never_redecodes_the_whole_output(tok: Tokenizer):
    counter = CountingDecoder(tok)
    ids = tok.encode(" ".join(TEXTS * 4)).ids
    detok = IncrementalDetokenizer(counter, tok.encode("a prompt of some length here").ids, [])
    _stream(detok, ids)
    assert len(ids) > 100
    assert max(counter.sizes) <= 10  # a small window: context plus the tokens of one split character


class MetaspaceLike:
    """A SentencePiece-style decoder: pieces carry their leading space as "▁", stripped at the text start."""

    pieces = ["▁hello", "▁world", "!", "▁again"]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(self.pieces[i] for i in ids).replace("▁", " ").removeprefix(" ")


def test_prompt_context_keeps_the_leading_space():
    detok = IncrementalDetokenizer(MetaspaceLike(), [0], [])
    assert [detok.update([i]) for i in (1, 2, 3)] == [" world", "!", " again"]
    # without a prompt there is no context, and the text starts like a full decode would
    detok = IncrementalDetokenizer(MetaspaceLike(), [], [])
    assert [detok.update([i]) for i in (1, 2, 3)] == ["world", "!", " again"]


def _boundary_stops(tok: Tokenizer, text: str) -> list[str]:
    """Substrings of `text` that start in one token and end in a later one."""
    enc = tok.encode(text)
    ends = sorted({e for _, e in enc.offsets})
    stops = []
    for boundary in ends[1:-1]:
        for before in (1, 2):
            for after in (1, 3):
                s = text[max(0, boundary - before): boundary + after]
                if len(s) > 1 and s.strip():
                    stops.append(s)
    return stops


@pytest.mark.parametrize("text", ["the quick brown fox jumps over the lazy dog", TEXTS[1], TEXTS[2]])
def test_stop_strings_across_token_boundaries(tok: Tokenizer, text: str):
    ids = tok.encode(text).ids
    stops = _boundary_stops(tok, text)
    assert len(stops) > 5
    for stop in stops:
        expected = text[: text.find(stop)]
        detok = IncrementalDetokenizer(tok, [], [stop])
        emitted = ""
        for i in range(len(ids)):
            d = detok.update(ids[i:i + 1])
            emitted += d
            assert REPLACEMENT not in d
            # never anything beyond the cut, so never even part of the stop string
            assert expected.startswith(emitted), (stop, i, emitted)
            if detok.stop_string_hit is not None:
                assert emitted == expected
        assert detok.stop_string_hit == stop
        assert detok.output_text == emitted == expected
        assert detok.update(ids[:1]) == "" and detok.finish() == ""  # nothing after the stop


def test_partial_stop_is_held_then_released_by_finish(tok: Tokenizer):
    detok = IncrementalDetokenizer(tok, [], ["world peace"])
    deltas = _stream(detok, tok.encode("hello world").ids)
    assert "".join(deltas) == "hello "  # "world" could still become "world peace"
    assert detok.finish() == "world"
    assert detok.output_text == "hello world"
    assert detok.stop_string_hit is None


def test_held_text_is_released_once_it_cannot_match(tok: Tokenizer):
    detok = IncrementalDetokenizer(tok, [], ["fox!"])
    out = "".join(_stream(detok, tok.encode("the quick brown fox jumps").ids))
    assert out == "the quick brown fox jumps"  # "fox" was held, then " " ruled the stop out
    assert detok.finish() == ""


@pytest.mark.parametrize("chunk", [1, 2, 100])  # token by token, and everything in one update
def test_first_of_several_stop_strings_wins(tok: Tokenizer, chunk: int):
    text = "the quick brown fox jumps over the lazy dog"
    ids = tok.encode(text).ids
    # "fox" and "quick brown fox" end together: the earlier start wins; list order does not matter
    detok = IncrementalDetokenizer(tok, [], ["lazy", "fox", "quick brown fox"])
    assert "".join(_stream(detok, ids, chunk)) == "the " and detok.stop_string_hit == "quick brown fox"
    detok = IncrementalDetokenizer(tok, [], ["lazy", "jumps", "brown"])
    assert "".join(_stream(detok, ids, chunk)) == "the quick " and detok.stop_string_hit == "brown"
    # overlapping: "n" completes before the earlier-starting "own fo" can, whatever the chunking
    detok = IncrementalDetokenizer(tok, [], ["own fo", "n"])
    assert "".join(_stream(detok, ids, chunk)) == "the quick brow" and detok.stop_string_hit == "n"


def test_stop_string_inside_one_token(tok: Tokenizer):
    ids = tok.encode("x 日本語 y").ids
    detok = IncrementalDetokenizer(tok, [], ["本"])
    assert "".join(_stream(detok, ids)) == "x 日"
    assert detok.stop_string_hit == "本"


def test_special_tokens(tok: Tokenizer):
    eos = tok.token_to_id("<eos>")
    ids = tok.encode("hello").ids + [eos]
    skipped = IncrementalDetokenizer(tok, [], [])
    assert "".join(_stream(skipped, ids)) + skipped.finish() == "hello"
    kept = IncrementalDetokenizer(tok, [], [], skip_special_tokens=False)
    assert "".join(_stream(kept, ids)) + kept.finish() == "hello<eos>"


def test_finish_flushes_an_incomplete_character(tok: Tokenizer):
    ids = tok.encode("ok 中").ids
    detok = IncrementalDetokenizer(tok, [], [])
    streamed = "".join(_stream(detok, ids[:-1]))
    assert REPLACEMENT not in streamed
    tail = detok.finish()  # cut off mid-character (e.g. max_tokens): the final text is the lossy decode
    assert streamed + tail == tok.decode(ids[:-1])
    assert detok.update(ids[-1:]) == "" and detok.finish() == ""
