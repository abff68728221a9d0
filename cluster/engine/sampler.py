"""Turns one step's logits into next tokens, the way vLLM v1 does, vectorised across the batch.

Order: penalties on the raw logits (repetition, frequency, presence), min_tokens masking, then greedy rows
take the argmax while the rest are divided by their temperature, filtered by top-k, top-p and min-p and
sampled. Sampling is the exponential race: argmax(probs / E) with E ~ Exp(1) i.i.d. per vocab entry picks
token i with probability probs[i], needs no normalisation and no per-row Python. Seeded requests draw their
row of noise from their own generator, so their tokens do not depend on what else is in the batch.

Logprobs are those of the model's raw logits (log_softmax before penalties and temperature), which is
vLLM's default ("raw_logprobs"); they describe the model, not the sampling distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cluster.request import Request, SamplingParams

_NEG_INF = float("-inf")
# top-p looks for the nucleus among this many top tokens, widening in turn; a full sort only for rows whose
# nucleus is wider still (topk(256) costs ~1/15 of a full sort of a 150k vocab, topk(8192) ~1/4)
_TOP_P_PROBES = (256, 8192)


@dataclass
class TokenLogprobs:
    """The chosen token's raw logprob and rank, plus the request's top-N alternatives."""

    token_id: int
    logprob: float
    rank: int  # 1 + number of vocab entries with a strictly higher logprob (1 = the most likely token)
    top: list[tuple[int, float]]  # the N most likely (token_id, logprob), best first; N = params.logprobs


@dataclass
class SamplerOutput:
    token_ids: list[int]  # row i's next token
    logprobs: list[TokenLogprobs | None]  # None for rows whose request did not ask for logprobs


class Sampler:
    """Stateless per step except for the seeded requests' generators, which live until `release`."""

    def __init__(self, seed: int | None = 0) -> None:
        self._seed = seed  # seeds the shared generator used by unseeded rows; None = nondeterministic
        self._shared: dict[torch.device, torch.Generator] = {}
        self._seeded: dict[str, torch.Generator] = {}

    def release(self, request_id: str) -> None:
        """Forget a finished request's generator."""
        self._seeded.pop(request_id, None)

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> SamplerOutput:
        """Sample one token per row; row i of `logits` [B, V] (float32) belongs to requests[i].

        `logits` is never modified. Every request passed in draws noise, so pass only rows whose token
        will be kept (a seeded request's stream would otherwise drift).
        """
        assert logits.dim() == 2 and logits.shape[0] == len(requests), (tuple(logits.shape), len(requests))
        params = [r.sampling_params for r in requests]
        x = apply_penalties(logits, requests)
        x = apply_min_tokens(x, requests, inplace=x is not logits)
        if all(p.temperature == 0.0 for p in params):
            token_ids = x.argmax(dim=-1)  # the common all-greedy step: nothing else to do
        else:
            token_ids = self._sample(x, requests)
        return SamplerOutput(token_ids=token_ids.tolist(), logprobs=_logprobs(logits, token_ids, params))

    def _sample(self, x: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        params = [r.sampling_params for r in requests]
        greedy = [i for i, p in enumerate(params) if p.temperature == 0.0]
        rand = [i for i, p in enumerate(params) if p.temperature != 0.0]
        temps = torch.tensor([params[i].temperature for i in rand], dtype=x.dtype, device=x.device)
        if greedy:
            xr = x[_idx(rand, x)].div_(temps.unsqueeze(1))  # indexing copies, so in-place is safe
        else:
            xr = x / temps.unsqueeze(1)  # out of place: x may be the caller's logits
        rparams = [params[i] for i in rand]
        apply_top_k(xr, rparams)
        apply_top_p(xr, rparams)
        apply_min_p(xr, rparams)
        probs = xr.softmax(dim=-1)
        # With E = -log(U) ~ Exp(1): argmax(p / E) == argmin(p / log U). U in [0, 1) makes log U < 0 (or -inf),
        # so there is no division by zero and masked tokens (p == 0) score -0.0, never below a live one.
        sampled = probs.div_(self._log_uniform(probs, [requests[i] for i in rand])).argmin(dim=-1)
        if not greedy:
            return sampled
        out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
        out[_idx(greedy, x)] = x[_idx(greedy, x)].argmax(dim=-1)
        out[_idx(rand, x)] = sampled
        return out

    def _log_uniform(self, like: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """log U(0, 1) shaped like `like`: one shared draw for unseeded rows, one row per seeded request."""
        u = torch.empty_like(like)
        unseeded = [j for j, r in enumerate(requests) if r.sampling_params.seed is None]
        if len(unseeded) == len(requests):
            u.uniform_(generator=self._shared_generator(like.device))
        else:
            if unseeded:
                draw = torch.empty((len(unseeded), like.shape[1]), dtype=like.dtype, device=like.device)
                u[_idx(unseeded, like)] = draw.uniform_(generator=self._shared_generator(like.device))
            for j, r in enumerate(requests):
                if r.sampling_params.seed is not None:
                    u[j].uniform_(generator=self._request_generator(r, like.device))
        return u.log_()

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        gen = self._shared.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            if self._seed is None:
                gen.seed()
            else:
                gen.manual_seed(self._seed)
            self._shared[device] = gen
        return gen

    def _request_generator(self, request: Request, device: torch.device) -> torch.Generator:
        gen = self._seeded.get(request.request_id)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(request.sampling_params.seed)
            self._seeded[request.request_id] = gen
        return gen


def _idx(rows: list[int], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=like.device)


def _padded(token_lists: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, max_len] token ids and their validity mask.

    Rows are padded with their own first token (0 if empty), so an idempotent scatter_ of a value computed
    from the gathered logit writes the same value twice instead of touching a foreign token.
    """
    width = max((len(t) for t in token_lists), default=0)
    rows = [t + [t[0] if t else 0] * (width - len(t)) for t in token_lists]
    ids = torch.tensor(rows, dtype=torch.long, device=device).reshape(len(token_lists), width)
    lengths = torch.tensor([len(t) for t in token_lists], dtype=torch.long, device=device)
    valid = torch.arange(width, device=device).unsqueeze(0) < lengths.unsqueeze(1)
    return ids, valid


def apply_penalties(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """vLLM's penalties on the raw logits; returns `logits` itself when no row has one, else a new tensor.

    repetition: tokens seen in prompt or output have positive logits divided by, negative ones multiplied
    by, the penalty. frequency: minus penalty * count in the output. presence: minus penalty if in the output.
    Work is O(tokens seen), not O(vocab): gather the affected logits, change them, scatter them back.
    """
    params = [r.sampling_params for r in requests]
    rows = [i for i, p in enumerate(params) if _has_penalty(p)]
    if not rows:
        return logits
    device = logits.device
    sub = logits[_idx(rows, logits)]  # a copy, changed in place below
    rep = [params[i].repetition_penalty for i in rows]
    if any(r != 1.0 for r in rep):
        ids, valid = _padded([requests[i].all_token_ids for i in rows], device)
        # an empty row has no real entry to pad from: a factor of 1 makes its write to token 0 a no-op
        factor = torch.where(valid[:, :1], torch.tensor(rep, dtype=sub.dtype, device=device).unsqueeze(1), 1.0)
        seen = sub.gather(1, ids)
        sub.scatter_(1, ids, torch.where(seen > 0, seen / factor, seen * factor))
    freq = [params[i].frequency_penalty for i in rows]
    pres = [params[i].presence_penalty for i in rows]
    if any(freq) or any(pres):
        ids, valid = _padded([requests[i].output_token_ids for i in rows], device)
        pres_t = torch.where(valid[:, :1], torch.tensor(pres, dtype=sub.dtype, device=device).unsqueeze(1), 0.0)
        sub.scatter_(1, ids, sub.gather(1, ids) - pres_t)  # once per distinct token, whatever its count
        freq_t = torch.tensor(freq, dtype=sub.dtype, device=device).unsqueeze(1)
        sub.scatter_add_(1, ids, torch.where(valid, -freq_t, 0.0))  # once per occurrence
    if len(rows) == logits.shape[0]:
        return sub
    out = logits.clone()
    out[_idx(rows, logits)] = sub
    return out


def _has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0


def apply_min_tokens(x: torch.Tensor, requests: list[Request], inplace: bool = False) -> torch.Tensor:
    """Until a request has min_tokens outputs, its stop token ids (and EOS unless ignore_eos) are banned.

    EOS is left alone under ignore_eos because it does not stop such a request (vLLM's all_stop_token_ids).
    Returns `x` itself when no row is affected, else `x` masked in place or a masked copy.
    """
    rows: list[int] = []
    cols: list[int] = []
    for i, r in enumerate(requests):
        p = r.sampling_params
        if r.num_output_tokens < p.min_tokens:
            banned = set(p.stop_token_ids)
            if not p.ignore_eos:
                banned.update(r.eos_token_ids)
            rows.extend([i] * len(banned))
            cols.extend(banned)
    if not rows:
        return x
    if not inplace:
        x = x.clone()
    x[_idx(rows, x), _idx(cols, x)] = _NEG_INF
    return x


def apply_top_k(x: torch.Tensor, params: list[SamplingParams]) -> None:
    """In place: keep each row's top_k largest logits (ties with the k-th are kept too)."""
    vocab = x.shape[1]
    rows = [i for i, p in enumerate(params) if 0 < p.top_k < vocab]
    if not rows:
        return
    sub = x if len(rows) == x.shape[0] else x[_idx(rows, x)]
    ks = [params[i].top_k for i in rows]
    k_t = torch.tensor(ks, dtype=torch.long, device=x.device).unsqueeze(1)
    kth = sub.topk(max(ks), dim=-1).values.gather(1, k_t - 1)  # topk(max k), not a sort
    sub.masked_fill_(sub < kth, _NEG_INF)
    if sub is not x:
        x[_idx(rows, x)] = sub


def apply_top_p(x: torch.Tensor, params: list[SamplingParams]) -> None:
    """In place: keep the smallest head of each row whose probability mass reaches top_p.

    The top token always survives; tokens tied with the last kept one are kept too. The nucleus is searched
    for among the top _TOP_P_PROBES tokens first, since a full-vocab sort costs much more; only rows whose
    nucleus is wider than all probes are sorted.
    """
    vocab = x.shape[1]
    rows = [i for i, p in enumerate(params) if p.top_p < 1.0]
    if not rows:
        return
    sub = x if len(rows) == x.shape[0] else x[_idx(rows, x)]
    p_t = torch.tensor([params[i].top_p for i in rows], dtype=x.dtype, device=x.device).unsqueeze(1)
    lse = sub.logsumexp(dim=-1, keepdim=True)
    threshold = torch.empty_like(lse)
    pending = torch.arange(len(rows), device=x.device)
    for k in [k for k in _TOP_P_PROBES if k < vocab] + [vocab]:
        part = sub if len(pending) == len(rows) else sub[pending]
        thr, found = _nucleus_threshold(part, lse[pending], p_t[pending], k)
        if k == vocab:
            threshold[pending] = thr  # the whole row was searched: the cut is wherever the mass ran out
            break
        threshold[pending[found]] = thr[found]
        pending = pending[~found]
        if len(pending) == 0:
            break
    sub.masked_fill_(sub < threshold, _NEG_INF)
    if sub is not x:
        x[_idx(rows, x)] = sub


def _nucleus_threshold(
    x: torch.Tensor, lse: torch.Tensor, p: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest logit kept by top-p when searching the top k tokens, and whether the nucleus fits in k."""
    vals = x.topk(k, dim=-1).values  # sorted, descending
    probs = (vals - lse).exp_()
    cum = probs.cumsum(dim=-1)
    # descending order keeps the mass before each token accurate where the cut usually falls
    num_kept = ((cum - probs) < p).sum(dim=-1, keepdim=True)  # the mass before the top token is 0 < p
    return vals.gather(1, num_kept - 1), cum[:, -1] >= p.squeeze(1)


def apply_min_p(x: torch.Tensor, params: list[SamplingParams]) -> None:
    """In place: drop tokens whose probability is below min_p * the row's top probability.

    Done on logits: p_i < min_p * p_max  <=>  x_i < x_max + log(min_p), which needs no softmax.
    """
    rows = [i for i, p in enumerate(params) if p.min_p > 0.0]
    if not rows:
        return
    sub = x if len(rows) == x.shape[0] else x[_idx(rows, x)]
    log_min_p = torch.tensor([math.log(params[i].min_p) for i in rows], dtype=x.dtype, device=x.device)
    threshold = sub.amax(dim=-1, keepdim=True) + log_min_p.unsqueeze(1)
    sub.masked_fill_(sub < threshold, _NEG_INF)
    if sub is not x:
        x[_idx(rows, x)] = sub


def _logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, params: list[SamplingParams]
) -> list[TokenLogprobs | None]:
    """Raw-logit logprobs of the chosen tokens (and top-N) for the rows that asked; only they pay.

    logprob = logit - logsumexp(row), so no [rows, V] log_softmax is materialised; rank and top-N are
    order statistics and read the logits directly.
    """
    result: list[TokenLogprobs | None] = [None] * len(params)
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not rows:
        return result
    idx = _idx(rows, logits)
    raw = (logits if len(rows) == len(params) else logits[idx]).float()
    lse = raw.logsumexp(dim=-1, keepdim=True)
    chosen = token_ids[idx].unsqueeze(1)
    chosen_logit = raw.gather(1, chosen)
    ranks = ((raw > chosen_logit).sum(dim=-1) + 1).tolist()
    chosen_lp = (chosen_logit - lse).squeeze(1).tolist()
    top_n = max(params[i].logprobs or 0 for i in rows)
    top_vals, top_ids = raw.topk(top_n, dim=-1) if top_n else (raw[:, :0], chosen[:, :0])
    top_lp, top_ids_l = (top_vals - lse).tolist(), top_ids.tolist()
    for j, (i, tok) in enumerate(zip(rows, chosen.squeeze(1).tolist(), strict=True)):
        n = params[i].logprobs or 0
        top = list(zip(top_ids_l[j][:n], top_lp[j][:n], strict=True))
        result[i] = TokenLogprobs(token_id=tok, logprob=chosen_lp[j], rank=ranks[j], top=top)
    return result
