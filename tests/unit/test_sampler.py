"""Sampler: greedy, seeded reproducibility, filters, temperature, penalties, min_tokens and logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from cluster.engine.sampler import Sampler, apply_penalties, apply_top_p
from cluster.request import Request, SamplingParams

# a known distribution; each test's filters keep a subset of it
PROBS = [0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.02]
N_DRAWS = 2000


def _req(rid: str, params: SamplingParams, prompt: list[int] | None = None, output: list[int] | None = None,
         eos: tuple[int, ...] = ()) -> Request:
    r = Request(rid, prompt if prompt is not None else [1, 2, 3], params, eos_token_ids=eos)
    for t in output or []:
        r.append_output_token(t)
    return r


def _draw_counts(params: SamplingParams, probs: list[float] = PROBS, n: int = N_DRAWS) -> list[int]:
    """n unseeded draws from `probs` under `params`, as one batch of n identical rows."""
    logits = torch.tensor(probs).log().repeat(n, 1)
    out = Sampler(seed=1234)(logits, [_req(f"r{i}", params) for i in range(n)])
    return torch.bincount(torch.tensor(out.token_ids), minlength=len(probs)).tolist()


def _assert_frequencies(counts: list[int], expected: list[float]) -> None:
    """Tokens with expected probability 0 never appear; the others are within 5 sigma of n * p."""
    n = sum(counts)
    total = sum(expected)
    for tok, (c, e) in enumerate(zip(counts, expected, strict=True)):
        p = e / total
        if p == 0.0:
            assert c == 0, f"excluded token {tok} drawn {c} times"
        else:
            sigma = math.sqrt(n * p * (1 - p))
            assert abs(c - n * p) <= 5 * sigma, f"token {tok}: {c} draws, expected {n * p:.0f} +- {5 * sigma:.0f}"


def test_greedy_is_argmax_and_logits_untouched():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    before = logits.clone()
    reqs = [_req(f"g{i}", SamplingParams(temperature=0.0)) for i in range(6)]
    out = Sampler()(logits, reqs)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 6
    assert torch.equal(logits, before)


def test_unfiltered_sampling_matches_distribution():
    _assert_frequencies(_draw_counts(SamplingParams(temperature=1.0)), PROBS)


@pytest.mark.parametrize(
    "params, kept",
    [
        (SamplingParams(top_k=3), [0, 1, 2]),
        (SamplingParams(top_p=0.6), [0, 1]),  # 0.4 < 0.6 <= 0.65
        (SamplingParams(top_p=0.75), [0, 1, 2]),  # 0.65 < 0.75 <= 0.8
        (SamplingParams(min_p=0.3), [0, 1, 2]),  # keep p >= 0.12
        # top-p sees the top-k-renormalised mass: 0.4/0.9 + 0.25/0.9 = 0.72 >= 0.7
        (SamplingParams(top_k=4, top_p=0.7), [0, 1]),
        (SamplingParams(top_k=5, min_p=0.5), [0, 1]),
        (SamplingParams(top_p=0.01), [0]),  # always at least one token
    ],
)
def test_filters_exclude_and_keep_frequencies(params: SamplingParams, kept: list[int]):
    expected = [p if i in kept else 0.0 for i, p in enumerate(PROBS)]
    _assert_frequencies(_draw_counts(params), expected)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_reshapes_distribution(temperature: float):
    expected = [p ** (1.0 / temperature) for p in PROBS]
    counts = _draw_counts(SamplingParams(temperature=temperature))
    _assert_frequencies(counts, expected)
    # and it moves the head the right way, beyond noise
    if temperature < 1:
        assert counts[0] > N_DRAWS * 0.55
    else:
        assert counts[0] < N_DRAWS * 0.33


def test_filters_per_row_in_mixed_batch():
    """Rows with and without filters share a step; each row keeps its own filter."""
    base = torch.tensor(PROBS).log()
    plist = [SamplingParams(top_k=2), SamplingParams(), SamplingParams(top_p=0.6, top_k=0), SamplingParams(min_p=0.5)]
    reqs = [_req(f"r{i}", plist[i % 4]) for i in range(4 * 500)]
    out = Sampler(seed=7)(base.repeat(len(reqs), 1), reqs)
    by_kind = [torch.tensor(out.token_ids[k::4]) for k in range(4)]
    assert set(by_kind[0].tolist()) <= {0, 1}
    assert set(by_kind[2].tolist()) <= {0, 1}
    assert set(by_kind[3].tolist()) <= {0, 1}
    assert len(set(by_kind[1].tolist())) >= 6  # the unfiltered row still reaches the tail


def test_top_p_keeps_smallest_nucleus_at_every_width():
    """Narrow nuclei are found by the cheap probes, wide ones by the full sort; all match a float64 reference."""
    vocab = 20000
    g = torch.Generator().manual_seed(5)
    scales = [12.0, 6.0, 3.0, 2.0, 1.0, 0.0]  # from a few tokens to nearly the whole vocab
    logits = torch.stack([torch.randn(vocab, generator=g) * s for s in scales])
    plist = [SamplingParams(top_p=p) for p in (0.9, 0.5, 0.95, 0.8, 0.9, 0.3)]
    x = logits.clone()
    apply_top_p(x, plist)
    sizes = []
    for row, p in enumerate(plist):
        probs = torch.softmax(logits[row].double(), dim=-1)
        sorted_probs, order = probs.sort(descending=True)
        n_keep = int((sorted_probs.cumsum(0) < p.top_p).sum()) + 1  # smallest prefix with mass >= top_p
        expected = set(order[:n_keep].tolist())
        if scales[row] == 0.0:
            expected = set(range(vocab))  # all tied: ties with the last kept token are kept
        kept = set(torch.isfinite(x[row]).nonzero().squeeze(1).tolist())
        assert kept == expected, (row, len(kept), len(expected))
        sizes.append(len(kept))
    assert min(sizes) < 256 and any(256 < n <= 8192 for n in sizes) and max(sizes) > 8192  # every path ran


def _steps(num_steps: int, vocab: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(vocab, generator=g) * 2 for _ in range(num_steps)]


def _run_seeded(sampler: Sampler, target: Request, steps: list[torch.Tensor], position: int, others: int,
                others_params: list[SamplingParams]) -> list[int]:
    """Generate len(steps) tokens for `target` at batch `position` among `others` unrelated rows."""
    fillers = [_req(f"other{j}", others_params[j % len(others_params)]) for j in range(others)]
    tokens = []
    for step, row in enumerate(steps):
        batch = fillers[:position] + [target] + fillers[position:]
        noise = torch.randn(len(batch), row.numel(), generator=torch.Generator().manual_seed(100 + step))
        logits = noise.clone()
        logits[position] = row
        out = sampler(logits, batch)
        tok = out.token_ids[position]
        target.append_output_token(tok)
        tokens.append(tok)
    return tokens


@pytest.mark.parametrize("params", [SamplingParams(seed=42), SamplingParams(seed=42, temperature=0.7, top_p=0.9)])
def test_seeded_reproducible_across_runs_and_batches(params: SamplingParams):
    steps = _steps(12, vocab=64, seed=3)
    alone = _run_seeded(Sampler(seed=0), _req("s", params), steps, position=0, others=0, others_params=[params])
    again = _run_seeded(Sampler(seed=0), _req("s", params), steps, position=0, others=0, others_params=[params])
    assert alone == again
    mixed = [SamplingParams(), SamplingParams(temperature=0.0), SamplingParams(seed=7, top_k=5),
             SamplingParams(min_p=0.2)]
    for position, others, sampler_seed in [(2, 5, 1), (5, 5, 99), (0, 3, None)]:
        batched = _run_seeded(Sampler(seed=sampler_seed), _req("s", params), steps, position, others, mixed)
        assert batched == alone, (position, others)
    # a different seed gives a different stream (12 draws over 64 tokens cannot all collide)
    other = _run_seeded(Sampler(), _req("s", SamplingParams(seed=43, temperature=params.temperature,
                                                            top_p=params.top_p)), steps, 0, 0, [params])
    assert other != alone


def test_release_restarts_the_seeded_stream():
    sampler = Sampler()
    logits = torch.zeros(1, 1000)  # uniform: the token is pure noise
    first = [sampler(logits, [_req("s", SamplingParams(seed=5))]).token_ids[0] for _ in range(3)]
    sampler.release("s")
    second = [sampler(logits, [_req("s", SamplingParams(seed=5))]).token_ids[0] for _ in range(3)]
    assert first == second
    assert len(set(first)) > 1  # the generator advances between steps


def test_mixed_greedy_seeded_unseeded_batch():
    torch.manual_seed(1)
    vocab = 40
    logits = torch.randn(6, vocab)
    plist = [SamplingParams(temperature=0.0), SamplingParams(seed=11), SamplingParams(),
             SamplingParams(temperature=0.0, top_k=3), SamplingParams(seed=12, top_k=4), SamplingParams(top_p=0.5)]
    reqs = [_req(f"m{i}", p) for i, p in enumerate(plist)]
    out = Sampler()(logits, reqs)
    assert out.token_ids[0] == logits[0].argmax().item()
    assert out.token_ids[3] == logits[3].argmax().item()
    assert out.token_ids[4] in logits[4].topk(4).indices.tolist()
    assert all(0 <= t < vocab for t in out.token_ids)
    # the seeded rows give what they give alone
    for i in (1, 4):
        solo = Sampler(seed=123)(logits[i:i + 1], [_req(f"m{i}", plist[i])])
        assert solo.token_ids[0] == out.token_ids[i]


def test_penalties_match_hand_computation():
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5, 3.0, 1.0]])
    prompt, output = [0, 1], [2, 2, 3]
    p = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    got = apply_penalties(logits, [_req("p", p, prompt=prompt, output=output)])
    # repetition over prompt+output {0,1,2,3}: positive / 2, negative * 2
    rep = [2.0 / 2, -1.0 * 2, 0.5 / 2, -0.5 * 2, 3.0, 1.0]
    # output counts: token 2 twice, token 3 once
    expected = [rep[0], rep[1], rep[2] - 0.5 * 2 - 0.25, rep[3] - 0.5 * 1 - 0.25, rep[4], rep[5]]
    assert torch.allclose(got, torch.tensor([expected]))
    assert torch.equal(logits, torch.tensor([[2.0, -1.0, 0.5, -0.5, 3.0, 1.0]]))  # input not modified


def test_penalties_only_touch_their_rows():
    torch.manual_seed(2)
    logits = torch.randn(4, 10)
    reqs = [_req("a", SamplingParams(), output=[1, 2]),
            _req("b", SamplingParams(presence_penalty=1.0), output=[4, 4, 7]),
            _req("c", SamplingParams(repetition_penalty=1.5), prompt=[9], output=[]),
            _req("d", SamplingParams(presence_penalty=1.0, frequency_penalty=1.0), prompt=[0], output=[])]
    got = apply_penalties(logits, reqs)
    assert torch.equal(got[3], logits[3])  # nothing generated yet: no frequency/presence effect
    assert torch.equal(got[0], logits[0])
    exp_b = logits[1].clone()
    exp_b[[4, 7]] -= 1.0
    assert torch.allclose(got[1], exp_b)
    exp_c = logits[2].clone()
    exp_c[9] = exp_c[9] / 1.5 if exp_c[9] > 0 else exp_c[9] * 1.5
    assert torch.allclose(got[2], exp_c)
    assert apply_penalties(logits, [reqs[0]] * 4) is logits  # no penalty anywhere: no work, no copy


def test_penalties_match_dense_reference():
    """Random prompts/outputs with repeats, ragged lengths and empty outputs against a dense computation."""
    g = torch.Generator().manual_seed(6)
    vocab, rows = 50, 8
    logits = torch.randn(rows, vocab, generator=g) * 3
    reqs = []
    for i in range(rows):
        prompt = torch.randint(0, vocab, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
        output = torch.randint(0, 10, (i * 3,), generator=g).tolist()  # small id range: many repeats
        p = SamplingParams(repetition_penalty=[1.0, 1.3, 0.7][i % 3], frequency_penalty=[0.0, 0.4, -0.3][i % 3],
                           presence_penalty=[0.6, 0.0, -1.0][i % 3])
        reqs.append(_req(f"d{i}", p, prompt=prompt, output=output))
    got = apply_penalties(logits, reqs)
    for i, r in enumerate(reqs):
        sp = r.sampling_params
        row = logits[i].clone()
        seen = torch.zeros(vocab, dtype=torch.bool)
        seen[r.all_token_ids] = True
        row = torch.where(seen & (row > 0), row / sp.repetition_penalty, row)
        row = torch.where(seen & (row <= 0), row * sp.repetition_penalty, row)
        counts = torch.bincount(torch.tensor(r.output_token_ids, dtype=torch.long), minlength=vocab).float()
        row = row - sp.frequency_penalty * counts - sp.presence_penalty * (counts > 0).float()
        assert torch.allclose(got[i], row, atol=1e-6), i


def test_penalty_changes_greedy_choice():
    logits = torch.tensor([[1.0, 0.9, 0.0]])
    plain = Sampler()(logits, [_req("a", SamplingParams(temperature=0.0), output=[0])])
    penalised = Sampler()(logits, [_req("b", SamplingParams(temperature=0.0, frequency_penalty=0.2), output=[0])])
    assert plain.token_ids == [0] and penalised.token_ids == [1]


def test_min_tokens_masks_eos_and_stop_ids():
    logits = torch.tensor([[0.0, 1.0, 5.0, 4.0, 3.0]])  # EOS=2 best, then stop id 3, then 4
    p = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[3])
    sampler = Sampler()
    assert sampler(logits, [_req("a", p, output=[], eos=(2,))]).token_ids == [4]
    assert sampler(logits, [_req("a", p, output=[1], eos=(2,))]).token_ids == [4]
    assert sampler(logits, [_req("a", p, output=[1, 1], eos=(2,))]).token_ids == [2]  # min reached
    # sampled rows too: EOS never drawn while masked
    flat = torch.zeros(400, 5)
    flat[:, 2] = 3.0
    out = sampler(flat, [_req(f"s{i}", SamplingParams(min_tokens=3), eos=(2,)) for i in range(400)])
    assert 2 not in out.token_ids
    # ignore_eos: EOS does not stop the request, so min_tokens leaves it alone (as vLLM)
    pi = SamplingParams(temperature=0.0, min_tokens=2, ignore_eos=True)
    assert sampler(logits, [_req("i", pi, eos=(2,))]).token_ids == [2]


def test_logprobs_are_raw_log_softmax():
    torch.manual_seed(3)
    vocab = 30
    logits = torch.randn(4, vocab) * 3
    plist = [SamplingParams(logprobs=5, temperature=0.7, repetition_penalty=1.3, top_k=10),
             SamplingParams(),
             SamplingParams(logprobs=0, temperature=0.0),
             SamplingParams(logprobs=3, seed=1, presence_penalty=1.0)]
    reqs = [_req(f"l{i}", p, output=[5, 6]) for i, p in enumerate(plist)]
    out = Sampler()(logits, reqs)
    ref = torch.log_softmax(logits, dim=-1)
    assert out.logprobs[1] is None
    for i in (0, 2, 3):
        lp = out.logprobs[i]
        assert lp is not None
        tok = out.token_ids[i]
        assert lp.token_id == tok
        assert lp.logprob == pytest.approx(ref[i, tok].item(), abs=1e-5)
        assert lp.rank == int((ref[i] > ref[i, tok]).sum()) + 1
        n = plist[i].logprobs
        assert len(lp.top) == n
        assert [t for t, _ in lp.top] == (ref[i].topk(n).indices.tolist() if n else [])
        vals = [v for _, v in lp.top]
        assert vals == sorted(vals, reverse=True)
        for t, v in lp.top:
            assert v == pytest.approx(ref[i, t].item(), abs=1e-5)
    assert out.logprobs[2].rank == 1  # greedy on raw logits picks the most likely token


def test_large_batch_smoke():
    """Every path at once on a realistic-ish shape; also a rough cost guard (no per-row Python in the hot path)."""
    torch.manual_seed(4)
    batch, vocab = 64, 8000
    logits = torch.randn(batch, vocab)
    plist = [SamplingParams(temperature=0.0), SamplingParams(seed=3, top_p=0.9), SamplingParams(top_k=50),
             SamplingParams(min_p=0.05, frequency_penalty=0.5, logprobs=2), SamplingParams(repetition_penalty=1.2)]
    reqs = [_req(f"x{i}", plist[i % len(plist)], output=list(range(i, i + 20))) for i in range(batch)]
    out = Sampler()(logits, reqs)
    assert len(out.token_ids) == batch
    assert all(0 <= t < vocab for t in out.token_ids)
    for i in range(0, batch, len(plist)):
        assert out.token_ids[i] == logits[i].argmax().item()
