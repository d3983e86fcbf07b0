"""Runs a `Transformer` in PyTorch, eagerly or through torch.compile."""

from __future__ import annotations

import torch
from torch import Tensor

from torchchat.model.transformer import Transformer
from torchchat.runtime.base import ModelRuntime


class EagerRuntime(ModelRuntime):
    """An nn.Module Transformer with caches set up; optionally compiled decode and prefill."""

    def __init__(
        self,
        model: Transformer,
        max_seq_len: int,
        *,
        compile: bool = False,
        compile_prefill: bool = False,
    ):
        super().__init__()
        self.model = model.eval()
        self.args = model.args
        self.max_seq_len = max_seq_len
        self.device = str(model.norm.weight.device)
        self.weight_bytes = weight_bytes_per_token(model)
        model.setup_caches(1, max_seq_len)
        self._decode_fn = self._forward_last
        self._prefill_fn = self._forward_last
        if compile:
            # Static shapes for one-token decode: one graph, reused at every position.
            self._decode_fn = torch.compile(self._forward_last, fullgraph=True, dynamic=False)
        if compile_prefill:
            self._prefill_fn = torch.compile(self._forward_last, fullgraph=True, dynamic=True)

    def _positions(self, start_pos: int, n: int) -> Tensor:
        return torch.arange(start_pos, start_pos + n, device=self.device)

    def _forward_last(self, tokens: Tensor, input_pos: Tensor) -> Tensor:
        return self.model(tokens, input_pos)[0, -1]

    @torch.inference_mode()
    def forward(self, tokens: Tensor, start_pos: int) -> Tensor:
        return self.model(tokens.to(self.device), self._positions(start_pos, tokens.shape[1]))

    @torch.inference_mode()
    def prefill(self, tokens: Tensor, start_pos: int) -> Tensor:
        return self._prefill_fn(tokens.to(self.device), self._positions(start_pos, tokens.shape[1]))

    @torch.inference_mode()
    def decode(self, token: Tensor, pos: int) -> Tensor:
        return self._decode_fn(token.to(self.device), self._positions(pos, 1))


def weight_bytes_per_token(model: Transformer) -> int:
    """Bytes of weights one decode step reads: every parameter and weight buffer except the
    embedding table (only one row of it is read), unless the table doubles as the output."""
    emb = model.tok_embeddings
    skip = (
        set()
        if model.output.weight is emb.weight
        else {id(t) for t in (*emb.parameters(), *emb.buffers())}
    )
    skip |= {
        id(t)
        for name, t in model.named_buffers()
        if "kv_cache" in name or name in ("freqs", "causal_mask")
    }
    seen = {id(t): t for t in (*model.parameters(), *model.buffers()) if id(t) not in skip}
    return sum(t.numel() * t.element_size() for t in seen.values())
