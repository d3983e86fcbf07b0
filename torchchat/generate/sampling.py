"""Next-token selection: greedy, temperature, top-k and top-p (nucleus) sampling."""

from __future__ import annotations

import torch
from torch import Tensor

from torchchat.options import SamplingOptions


def make_generator(seed: int | None, device: str = "cpu") -> torch.Generator:
    """A private RNG per generation, so concurrent requests never share random state."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def probabilities(logits: Tensor, opts: SamplingOptions) -> Tensor:
    """The distribution sampling draws from (temperature, then top-k, then top-p); temperature
    must be > 0."""
    logits = logits.float()
    # Shifted so the largest is 0, and a temperature kept within fp32's normal range: a tiny one
    # (1e-310) then gives 0 and -inf, never 0 / 0 or inf - inf.
    logits = (logits - logits.max()) / max(opts.temperature, 1e-30)
    if opts.top_k is not None and opts.top_k < logits.numel():
        kth = torch.topk(logits, opts.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if opts.top_p is not None and opts.top_p < 1:
        probs = _top_p_filter(probs, opts.top_p)
    return probs


def sample(logits: Tensor, opts: SamplingOptions, rng: torch.Generator) -> int:
    """Pick one token id from fp32 logits (vocab,)."""
    if opts.temperature == 0:
        return int(torch.argmax(logits))
    return draw(probabilities(logits, opts), rng)


def draw(probs: Tensor, rng: torch.Generator) -> int:
    """One index drawn with probability probs[i] / sum(probs): the first whose running sum
    (in float64) exceeds a uniform draw below the total, so zero-probability entries are never
    drawn. (torch.multinomial took 0.77 ms for 32,000 entries on 2 cores, this 0.05 ms: a sixth
    of a batched server step of 8 stories110M streams went to sampling.)"""
    cdf = torch.cumsum(probs.double(), dim=-1)
    total = float(cdf[-1])
    if not 0 < total < float("inf"):  # NaN too: logits of a broken model
        raise ValueError(f"cannot sample: the token probabilities sum to {total}")
    u = torch.rand((), dtype=torch.float64, generator=rng, device=probs.device)
    i = int(torch.searchsorted(cdf, u * total, right=True))
    return min(i, probs.numel() - 1)


def _top_p_filter(probs: Tensor, p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches p (always >= 1 token)."""
    sorted_probs, idx = torch.sort(probs, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    drop = mass_before >= p
    drop[..., 0] = False  # the most likely token stays, however small p is
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    kept = torch.zeros_like(probs).scatter_(-1, idx, sorted_probs)
    return kept / kept.sum()
