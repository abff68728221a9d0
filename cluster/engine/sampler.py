"""Turns one step's logits into next tokens, the way vLLM v1 does, vectorised across the batch.

Order: penalties on the raw logits (repetition, frequency, presence), min_tokens masking, then greedy rows
take the argmax while the rest are divided by their temperature, filtered by top-k, top-p and min-p and
sampled. Sampling is the exponential race: argmax(probs / E) with E ~ Exp(1) i.i.d. per vocab entry picks
token i with probability probs[i], needs no normalisation and no per-row Python. Seeded requests draw their
row of E from their own generator, so their tokens do not depend on what else is in the batch.

Logprobs are those of the model's raw logits (log_softmax before penalties and temperature), which is
vLLM's default ("raw_logprobs"); they describe the model, not the sampling distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cluster.request import Request, SamplingParams

_NEG_INF = float("-inf")
# exponential_ may return exactly 0; p / 0 would be inf (or nan for masked p == 0, which argmax prefers)
_MIN_NOISE = 1e-10


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
        num_rows = x.shape[0]
        greedy = [i for i, p in enumerate(params) if p.temperature == 0.0]
        rand = [i for i, p in enumerate(params) if p.temperature != 0.0]
        temps = torch.tensor([params[i].temperature for i in rand], dtype=x.dtype, device=x.device)
        if greedy:
            out = torch.empty(num_rows, dtype=torch.long, device=x.device)
            out[_idx(greedy, x)] = x[_idx(greedy, x)].argmax(dim=-1)
            xr = x[_idx(rand, x)].div_(temps.unsqueeze(1))  # indexing copies, so in-place is safe
        else:
            out = None
            xr = x / temps.unsqueeze(1)  # out of place: x may be the caller's logits
        rparams = [params[i] for i in rand]
        apply_top_k_top_p(xr, rparams)
        apply_min_p(xr, rparams)
        probs = xr.softmax(dim=-1)
        probs.div_(self._noise(probs, [requests[i] for i in rand]))
        sampled = probs.argmax(dim=-1)
        if out is None:
            return sampled
        out[_idx(rand, x)] = sampled
        return out

    def _noise(self, probs: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """Exp(1) noise shaped like `probs`: one shared draw for unseeded rows, one row per seeded request."""
        q = torch.empty_like(probs)
        unseeded = [j for j, r in enumerate(requests) if r.sampling_params.seed is None]
        if len(unseeded) == len(requests):
            q.exponential_(generator=self._shared_generator(probs.device))
        else:
            if unseeded:
                draw = torch.empty((len(unseeded), probs.shape[1]), dtype=probs.dtype, device=probs.device)
                q[_idx(unseeded, probs)] = draw.exponential_(generator=self._shared_generator(probs.device))
            for j, r in enumerate(requests):
                if r.sampling_params.seed is not None:
                    q[j].exponential_(generator=self._request_generator(r, probs.device))
        return q.clamp_min_(_MIN_NOISE)

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


def _padded(token_lists: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    """[n, max_len] token ids padded with `pad` (= V, an extra scatter column that is then dropped)."""
    width = max((len(t) for t in token_lists), default=0)
    rows = [t + [pad] * (width - len(t)) for t in token_lists]
    return torch.tensor(rows, dtype=torch.long, device=device).reshape(len(token_lists), width)


def apply_penalties(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """vLLM's penalties on the raw logits; returns `logits` itself when no row has one.

    repetition: tokens seen in prompt or output have positive logits divided by, negative ones multiplied
    by, the penalty. frequency: minus penalty * count in the output. presence: minus penalty if in the output.
    """
    params = [r.sampling_params for r in requests]
    rows = [i for i, p in enumerate(params) if _has_penalty(p)]
    if not rows:
        return logits
    num_rows, vocab = logits.shape
    device = logits.device
    idx = _idx(rows, logits)
    sub = logits[idx]
    rep = [params[i].repetition_penalty for i in rows]
    if any(r != 1.0 for r in rep):
        all_ids = _padded([requests[i].all_token_ids for i in rows], vocab, device)
        seen = torch.zeros((len(rows), vocab + 1), dtype=torch.bool, device=device)
        seen.scatter_(1, all_ids, True)
        rep_t = torch.tensor(rep, dtype=sub.dtype, device=device).unsqueeze(1)
        factor = torch.where(seen[:, :vocab], rep_t, 1.0)
        sub = torch.where(sub > 0, sub / factor, sub * factor)
    freq = [params[i].frequency_penalty for i in rows]
    pres = [params[i].presence_penalty for i in rows]
    if any(freq) or any(pres):
        out_ids = _padded([requests[i].output_token_ids for i in rows], vocab, device)
        counts = torch.zeros((len(rows), vocab + 1), dtype=sub.dtype, device=device)
        counts.scatter_add_(1, out_ids, torch.ones_like(out_ids, dtype=sub.dtype))
        counts = counts[:, :vocab]
        freq_t = torch.tensor(freq, dtype=sub.dtype, device=device).unsqueeze(1)
        pres_t = torch.tensor(pres, dtype=sub.dtype, device=device).unsqueeze(1)
        sub = sub - freq_t * counts - pres_t * (counts > 0).to(sub.dtype)
    if len(rows) == num_rows:
        return sub
    out = logits.clone()
    out[idx] = sub
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


def apply_top_k_top_p(x: torch.Tensor, params: list[SamplingParams]) -> None:
    """In place: keep the top_k largest logits, then the smallest head whose probability mass >= top_p.

    Ties at the k-th value are all kept. Only rows that use either filter pay for it; a full sort happens
    only when some row uses top-p, otherwise topk(max k) is enough to find each row's threshold.
    """
    vocab = x.shape[1]
    rows = [i for i, p in enumerate(params) if 0 < p.top_k < vocab or p.top_p < 1.0]
    if not rows:
        return
    sub = x if len(rows) == x.shape[0] else x[_idx(rows, x)]
    ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in (params[i] for i in rows)]
    k_t = torch.tensor(ks, dtype=torch.long, device=x.device).unsqueeze(1)
    if all(params[i].top_p >= 1.0 for i in rows):
        kth = sub.topk(max(ks), dim=-1).values.gather(1, k_t - 1)
        sub.masked_fill_(sub < kth, _NEG_INF)
    else:
        # 2.0 disables top-p for a row: the exclusive cumsum never reaches it despite rounding
        ps = [params[i].top_p if params[i].top_p < 1.0 else 2.0 for i in rows]
        p_t = torch.tensor(ps, dtype=sub.dtype, device=x.device).unsqueeze(1)
        sorted_x, order = sub.sort(dim=-1, descending=True)
        drop = sorted_x < sorted_x.gather(1, k_t - 1)
        probs = sorted_x.masked_fill(drop, _NEG_INF).softmax(dim=-1)
        # descending order makes the mass before each token accurate where the cut usually falls
        mass_before = probs.cumsum(dim=-1).sub_(probs)
        drop |= mass_before >= p_t  # the top token has mass_before == 0 < top_p, so it always survives
        sub.masked_fill_(torch.empty_like(drop).scatter_(1, order, drop), _NEG_INF)
    if sub is not x:
        x[_idx(rows, x)] = sub


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
    """Raw-logit logprobs of the chosen tokens (and top-N) for the rows that asked; only they pay."""
    result: list[TokenLogprobs | None] = [None] * len(params)
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not rows:
        return result
    idx = _idx(rows, logits)
    lp = torch.log_softmax(logits[idx].float(), dim=-1)
    chosen = token_ids[idx].unsqueeze(1)
    chosen_lp = lp.gather(1, chosen)
    ranks = ((lp > chosen_lp).sum(dim=-1) + 1).tolist()
    top_n = max(params[i].logprobs or 0 for i in rows)
    top_vals, top_ids = lp.topk(top_n, dim=-1) if top_n else (lp[:, :0], lp[:, :0].long())
    top_vals_l, top_ids_l = top_vals.tolist(), top_ids.tolist()
    chosen_l, chosen_lp_l = chosen.squeeze(1).tolist(), chosen_lp.squeeze(1).tolist()
    for j, i in enumerate(rows):
        n = params[i].logprobs or 0
        top = list(zip(top_ids_l[j][:n], top_vals_l[j][:n], strict=True))
        result[i] = TokenLogprobs(token_id=chosen_l[j], logprob=chosen_lp_l[j], rank=ranks[j], top=top)
    return result
