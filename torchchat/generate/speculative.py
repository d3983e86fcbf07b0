"""Speculative decoding: a small draft model proposes k tokens, the target checks them in one
forward pass. Greedy output is exactly the target's; sampled output keeps the target's
distribution (rejection sampling, Leviathan et al. 2023)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from torchchat.generate.sampling import draw, probabilities, sample
from torchchat.options import SamplingOptions
from torchchat.runtime.base import ModelRuntime


@dataclass
class SpeculationStats:
    proposed: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


class Speculator:
    """Runs one draft model alongside the target; keeps the draft's KV cache in step."""

    def __init__(self, target: ModelRuntime, draft: ModelRuntime, k: int):
        self.target, self.draft, self.k = target, draft, k
        self.stats = SpeculationStats()
        self.draft_pos = 0  # positions of the draft's cache that match the target's sequence

    def prefill(self, sequence: list[int], start_pos: int) -> None:
        """Bring the draft's cache to the target's: `sequence` is everything up to the prompt's
        end, of which the target already held positions < start_pos."""
        begin = min(self.draft_pos, start_pos)  # the draft's positions still valid
        if len(sequence) < start_pos:  # the target's earlier context is unknown: start over
            raise ValueError("speculative decoding needs the whole sequence before start_pos")
        self.draft.prefill(torch.tensor([sequence[begin:]]), begin)
        self.draft_pos = len(sequence)

    def step(self, token: int, pos: int, opts: SamplingOptions, rng: torch.Generator) -> list[int]:
        """`token` (sampled, not fed) goes at `pos`. Returns 1..k+1 new tokens; all but the last
        are now fed to the target, the last is the new pending token."""
        k = min(self.k, self.target.max_seq_len - pos - 1)
        if k < 1:
            return [sample(self.target.decode(torch.tensor([[token]]), pos), opts, rng)]
        greedy = opts.temperature == 0
        proposal, draft_probs = [], []
        cur = token
        for i in range(k):
            logits = self.draft.decode(torch.tensor([[cur]]), pos + i)
            if greedy:
                cur = int(torch.argmax(logits))
            else:
                q = probabilities(logits, opts)
                draft_probs.append(q)
                cur = draw(q, rng)
            proposal.append(cur)
        target_logits = self.target.forward(torch.tensor([[token, *proposal]]), pos)[0]
        self.stats.proposed += k
        out: list[int] = []
        for i, d in enumerate(proposal):
            if greedy:
                t = int(torch.argmax(target_logits[i]))
                if t != d:
                    out.append(t)
                    break
            else:
                p = probabilities(target_logits[i], opts)
                q = draft_probs[i]
                if torch.rand((), generator=rng) * q[d] >= p[d]:  # reject with prob 1 - p/q
                    residual = torch.clamp(p - q, min=0)
                    total = residual.sum()
                    residual = residual / total if total > 0 else p
                    out.append(draw(residual, rng))
                    break
            out.append(d)
            self.stats.accepted += 1
        else:  # every proposal accepted: the target's next token comes free
            out.append(sample(target_logits[k], opts, rng))
            # The draft never fed its last proposal; do it so its cache has no hole.
            self.draft.decode(torch.tensor([[proposal[-1]]]), pos + k)
        self.draft_pos = pos + len(out)
        return out
